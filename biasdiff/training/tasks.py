"""Build the training task of the hierarchical setting from its config.

The task holds the transformer, the sequence x0 objective, the stacked training
blocks [models, n, L] of the zoo and the data fingerprint that checkpoints
record. The image pipeline builds its own `TrainingTask` and calls
`biasdiff.training.fit` the same way.
"""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from biasdiff import diffusion
from biasdiff import hierarchical
from biasdiff import parallel
from biasdiff.models import Transformer
from biasdiff.training import loop
from biasdiff.training import objectives
from biasdiff.training import state as state_lib
from biasdiff.training.loop import TrainingTask
from biasdiff.training.loop import require_field

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_config(config) -> None:
  """Check a configs/hierarchical.py config against its documented ranges.

  Covers the sections that `loop.check_config` checks plus seed, data,
  diffusion, model and zoo, so a bad value fails before the corpus is built.

  Raises:
    ValueError: naming the first field out of range, its value and the range.
  """
  loop.check_config(config)
  models = zoo(config)  # checks seed and data.n

  data = config.data
  require_field(data.num_symbols >= 2, "data.num_symbols", data.num_symbols,
                "a value >= 2")
  require_field(1 <= data.num_allowed <= data.num_symbols, "data.num_allowed",
                data.num_allowed, f"a value in [1, data.num_symbols={data.num_symbols}]")
  require_field(math.isfinite(data.sigma) and data.sigma >= 0, "data.sigma",
                data.sigma, "a finite value >= 0")
  require_field(data.depth >= 1, "data.depth", data.depth, "a value >= 1")
  require_field(config.train.batch_size <= data.n, "train.batch_size",
                config.train.batch_size,
                f"a value <= data.n={data.n}, because every step is padded to "
                "train.batch_size rows")
  require_field(data.heldout_size >= 1, "data.heldout_size", data.heldout_size,
                "a value >= 1")
  pool_rows = (max(m.block for m in models) + 1) * data.n
  require_field(data.train_pool_size >= pool_rows, "data.train_pool_size",
                data.train_pool_size,
                f"a value >= (max block + 1) * data.n = {pool_rows}, or train fewer "
                "blocks or a smaller data.n")

  require_field(config.diffusion.num_steps >= 1, "diffusion.num_steps",
                config.diffusion.num_steps, "a value >= 1")

  model = config.model
  require_field(model.num_heads >= 1 and model.d_model % model.num_heads == 0,
                "model.num_heads", model.num_heads,
                f"a divisor of model.d_model={model.d_model}")
  require_field(model.num_layers >= 1, "model.num_layers", model.num_layers,
                "a value >= 1")
  require_field(model.ffn_dim >= 1, "model.ffn_dim", model.ffn_dim, "a value >= 1")
  require_field(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout,
                "a value in [0, 1)")
  require_field(model.dtype in _DTYPES, "model.dtype", model.dtype,
                f"one of {sorted(_DTYPES)}")


def corpus_directory(config, workdir: str) -> str:
  """Return config.data.corpus_dir, or <workdir>/corpus when it is empty."""
  return config.data.corpus_dir or os.path.join(workdir, "corpus")


def load_corpus(config, workdir: str) -> hierarchical.Corpus:
  """Load the corpus of config.data, building it once if it does not exist.

  Process 0 builds and stores the corpus while the other processes wait. They
  then read it, or regenerate it in memory (bit for bit the same) when they do
  not share process 0's file system.
  """
  data = config.data
  grammar = hierarchical.make_grammar(data.num_symbols, data.num_allowed,
                                      data.sigma, data.grammar_seed)
  directory = corpus_directory(config, workdir)
  arguments = (grammar, data.depth, data.train_pool_size, data.heldout_size,
               data.data_seed)
  if parallel.is_main_process():
    corpus = hierarchical.load_or_build_corpus(directory, *arguments)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("biasdiff corpus ready")
  if not parallel.is_main_process():
    if os.path.exists(os.path.join(directory, "metadata.json")):
      corpus = hierarchical.load_or_build_corpus(directory, *arguments)
    else:
      logger.info("No shared corpus at %s; regenerating it in memory.",
                   directory)
      corpus = hierarchical.build_corpus(*arguments)
  return corpus


def zoo(config) -> list[state_lib.ModelSpec]:
  """Return the model list of config.zoo at n = config.data.n."""
  # derive_train_seed checks these too, but under its own argument names.
  require_field(isinstance(config.seed, int) and config.seed >= 0, "seed",
                config.seed, "an int >= 0")
  require_field(config.data.n >= 1, "data.n", config.data.n, "a value >= 1")
  return state_lib.zoo_models(
      n=config.data.n,
      blocks=config.zoo.blocks,
      replicates=config.zoo.replicates,
      extra_models=config.zoo.extra_models,
      base_seed=config.seed,
      share_init_across_blocks=config.zoo.share_init_across_blocks)


def transformer(config) -> Transformer:
  """Return the transformer of config.model for sequences of config.data."""
  model = config.model
  if model.dtype not in _DTYPES:
    raise ValueError(
        f"model.dtype={model.dtype!r} is not supported; use one of "
        f"{sorted(_DTYPES)}.")
  return Transformer(
      num_symbols=config.data.num_symbols,
      length=2**config.data.depth,
      d_model=model.d_model,
      num_layers=model.num_layers,
      num_heads=model.num_heads,
      ffn_dim=model.ffn_dim,
      dropout_rate=model.dropout,
      tie_initial_layers=model.tie_initial_layers,
      dtype=_DTYPES[model.dtype])


def hierarchical_task(config, workdir: str) -> TrainingTask:
  """Return the task of training config.zoo on blocks of the tree corpus."""
  experiment = config.get("experiment")
  if experiment != "hierarchical":
    raise ValueError(
        f"config.experiment={experiment!r}; hierarchical_task (experiments/train.py) needs a "
        "config from configs/hierarchical.py, for example --config=configs/hierarchical.py:quick.")
  check_config(config)
  corpus = load_corpus(config, workdir)
  models = zoo(config)
  n = config.data.n
  train_data = np.stack([corpus.training_block(m.block, n) for m in models])
  length = 2**config.data.depth
  fingerprint = {
      "n": n,
      "blocks": [m.block for m in models],
      "corpus": corpus.fingerprint,
  }
  schedule = diffusion.sequence_schedule(config.diffusion.num_steps)
  return TrainingTask(
      model=transformer(config),
      objective=objectives.SequenceX0Objective(schedule, config.data.num_symbols),
      train_data=train_data,
      models=models,
      fingerprint=fingerprint,
      example_input=(np.zeros((1, length, config.data.num_symbols), np.float32),
                     np.ones((1,), np.int32)))
