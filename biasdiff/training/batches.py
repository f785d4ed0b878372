"""Epoch order and batches of the stacked training sets, built on the host.

An epoch of model m is one pass over its n training rows in the order
permutation(fold(seed_m, EPOCH, e), n). It takes ceil(n / B) steps. The last
batch keeps the remaining rows and is padded to B with a False validity mask,
so every step has the same shape and one compiled program serves throughout.
Global step s is batch s mod S of epoch s div S, with S the steps per epoch.

The data order is therefore a pure function of (seed, step), which is what
makes a resumed run replay exactly the batches of an uninterrupted one.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import rng

# Number of epoch permutations kept in memory (a dispatch can span epochs).
_CACHED_EPOCHS = 4


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Return ceil(n / batch_size), the optimizer steps of one epoch."""
  if n < 1 or batch_size < 1:
    raise ValueError(f"n={n} and batch_size={batch_size} must be >= 1.")
  return math.ceil(n / batch_size)


@functools.partial(jax.jit, static_argnums=(2,))
def _permutations(seeds: jax.Array, epoch: jax.Array, n: int) -> jax.Array:
  # seeds: [M] -> [M, n]
  def one(seed):
    return jax.random.permutation(rng.fold(seed, rng.EPOCH, epoch), n)

  return jax.vmap(one)(seeds)


def epoch_permutations(seeds: Sequence[int], epoch: int, n: int) -> np.ndarray:
  """Return the [M, n] row order of `epoch` for models with training `seeds`.

  Computed on the CPU backend so that every process and every accelerator
  type gets the same order.
  """
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    seeds = jnp.asarray(np.asarray(seeds, np.int32))
    order = _permutations(seeds, jnp.int32(epoch), n)
  return np.asarray(order)


class BatchSource:
  """Batches of stacked per-model training arrays, by global step.

  Args:
    data: [M, n, ...] training rows of each model (tokens or images).
    seeds: the M training seeds.
    batch_size: rows per step and model, B, in [1, n].

  Raises:
    ValueError: on data that is not [M, n, ...] with one seed per model, or a
      batch size outside [1, n].
  """

  def __init__(self, data: np.ndarray, seeds: Sequence[int], batch_size: int):
    data = np.asarray(data)
    if data.ndim < 2:
      raise ValueError(
          f"Training data must have shape [models, n, ...], got {data.shape}.")
    if data.shape[0] != len(seeds):
      raise ValueError(
          f"Training data contains {data.shape[0]} models but {len(seeds)} seeds "
          "were given; pass one training array per model.")
    self.data = data
    self.seeds = np.asarray(seeds, np.int64)
    self.batch_size = int(batch_size)
    self.num_models, self.n = data.shape[:2]
    if self.n < 1:
      raise ValueError(
          f"Training data contains n={self.n} rows per model; give each model "
          "at least one training row.")
    if not 1 <= self.batch_size <= self.n:
      # Every step is padded to B rows, so B > n would only add padding rows.
      raise ValueError(
          f"Invalid train.batch_size={self.batch_size} for n={self.n} training "
          f"rows per model (data.n). Set train.batch_size to a value in [1, "
          f"{self.n}].")
    self.steps_per_epoch = steps_per_epoch(self.n, self.batch_size)
    self._orders: dict[int, np.ndarray] = {}

  def batch_shape(self, num_steps: int) -> tuple[int, ...]:
    """Shape of `num_steps` stacked batches: [K, M, B, ...]."""
    return (num_steps, self.num_models, self.batch_size) + self.data.shape[2:]

  def epoch_order(self, epoch: int) -> np.ndarray:
    """[M, n] row order of `epoch`, cached for the last few epochs."""
    if epoch not in self._orders:
      if len(self._orders) >= _CACHED_EPOCHS:
        del self._orders[min(self._orders)]
      self._orders[epoch] = epoch_permutations(self.seeds, epoch, self.n)
    return self._orders[epoch]

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the row indices [M, B] and validity mask [M, B] of global `step`.

    Padding rows repeat row 0 of the order and are marked invalid.
    """
    epoch, batch = divmod(int(step), self.steps_per_epoch)
    order = self.epoch_order(epoch)
    start = batch * self.batch_size
    stop = min(start + self.batch_size, self.n)
    rows = order[:, start:stop]
    padding = self.batch_size - (stop - start)
    valid = np.zeros((self.num_models, self.batch_size), bool)
    valid[:, :stop - start] = True
    if padding:
      rows = np.concatenate(
          [rows, np.repeat(order[:, :1], padding, axis=1)], axis=1)
    return rows, valid

  def local_batches(self, first_step: int, num_steps: int,
                    box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Build the part `box` of the stacked batches of steps [first, first + K).

    Args:
      first_step: global step of the first batch.
      num_steps: K.
      box: slices of the [K, M, B, ...] global batch that this process holds;
        only the steps, models and rows axes may be restricted.

    Returns:
      x0 [K', M', B', ...] and valid [K', M', B'] inside the box.
    """
    step_slice, model_slice, row_slice = box[:3]
    steps = range(first_step, first_step + num_steps)[step_slice]
    models = np.arange(self.num_models)[model_slice]
    x0, valid = [], []
    for step in steps:
      rows, mask = self.indices(step)
      rows = rows[model_slice, row_slice]
      x0.append(self.data[models[:, None], rows])
      valid.append(mask[model_slice, row_slice])
    return np.stack(x0), np.stack(valid)
