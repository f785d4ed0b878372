"""CelebA at 32 x 32 grayscale from a folder of the aligned JPEGs.

Each image goes through these steps, in this order:

  1. decode to RGB floats in [0, 1] (uint8 / 255);
  2. resize so the shorter side is 32 with antialiased bilinear interpolation
     on the float image. The long side becomes int(32 * long / short), so
     178 x 218 becomes 32 wide x 39 high;
  3. center-crop 32 x 32 at offset round((39 - 32) / 2) = 4 rows (Python
     rounds 3.5 to 4);
  4. grayscale 0.299 R + 0.587 G + 0.114 B, clipped to [0, 1] against float
     rounding.

Resizing before the grayscale conversion matters: the other order changes
pixel values slightly. The files are sorted by name, so `000001.jpg` is row 0.
Training block i is rows [n*i, n*(i+1)) and the test set is the last m rows
(`splits.BlockLayout`); only those rows are decoded.
"""

import dataclasses
import functools
import json
import logging
import os
import pathlib
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL
from PIL import Image

from biasdiff.images import data as data_lib
from biasdiff.images import splits as splits_lib

IMAGE_SIZE = 32
# (height, width) of the aligned CelebA JPEGs in img_align_celeba.
CELEBA_SOURCE_SHAPE = (218, 178)
CELEBA_NUM_FILES = 202599
GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)
RESIZE_BACKENDS = ("pil", "jax")
JPEG_SUFFIXES = (".jpg", ".jpeg")
# Images decoded between two progress messages.
_LOG_EVERY = 2048


def resized_shape(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
  """Return (height, width) after scaling the shorter side to `size`."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop_offsets(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
  """Return (top, left) of the centered size x size crop, rounding halves to even."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


@functools.partial(jax.jit, static_argnames=("shape",))
def _resize_jax(image: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  return jax.image.resize(image, shape, method="linear", antialias=True)


def _resize_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
  # PIL resizes one float32 ("F" mode) channel at a time. Its bilinear filter
  # widens by the scale factor when shrinking, which is the antialiasing.
  channels = [
      np.asarray(
          Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
              (width, height), Image.Resampling.BILINEAR
          )
      )
      for c in range(image.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def preprocess_celeba_image(
    rgb: np.ndarray, size: int = IMAGE_SIZE, resize_backend: str = "pil"
) -> np.ndarray:
  """Turn one RGB uint8 image into a size x size grayscale float32 image in [0, 1].

  Args:
    rgb: uint8 [height, width, 3] array.
    size: side of the output.
    resize_backend: "pil" (Pillow, float32 per channel) or "jax"
      (`jax.image.resize`, method="linear", antialias=True). The two agree to
      about 1e-6 on CelebA-sized images.

  Returns:
    float32 [size, size] array.
  """
  if resize_backend not in RESIZE_BACKENDS:
    raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {resize_backend!r}.")
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [height, width, 3] image, got {rgb.dtype} {rgb.shape}.")
  image = rgb.astype(np.float32) / np.float32(255.0)
  height, width = resized_shape(*rgb.shape[:2], size=size)
  if resize_backend == "pil":
    resized = _resize_pil(image, height, width)
  else:
    resized = np.asarray(_resize_jax(jnp.asarray(image), (height, width, 3)))
  top, left = center_crop_offsets(height, width, size=size)
  crop = resized[top:top + size, left:left + size]
  red, green, blue = (np.float32(w) for w in GRAYSCALE_WEIGHTS)
  gray = red * crop[..., 0] + green * crop[..., 1] + blue * crop[..., 2]
  return np.clip(gray, 0.0, 1.0).astype(np.float32)


def preprocessing_record(size: int, resize_backend: str) -> dict[str, Any]:
  """Return the JSON description of `preprocess_celeba_image` with these options."""
  if resize_backend not in RESIZE_BACKENDS:
    raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {resize_backend!r}.")
  if resize_backend == "pil":
    resize = {"library": "Pillow", "version": PIL.__version__, "call": "Image.resize(BILINEAR) on mode F"}
  else:
    resize = {
        "library": "jax",
        "version": jax.__version__,
        "call": 'jax.image.resize(method="linear", antialias=True)',
        "backend": jax.default_backend(),
    }
  return {
      "steps": [
          "decode RGB, uint8 / 255",
          f"antialiased bilinear resize, shorter side {size}",
          f"center crop {size}x{size}",
          "grayscale 0.299 R + 0.587 G + 0.114 B, clip to [0, 1]",
      ],
      "size": size,
      "resize": resize,
  }


def decode_jpeg(source: Any, name: str, source_shape: Optional[tuple[int, int]]) -> np.ndarray:
  """Decode a JPEG file or bytes object to uint8 RGB [height, width, 3].

  Args:
    source: a path or a binary file object.
    name: file name used in error messages.
    source_shape: (height, width) every image must have, or None to accept any.

  Raises:
    ValueError: the file cannot be decoded or has another size.
  """
  try:
    with Image.open(source) as image:
      rgb = np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as error:
    # Pillow raises UnidentifiedImageError (an OSError) for bytes that are no
    # image and OSError for truncated files.
    raise ValueError(
        f"cannot decode JPEG {name}: {error}; replace it with an intact copy."
    ) from error
  if source_shape is not None and rgb.shape[:2] != tuple(source_shape):
    raise ValueError(
        f"{name} is {rgb.shape[1]} wide x {rgb.shape[0]} high, expected "
        f"{source_shape[1]} x {source_shape[0]} (the aligned CelebA images in "
        "img_align_celeba); pass source_shape=None to accept other sizes."
    )
  return rgb


def list_jpegs(folder: data_lib.PathLike) -> tuple[pathlib.Path, list[str]]:
  """Return the image folder and its JPEG file names in sorted order.

  `folder` may be the `img_align_celeba` folder itself or a folder that
  contains it.

  Raises:
    FileNotFoundError: the folder does not exist or contains no JPEG files.
  """
  folder = _image_folder(folder)
  names = sorted(_jpeg_names(folder))
  if not names:
    raise FileNotFoundError(_no_jpegs_message(folder))
  return folder, names


def check_folder(folder: data_lib.PathLike, layout: splits_lib.BlockLayout) -> None:
  """Raise the errors `load_celeba_folder` would raise about the folder, without decoding.

  Counts the JPEG names in one pass over the folder, without sorting them or
  opening any file, so it is cheap enough to run before a long job.

  Raises:
    FileNotFoundError: the folder does not exist or contains no JPEG files.
    ValueError: the layout needs more images than the folder contains.
  """
  folder = _image_folder(folder)
  count = sum(1 for _ in _jpeg_names(folder))
  if count == 0:
    raise FileNotFoundError(_no_jpegs_message(folder))
  if layout.num_rows > count:
    raise ValueError(
        f"CelebA folder {folder} contains {count} JPEG files, but {layout.num_blocks} blocks of "
        f"{layout.block_size} plus {layout.heldout_size} held-out images need {layout.num_rows}; "
        f"pass the full img_align_celeba folder ({CELEBA_NUM_FILES:,} files) or reduce "
        "num_blocks, block_size or heldout_size."
    )


def _image_folder(folder: data_lib.PathLike) -> pathlib.Path:
  """Return `folder`, or its img_align_celeba subfolder when it has one."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(
        f"CelebA folder {folder} not found; pass the folder of aligned JPEGs "
        "(img_align_celeba) from your own copy of CelebA."
    )
  if (folder / "img_align_celeba").is_dir():
    folder = folder / "img_align_celeba"
  return folder


def _jpeg_names(folder: pathlib.Path) -> Iterator[str]:
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.is_file() and os.path.splitext(entry.name)[1].lower() in JPEG_SUFFIXES:
        yield entry.name


def _no_jpegs_message(folder: pathlib.Path) -> str:
  return (f"no .jpg files in {folder}; pass the folder of aligned CelebA JPEGs "
          "(000001.jpg, 000002.jpg, ...).")


def build_celeba_data(
    names: Sequence[str],
    layout: splits_lib.BlockLayout,
    decode_row: Callable[[int], np.ndarray],
    source_metadata: dict[str, Any],
    size: int,
    resize_backend: str,
) -> tuple[data_lib.ImageData, splits_lib.Splits]:
  """Preprocess the rows `layout` needs from a sorted source; return data and splits.

  Args:
    names: sorted file names of the whole source; row r is names[r].
    layout: the blocks and held-out rows to take.
    decode_row: function from a source row to uint8 RGB [height, width, 3].
    source_metadata: JSON description of the source, stored in the metadata.
    size: output side.
    resize_backend: see `preprocess_celeba_image`.
  """
  rows = layout.source_rows(len(names))
  images = np.empty((rows.size, size, size, 1), np.float32)
  for position, row in enumerate(rows):
    images[position, ..., 0] = preprocess_celeba_image(decode_row(int(row)), size, resize_backend)
    if (position + 1) % _LOG_EVERY == 0:
      logging.info("CelebA: preprocessed %d of %d images.", position + 1, rows.size)

  metadata = {
      **source_metadata,
      "file_list_sha256": data_lib.strings_sha256(names),
      "num_files": len(names),
      "layout": dataclasses.asdict(layout),
      "source_rows": rows.tolist(),
      "preprocessing": preprocessing_record(size, resize_backend),
  }
  data = data_lib.ImageData(images=images, ids=tuple(names[r] for r in rows), metadata=metadata)
  blocks, heldout = layout.stored_splits_indices()
  splits = splits_lib.make_splits(
      data,
      blocks,
      heldout,
      metadata={
          "kind": "consecutive-blocks",
          "layout": dataclasses.asdict(layout),
          "train_files": [[names[r] for r in (rows[blocks[b][0]], rows[blocks[b][-1]])] for b in range(len(blocks))],
          "heldout_files": [names[rows[heldout[0]]], names[rows[heldout[-1]]]],
      },
  )
  return data, splits


def cached_build(
    cache_dir: Optional[data_lib.PathLike],
    prefix: str,
    cache_options: dict[str, Any],
    build: Callable[[], tuple[data_lib.ImageData, splits_lib.Splits]],
) -> tuple[data_lib.ImageData, splits_lib.Splits]:
  """Return `build()`, reusing a cached copy whose options match.

  The cache folder is `cache_dir/<prefix>-<first 16 hex digits of the SHA-256
  of the options>`. A cached copy is reused only when the options stored in
  its metadata equal `cache_options` and its array matches its stored hash.

  Raises:
    ValueError: the cached array does not match its stored hash (the error
      names the folder to delete).
  """
  if cache_dir is None:
    return build()
  key = data_lib.strings_sha256([json.dumps(cache_options, sort_keys=True)])[:16]
  folder = pathlib.Path(cache_dir) / f"{prefix}-{key}"
  if (folder / data_lib.METADATA_FILE).is_file():
    data, splits = splits_lib.load_prepared(folder)
    if data.metadata.get("cache_options") == json.loads(json.dumps(cache_options)):
      logging.info("CelebA: reusing the cached arrays in %s.", folder)
      return data, splits
    logging.warning("CelebA: the cache in %s was made with other options; rebuilding it.", folder)

  data, splits = build()
  data = data_lib.ImageData(
      images=data.images, ids=data.ids, metadata={**data.metadata, "cache_options": cache_options}
  )
  # The metadata does not enter the hash, so the splits stay valid.
  splits_lib.save_prepared(data, splits, folder)
  logging.info("CelebA: wrote %d preprocessed images to %s.", data.num_images, folder)
  return data, splits


def load_celeba_folder(
    folder: data_lib.PathLike,
    layout: splits_lib.BlockLayout = splits_lib.BlockLayout(),
    cache_dir: Optional[data_lib.PathLike] = None,
    size: int = IMAGE_SIZE,
    resize_backend: str = "pil",
    source_shape: Optional[tuple[int, int]] = CELEBA_SOURCE_SHAPE,
) -> tuple[data_lib.ImageData, splits_lib.Splits]:
  """Load the CelebA blocks and test set from a folder of aligned JPEGs.

  Only the K*n + m rows of the layout are decoded (17,408 with the defaults).
  The returned images contain the training blocks first and the test rows
  last. `data.ids` are the file names and `metadata["source_rows"]` are their
  rows in the sorted file list.

  Args:
    folder: `img_align_celeba` or a folder containing it.
    layout: block size, block count and test size.
    cache_dir: if given, the preprocessed arrays are stored there and reused
      while the SHA-256 of the sorted file-name list and every option match.
    size: output side in pixels.
    resize_backend: "pil" or "jax", see `preprocess_celeba_image`.
    source_shape: (height, width) every JPEG must have; None accepts any.

  Raises:
    FileNotFoundError: the folder is missing or contains no JPEG.
    ValueError: the layout needs more rows than there are files, a JPEG is
      corrupt or has another size (the message names the file), or the cache
      does not match its hash.
  """
  image_folder, names = list_jpegs(folder)
  layout.source_rows(len(names))  # Fails early when the layout does not fit.
  decoder_record = {"library": "Pillow", "version": PIL.__version__}
  cache_options = {
      "source": "celeba-folder",
      "jpeg_decoder": decoder_record,
      "file_list_sha256": data_lib.strings_sha256(names),
      "layout": dataclasses.asdict(layout),
      "preprocessing": preprocessing_record(size, resize_backend),
      "source_shape": None if source_shape is None else list(source_shape),
  }

  def decode_row(row: int) -> np.ndarray:
    return decode_jpeg(image_folder / names[row], names[row], source_shape)

  def build():
    logging.info("CelebA: preprocessing %d of %d files in %s.", layout.num_rows, len(names), image_folder)
    return build_celeba_data(
        names,
        layout,
        decode_row,
        {
            "source": "celeba-folder",
            "folder": str(image_folder),
            "jpeg_decoder": decoder_record,
        },
        size,
        resize_backend,
    )

  return cached_build(cache_dir, "celeba-folder", cache_options, build)
