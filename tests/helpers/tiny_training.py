"""Tiny models, data and configs for training-engine tests.

The network has the interface of the project's denoisers (x_t, t, train,
dropout rng) with a few hundred parameters, so tests run in seconds.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

import configs
from biasdiff import diffusion
from biasdiff.training import objectives
from biasdiff.training import state as state_lib
from biasdiff.training.loop import TrainingTask

NUM_SYMBOLS = 4
LENGTH = 8
NUM_STEPS = 50  # diffusion steps of the tiny sequence schedule


class TinyDenoiser(nn.Module):
  """Per-position MLP with a time feature and dropout; output shape = input shape."""

  features: int = 8
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x_t, t, train: bool):
    # x_t: [batch, ..., channels]; t: [batch] int
    frequencies = jnp.arange(1, 4, dtype=jnp.float32)
    time = jnp.sin(t.astype(jnp.float32)[:, None] * frequencies / NUM_STEPS)
    time = nn.Dense(self.features)(time)
    time = time.reshape(time.shape[:1] + (1,) * (x_t.ndim - 2) + time.shape[1:])
    h = nn.gelu(nn.Dense(self.features)(x_t) + time)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(x_t.shape[-1])(h)


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
  """A locked config with the train, checkpoint and parallel sections."""
  config = ml_collections.ConfigDict()
  config.experiment = "tiny"
  config.train = configs.train_section()
  config.checkpoint = configs.checkpoint_section()
  config.parallel = configs.parallel_section()
  config.train.batch_size = 4
  config.train.num_epochs = 3
  config.train.learning_rate = 3e-2
  config.train.lr_schedule = "constant"
  config.train.ema_decay = 0.9
  config.train.log_every_steps = 1
  config.checkpoint.grid = "none"
  config.checkpoint.rolling_every_minutes = 0.0
  for name, value in train_overrides.items():
    setattr(config.train, name, value)
  config.lock()
  return config


def tiny_models(num_models: int = 2) -> list:
  """Models (block m, replicate 0) with seeds 100 + m."""
  return [state_lib.ModelSpec(block=m, replicate=0, seed=100 + m, init_seed=100 + m)
          for m in range(num_models)]


def sequence_data(num_models: int = 2, n: int = 10, seed: int = 0) -> np.ndarray:
  """uint8 [num_models, n, LENGTH] random tokens."""
  generator = np.random.default_rng(seed)
  return generator.integers(0, NUM_SYMBOLS, (num_models, n, LENGTH), dtype=np.uint8)


# Fast XLA compiles on CPU; every run a test compares uses the same options.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.cache
def sequence_objective() -> objectives.SequenceX0Objective:
  """One shared objective, so that repeated fits reuse their compiled step."""
  return objectives.SequenceX0Objective(diffusion.sequence_schedule(NUM_STEPS), NUM_SYMBOLS)


@functools.cache
def image_objective() -> objectives.ImageEpsObjective:
  return objectives.ImageEpsObjective(diffusion.ddpm_schedule(100), t_min=1)


def sequence_task(models=None, data=None) -> TrainingTask:
  models = tiny_models() if models is None else models
  data = sequence_data(len(models)) if data is None else data
  return TrainingTask(
      model=TinyDenoiser(),
      objective=sequence_objective(),
      train_data=data,
      models=models,
      fingerprint={"n": int(data.shape[1]), "blocks": [m.block for m in models]},
      example_input=(np.zeros((1, LENGTH, NUM_SYMBOLS), np.float32), np.ones((1,), np.int32)))


def image_task(data: np.ndarray, models=None) -> TrainingTask:
  """A task of float images [models, n, H, W, 1] with the DDPM eps objective."""
  models = tiny_models(data.shape[0]) if models is None else models
  return TrainingTask(
      model=TinyDenoiser(),
      objective=image_objective(),
      train_data=data,
      models=models,
      fingerprint={"n": int(data.shape[1])},
      example_input=(np.zeros((1,) + data.shape[2:], np.float32), np.zeros((1,), np.int32)))


def shrunken_smoke_config() -> ml_collections.ConfigDict:
  """Return the hierarchical smoke config shrunk so that it trains in seconds."""
  from configs import hierarchical  # pylint: disable=g-import-not-at-top
  config = hierarchical.get_config("smoke")
  config.data.train_pool_size = 128
  config.data.heldout_size = 16
  config.data.n = 32
  config.model.d_model = 16
  config.model.num_layers = 1
  config.model.ffn_dim = 32
  config.train.batch_size = 16
  config.train.num_epochs = 2
  config.train.steps_per_dispatch = 2
  config.checkpoint.grid_min_epoch = 1
  config.checkpoint.grid_size = 2
  config.checkpoint.rolling_every_steps = 0
  return config
