"""CelebA through tensorflow-datasets, read without TensorFlow.

`tfds.data_source(name, split=...)` reads a dataset prepared in the
ArrayRecord format with random access and needs no TensorFlow. Preparing
CelebA in that format is the user's step, done once with their own copy, for
example

  tfds build celeb_a --file_format=array_record --data_dir=DIR

and then `load_celeba_tfds(data_dir=DIR)`. biasdiff neither downloads nor
redistributes CelebA. The default `tfrecord` format cannot be read this way.

Record order. TFDS stores the examples of a split sorted by the 128-bit MD5 of
the split name followed by the example key (`tensorflow_datasets/core/
hashing.py` and `shuffle.py` in TFDS 4.9.10; TFDS documents that changing this
hash would need a new major version of every dataset). The `celeb_a` builder
keys each example by its file name ("000001.jpg"), so the record index of a
file is its rank under that hash within its split. The loader inverts this
order: row r is the r-th file of the name-sorted list across all splits, the
same row as in `celeba.load_celeba_folder`, and the same preprocessing runs.
"""

import dataclasses
import glob
import hashlib
import importlib.util
import io
import logging
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import PIL

from biasdiff.images import celeba
from biasdiff.images import data as data_lib
from biasdiff.images import splits as splits_lib

# CelebA's official partition (list_eval_partition.txt): first and last file
# number of each split. The default training blocks (files 000001-015360) lie
# in "train" and the default test set (files 200552-202599) in "test".
CELEBA_PARTITION_RANGES = {
    "train": (1, 162770),
    "validation": (162771, 182637),
    "test": (182638, 202599),
}
DECODERS = ("pil", "tfds")


def celeba_partition() -> dict[str, list[str]]:
  """Return the file names of each official CelebA split, in sorted order."""
  return {
      split: [f"{number:06d}.jpg" for number in range(first, last + 1)]
      for split, (first, last) in CELEBA_PARTITION_RANGES.items()
  }


def tfds_record_order(keys: Sequence[str], split: str) -> list[str]:
  """Return `keys` in the order TFDS stores them in `split`.

  TFDS sorts the examples by int(md5(split + key).hexdigest(), 16), with both
  strings UTF-8 encoded. This does not apply to datasets prepared with
  `disable_shuffling=True`.
  """
  salted = hashlib.md5(split.encode("utf-8"))

  def key_hash(key: str) -> int:
    digest = salted.copy()
    digest.update(key.encode("utf-8"))
    return int(digest.hexdigest(), 16)

  return sorted(keys, key=key_hash)


def _decoder_record(decoder: str) -> dict[str, str]:
  if decoder == "pil":
    return {"library": "Pillow", "version": PIL.__version__}
  # TFDS decodes with OpenCV when it can import cv2 and falls back to Pillow.
  library = "OpenCV" if importlib.util.find_spec("cv2") is not None else "Pillow"
  return {"library": library, "via": "tensorflow_datasets"}


def default_data_dir() -> str:
  """Return the data directory TFDS uses when none is given.

  This is `tfds.core.constants.get_default_data_dir()` of TFDS 4.9.10, written
  out so that the check below does not import tensorflow_datasets.
  """
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def check_source(
    layout: splits_lib.BlockLayout,
    name: str = "celeb_a",
    data_dir: Optional[data_lib.PathLike] = None,
) -> None:
  """Raise an error before loading when the dataset is not prepared or too small.

  Looks for `<data_dir>/<name>/<version>/dataset_info.json`, which TFDS
  writes when it prepares a dataset; without it, `tfds.data_source` of TFDS
  4.9.10 starts to download and build the dataset. Remote data directories ("gs://...")
  are not checked. The layout is checked against CelebA's official
  partition, which `load_celeba_tfds` reads by default.

  Raises:
    FileNotFoundError: no prepared version of the dataset in the data directory.
    ValueError: the layout needs more rows than CelebA has.
  """
  layout.source_rows(celeba.CELEBA_NUM_FILES)
  data_dir = str(data_dir or default_data_dir())
  if "://" in data_dir:
    return
  base_name = name.split(":")[0]
  if glob.glob(os.path.join(glob.escape(data_dir), base_name, "*", "dataset_info.json")):
    return
  raise FileNotFoundError(
      f"no prepared {base_name} dataset in the TFDS data directory {data_dir} (no "
      f"{base_name}/<version>/dataset_info.json there); prepare it once from your own copy of "
      f"CelebA with `tfds build {base_name} --file_format=array_record --data_dir=DIR`."
  )


def load_celeba_tfds(
    layout: splits_lib.BlockLayout = splits_lib.BlockLayout(),
    name: str = "celeb_a",
    data_dir: Optional[data_lib.PathLike] = None,
    partition: Optional[Mapping[str, Sequence[str]]] = None,
    decoder: str = "pil",
    cache_dir: Optional[data_lib.PathLike] = None,
    size: int = celeba.IMAGE_SIZE,
    resize_backend: str = "pil",
    source_shape: Optional[tuple[int, int]] = celeba.CELEBA_SOURCE_SHAPE,
) -> tuple[data_lib.ImageData, splits_lib.Splits]:
  """Load the CelebA blocks and test set with `tfds.data_source`.

  Rows, blocks, preprocessing and the returned records are those of
  `celeba.load_celeba_folder`; only the K*n + m rows of the layout are read.

  Args:
    layout: block size, block count and test size.
    name: TFDS dataset name, optionally with a version ("celeb_a:2.1.0").
    data_dir: TFDS data directory; None uses TFDS's default.
    partition: file names (the example keys) of each TFDS split to read;
      None uses CelebA's official partition. Every split's record count must
      equal its number of names.
    decoder: "pil" reads the stored JPEG bytes and decodes them with Pillow,
      exactly as the folder loader does. "tfds" takes the uint8 arrays that
      TFDS decodes, with OpenCV when it is installed and otherwise Pillow.
      Use "tfds" under `tfds.testing.mock_data`, which cannot serve undecoded
      images without TensorFlow.
    cache_dir: as in `load_celeba_folder`; the key also holds the dataset name
      and version.
    size: output side in pixels.
    resize_backend: "pil" or "jax", see `celeba.preprocess_celeba_image`.
    source_shape: (height, width) every image must have; None accepts any.

  Raises:
    ValueError: a split contains another number of records than `partition`
      lists, the dataset was prepared without shuffling, the layout needs more
      rows than there are files, or an image cannot be decoded or has another
      size.
  """
  # Imported here: tensorflow_datasets takes about a quarter of a second to
  # import, and only this loader needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if decoder not in DECODERS:
    raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
  if partition is None:
    partition = celeba_partition()
  partition = {split: list(keys) for split, keys in partition.items()}
  names = sorted(key for keys in partition.values() for key in keys)
  if len(set(names)) != len(names):
    raise ValueError("partition lists a file name in more than one split, or twice in one split.")
  rows = layout.source_rows(len(names))

  decoders = {"image": tfds.decode.SkipDecoding()} if decoder == "pil" else None
  split_of = {key: split for split, keys in partition.items() for key in keys}
  needed_splits = sorted({split_of[names[r]] for r in rows})
  sources = {}
  record_index = {}
  for split in needed_splits:
    source = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
    if len(source) != len(partition[split]):
      raise ValueError(
          f"TFDS split {name}/{split} contains {len(source)} records but the partition "
          f"lists {len(partition[split])} files; pass the partition the dataset was "
          "prepared with."
      )
    if getattr(source.dataset_info, "disable_shuffling", False):
      raise ValueError(
          f"{name} was prepared with disable_shuffling=True, so its records are in "
          "generation order, which this loader does not assume."
      )
    sources[split] = source
    order = tfds_record_order(partition[split], split)
    record_index.update({key: index for index, key in enumerate(order)})
  version = str(sources[needed_splits[0]].dataset_info.version)

  def decode_row(row: int) -> np.ndarray:
    key = names[row]
    example = sources[split_of[key]][record_index[key]]
    image = example["image"]
    label = f"{name}/{split_of[key]}[{record_index[key]}] ({key})"
    if isinstance(image, bytes):
      return celeba.decode_jpeg(io.BytesIO(image), label, source_shape)
    image = np.asarray(image)
    if source_shape is not None and image.shape[:2] != tuple(source_shape):
      raise ValueError(
          f"{label} is {image.shape[1]} wide x {image.shape[0]} high, expected "
          f"{source_shape[1]} x {source_shape[0]}; pass source_shape=None to accept other sizes."
      )
    return image

  source_metadata = {
      "source": "tfds",
      "tfds_name": name,
      "tfds_version": tfds.__version__,
      "dataset_version": version,
      "splits": needed_splits,
      "jpeg_decoder": _decoder_record(decoder),
  }
  cache_options = {
      **source_metadata,
      "file_list_sha256": data_lib.strings_sha256(names),
      "layout": dataclasses.asdict(layout),
      "preprocessing": celeba.preprocessing_record(size, resize_backend),
      "source_shape": None if source_shape is None else list(source_shape),
  }

  def build():
    logging.info("CelebA: preprocessing %d of %d records of %s.", layout.num_rows, len(names), name)
    return celeba.build_celeba_data(names, layout, decode_row, source_metadata, size, resize_backend)

  return celeba.cached_build(cache_dir, "celeba-tfds", cache_options, build)
