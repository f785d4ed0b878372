"""Build the training task of the hierarchical setting from its config.

The task holds the transformer, the sequence x0 objective, the stacked training
blocks [models, n, L] of the zoo and the data fingerprint that checkpoints
record. The image pipeline builds its own `TrainingTask` and calls
`biasdiff.training.fit` the same way.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from biasdiff import diffusion
from biasdiff import hierarchical
from biasdiff import parallel
from biasdiff.models import Transformer
from biasdiff.training import objectives
from biasdiff.training import state as state_lib
from biasdiff.training.loop import TrainingTask

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
  if config.experiment != "hierarchical":
    raise ValueError(
        f"config.experiment={config.experiment!r}; hierarchical_task needs a "
        "config from configs/hierarchical.py.")
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
