"""Error bars and minima for the bias measures.

One convention serves every measure of the library:

- Independent units (inputs, sequences, models): the mean with the standard
  error SE = std(ddof = 1) / sqrt(n). `mean_and_se` also takes ddof = 0, which
  some figures of the authors' code used.
- Statistics over pairs of models, where pairs share a model or a data block
  and are therefore not independent: the delete-one-group jackknife. With
  theta_(g) the statistic over the pairs that do not involve group g (a block
  or a model) and G the number of groups,
      SE = sqrt((G - 1) / G * sum_g (theta_(g) - mean_g theta_(g))^2).
- Medians and fractions over samples: the percentile bootstrap, with
  resampling indices drawn from fold(seed, SUBSET, SUBSET_BOOTSTRAP, a, b).
- Minima over a checkpoint grid: the argmin of the across-unit aggregate curve
  (mean or median), plus every unit's own argmin and the spread of those.

Every result carries its sample count. Raw per-unit arrays stay with the
caller, so any other convention can be recomputed from them.
"""

import functools
import logging
from typing import Any, Callable, Iterator, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import rng
from biasdiff.metrics import probes

logger = logging.getLogger(__name__)

Statistic = Union[str, Callable[[np.ndarray], Any]]

# Resamples per device call in `bootstrap`, bounding the index array to about
# this many entries.
_BOOTSTRAP_CHUNK_ENTRIES = 1 << 22


class Summary(NamedTuple):
  """Mean, standard error and number of units along one axis."""
  mean: Any  # the reduced shape
  se: Any  # the reduced shape; NaN when count < 2
  count: int


class JackknifeResult(NamedTuple):
  """A pair statistic with its delete-one-group jackknife standard error."""
  estimate: np.ndarray  # the statistic over all pairs, trailing shape of the values
  se: np.ndarray  # same shape; NaN when fewer than 2 groups leave pairs behind
  count: int  # number of pairs
  num_groups: int
  groups: np.ndarray  # [G] group labels, sorted
  leave_one_out: np.ndarray  # [G, ...] the statistic without each group


class BootstrapResult(NamedTuple):
  """A statistic with its bootstrap standard error and percentile interval."""
  estimate: float
  se: float  # std (ddof 1) of the resampled statistics
  low: float  # lower end of the percentile interval
  high: float  # upper end
  confidence: float
  count: int  # number of samples
  num_resamples: int


class GridArgmin(NamedTuple):
  """The minimum (or maximum) of curves over a checkpoint grid."""
  index: int  # grid index of the extremum of the aggregate curve (earliest on ties)
  value: Any  # grid value there, e.g. the epoch
  aggregate: np.ndarray  # [C] the across-unit curve
  unit_indices: np.ndarray  # [U] each unit's own extremum index
  unit_values: np.ndarray  # [U] grid values at those indices
  unit_quartiles: np.ndarray  # [3] 25th, 50th and 75th percentile of unit_values
  unit_range: np.ndarray  # [2] min and max of unit_values
  count: int  # number of units U


def mean_and_se(values: Any, axis: int = -1, ddof: int = 1) -> Summary:
  """Compute the mean and standard error along `axis`: SE = std(ddof) / sqrt(n).

  Works on device arrays and under jit. With n = 1 and ddof = 1 the SE is NaN.
  Concrete inputs must be finite.

  Raises:
    ValueError: empty axis, ddof not 0 or 1, or non-finite values.
  """
  values = jnp.asarray(values)
  if not jnp.issubdtype(values.dtype, jnp.floating):
    values = values.astype(jnp.float32)
  if values.ndim == 0:
    raise ValueError("mean_and_se needs an array with at least one axis, got a scalar.")
  if ddof not in (0, 1):
    raise ValueError(f"ddof must be 0 or 1, got {ddof!r}.")
  count = values.shape[axis]
  if count == 0:
    raise ValueError(f"mean_and_se got no values along axis {axis} (shape {values.shape}).")
  probes.check_finite(values, "values")
  mean = jnp.mean(values, axis=axis)
  if count - ddof < 1:
    se = jnp.full(mean.shape, jnp.nan, values.dtype)
  else:
    se = jnp.std(values, axis=axis, ddof=ddof) / jnp.sqrt(count)
  return Summary(mean, se, int(count))


def _reduce(statistic: Statistic) -> Callable[[np.ndarray], np.ndarray]:
  """Turn "mean", "median" or a callable into a reduction over axis 0."""
  if statistic == "mean":
    return lambda x: np.mean(x, axis=0)
  if statistic == "median":
    return lambda x: np.median(x, axis=0)
  if callable(statistic):
    return statistic
  raise ValueError(f"statistic must be 'mean', 'median' or a callable, got {statistic!r}.")


def jackknife(values: Any, groups: Any, statistic: Statistic = "mean") -> JackknifeResult:
  """Compute a statistic over pairs with its delete-one-group jackknife SE.

  Args:
    values: [P, ...] one value (or one curve) per pair; the statistic reduces
      axis 0.
    groups: [P, K] integer labels of the K groups (models or data blocks) that
      each pair involves, e.g. [[block_a, block_b], ...].
    statistic: "mean", "median" or a callable reducing axis 0 of a numpy array.

  Returns:
    The statistic over all pairs and SE = sqrt((G - 1) / G * sum_g
    (theta_(g) - mean theta)^2), where theta_(g) leaves out every pair that
    involves group g. Groups whose removal leaves no pair are skipped; the SE
    is NaN if fewer than two groups remain.
  """
  values = np.asarray(values, dtype=np.float64)
  groups = np.asarray(groups)
  if values.ndim < 1 or values.shape[0] < 1:
    raise ValueError(f"values must have shape [P, ...] with P >= 1, got {values.shape}.")
  if not np.issubdtype(groups.dtype, np.integer):
    raise TypeError(f"groups must be integer labels, got dtype {groups.dtype}.")
  if groups.ndim == 1:
    groups = groups[:, None]
  if groups.ndim != 2 or groups.shape[0] != values.shape[0]:
    raise ValueError(
        f"groups must have shape [P, K] with P = {values.shape[0]} pairs, got {groups.shape}.")
  if not np.all(np.isfinite(values)):
    raise ValueError("values contains NaN or infinite entries; the jackknife needs finite values.")
  reduce = _reduce(statistic)
  estimate = np.asarray(reduce(values))

  labels = np.unique(groups)
  kept_labels, leave_one_out = [], []
  for label in labels:
    keep = ~np.any(groups == label, axis=1)
    if keep.any():
      kept_labels.append(label)
      leave_one_out.append(np.asarray(reduce(values[keep])))
  num_groups = len(kept_labels)
  if num_groups < 2:
    logger.warning("Jackknife over %d pairs has %d usable groups; its SE is undefined (NaN).",
                   values.shape[0], num_groups)
    se = np.full(estimate.shape, np.nan)
    leave_one_out = np.zeros((num_groups,) + estimate.shape) if not leave_one_out else np.stack(
        leave_one_out)
  else:
    leave_one_out = np.stack(leave_one_out)
    deviation = leave_one_out - leave_one_out.mean(axis=0)
    se = np.sqrt((num_groups - 1) / num_groups * np.sum(deviation**2, axis=0))
  return JackknifeResult(estimate, se, int(values.shape[0]), num_groups,
                         np.asarray(kept_labels), leave_one_out)


def bootstrap(values: Any, seed: rng.KeyLike, statistic: Statistic = "median", *,
              num_resamples: int = 1000, confidence: float = 0.95,
              ids: Sequence[int] = (0, 0)) -> BootstrapResult:
  """Compute a statistic of independent samples with a percentile bootstrap.

  Each resample draws N indices with replacement from
  fold(seed, SUBSET, SUBSET_BOOTSTRAP, ids[0], ids[1]), so a result is a pure
  function of (seed, ids) and of the values. The SE is the std (ddof 1) of the
  resampled statistics, and the interval is their (1 - confidence) / 2 and
  (1 + confidence) / 2 quantiles.

  Args:
    values: [N] samples (booleans are counted as 0/1).
    seed: an integer seed or a typed key.
    statistic: "mean", "median" or a callable reducing axis 0 of a numpy array.
    num_resamples: number of bootstrap resamples, >= 2.
    confidence: interval coverage in (0, 1).
    ids: two integers that name this resampling, so separate measures drawn
      from one seed get independent resamples.
  """
  values = np.asarray(values)
  if values.dtype == np.bool_:
    values = values.astype(np.float64)
  if values.ndim != 1 or values.size < 1:
    raise ValueError(f"values must have shape [N] with N >= 1, got {values.shape}.")
  if not np.issubdtype(values.dtype, np.number) or not np.all(np.isfinite(values)):
    raise ValueError("values must be finite numbers for the bootstrap.")
  num_resamples = probes.check_positive_int(num_resamples, "num_resamples")
  if num_resamples < 2:
    raise ValueError(f"num_resamples must be >= 2, got {num_resamples}.")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
  if len(ids) != 2:
    raise ValueError(f"ids must be two integers, got {ids!r}.")
  reduce = _reduce(statistic)
  values = values.astype(np.float64)
  resampled = np.concatenate([
      np.asarray(reduce(values[indices].T))
      for indices in resampled_indices(seed, values.shape[0], num_resamples, ids)
  ])
  low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
  return BootstrapResult(float(reduce(values)), float(np.std(resampled, ddof=1)), float(low),
                         float(high), float(confidence), int(values.shape[0]), int(num_resamples))


def resampled_indices(seed: rng.KeyLike, num: int, num_resamples: int,
                      ids: Sequence[int] = (0, 0)) -> Iterator[np.ndarray]:
  """Yield bootstrap index arrays [chunk, num], num_resamples rows in all.

  Resample r draws num indices with replacement from fold(key, r), with
  key = fold(seed, SUBSET, SUBSET_BOOTSTRAP, ids[0], ids[1]), so the draws do
  not depend on the chunking.
  """
  num = probes.check_positive_int(num, "num")
  num_resamples = probes.check_positive_int(num_resamples, "num_resamples")
  key = probes.subset_key(seed, probes.SUBSET_BOOTSTRAP, int(ids[0]), int(ids[1]))
  chunk = max(1, min(num_resamples, _BOOTSTRAP_CHUNK_ENTRIES // num))
  for start in range(0, num_resamples, chunk):
    stop = min(start + chunk, num_resamples)
    yield np.asarray(_resample_indices(key, jnp.arange(start, stop), num))


@functools.partial(jax.jit, static_argnames=("num",))
def _resample_indices(key: jax.Array, resample_ids: jax.Array, num: int) -> jax.Array:
  # [R] -> [R, N]: resample r uses fold(key, r).
  draw = lambda r: jax.random.randint(jax.random.fold_in(key, r), (num,), 0, num)
  return jax.vmap(draw)(resample_ids)


def grid_argmin(curves: Any, grid: Any, aggregate: str = "mean",
                maximize: bool = False) -> GridArgmin:
  """Locate the minimum (or maximum) of curves over a checkpoint grid.

  Args:
    curves: [U, C] one curve per unit (model or pair) over C checkpoints, or
      [C] for a single curve.
    grid: [C] grid values, e.g. epochs.
    aggregate: "mean" or "median" across units for the aggregate curve.
    maximize: locate maxima instead of minima.

  Returns:
    The extremum of the aggregate curve and of every unit's curve; ties go to
    the earliest grid point. The spread is the quartiles and range of the
    per-unit grid values.
  """
  curves = np.asarray(curves, dtype=np.float64)
  grid = np.asarray(grid)
  if curves.ndim == 1:
    curves = curves[None]
  if curves.ndim != 2 or curves.shape[0] < 1 or curves.shape[1] < 1:
    raise ValueError(f"curves must have shape [U, C] with U, C >= 1, got {curves.shape}.")
  if grid.shape != (curves.shape[1],):
    raise ValueError(
        f"grid must have shape ({curves.shape[1]},), one value per checkpoint, got {grid.shape}.")
  if not np.all(np.isfinite(curves)):
    raise ValueError("curves contains NaN or infinite values; drop or fill those checkpoints.")
  if aggregate == "mean":
    combined = curves.mean(axis=0)
  elif aggregate == "median":
    combined = np.median(curves, axis=0)
  else:
    raise ValueError(f"aggregate must be 'mean' or 'median', got {aggregate!r}.")
  pick = np.argmax if maximize else np.argmin
  index = int(pick(combined))
  unit_indices = pick(curves, axis=1)
  unit_values = grid[unit_indices]
  return GridArgmin(
      index=index,
      value=grid[index],
      aggregate=combined,
      unit_indices=unit_indices,
      unit_values=unit_values,
      unit_quartiles=np.quantile(unit_values.astype(np.float64), [0.25, 0.5, 0.75]),
      unit_range=np.array([unit_values.min(), unit_values.max()]),
      count=int(curves.shape[0]))
