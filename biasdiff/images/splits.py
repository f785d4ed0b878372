"""Disjoint training blocks, a held-out block and their centering constants.

A `Splits` record names K training blocks of n rows each (model b trains on
block b) and one held-out block, all as row indices into one `ImageData`,
whose hash the record carries. The blocks are pairwise disjoint, so any two
models form a sample-split pair.

Centering subtracts one scalar from every pixel and does not rescale:

  block centering:   x -> x - mu_b,  mu_b = mean of all pixels of block b;
  global centering:  x -> x - mu,    mu = mean of all pixels of the union of
                                      the training blocks (for ablations).

The record is saved as `splits.json` next to the dataset files.
"""

import dataclasses
import itertools
import json
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from biasdiff.images import data as data_lib

SPLITS_FILE = "splits.json"
FORMAT_VERSION = 1
CENTERINGS = ("block", "global")
HELDOUT = "heldout"

# Largest accepted difference between a stored centering constant and the one
# recomputed from the images. Both are float64 means of the same float32
# pixels, so only the order of summation can differ.
_MEAN_TOLERANCE = 1e-9

Block = Union[int, str]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Consecutive blocks of a sorted source, as used for CelebA and its proxy.

  Training block i is source rows [n*i, n*(i+1)) and the held-out block is the
  last `heldout_size` rows. The defaults are the CelebA protocol: 15 blocks of
  1,024 images and a test set of 2,048 images.

  Attributes:
    block_size: rows per training block (n), at least 1.
    num_blocks: number of training blocks (K), at least 1.
    heldout_size: rows in the held-out block, at least 1.
  """

  block_size: int = 1024
  num_blocks: int = 15
  heldout_size: int = 2048

  def __post_init__(self):
    for name in ("block_size", "num_blocks", "heldout_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"BlockLayout.{name} must be a positive integer, got {value!r}.")

  @property
  def num_rows(self) -> int:
    """Rows the layout reads: K*n training rows plus the held-out rows."""
    return self.num_blocks * self.block_size + self.heldout_size

  def source_rows(self, source_size: int) -> np.ndarray:
    """Return the source rows to load, training blocks first, as int64 [K*n + m].

    Raises:
      ValueError: the blocks and the held-out rows do not fit in the source
        without overlapping.
    """
    if self.num_rows > source_size:
      raise ValueError(
          f"{self.num_blocks} blocks of {self.block_size} plus {self.heldout_size} "
          f"held-out rows need {self.num_rows} rows, but the source has "
          f"{source_size}; reduce num_blocks, block_size or heldout_size."
      )
    training = np.arange(self.num_blocks * self.block_size, dtype=np.int64)
    heldout = np.arange(source_size - self.heldout_size, source_size, dtype=np.int64)
    return np.concatenate([training, heldout])

  def stored_splits_indices(self) -> tuple[list[np.ndarray], np.ndarray]:
    """Return block and held-out indices into the array of `source_rows` order."""
    n = self.block_size
    blocks = [np.arange(i * n, (i + 1) * n, dtype=np.int64) for i in range(self.num_blocks)]
    heldout = np.arange(self.num_blocks * n, self.num_rows, dtype=np.int64)
    return blocks, heldout


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """Training blocks and a held-out block of one dataset, with centering constants.

  Attributes:
    train_blocks: K read-only int64 arrays of n row indices each; block b
      trains model b.
    heldout: read-only int64 array of the held-out row indices.
    data_sha256: SHA-256 of the `ImageData` the indices refer to.
    block_means: mu_b, the float64 mean of all pixels of block b, K entries.
    global_mean: the float64 mean of all pixels of the union of the training
      blocks.
    metadata: JSON-serialisable dictionary of how the blocks were chosen.
  """

  train_blocks: tuple[np.ndarray, ...]
  heldout: np.ndarray
  data_sha256: str
  block_means: tuple[float, ...]
  global_mean: float
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    blocks = tuple(_as_index_array(block, f"train block {b}") for b, block in enumerate(self.train_blocks))
    heldout = _as_index_array(self.heldout, HELDOUT)
    if not blocks:
      raise ValueError("Splits needs at least one training block.")
    sizes = sorted({block.size for block in blocks})
    if len(sizes) != 1 or sizes[0] == 0:
      raise ValueError(
          f"training blocks must be non-empty and of equal size, got sizes "
          f"{[block.size for block in blocks]}."
      )
    if heldout.size == 0:
      raise ValueError("the held-out block is empty; give it at least one row.")
    if len(self.block_means) != len(blocks):
      raise ValueError(f"got {len(self.block_means)} block means for {len(blocks)} blocks.")
    object.__setattr__(self, "train_blocks", blocks)
    object.__setattr__(self, "heldout", heldout)
    object.__setattr__(self, "block_means", tuple(float(m) for m in self.block_means))
    object.__setattr__(self, "global_mean", float(self.global_mean))
    object.__setattr__(self, "metadata", json.loads(json.dumps(dict(self.metadata))))
    assert_disjoint(self)

  @property
  def num_blocks(self) -> int:
    return len(self.train_blocks)

  @property
  def block_size(self) -> int:
    return self.train_blocks[0].size

  def named_blocks(self) -> dict[str, np.ndarray]:
    """Return every block by name: "0" ... "K-1" and "heldout"."""
    named = {str(b): block for b, block in enumerate(self.train_blocks)}
    named[HELDOUT] = self.heldout
    return named


def _as_index_array(indices: Sequence[int], name: str) -> np.ndarray:
  array = np.asarray(indices)
  if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
    raise TypeError(f"{name} must be a 1-D array of integer row indices, got {array.dtype} {array.shape}.")
  array = np.array(array, dtype=np.int64, copy=True)
  if np.unique(array).size != array.size:
    raise ValueError(f"{name} lists a row more than once.")
  array.setflags(write=False)
  return array


def assert_disjoint(splits: Splits) -> None:
  """Raise ValueError unless the training blocks and the held-out block are pairwise disjoint.

  The message names the two blocks and up to five shared rows.
  """
  for (name_a, a), (name_b, b) in itertools.combinations(splits.named_blocks().items(), 2):
    shared = np.intersect1d(a, b)
    if shared.size:
      raise ValueError(
          f"blocks {name_a} and {name_b} share {shared.size} rows, first "
          f"{shared[:5].tolist()}; every pair of blocks must be disjoint."
      )


def make_splits(
    data: data_lib.ImageData,
    train_blocks: Sequence[Sequence[int]],
    heldout: Sequence[int],
    metadata: Optional[Mapping[str, Any]] = None,
) -> Splits:
  """Build a `Splits` record over `data` and compute its centering constants.

  Raises:
    ValueError: an index lies outside [0, N), the blocks overlap or differ in
      size.
  """
  for name, indices in [*((str(b), block) for b, block in enumerate(train_blocks)), (HELDOUT, heldout)]:
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= data.num_images):
      raise ValueError(
          f"block {name} has rows in [{indices.min()}, {indices.max()}] but the "
          f"dataset has {data.num_images} images."
      )
  block_means = [_pixel_mean(data.images, block) for block in train_blocks]
  union = np.concatenate([np.asarray(block, dtype=np.int64) for block in train_blocks])
  return Splits(
      train_blocks=tuple(train_blocks),
      heldout=heldout,
      data_sha256=data.sha256,
      block_means=tuple(block_means),
      global_mean=_pixel_mean(data.images, union),
      metadata=metadata or {},
  )


def _pixel_mean(images: np.ndarray, rows: Sequence[int]) -> float:
  return float(np.mean(images[np.asarray(rows)], dtype=np.float64))


def check_matches(splits: Splits, data: data_lib.ImageData) -> None:
  """Raise ValueError unless `splits` was made for `data`.

  Checks the data hash, that every index lies in [0, N), and that the stored
  centering constants equal the means recomputed from the images.
  """
  if splits.data_sha256 != data.sha256:
    raise ValueError(
        f"the splits were made for data with SHA-256 {splits.data_sha256}, but "
        f"these images have {data.sha256}; load the splits saved with this dataset "
        "or rebuild them."
    )
  for name, block in splits.named_blocks().items():
    if block.min() < 0 or block.max() >= data.num_images:
      raise ValueError(
          f"block {name} has rows in [{block.min()}, {block.max()}] but the dataset "
          f"has {data.num_images} images."
      )
  stored = [*splits.block_means, splits.global_mean]
  union = np.concatenate(splits.train_blocks)
  recomputed = [_pixel_mean(data.images, block) for block in splits.train_blocks]
  recomputed.append(_pixel_mean(data.images, union))
  for name, want, got in zip([*map(str, range(splits.num_blocks)), "global"], stored, recomputed):
    if abs(want - got) > _MEAN_TOLERANCE:
      raise ValueError(
          f"the stored centering constant of block {name} is {want!r} but the "
          f"images give {got!r}; rebuild the splits."
      )


def block_images(data: data_lib.ImageData, splits: Splits, block: Block) -> np.ndarray:
  """Return the uncentered images of training block `block` or of "heldout".

  Returns:
    float32 [rows, H, W, 1] array in [0, 1].
  """
  named = splits.named_blocks()
  if str(block) not in named:
    raise ValueError(
        f"unknown block {block!r}; use an integer in [0, {splits.num_blocks}) or {HELDOUT!r}."
    )
  return data.images[named[str(block)]]


def centering_shift(splits: Splits, block: int, centering: str = "block") -> float:
  """Return the constant subtracted from the inputs of the model trained on `block`.

  With centering="block" it is mu_block, the mean of all pixels of that block;
  with centering="global" it is the mean over the union of all training blocks,
  the same for every model. Held-out images given to model b are shifted by the
  same constant, so every input to a model is in that model's coordinates.
  """
  if centering not in CENTERINGS:
    raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}.")
  if not isinstance(block, (int, np.integer)) or not 0 <= block < splits.num_blocks:
    raise ValueError(f"block must be an integer in [0, {splits.num_blocks}), got {block!r}.")
  if centering == "global":
    return splits.global_mean
  return splits.block_means[block]


def center_block(
    data: data_lib.ImageData, splits: Splits, block: int, centering: str = "block"
) -> tuple[np.ndarray, float]:
  """Return training block `block` centered for its model, and the shift used.

  Returns:
    (images - shift) as float32 [n, H, W, 1], and the float shift, which a
    caller stores with its results and adds back to generated samples.
  """
  check_matches(splits, data)
  shift = centering_shift(splits, block, centering)
  centered = block_images(data, splits, block) - np.float32(shift)
  return centered.astype(np.float32), shift


def save_splits(splits: Splits, directory: data_lib.PathLike) -> pathlib.Path:
  """Write `splits` as `splits.json` in `directory` (atomically); return the file path."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / SPLITS_FILE
  data_lib.write_json_atomically(
      path,
      {
          "format_version": FORMAT_VERSION,
          "data_sha256": splits.data_sha256,
          "train_blocks": [block.tolist() for block in splits.train_blocks],
          HELDOUT: splits.heldout.tolist(),
          "block_means": list(splits.block_means),
          "global_mean": splits.global_mean,
          "metadata": splits.metadata,
      },
  )
  return path


def load_splits(directory: data_lib.PathLike, data: Optional[data_lib.ImageData] = None) -> Splits:
  """Read `splits.json` from `directory`; if `data` is given, check that they match.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the blocks overlap, or they do not match `data`.
  """
  path = pathlib.Path(directory) / SPLITS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; write it with save_splits.")
  record = json.loads(path.read_text(encoding="utf-8"))
  if record.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{path} has format_version {record.get('format_version')!r}, expected "
        f"{FORMAT_VERSION}; rebuild the splits with this version of biasdiff."
    )
  splits = Splits(
      train_blocks=tuple(np.asarray(block, dtype=np.int64) for block in record["train_blocks"]),
      heldout=np.asarray(record[HELDOUT], dtype=np.int64),
      data_sha256=record["data_sha256"],
      block_means=tuple(record["block_means"]),
      global_mean=record["global_mean"],
      metadata=record["metadata"],
  )
  if data is not None:
    try:
      check_matches(splits, data)
    except ValueError as error:
      raise ValueError(f"{path}: {error}") from error
  return splits


def save_prepared(data: data_lib.ImageData, splits: Splits, directory: data_lib.PathLike) -> pathlib.Path:
  """Write a dataset and its splits to one directory; return the directory."""
  check_matches(splits, data)
  data_lib.save_image_data(data, directory)
  save_splits(splits, directory)
  return pathlib.Path(directory)


def load_prepared(
    directory: data_lib.PathLike, expected_sha256: Optional[str] = None
) -> tuple[data_lib.ImageData, Splits]:
  """Read a dataset and its splits written by `save_prepared`, verifying both hashes."""
  data = data_lib.load_image_data(directory, expected_sha256=expected_sha256)
  return data, load_splits(directory, data)
