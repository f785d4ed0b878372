"""Exact k-nearest-neighbour search, tiled so memory does not grow with the data.

`nearest_neighbors` finds, for every query, the k closest references under one
of three metrics:

- ``"hamming"``: for integer sequences x, y of length L over an alphabet of
  size q, Hamming(x, y) = L - <onehot(x), onehot(y)>, where onehot maps a
  sequence to its flattened L*q indicator vector. On accelerators the inner
  product is a bf16 matrix product with fp32 accumulation, which is exact
  because the entries are 0/1 and the sums are at most L. On CPU, when
  L*q <= 256, it is popcount(a & b) on the same indicator vectors packed into
  32-bit words: the identical integer, computed with bit operations.
- ``"sqeuclidean"``: ||x - y||^2 for float vectors (trailing axes are
  flattened, so images work as they are).
- ``"cosine"``: 1 - Pearson correlation. Each vector is standardised by its own
  mean and standard deviation (ddof 1, plus 1e-12) and L2-normalised to z, and
  the distance is 1 - <z_x, z_y>.

The search is deterministic and exact (for the float metrics, within the
candidate margin described under `extra_candidates`). Results are sorted by
ascending distance, and ties are broken by the lower reference index.

Memory: queries are processed in tiles of `query_tile` rows and references in
tiles of `reference_tile` rows, with a running top-k per query carried across
reference tiles. Apart from the inputs and outputs, peak memory depends only on
the tile sizes and the feature size, never on the number of references, so the
full queries x references distance matrix is never formed. A ragged last tile
is processed at its own (smaller) static size, so no row is dropped or padded.

Float metrics first rank with the norm expansion ||x||^2 + ||y||^2 - 2<x, y>
(after centring both sets by the reference mean) and keep k + extra_candidates
candidates, then recompute those candidates exactly and re-sort. The expansion
alone cancels catastrophically for near-duplicates, which are exactly the
memorised samples this search is used to find.

Queries sharded on their first axis with a `NamedSharding` are searched with
`jax.shard_map`: each device searches its own queries against a replicated copy
of the references, and the outputs keep the query sharding.
"""

import functools
import math
from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

METRICS = ("hamming", "sqeuclidean", "cosine")
HAMMING_METHODS = ("auto", "matmul", "bits")

# Default (query_tile, reference_tile) per (metric family, hamming method,
# platform). The CPU values were chosen by timing on a 2-core AMD EPYC
# (jax 0.10.2) shared with other jobs. The popcount path needs a moderate
# reference tile, because XLA:CPU then keeps the column-wise minimum
# vectorised. With the float tiles, a plain matrix product of the same
# 8192 x 16384 x 1024 size took about 89% of the search's CPU time.
# NOTE: the accelerator values are larger guesses, not yet measured.
_DEFAULT_TILES = {
    ("hamming", "bits", "cpu"): (512, 4096),
    ("hamming", "matmul", "cpu"): (1024, 2048),
    ("float", None, "cpu"): (1024, 2048),
    ("hamming", "bits", "accelerator"): (4096, 8192),
    ("hamming", "matmul", "accelerator"): (4096, 16384),
    ("float", None, "accelerator"): (2048, 8192),
}
# The bits path packs at most this many 32-bit words per sequence (L*q <= 256);
# longer indicator vectors are cheaper as a matrix product.
_MAX_BIT_WORDS = 8
_UINT32_MAX = np.uint32(0xFFFFFFFF)


def nearest_neighbors(
    queries: Any,
    references: Any,
    metric: str,
    k: int = 1,
    *,
    num_classes: Optional[int] = None,
    query_tile: Optional[int] = None,
    reference_tile: Optional[int] = None,
    extra_candidates: int = 8,
    hamming_method: str = "auto",
    check_finite: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Find the k nearest references of every query.

  Inside a caller's `jax.jit` the values are unknown, so the finiteness and
  token-range checks are skipped and the query sharding is not inspected.
  Shape, k and argument checks still run.

  Args:
    queries: [Q, L] integer tokens for "hamming", or [Q, ...] real values for
      "sqeuclidean" and "cosine" (trailing axes are flattened to D features).
    references: [R, L] or [R, ...] with the same trailing shape as `queries`.
    metric: "hamming", "sqeuclidean" or "cosine" (see the module docstring for
      the formulas).
    k: number of neighbours, 1 <= k <= R.
    num_classes: alphabet size q for "hamming"; tokens must lie in [0, q).
    query_tile: queries per tile; None picks a default for the metric and
      platform.
    reference_tile: references per tile; None picks a default likewise.
    extra_candidates: float metrics keep k + extra_candidates approximate
      candidates per query before the exact recomputation. The result is exact
      unless more than that many references lie within fp32 rounding of the
      k-th distance.
    hamming_method: "matmul" (bf16 one-hot matrix product, fp32 accumulation),
      "bits" (popcount of packed one-hot words), or "auto", which picks "bits"
      on CPU when L*q <= 256 and "matmul" otherwise.
    check_finite: check float inputs for NaN and infinity before the search.
      The check is one pass over the data; pass False to skip it, in which
      case results for non-finite inputs are undefined.

  Returns:
    (distances, indices), both [Q, k]. Distances are int32 for "hamming" and
    float32 otherwise, sorted ascending; indices are int32 rows of
    `references`, and equal distances are ordered by lower index. For
    "cosine" the exactly recomputed distance is ||z_x - z_y||^2 / 2, which
    equals 1 - <z_x, z_y> for unit vectors and is 0 for identical inputs. A
    constant vector has z = 0 and distance 1 to every vector but its copies.

  Raises:
    ValueError: unknown metric or method, mismatched shapes, k out of range,
      invalid tile sizes, non-finite values, hamming without `num_classes` or
      with tokens outside [0, num_classes).
    TypeError: float tokens for "hamming", or non-numeric inputs.
  """
  if metric not in METRICS:
    raise ValueError(
        f"Unknown metric {metric!r}; expected one of {', '.join(METRICS)}.")
  if hamming_method not in HAMMING_METHODS:
    raise ValueError(
        f"Unknown hamming_method {hamming_method!r}; expected one of "
        f"{', '.join(HAMMING_METHODS)}.")
  queries = _as_array(queries, "queries")
  references = _as_array(references, "references")
  num_queries, num_references = _validate_shapes(queries, references, metric)
  k = _validate_k(k, num_references)
  if not isinstance(extra_candidates, (int, np.integer)) or extra_candidates < 0:
    raise ValueError(
        f"extra_candidates must be a non-negative integer, got "
        f"{extra_candidates!r}.")

  platform = _platform_of(queries)
  device_class = "cpu" if platform == "cpu" else "accelerator"
  if metric == "hamming":
    num_classes = _validate_tokens(queries, references, num_classes)
    length = queries.shape[1]
    method = hamming_method
    if method == "auto":
      words = math.ceil(length * num_classes / 32)
      use_bits = platform == "cpu" and words <= _MAX_BIT_WORDS
      method = "bits" if use_bits else "matmul"
    default_tiles = _DEFAULT_TILES[("hamming", method, device_class)]
  else:
    if check_finite:
      _check_finite(queries, "queries")
      _check_finite(references, "references")
    method = None
    default_tiles = _DEFAULT_TILES[("float", None, device_class)]

  query_tile = _validate_tile(query_tile, default_tiles[0], "query_tile")
  reference_tile = _validate_tile(
      reference_tile, default_tiles[1], "reference_tile")

  if num_queries == 0:
    distance_dtype = jnp.int32 if metric == "hamming" else jnp.float32
    return jnp.zeros((0, k), distance_dtype), jnp.zeros((0, k), jnp.int32)

  mesh, query_axes = _query_sharding(queries)
  return _search(
      queries,
      references,
      metric=metric,
      k=k,
      num_classes=num_classes,
      query_tile=query_tile,
      reference_tile=reference_tile,
      extra_candidates=int(extra_candidates),
      hamming_method=method,
      mesh=mesh,
      query_axes=query_axes,
  )


# ----------------------------------------------------------------------------
# Input validation (host side, before dispatch).


def _as_array(x: Any, name: str) -> Any:
  """Return `x` as a jax.Array or numpy array, rejecting non-numeric data."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.integer)
          or jnp.issubdtype(x.dtype, jnp.floating)
          or x.dtype == np.bool_):
    raise TypeError(
        f"{name} must contain integers or floats, got dtype {x.dtype}.")
  return x


def _validate_shapes(queries, references, metric: str) -> tuple[int, int]:
  for name, x in (("queries", queries), ("references", references)):
    if x.ndim < 2:
      raise ValueError(
          f"{name} must have shape [N, features...], got shape {x.shape}; "
          "add a leading axis for a single vector.")
  if queries.shape[1:] != references.shape[1:]:
    raise ValueError(
        f"queries have feature shape {queries.shape[1:]} but references have "
        f"{references.shape[1:]}; both must match after the leading axis.")
  if metric == "hamming" and queries.ndim != 2:
    raise ValueError(
        f"hamming expects token arrays of shape [N, L], got queries of shape "
        f"{queries.shape}; reshape to [N, L].")
  features = math.prod(queries.shape[1:])
  if features == 0:
    raise ValueError(
        f"inputs have no features (feature shape {queries.shape[1:]}).")
  if metric == "cosine" and features < 2:
    raise ValueError(
        "cosine needs at least 2 features per vector, because the standard "
        f"deviation uses ddof 1; got feature shape {queries.shape[1:]}.")
  return queries.shape[0], references.shape[0]


def _validate_k(k: Any, num_references: int) -> int:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
    raise ValueError(f"k must be an integer, got {k!r}.")
  if not 1 <= k <= num_references:
    raise ValueError(
        f"k must satisfy 1 <= k <= number of references ({num_references}), "
        f"got k={k}; lower k or pass more references.")
  return int(k)


def _validate_tile(tile: Optional[int], default: int, name: str) -> int:
  if tile is None:
    return default
  if not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or tile < 1:
    raise ValueError(f"{name} must be a positive integer, got {tile!r}.")
  return int(tile)


def _validate_tokens(queries, references, num_classes) -> int:
  if num_classes is None:
    raise ValueError(
        "hamming needs num_classes (the alphabet size q), because the one-hot "
        "encoding has a static size; pass num_classes=q.")
  if (not isinstance(num_classes, (int, np.integer))
      or isinstance(num_classes, bool) or num_classes < 1):
    raise ValueError(
        f"num_classes must be a positive integer, got {num_classes!r}.")
  for name, x in (("queries", queries), ("references", references)):
    if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_):
      raise TypeError(
          f"hamming expects integer tokens, got {name} of dtype {x.dtype}; "
          "cast the tokens to an integer dtype.")
    if x.size == 0:
      continue
    if isinstance(x, jax.core.Tracer):
      continue
    low, high = _min_max(x)
    if low < 0 or high >= num_classes:
      raise ValueError(
          f"{name} contain tokens in [{low}, {high}], outside "
          f"[0, num_classes={num_classes}); fix the tokens or raise "
          "num_classes.")
  return int(num_classes)


def _min_max(x) -> tuple[int, int]:
  if isinstance(x, jax.Array):
    low, high = _jit_min_max(x)
    return int(low), int(high)
  return int(np.min(x)), int(np.max(x))


@jax.jit
def _jit_min_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.min(x), jnp.max(x)


@jax.jit
def _jit_all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def _check_finite(x, name: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating) or isinstance(x, jax.core.Tracer):
    return
  if isinstance(x, jax.Array):
    finite = bool(_jit_all_finite(x))
  else:
    # The search runs in float32, so a float64 value beyond its range is not finite there.
    with np.errstate(over="ignore"):
      finite = bool(np.isfinite(np.asarray(x).astype(np.float32)).all())
  if not finite:
    raise ValueError(
        f"{name} contain NaN or infinite values; clean the inputs, or pass "
        "check_finite=False to skip this check.")


def _platform_of(x) -> str:
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return next(iter(x.devices())).platform
  return jax.default_backend()


def _query_sharding(queries) -> tuple[Optional[jax.sharding.Mesh], Any]:
  """Return (mesh, mesh axes of the query axis) if queries are sharded on it."""
  if isinstance(queries, jax.core.Tracer):
    return None, None
  sharding = getattr(queries, "sharding", None)
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return None, None
  axes = sharding.spec[0]
  if axes is None:
    return None, None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  if math.prod(sharding.mesh.shape[a] for a in names) == 1:
    return None, None
  return sharding.mesh, axes


# ----------------------------------------------------------------------------
# Dispatch.


@functools.partial(
    jax.jit,
    static_argnames=("metric", "k", "num_classes", "query_tile",
                     "reference_tile", "extra_candidates", "hamming_method",
                     "mesh", "query_axes"))
def _search(queries, references, *, metric, k, num_classes, query_tile,
            reference_tile, extra_candidates, hamming_method, mesh, query_axes):
  local = functools.partial(
      _search_local, metric=metric, k=k, num_classes=num_classes,
      query_tile=query_tile, reference_tile=reference_tile,
      extra_candidates=extra_candidates, hamming_method=hamming_method)
  if mesh is None:
    return local(queries, references)

  # Each device searches its block of queries against all references, so the
  # references are replicated and the query features gathered first. The
  # loop carries start replicated and become per-device, which the
  # varying-axes check would reject, so it is switched off.
  query_spec = PartitionSpec(query_axes)
  queries = _reshard(queries, mesh, query_spec)
  references = _reshard(references, mesh, PartitionSpec())
  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(query_spec, PartitionSpec()),
      out_specs=(query_spec, query_spec), check_vma=False)
  return sharded(queries, references)


def _reshard(x: jax.Array, mesh: jax.sharding.Mesh,
             spec: PartitionSpec) -> jax.Array:
  """Move `x` to `spec` on `mesh`, for Explicit and Auto mesh axes alike."""
  explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
              if kind == jax.sharding.AxisType.Explicit}
  names = set()
  for entry in spec:
    if entry is not None:
      names.update((entry,) if isinstance(entry, str) else entry)
  # jax.reshard accepts only Explicit axis names; Auto axes take a constraint.
  if explicit and names <= explicit:
    return jax.reshard(x, NamedSharding(mesh, spec))
  if names & explicit:
    raise ValueError(
        f"queries are sharded over mesh axes {sorted(names)} of both Explicit "
        "and Auto type; shard the query axis over axes of one type.")
  return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _search_local(queries, references, *, metric, k, num_classes, query_tile,
                  reference_tile, extra_candidates, hamming_method):
  # [Q, ...], [R, ...] -> ([Q, k], [Q, k])
  if metric == "hamming":
    return _hamming_search(
        queries.astype(jnp.int32), references.astype(jnp.int32), k=k,
        num_classes=num_classes, query_tile=query_tile,
        reference_tile=reference_tile, method=hamming_method)
  queries = queries.reshape(queries.shape[0], -1).astype(jnp.float32)
  references = references.reshape(references.shape[0], -1).astype(jnp.float32)
  return _float_search(
      queries, references, metric=metric, k=k,
      num_candidates=min(k + extra_candidates, references.shape[0]),
      query_tile=query_tile, reference_tile=reference_tile)


# ----------------------------------------------------------------------------
# Tiling helpers.


def _map_query_tiles(fn: Callable, queries: jax.Array, tile: int) -> Any:
  """Apply `fn` to row tiles of `queries` and concatenate its outputs.

  Full tiles run in a `lax.map` over dynamic slices of the input (no copy);
  a ragged last tile runs once at its own size.
  """
  num_rows = queries.shape[0]
  tile = min(tile, num_rows)
  num_full, remainder = divmod(num_rows, tile)

  def full_tile(i):
    return fn(lax.dynamic_slice_in_dim(queries, i * tile, tile))

  outputs = lax.map(full_tile, jnp.arange(num_full))
  outputs = jax.tree.map(
      lambda a: a.reshape((num_full * tile,) + a.shape[2:]), outputs)
  if remainder:
    last = fn(queries[num_full * tile:])
    outputs = jax.tree.map(
        lambda a, b: jnp.concatenate([a, b]), outputs, last)
  return outputs


def _scan_reference_tiles(step: Callable, carry: Any, references: jax.Array,
                          tile: int) -> Any:
  """Fold `step(carry, reference_tile, start)` over row tiles of `references`."""
  num_rows = references.shape[0]
  tile = min(tile, num_rows)
  num_full, remainder = divmod(num_rows, tile)

  def body(j, carry):
    start = j * tile
    return step(carry, lax.dynamic_slice_in_dim(references, start, tile), start)

  carry = lax.fori_loop(0, num_full, body, carry)
  if remainder:
    start = num_full * tile
    carry = step(carry, references[start:], jnp.int32(start))
  return carry


# ----------------------------------------------------------------------------
# Hamming.


def _pack_one_hot_bits(tokens: jax.Array, num_classes: int) -> jax.Array:
  """Pack onehot(tokens) into 32-bit words: bit l*q + x_l is set for position l.

  [N, L] int32 -> [N, W] uint32 with W = ceil(L*q / 32).
  """
  length = tokens.shape[1]
  num_words = math.ceil(length * num_classes / 32)
  bit = jnp.arange(length, dtype=jnp.int32) * num_classes + tokens  # [N, L]
  word = bit // 32
  value = jnp.left_shift(jnp.uint32(1), (bit % 32).astype(jnp.uint32))
  in_word = word[..., None] == jnp.arange(num_words, dtype=jnp.int32)
  # Bits are distinct, so the sum is the bitwise OR.
  return jnp.sum(jnp.where(in_word, value[..., None], jnp.uint32(0)), axis=1,
                 dtype=jnp.uint32)


def _one_hot_flat(tokens: jax.Array, num_classes: int) -> jax.Array:
  # [N, L] -> [N, L*q] bf16 (0 and 1 are exact in bf16).
  one_hot = jax.nn.one_hot(tokens, num_classes, dtype=jnp.bfloat16)
  return one_hot.reshape(tokens.shape[0], -1)


def _smallest_keys(keys: jax.Array, k: int) -> jax.Array:
  """Return the k smallest distinct keys of each column, ascending.

  [rows, Qt] uint32 -> [k, Qt]. Each pass takes the minimum of the keys above
  the previous minimum; columns with fewer than k keys are filled with the
  maximum uint32.
  """
  selected = []
  previous = None
  for _ in range(min(k, keys.shape[0])):
    masked = keys if previous is None else jnp.where(
        keys > previous[None, :], keys, _UINT32_MAX)
    previous = jnp.min(masked, axis=0)
    selected.append(previous)
  while len(selected) < k:
    selected.append(jnp.full_like(selected[0], _UINT32_MAX))
  return jnp.stack(selected)


def _merge_sorted(run_d, run_i, new_d, new_i, k: int, axis: int):
  """Keep the k smallest of two sorted candidate lists, earlier list first on ties.

  Every index in the running list is lower than every new index, so ordering
  equal distances by list keeps the lower index first.
  """
  if k == 1 and run_d.shape[axis] == 1 and new_d.shape[axis] == 1:
    better = new_d < run_d
    return jnp.where(better, new_d, run_d), jnp.where(better, new_i, run_i)
  d = jnp.concatenate([run_d, new_d], axis=axis)
  i = jnp.concatenate([run_i, new_i], axis=axis)
  d, i = lax.sort((d, i), dimension=axis, is_stable=True, num_keys=1)
  return (lax.slice_in_dim(d, 0, k, axis=axis),
          lax.slice_in_dim(i, 0, k, axis=axis))


def _hamming_search(queries, references, *, k, num_classes, query_tile,
                    reference_tile, method):
  """Tiled exact Hamming search.

  Each (reference tile, query tile) block builds keys d << s | r in a
  [Rt, Qt] layout, where d is the Hamming distance, r the row within the
  reference tile and s = bit_length(Rt - 1). Keys are unique per column and
  order by (distance, index), so a column minimum gives the nearest reference
  with the lower-index tie rule, and the minimum over the reference axis is
  a vectorised elementwise minimum over query columns.
  """
  # [Q, L], [R, L] -> ([Q, k], [Q, k])
  length = queries.shape[1]
  # Keys must leave room for d <= L and a sentinel above it.
  max_rows = 2 ** (32 - (length + 1).bit_length())
  reference_tile = min(reference_tile, max_rows)

  if method == "bits":
    encode = lambda t: _pack_one_hot_bits(t, num_classes)

    def matches(query_code, reference_code):
      # [W, Qt], [Rt, W] -> [Rt, Qt] int32
      total = None
      for w in range(query_code.shape[0]):
        count = lax.population_count(
            reference_code[:, w, None] & query_code[None, w, :])
        total = count if total is None else total + count
      return total.astype(jnp.int32)
  else:
    encode = lambda t: _one_hot_flat(t, num_classes)

    def matches(query_code, reference_code):
      # [Qt, L*q], [Rt, L*q] -> [Rt, Qt] int32
      counts = lax.dot_general(
          reference_code, query_code, (((1,), (1,)), ((), ())),
          preferred_element_type=jnp.float32)
      return counts.astype(jnp.int32)

  def search_query_tile(query_tokens):
    # [Qt, L] -> ([Qt, k], [Qt, k])
    query_code = encode(query_tokens)
    if method == "bits":
      query_code = query_code.T  # [W, Qt]
    num_rows = query_tokens.shape[0]

    def step(carry, reference_tokens, start):
      rows = reference_tokens.shape[0]
      shift = max(1, (rows - 1).bit_length())
      distance = length - matches(query_code, encode(reference_tokens))
      keys = (jnp.left_shift(distance.astype(jnp.uint32), jnp.uint32(shift))
              | jnp.arange(rows, dtype=jnp.uint32)[:, None])
      best = _smallest_keys(keys, k)  # [k, Qt]
      new_d = jnp.right_shift(best, jnp.uint32(shift)).astype(jnp.int32)
      new_i = (best & jnp.uint32((1 << shift) - 1)).astype(jnp.int32) + start
      # Columns with fewer than k references in this tile got the sentinel.
      new_d = jnp.where(best == _UINT32_MAX, length + 1, new_d)
      return _merge_sorted(*carry, new_d, new_i, k, axis=0)

    init = (jnp.full((k, num_rows), length + 1, jnp.int32),
            jnp.zeros((k, num_rows), jnp.int32))
    d, i = _scan_reference_tiles(step, init, references, reference_tile)
    return d.T, i.T

  return _map_query_tiles(search_query_tile, queries, query_tile)


# ----------------------------------------------------------------------------
# Squared Euclidean and cosine.


def _standardize_factors(x: jax.Array):
  """Return (mean, scale, unit) per row so that z = (x - mean) * scale.

  z = s / max(||s||, 1e-12) with s = (x - mean) / (std + 1e-12) and the
  standard deviation with ddof 1, so <z_x, z_y> is the Pearson correlation
  of x and y. A constant row has z = 0, and `unit` is False for it.
  [..., D] -> three [..., 1] arrays.
  """
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  sum_squares = jnp.sum(centred * centred, axis=-1, keepdims=True)
  std_plus = jnp.sqrt(sum_squares / (x.shape[-1] - 1)) + 1e-12
  norm = jnp.sqrt(sum_squares) / std_plus  # ||s||
  scale = 1.0 / (std_plus * jnp.maximum(norm, 1e-12))
  return mean, scale, norm >= 1e-12


def _standardize(x: jax.Array) -> jax.Array:
  # [..., D] -> [..., D]: the unit vector z of _standardize_factors.
  mean, scale, _ = _standardize_factors(x)
  return (x - mean) * scale


def _float_search(queries, references, *, metric, k, num_candidates,
                  query_tile, reference_tile):
  """Tiled float search: approximate ranking, then exact recomputation.

  sqeuclidean: with c the reference mean, x' = x - c and y' = y - c, the
  ranking distance is max(||x'||^2 + ||y'||^2 - 2<x', y'>, 0); the
  candidates are then recomputed as sum((x - y)^2) on the fp32 inputs.
  cosine: the ranking distance is 1 - <z_x, z_y>; the candidates are
  recomputed as ||z_x - z_y||^2 / 2, and identical inputs get distance 0.
  """
  # [Q, D], [R, D] -> ([Q, k], [Q, k])
  num_references = references.shape[0]
  centre = jnp.mean(references, axis=0) if metric == "sqeuclidean" else None

  def search_query_tile(query_rows):
    # [Qt, D] -> ([Qt, k], [Qt, k])
    num_rows = query_rows.shape[0]
    if metric == "sqeuclidean":
      query = query_rows - centre
      query_norm = jnp.sum(query * query, axis=1)
    else:
      query = _standardize(query_rows)

    def step(carry, reference_rows, start):
      # The cosine refinement needs the standardising factors of each
      # candidate. They are carried with the candidates, because computing
      # them again on gathered rows is several times slower on XLA:CPU.
      if metric == "sqeuclidean":
        reference = reference_rows - centre
        factors = ()
      else:
        mean, scale, unit = _standardize_factors(reference_rows)
        reference = (reference_rows - mean) * scale
        factors = (mean[:, 0], scale[:, 0], unit[:, 0].astype(jnp.float32))
      inner = lax.dot_general(
          query, reference, (((1,), (1,)), ((), ())),
          precision=lax.Precision.HIGHEST,
          preferred_element_type=jnp.float32)  # [Qt, Rt]
      if metric == "sqeuclidean":
        reference_norm = jnp.sum(reference * reference, axis=1)
        distance = jnp.maximum(
            query_norm[:, None] + reference_norm[None, :] - 2.0 * inner, 0.0)
      else:
        distance = 1.0 - inner
      count = min(num_candidates, reference_rows.shape[0])
      neg_d, position = lax.top_k(-distance, count)  # [Qt, count]
      new = (-neg_d, position + start) + tuple(f[position] for f in factors)
      return _merge_top_k(carry, new, num_candidates)

    shape = (num_rows, num_candidates)
    init = (jnp.full(shape, jnp.inf, jnp.float32),
            jnp.full(shape, num_references, jnp.int32))
    if metric == "cosine":
      init += (jnp.zeros(shape, jnp.float32),) * 3
    _, candidates, *factors = _scan_reference_tiles(
        step, init, references, reference_tile)
    return _refine(query_rows, references, candidates, factors, metric, k)

  return _map_query_tiles(search_query_tile, queries, query_tile)


def _merge_top_k(running: tuple, new: tuple, k: int) -> tuple:
  """Keep the k smallest distances of two candidate lists with their fields.

  Both tuples start with (distances, indices) and may carry more per-candidate
  arrays; [Qt, k] and [Qt, n] -> [Qt, k]. top_k puts the lower position first
  on ties, and running candidates come first and have lower indices.
  """
  fields = [jnp.concatenate([a, b], axis=1) for a, b in zip(running, new)]
  neg_d, position = lax.top_k(-fields[0], k)
  return (-neg_d,) + tuple(
      jnp.take_along_axis(f, position, axis=1) for f in fields[1:])


def _refine(query_rows, references, candidates, factors, metric: str, k: int):
  """Recompute candidate distances exactly and keep the k best.

  [Qt, D], [R, D], [Qt, C] -> ([Qt, k], [Qt, k]), sorted by (distance, index).
  For cosine, `factors` contains the candidates' (mean, scale, unit) as [Qt, C]
  arrays; for sqeuclidean it is empty. The candidates are visited one slot at
  a time, so each gather is [Qt, D] and stays in cache; gathering all
  [Qt, C, D] at once was twice as slow on XLA:CPU.
  """
  if metric == "cosine":
    query_mean, query_scale, query_unit = _standardize_factors(query_rows)
    query_z = (query_rows - query_mean) * query_scale
    query_unit = query_unit[:, 0]

  def slot_distance(slot):
    # [] -> [Qt]
    rows = jnp.take(references, candidates[:, slot], axis=0)  # [Qt, D]
    if metric == "sqeuclidean":
      difference = query_rows - rows
      return jnp.sum(difference * difference, axis=-1)
    mean, scale, unit = (f[:, slot, None] for f in factors)
    difference = query_z - (rows - mean) * scale
    half_square = 0.5 * jnp.sum(difference * difference, axis=-1)
    # A constant row has z = 0; its correlation with anything is taken as 0.
    distance = jnp.where(query_unit & (unit[:, 0] > 0.5), half_square, 1.0)
    # Equal rows in different tiles may round their mean and scale
    # differently, so identical inputs are set to 0 explicitly.
    identical = jnp.max(jnp.abs(query_rows - rows), axis=-1) == 0.0
    return jnp.where(identical, 0.0, distance)

  distance = lax.map(slot_distance, jnp.arange(candidates.shape[1])).T
  distance, candidates = lax.sort(
      (distance, candidates), dimension=1, num_keys=2)
  return distance[:, :k], candidates[:, :k]
