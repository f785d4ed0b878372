"""In-memory image datasets and their files on disk.

An `ImageData` contains float32 images [N, H, W, 1] with values in [0, 1], one
source identifier per image, the SHA-256 of the image bytes and a JSON
dictionary of how the images were made. On disk a dataset is a directory with
`images.npy` (read with allow_pickle=False) and `data.json`. Every file is
written to a temporary file in the same directory and then moved into place
with `os.replace`, so a reader never sees a half-written file.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from biasdiff.io import write_file_atomically, write_json_atomically

IMAGES_FILE = "images.npy"
METADATA_FILE = "data.json"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def array_sha256(images: np.ndarray) -> str:
  """Return the SHA-256 hex digest of the little-endian float32 bytes of `images`.

  The bytes are taken in C order, so the digest depends on the values and the
  shape's element order but not on the array's memory layout.
  """
  array = np.ascontiguousarray(images, dtype="<f4")
  return hashlib.sha256(array.tobytes()).hexdigest()


def strings_sha256(strings: Sequence[str]) -> str:
  """Return the SHA-256 hex digest of the strings joined by newlines (UTF-8)."""
  return hashlib.sha256("\n".join(strings).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
  """Grayscale images, where they came from and how they were made.

  Attributes:
    images: read-only float32 array [N, H, W, 1] with values in [0, 1].
    ids: source identifier of each image (a file name or a row index as a
      decimal string), N entries.
    metadata: JSON-serialisable dictionary of the source, the preprocessing
      steps and the libraries (with versions) that ran them.
    sha256: SHA-256 of the image bytes (see `array_sha256`), computed on
      construction.
  """

  images: np.ndarray
  ids: tuple[str, ...]
  metadata: Mapping[str, Any]
  sha256: str = dataclasses.field(init=False)

  def __post_init__(self):
    images = np.asarray(self.images)
    if images.dtype != np.float32:
      raise TypeError(
          f"images must be float32, got {images.dtype}; convert with "
          "images.astype(np.float32) after scaling to [0, 1]."
      )
    if images.ndim != 4 or images.shape[-1] != 1:
      raise ValueError(
          f"images must have shape [N, H, W, 1], got {images.shape}; add the "
          "channel axis with images[..., None]."
      )
    num_nonfinite = int(np.sum(~np.isfinite(images)))
    if num_nonfinite:
      raise ValueError(f"images contain {num_nonfinite} NaN or infinite values.")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise ValueError(
          f"images must lie in [0, 1], got values in [{images.min()}, {images.max()}]; "
          "scale them to [0, 1] first."
      )
    ids = tuple(self.ids)
    if len(ids) != images.shape[0]:
      raise ValueError(
          f"got {len(ids)} ids for {images.shape[0]} images; pass one id per image."
      )
    if not all(isinstance(i, str) for i in ids):
      raise TypeError("ids must be strings; write row indices as str(index).")
    try:
      metadata = json.loads(json.dumps(dict(self.metadata)))
    except (TypeError, ValueError) as error:
      raise TypeError(f"metadata must be JSON-serialisable: {error}") from error

    images = np.array(images, copy=True, order="C")
    images.setflags(write=False)
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "ids", ids)
    object.__setattr__(self, "metadata", metadata)
    object.__setattr__(self, "sha256", array_sha256(images))

  @property
  def num_images(self) -> int:
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of one image."""
    return tuple(self.images.shape[1:])


def save_image_data(data: ImageData, directory: PathLike) -> pathlib.Path:
  """Write `data` to `directory` as `images.npy` and `data.json`; return the directory.

  Each file is replaced atomically, the array first. An interruption between
  the two leaves an array that the old `data.json` does not match, which
  `load_image_data` rejects.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_file_atomically(
      directory / IMAGES_FILE,
      lambda file: np.save(file, data.images, allow_pickle=False),
  )
  write_json_atomically(
      directory / METADATA_FILE,
      {
          "format_version": FORMAT_VERSION,
          "sha256": data.sha256,
          "shape": list(data.images.shape),
          "dtype": "float32",
          "ids": list(data.ids),
          "metadata": data.metadata,
      },
  )
  return directory


def load_image_data(directory: PathLike, expected_sha256: Optional[str] = None) -> ImageData:
  """Read a dataset written by `save_image_data` and verify its hash.

  Args:
    directory: folder containing `images.npy` and `data.json`.
    expected_sha256: if given, the hash the images must have, for example the
      one recorded with a run or next to a prebuilt array.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the array does not match the hash stored in `data.json` or
      `expected_sha256`, or its shape differs from the stored one.
  """
  directory = pathlib.Path(directory)
  images_path = directory / IMAGES_FILE
  metadata_path = directory / METADATA_FILE
  for path in (images_path, metadata_path):
    if not path.is_file():
      raise FileNotFoundError(
          f"{path} not found; a dataset directory needs {IMAGES_FILE} and "
          f"{METADATA_FILE} as written by save_image_data."
      )
  record = json.loads(metadata_path.read_text(encoding="utf-8"))
  if record.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{metadata_path} has format_version {record.get('format_version')!r}, "
        f"expected {FORMAT_VERSION}; rebuild the dataset with this version of biasdiff."
    )
  images = np.load(images_path, allow_pickle=False)
  if list(images.shape) != record["shape"]:
    raise ValueError(
        f"{images_path} has shape {list(images.shape)} but {metadata_path} records "
        f"{record['shape']}; delete {directory} and rebuild it."
    )

  data = ImageData(images=images, ids=tuple(record["ids"]), metadata=record["metadata"])
  if data.sha256 != record["sha256"]:
    raise ValueError(
        f"{images_path} has SHA-256 {data.sha256} but {metadata_path} records "
        f"{record['sha256']}; the file is corrupt or was replaced. Delete "
        f"{directory} and rebuild it."
    )
  if expected_sha256 is not None and data.sha256 != expected_sha256:
    raise ValueError(
        f"{images_path} has SHA-256 {data.sha256}, expected {expected_sha256}; "
        "these are different images from the ones the run was made with."
    )
  return data
