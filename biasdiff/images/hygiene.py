"""Data hygiene: near-duplicate images across two sets by Pearson correlation.

For flattened images a and b with D pixels,

  r(a, b) = sum_p (a_p - mean(a)) (b_p - mean(b)) / (||a - mean(a)|| ||b - mean(b)||),

which ignores brightness and contrast. Cross pairs with r >= 0.995 are
reported as possible duplicates, together with the most correlated pairs. The
matrix is computed in row tiles of the first set, so memory stays at one tile
of [tile, N_b] values plus the inputs.
"""

import dataclasses
import logging
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DUPLICATE_THRESHOLD = 0.995
NUM_TOP_PAIRS = 10


def standardize_rows(images: np.ndarray) -> jax.Array:
  """Flatten each image, subtract its mean and divide by its norm.

  An image with zero variance has no defined correlation. Its row is set to
  zero, so every correlation with it is 0, and a warning is logged.

  Args:
    images: [N, ...] array.

  Returns:
    float32 [N, D] array whose rows have zero mean and unit norm.
  """
  flat = jnp.asarray(images, jnp.float32).reshape(len(images), -1)
  centered = flat - jnp.mean(flat, axis=1, keepdims=True)
  norms = jnp.linalg.norm(centered, axis=1, keepdims=True)
  # Test constancy on the pixels: the float32 mean of a constant row need not
  # equal its value, which leaves a tiny but nonzero norm.
  constant = (jnp.max(flat, axis=1) == jnp.min(flat, axis=1))[:, None]
  num_constant = int(jnp.sum(constant))
  if num_constant:
    logging.warning("%d images have zero variance; their correlations are set to 0.", num_constant)
  return jnp.where(constant, 0.0, centered / jnp.where(constant, 1.0, norms))


@jax.jit
def _correlation_tile(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 precision. The default on TPUs (bfloat16 passes) and on GPUs
  # with TF32 keeps about three significant digits, too few to compare r with
  # the 0.995 threshold.
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def pearson_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Return the Pearson correlation of every image of `a` with every image of `b`.

  Args:
    a: [N_a, ...] images.
    b: [N_b, ...] images with the same number of pixels.

  Returns:
    float32 [N_a, N_b] matrix.
  """
  _check_pair(a, b)
  return np.asarray(_correlation_tile(standardize_rows(a), standardize_rows(b)))


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
  if len(a) == 0 or len(b) == 0:
    raise ValueError(f"both sets need at least one image, got {len(a)} and {len(b)}.")
  if np.prod(np.shape(a)[1:]) != np.prod(np.shape(b)[1:]):
    raise ValueError(f"images of shape {np.shape(a)[1:]} and {np.shape(b)[1:]} cannot be compared.")


@dataclasses.dataclass(frozen=True)
class CorrelationReport:
  """Possible duplicates and the most correlated pairs between two image sets.

  Pairs are (row in the first set, row in the second set, r), sorted by
  decreasing r and then by row.

  Attributes:
    threshold: r at or above which a pair counts as a possible duplicate.
    duplicates: every pair with r >= threshold.
    top_pairs: the `num_top` pairs with the largest r.
    max_r: largest r over all pairs.
  """

  threshold: float
  duplicates: tuple[tuple[int, int, float], ...]
  top_pairs: tuple[tuple[int, int, float], ...]
  max_r: float

  def to_json(
      self, ids_a: Optional[Sequence[str]] = None, ids_b: Optional[Sequence[str]] = None
  ) -> dict[str, Any]:
    """Return the report as JSON-ready data, naming rows by id when ids are given."""

    def pair_record(i: int, j: int, r: float) -> dict[str, Any]:
      record = {"row_a": i, "row_b": j, "r": r}
      if ids_a is not None:
        record["id_a"] = ids_a[i]
      if ids_b is not None:
        record["id_b"] = ids_b[j]
      return record

    return {
        "threshold": self.threshold,
        "max_r": self.max_r,
        "num_duplicates": len(self.duplicates),
        "duplicates": [pair_record(*pair) for pair in self.duplicates],
        "top_pairs": [pair_record(*pair) for pair in self.top_pairs],
    }


def correlation_report(
    a: np.ndarray,
    b: np.ndarray,
    threshold: float = DUPLICATE_THRESHOLD,
    num_top: int = NUM_TOP_PAIRS,
    tile_size: int = 512,
) -> CorrelationReport:
  """Find cross pairs of `a` and `b` with Pearson r >= threshold and the top pairs.

  Args:
    a: [N_a, ...] images, for example one training block.
    b: [N_b, ...] images, for example another block or the held-out block.
    threshold: r at or above which a pair is a possible duplicate.
    num_top: number of most correlated pairs to keep.
    tile_size: rows of `a` per correlation tile.
  """
  _check_pair(a, b)
  if num_top < 1 or tile_size < 1:
    raise ValueError(f"num_top and tile_size must be positive, got {num_top} and {tile_size}.")
  standard_a = standardize_rows(a)
  standard_b = standardize_rows(b)

  duplicates = []
  candidates = []
  for start in range(0, standard_a.shape[0], tile_size):
    tile = np.asarray(_correlation_tile(standard_a[start:start + tile_size], standard_b))
    rows, columns = np.nonzero(tile >= threshold)
    duplicates.extend(
        (start + int(i), int(j), float(tile[i, j])) for i, j in zip(rows, columns)
    )
    # The best num_top pairs overall are among the best num_top of each tile.
    k = min(num_top, tile.size)
    flat = np.argpartition(-tile, k - 1, axis=None)[:k]
    candidates.extend(
        (start + int(index // tile.shape[1]), int(index % tile.shape[1]), float(tile.flat[index]))
        for index in flat
    )

  def order(pair: tuple[int, int, float]) -> tuple[float, int, int]:
    return (-pair[2], pair[0], pair[1])

  top_pairs = tuple(sorted(candidates, key=order)[:num_top])
  return CorrelationReport(
      threshold=float(threshold),
      duplicates=tuple(sorted(duplicates, key=order)),
      top_pairs=top_pairs,
      max_r=top_pairs[0][2],
  )
