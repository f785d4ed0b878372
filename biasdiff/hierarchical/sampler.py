"""Seeded, vectorised sampling of sequences from a tree grammar.

Sequence mu of stream s is drawn from the key fold(data_seed, TREE, s, mu) alone,
so a sequence does not depend on how many others are drawn with it, on the chunk
size or on the device count. Each sequence takes one uniform number per tree node
(heap order: the root, then depth 1, depth 2, ...): the root symbol is
floor(u * q) and every internal node picks its child pair by inverse-CDF over the
q**2 entries of M[parent], level by level.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import rng
from biasdiff.hierarchical.grammar import Grammar

# Incremented whenever the mapping from (seed, stream, index) to sequences
# changes, and stored with every corpus so that stale files are detected.
GENERATOR_VERSION = 1

_DEFAULT_CHUNK = 1 << 18


def sample_sequences(grammar: Grammar,
                     depth: int,
                     num_sequences: int,
                     seed: int,
                     *,
                     stream: int = 0,
                     start: int = 0,
                     chunk_size: int = _DEFAULT_CHUNK) -> np.ndarray:
  """Draw sequences start, ..., start + num_sequences - 1 of a stream.

  Args:
    grammar: the tree grammar.
    depth: tree depth; sequences have length 2**depth.
    num_sequences: how many sequences to draw.
    seed: the data seed.
    stream: an integer naming an independent stream (the corpus uses 0 for the
      training pool and 1 for the held-out pool).
    start: global index of the first sequence within the stream.
    chunk_size: sequences per device call; it bounds memory and does not change
      the output.

  Returns:
    uint8 array [num_sequences, 2**depth] of symbols.
  """
  depth = _check_depth(depth)
  if grammar.num_symbols > 256:
    raise ValueError(f"sample_sequences stores symbols as uint8, so q <= 256; the grammar has "
                     f"q = {grammar.num_symbols}")
  for name, value in (("num_sequences", num_sequences), ("start", start), ("seed", seed),
                      ("stream", stream)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be an integer, got {value!r}")
  if not 0 <= seed < 2**32 or not 0 <= stream < 2**32:
    raise ValueError(f"seed ({seed}) and stream ({stream}) must lie in [0, 2**32)")
  if num_sequences < 0 or start < 0:
    raise ValueError(f"num_sequences ({num_sequences}) and start ({start}) must be >= 0")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if start + num_sequences > np.iinfo(np.uint32).max:
    raise ValueError("sequence indices must stay below 2**32; "
                     f"got start + num_sequences = {start + num_sequences}")
  cdf = _pair_cdf(grammar)
  out = np.empty((num_sequences, 2**depth), dtype=np.uint8)
  for lo in range(0, num_sequences, chunk_size):
    hi = min(lo + chunk_size, num_sequences)
    # Pad the last chunk to a full one so a single compiled program serves all.
    indices = start + lo + np.arange(chunk_size if num_sequences > chunk_size else hi - lo)
    tokens = _sample_chunk(cdf, jnp.asarray(indices, dtype=jnp.uint32), seed, stream, depth)
    out[lo:hi] = np.asarray(tokens)[:hi - lo]
  return out


def _pair_cdf(grammar: Grammar) -> jax.Array:
  """Cumulative distribution over flattened child pairs, float32 [q, q*q].

  Zero-probability pairs repeat the previous cumulative value, so inverse-CDF
  sampling (first entry exceeding u) never selects them. From the last allowed pair
  on, the cumulative value is set to 2, above any u in [0, 1), so float32 rounding
  of the sum can never select a pair past it.
  """
  q = grammar.num_symbols
  probs = grammar.rules.reshape(q, q * q)
  cdf = np.cumsum(probs, axis=1)
  for parent in range(q):
    last = np.flatnonzero(probs[parent] > 0)[-1]
    cdf[parent, last:] = 2.0  # Any u in [0, 1) stops at or before `last`.
  return jnp.asarray(cdf, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("depth",))
def _sample_chunk(cdf, indices, seed, stream, depth):
  q = cdf.shape[0]

  def one_sequence(index):
    key = rng.fold(seed, rng.TREE, stream, index)
    uniforms = jax.random.uniform(key, (2**depth,), dtype=jnp.float32)
    level = jnp.minimum(jnp.floor(uniforms[0] * q), q - 1).astype(jnp.int32)[None]
    for d in range(depth):
      u = uniforms[2**d:2**(d + 1)]  # One draw per node at depth d.
      pair = jnp.sum(cdf[level] <= u[:, None], axis=1)  # [2**d]
      level = jnp.stack([pair // q, pair % q], axis=1).reshape(-1)
    return level.astype(jnp.uint8)

  return jax.vmap(one_sequence)(indices)


def _check_depth(depth) -> int:
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
    raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
  return int(depth)
