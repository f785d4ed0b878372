"""Counter-based randomness: every draw is a pure function of a seed and integer ids.

A key is built as fold(seed, stream, i_1, i_2, ...) with repeated
`jax.random.fold_in`, so a draw depends only on *what* it is for (the stream and
the ids: step, sample index, model index, ...) and never on batch size, device
layout or the order in which other draws happened. This is what lets two models
of a pair, every checkpoint and any batching share exactly the same sampling
noise while their training noise stays independent.

Stream constants are fixed integers. Changing one changes every result that
uses it, so they are never renumbered.
"""

from typing import Union

import jax
import jax.numpy as jnp

# Data generation.
TREE = 1  # tree sampler: fold(data_seed, TREE, pool, sequence index)
PROXY = 2  # synthetic proxy image r: fold(data_seed, PROXY, r)
# Training.
INIT = 10  # parameter initialisation: fold(train_seed, INIT)
EPOCH = 11  # epoch permutation: fold(train_seed, EPOCH, epoch)
NOISE = 12  # per-sample t and noise: fold(train_seed, NOISE, step, sample)
DROPOUT = 13  # dropout: fold(train_seed, DROPOUT, step)
# Sampling (shared across the models of a pair).
SAMPLE_INIT = 20  # start noise x_T[k]: fold(sample_seed, SAMPLE_INIT, k)
SAMPLE_STEP = 21  # step noise z_t[k]: fold(sample_seed, SAMPLE_STEP, t, k)
# Analyses.
PROBE = 30  # fixed probe noise and probe times
START = 31  # U-turn start noise
SUBSET = 32  # seeded subsets (e.g. the empirical denoiser's reference set)

KeyLike = Union[int, jax.Array]


def as_key(seed: KeyLike) -> jax.Array:
  """Return a typed PRNG key for an integer seed; pass typed keys through."""
  if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
    return seed
  return jax.random.key(seed)


def fold(seed: KeyLike, *ids) -> jax.Array:
  """Fold the integer ids, in order, into the key of `seed`.

  Ids may be Python ints or traced integer scalars, so this works inside jit
  and vmap (for example with a per-sample index array under vmap).
  """
  key = as_key(seed)
  for i in ids:
    key = jax.random.fold_in(key, i)
  return key


def use_unrolled_threefry_on_cpu() -> bool:
  """Lower threefry on CPU as straight-line code instead of a loop over its rounds.

  jax 0.10.2 lowers the threefry2x32 primitive on CPU to a rolled loop, which
  compiles faster, and on other backends to the unrolled rounds. Both compute
  the same bits. In the rolled form XLA:CPU copies the loop's carries at every
  round, and a 500-step exact-BP sampler run of 1,000 sequences took 3.4 s
  against 1.5 s unrolled, side by side on 2 cores, with identical output.
  The entry points in experiments/ and the benchmarks call this once at start.

  NOTE: this re-registers the CPU lowering through JAX internals
  (jax._src.random.threefry2x32). When they are missing, as in a JAX version
  that moved them, it changes nothing and returns False.
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32 as threefry  # pylint: disable=g-import-not-at-top
    primitive = threefry.threefry2x32_p
    rule = threefry._threefry2x32_lowering_rule  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False
  mlir.register_lowering(primitive, rule, platform="cpu")
  return True
