"""Handwritten digits: the real-image dataset that works offline.

scikit-learn ships the UCI optical handwritten digits: 1,797 real 8 x 8
grayscale images with integer values 0 ... 16. They are scaled by 1/16 to
[0, 1] and kept at 8 x 8, or upsampled to 16 x 16 when a network needs a third
resolution. A permutation drawn from the data seed assigns K disjoint training
blocks of n images and a held-out block. More blocks, for more model pairs,
leave fewer images per block.
"""

import logging
from typing import Optional

import numpy as np
import sklearn
from sklearn import datasets as sklearn_datasets

from biasdiff.images import data as data_lib
from biasdiff.images import splits as splits_lib

NUM_DIGITS = 1797
DIGITS_MAX_VALUE = 16.0
SIZES = (8, 16)
UPSAMPLING = "bilinear x2, half-pixel centers, edge rows and columns repeated (numpy, float64)"


def upsample2x_bilinear(images: np.ndarray) -> np.ndarray:
  """Double height and width with bilinear interpolation at half-pixel centers.

  Output pixel j samples input coordinate j/2 - 1/4, so along each axis
    out[2i]     = 3/4 x[i] + 1/4 x[i-1],
    out[2i + 1] = 3/4 x[i] + 1/4 x[i+1],
  with x[-1] = x[0] and x[h] = x[h-1]. This equals
  `jax.image.resize(images, ..., method="linear")` but runs in numpy float64,
  so the result, and hence the data hash, does not depend on the JAX backend.

  Args:
    images: [N, h, w, C] array.

  Returns:
    float32 [N, 2h, 2w, C] array.
  """
  x = np.asarray(images, dtype=np.float64)
  for axis in (1, 2):
    previous = np.concatenate([np.take(x, [0], axis=axis), np.take(x, np.arange(x.shape[axis] - 1), axis=axis)], axis=axis)
    following = np.concatenate([np.take(x, np.arange(1, x.shape[axis]), axis=axis), np.take(x, [-1], axis=axis)], axis=axis)
    even = 0.75 * x + 0.25 * previous
    odd = 0.75 * x + 0.25 * following
    # Interleave even and odd outputs along `axis`.
    x = np.stack([even, odd], axis=axis + 1)
    shape = list(even.shape)
    shape[axis] *= 2
    x = x.reshape(shape)
  return x.astype(np.float32)


def load_digits_data(
    block_size: int = 640,
    num_blocks: int = 2,
    heldout_size: Optional[int] = None,
    seed: int = 0,
    size: int = 8,
) -> tuple[data_lib.ImageData, splits_lib.Splits]:
  """Load scikit-learn's digits and split them into disjoint blocks.

  The permutation is `np.random.default_rng(seed).permutation(1797)`. Training
  block b is perm[b*n : (b+1)*n] and the held-out block is
  perm[K*n : K*n + m]; indices refer to rows of `load_digits()`, which the
  returned images keep in their original order.

  Args:
    block_size: images per training block (n).
    num_blocks: number of training blocks (K).
    heldout_size: images in the held-out block (m); None takes every image not
      in a training block.
    seed: data seed of the permutation.
    size: image side, 8 (native) or 16 (see `upsample2x_bilinear`).

  Returns:
    (data, splits): all 1,797 images, float32 [1797, size, size, 1] in [0, 1],
    with ids "0" ... "1796", and the blocks over them.

  Raises:
    ValueError: K*n + m exceeds 1,797, no image is left for the held-out block,
      or `size` is not 8 or 16.
  """
  if size not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {size!r}.")
  for name, value in (("block_size", block_size), ("num_blocks", num_blocks)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  num_training = num_blocks * block_size
  if heldout_size is None:
    heldout_size = NUM_DIGITS - num_training
    if heldout_size < 1:
      raise ValueError(
          f"{num_blocks} blocks of {block_size} use {num_training} of the "
          f"{NUM_DIGITS} digits and leave none held out; reduce num_blocks or block_size."
      )
  elif not isinstance(heldout_size, (int, np.integer)) or heldout_size < 1:
    raise ValueError(f"heldout_size must be a positive integer or None, got {heldout_size!r}.")
  if num_training + heldout_size > NUM_DIGITS:
    raise ValueError(
        f"{num_blocks} blocks of {block_size} plus {heldout_size} held-out images "
        f"need {num_training + heldout_size} digits, but there are {NUM_DIGITS}; "
        "reduce num_blocks, block_size or heldout_size."
    )

  # [1797, 8, 8] float64 with integer values 0 ... 16.
  raw = sklearn_datasets.load_digits().images
  images = (raw / DIGITS_MAX_VALUE).astype(np.float32)[..., None]
  if size == 16:
    images = upsample2x_bilinear(images)
  metadata = {
      "source": "sklearn.datasets.load_digits",
      "scikit_learn_version": sklearn.__version__,
      "scale": f"1/{DIGITS_MAX_VALUE:g}",
      "size": size,
      "upsampling": UPSAMPLING if size == 16 else None,
  }
  data = data_lib.ImageData(images=images, ids=tuple(str(i) for i in range(NUM_DIGITS)), metadata=metadata)

  permutation = np.random.default_rng(seed).permutation(NUM_DIGITS)
  train_blocks = [permutation[b * block_size:(b + 1) * block_size] for b in range(num_blocks)]
  heldout = permutation[num_training:num_training + heldout_size]
  splits = splits_lib.make_splits(
      data,
      train_blocks,
      heldout,
      metadata={
          "kind": "digits-permutation",
          "permutation": f"np.random.default_rng({seed}).permutation({NUM_DIGITS})",
          "seed": seed,
          "block_size": block_size,
          "num_blocks": num_blocks,
          "heldout_size": heldout_size,
      },
  )
  logging.info(
      "Digits: %d blocks of %d, %d held out, %dx%d, data SHA-256 %s.",
      num_blocks, block_size, heldout_size, size, size, data.sha256,
  )
  return data, splits
