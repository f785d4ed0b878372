"""Learning-rate schedules, evaluated on the host and fed to the step as inputs.

The step receives one learning rate per optimizer step, so a schedule defined
per epoch is applied exactly: every step of epoch e uses lr(e), whatever the
number of steps per dispatch.
"""

import math
from typing import Callable

import numpy as np

# Schedule names accepted in `config.train.lr_schedule`.
PAPER_EPOCH = "paper_epoch"
WARMUP_COSINE = "warmup_cosine"
CONSTANT = "constant"
SCHEDULES = (PAPER_EPOCH, WARMUP_COSINE, CONSTANT)

# Length of the linear phase of the per-epoch schedule, in epochs.
PAPER_LINEAR_EPOCHS = 50


def paper_epoch_factor(epoch: np.ndarray, num_epochs: int) -> np.ndarray:
  """Return the per-epoch multiplier lambda(e) of the base learning rate.

  For the 0-based epoch e and N = num_epochs:

    lambda(e) = 1 - 0.5 e / 50                             for e <= 50,
    lambda(e) = 0.1 + 0.2 (1 + cos(pi (e - 50) / (N - 50))) for e > 50,

  a linear decay from 1 to 0.5 over 50 epochs, then a cosine from 0.5 to 0.1
  reached at e = N. Epochs past N keep lambda(N) = 0.1.
  """
  if num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1.")
  e = np.minimum(np.asarray(epoch, dtype=np.float64), num_epochs)
  linear = 1.0 - 0.5 * e / PAPER_LINEAR_EPOCHS
  cosine_length = max(num_epochs - PAPER_LINEAR_EPOCHS, 1)
  phase = np.clip((e - PAPER_LINEAR_EPOCHS) / cosine_length, 0.0, 1.0)
  cosine = 0.1 + 0.2 * (1.0 + np.cos(math.pi * phase))
  return np.where(e <= PAPER_LINEAR_EPOCHS, linear, cosine)


def warmup_cosine_factor(step: np.ndarray, warmup_steps: int, decay_steps: int,
                         final_fraction: float = 0.0) -> np.ndarray:
  """Return the multiplier of a linear warm-up followed by a cosine decay.

  For the 0-based step s, W = warmup_steps, D = decay_steps (counted from step
  0, warm-up included) and f = final_fraction:

    factor(s) = (s + 1) / W                                   for s < W,
    factor(s) = f + (1 - f) (1 + cos(pi (s - W) / (D - W))) / 2 for W <= s < D,
    factor(s) = f                                             for s >= D.

  The warm-up starts at 1/W rather than 0 so that the first step trains.
  """
  if warmup_steps < 0 or decay_steps <= warmup_steps:
    raise ValueError(
        f"Invalid warm-up and cosine lengths: need 0 <= warmup_steps "
        f"({warmup_steps}) < decay_steps ({decay_steps}); set "
        "train.decay_steps above train.warmup_steps.")
  s = np.asarray(step, dtype=np.float64)
  warm = (s + 1.0) / max(warmup_steps, 1)
  phase = np.clip((s - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
  cosine = final_fraction + (1.0 - final_fraction) * 0.5 * (
      1.0 + np.cos(math.pi * phase))
  return np.where(s < warmup_steps, warm, cosine)


def check_schedule_config(train_config) -> None:
  """Raise ValueError naming the first schedule field of `train_config` out of range.

  Checks train.learning_rate, train.lr_schedule and, for warmup_cosine,
  train.warmup_steps, train.decay_steps and train.lr_final_fraction.
  """
  base = train_config.learning_rate
  if not (math.isfinite(base) and base > 0):
    raise ValueError(
        f"Invalid train.learning_rate={base!r}. Set train.learning_rate to a "
        "finite value > 0.")
  name = train_config.lr_schedule
  if name not in SCHEDULES:
    raise ValueError(
        f"Invalid train.lr_schedule={name!r}. Set train.lr_schedule to one of "
        f"{SCHEDULES}.")
  if name != WARMUP_COSINE:
    return
  warmup = train_config.warmup_steps
  decay = train_config.decay_steps
  final = train_config.lr_final_fraction
  if warmup < 0:
    raise ValueError(
        f"Invalid train.warmup_steps={warmup!r}. Set train.warmup_steps to a "
        "value >= 0.")
  if decay <= warmup:
    raise ValueError(
        f"Invalid train.decay_steps={decay!r} with train.warmup_steps={warmup!r}. "
        "Set train.decay_steps above train.warmup_steps, because it counts the "
        "warm-up steps too.")
  if not 0.0 <= final <= 1.0:
    raise ValueError(
        f"Invalid train.lr_final_fraction={final!r}. Set "
        "train.lr_final_fraction to a value in [0, 1].")


def make_learning_rate_fn(train_config,
                          steps_per_epoch: int) -> Callable[[np.ndarray], np.ndarray]:
  """Return a map from 0-based optimizer steps to float32 learning rates.

  Args:
    train_config: the `train` section of a config, with fields
      `learning_rate`, `lr_schedule`, `num_epochs`, `warmup_steps`,
      `decay_steps` and `lr_final_fraction`.
    steps_per_epoch: optimizer steps per epoch.

  Raises:
    ValueError: if a schedule field is out of range (see `check_schedule_config`).
  """
  check_schedule_config(train_config)
  name = train_config.lr_schedule
  base = float(train_config.learning_rate)
  if name == PAPER_EPOCH:
    num_epochs = int(train_config.num_epochs)
    factor = lambda steps: paper_epoch_factor(steps // steps_per_epoch,
                                              num_epochs)
  elif name == WARMUP_COSINE:
    warmup = int(train_config.warmup_steps)
    decay = int(train_config.decay_steps)
    final = float(train_config.lr_final_fraction)
    factor = lambda steps: warmup_cosine_factor(steps, warmup, decay, final)
  else:  # CONSTANT, the only name that check_schedule_config leaves
    factor = lambda steps: np.ones(np.shape(steps))

  def learning_rate(steps: np.ndarray) -> np.ndarray:
    steps = np.asarray(steps, dtype=np.int64)
    return (base * factor(steps)).astype(np.float32)

  return learning_rate
