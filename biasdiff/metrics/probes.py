"""Fixed probe randomness and batched evaluation shared by the sequence and image measures.

Every random input of a measure is a pure function of integer ids, so the same
inputs are rebuilt, not stored, at every checkpoint and for every model:

- probe noise of input (set, index) at time t, repetition r:
  fold(seed, PROBE, set, index, t, r);
- a per-input random time (loss probes with one t per sequence):
  fold(seed, PROBE, set, index, TIME_DRAW, r), where TIME_DRAW is a value that
  no diffusion time takes;
- U-turn start noise: fold(seed, START, t0, r, set, index);
- seeded subsets, uniform random sequences and bootstrap resamples:
  fold(seed, SUBSET, purpose, a, b) with the purpose constants below.

Keys of one stream always have the same number of folds, so no key is both a
leaf that draws numbers and the parent of another key.

`set` is an integer naming an input set. The convention used by the analyses
is HELDOUT_SET = 0 for the held-out pool and `training_set_id(b)` = 1 + b for
training block b; `index` is the row within that set.
"""

from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from biasdiff import rng

HELDOUT_SET = 0
# Uniformly random sequences (the far-from-data U-turns) get their own set id,
# so their noise never coincides with a held-out or training input.
RANDOM_SET = 2**20

# A value in the time slot of a probe key that no diffusion time takes.
TIME_DRAW = 2**31 - 1

# Purposes of the SUBSET stream: fold(seed, SUBSET, purpose, a, b).
SUBSET_REFERENCES = 0  # empirical-denoiser reference set: a = block, b = 0
SUBSET_RANDOM_TOKENS = 1  # uniform random sequences: a = set id, b = index
SUBSET_BOOTSTRAP = 2  # bootstrap resamples: a, b given by the caller


def training_set_id(block: int) -> int:
  """Return the set id of training block `block` (1 + block), distinct from HELDOUT_SET."""
  block = check_nonnegative_int(block, "block")
  return 1 + block


def time_at_fraction(fraction: float, num_steps: int) -> int:
  """Return floor(fraction * T), computed on the decimal value of `fraction`.

  0.15 and 0.085 are not exact binary floats, so floor(0.085 * 500) in floating
  point could land one step low. Fraction(str(x)) uses the printed decimal.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
  return int(Fraction(str(fraction)) * int(num_steps))


def probe_noise(seed: rng.KeyLike, set_id: Any, indices: jax.Array, t: Any,
                repetition: Any, event_shape: Sequence[int]) -> jax.Array:
  """Draw standard normal noise [N, *event_shape] from fold(seed, PROBE, set, index, t, r).

  indices is [N]; t and repetition are scalars or [N] arrays. Works under jit
  and vmap.
  """
  indices = jnp.asarray(indices)
  t = jnp.broadcast_to(jnp.asarray(t), indices.shape)
  repetition = jnp.broadcast_to(jnp.asarray(repetition), indices.shape)
  key = rng.as_key(seed)
  event_shape = tuple(int(n) for n in event_shape)

  def draw(index, time, rep):
    return jax.random.normal(rng.fold(key, rng.PROBE, set_id, index, time, rep), event_shape,
                             jnp.float32)

  return jax.vmap(draw)(indices, t, repetition)


def probe_times(seed: rng.KeyLike, set_id: Any, indices: jax.Array, first_t: int, last_t: int,
                repetition: Any = 0) -> jax.Array:
  """Draw one uniform time per input, int32 [N] in first_t ... last_t.

  The time of input `index` comes from fold(seed, PROBE, set, index, TIME_DRAW, r).
  """
  indices = jnp.asarray(indices)
  repetition = jnp.broadcast_to(jnp.asarray(repetition), indices.shape)
  key = rng.as_key(seed)

  def draw(index, rep):
    return jax.random.randint(rng.fold(key, rng.PROBE, set_id, index, TIME_DRAW, rep), (),
                              first_t, last_t + 1, jnp.int32)

  return jax.vmap(draw)(indices, repetition)


def start_noise(seed: rng.KeyLike, t0: Any, repetition: Any, set_id: Any, indices: jax.Array,
                event_shape: Sequence[int]) -> jax.Array:
  """Draw U-turn start noise [N, *event_shape] from fold(seed, START, t0, r, set, index).

  The key has no checkpoint or model id, so every checkpoint and every
  denoiser starts from the same noisy inputs.
  """
  indices = jnp.asarray(indices)
  key = rng.as_key(seed)
  event_shape = tuple(int(n) for n in event_shape)

  def draw(index):
    return jax.random.normal(rng.fold(key, rng.START, t0, repetition, set_id, index), event_shape,
                             jnp.float32)

  return jax.vmap(draw)(indices)


def subset_key(seed: rng.KeyLike, purpose: int, a: Any = 0, b: Any = 0) -> jax.Array:
  """Return the key fold(seed, SUBSET, purpose, a, b)."""
  return rng.fold(seed, rng.SUBSET, purpose, a, b)


def map_in_batches(fn: Callable[[Any], Any], inputs: Any, batch_size: int, out_axis: int) -> Any:
  """Apply `fn` to consecutive batches of `inputs` and join the results.

  Traceable, so it runs inside jit as one `lax.map` over batches. inputs is a
  pytree of arrays that share their leading size N. The last batch is padded
  by repeating the final row, which keeps every input valid, and the padding is
  dropped from the outputs. fn returns a pytree whose leaves all carry the
  batch axis at position out_axis (negative values count from the end), so a
  model stack may add leading axes; the joined leaves carry N there.
  """
  leaves = jax.tree_util.tree_leaves(inputs)
  if not leaves:
    raise ValueError("map_in_batches needs at least one input array.")
  num_inputs = leaves[0].shape[0]
  for leaf in leaves:
    if leaf.shape[0] != num_inputs:
      raise ValueError(
          f"All inputs must share their leading size; got {leaf.shape[0]} and {num_inputs}.")
  if num_inputs == 0:
    raise ValueError("map_in_batches got empty inputs; pass at least one row.")
  batch_size = max(1, min(int(batch_size), num_inputs))
  num_batches = -(-num_inputs // batch_size)
  padding = num_batches * batch_size - num_inputs

  def to_batches(x):
    if padding:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], padding, axis=0)], axis=0)
    return x.reshape((num_batches, batch_size) + x.shape[1:])

  outputs = lax.map(fn, jax.tree_util.tree_map(to_batches, inputs))

  def join(y):
    # y: [num_batches, ..., batch, ...] with the batch axis at out_axis of one output.
    axis = out_axis % (y.ndim - 1)
    y = jnp.moveaxis(y, 0, axis)
    y = y.reshape(y.shape[:axis] + (num_batches * batch_size,) + y.shape[axis + 2:])
    return lax.slice_in_dim(y, 0, num_inputs, axis=axis)

  return jax.tree_util.tree_map(join, outputs)


# ---------------------------------------------------------------------------
# Host-side input checks.


def is_concrete(x: Any) -> bool:
  """Return whether x has values that the host can inspect (it is not a tracer)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(x: Any, name: str) -> None:
  """Raise ValueError if a concrete float array contains NaN or infinity."""
  if not is_concrete(x):
    return
  array = np.asarray(x)
  if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
    raise ValueError(
        f"{name} contains {int(np.sum(~np.isfinite(array)))} NaN or infinite values; "
        "clean the inputs before measuring.")


def check_log_probabilities(x: Any, name: str) -> None:
  """Raise ValueError if concrete log-probabilities contain NaN or +infinity.

  -infinity is allowed: it is the log of a zero probability.
  """
  if not is_concrete(x):
    return
  array = np.asarray(x)
  bad = np.isnan(array) | (array == np.inf)
  if np.any(bad):
    raise ValueError(
        f"{name} contains {int(bad.sum())} NaN or +inf values; log-probabilities must be "
        "finite or -inf.")


def check_tokens(tokens: Any, num_symbols: int, name: str = "tokens") -> np.ndarray:
  """Return tokens [N, L] as int32 numpy, raising on a bad shape, dtype or value."""
  array = np.asarray(tokens)
  if not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"{name} must be integer tokens, got dtype {array.dtype}; cast to int32.")
  if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"{name} must have shape [N, L] with N, L >= 1, got {array.shape}.")
  if array.min() < 0 or array.max() >= num_symbols:
    raise ValueError(
        f"{name} contains symbols in [{array.min()}, {array.max()}], outside "
        f"[0, {num_symbols}); check num_symbols or the tokens.")
  return array.astype(np.int32)


def check_indices(indices: Any, num: int, name: str = "indices") -> np.ndarray:
  """Return per-row set indices [num] as int64 numpy; None means 0 ... num - 1."""
  if indices is None:
    return np.arange(num, dtype=np.int64)
  array = np.asarray(indices)
  if not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"{name} must be integers, got dtype {array.dtype}.")
  if array.shape != (num,):
    raise ValueError(f"{name} must have shape ({num},), one per row, got {array.shape}.")
  if num and (array.min() < 0 or array.max() >= 2**31):
    raise ValueError(f"{name} must lie in [0, 2**31), got [{array.min()}, {array.max()}].")
  return array.astype(np.int64)


def check_positive_int(value: Any, name: str) -> int:
  """Return value as an int, raising ValueError unless it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def check_nonnegative_int(value: Any, name: str) -> int:
  """Return value as an int, raising ValueError unless it is an integer >= 0."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
  return int(value)


def check_time(schedule: Any, t: Any, name: str = "t") -> int:
  """Return t as an int, raising ValueError unless it is a time of the schedule."""
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
    raise ValueError(f"{name} must be an integer diffusion time, got {t!r}.")
  if not schedule.first_t <= t <= schedule.last_t:
    raise ValueError(
        f"{name}={t} is outside the schedule's times {schedule.first_t} ... {schedule.last_t}.")
  return int(t)
