"""A deterministic synthetic stand-in for CelebA, for tests and smoke runs.

Each 32 x 32 image is

  x = 1/2 + 1/2 tanh(s),
  s(p) = sum over scales k of a_k / sqrt(c_k) * sum_{j < c_k} w_j exp(-|p - m_j|^2 / (2 sigma_k^2))
         + tau * z(p),

with c_k blobs per scale at uniform centers m_j in [0, 32)^2, weights
w_j ~ N(0, 1), three scales sigma_k (coarse to fine) and weak white texture
z(p) ~ N(0, 1). The images have structure from coarse to fine but support no
scientific claim. Row r is drawn from its own key fold(seed, PROXY, r), so a
row's image does not depend on which other rows are generated. The rows and
blocks follow `splits.BlockLayout`, exactly as for CelebA.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import rng
from biasdiff.images import celeba
from biasdiff.images import data as data_lib
from biasdiff.images import splits as splits_lib


# Blob width in pixels, blob count and amplitude of each scale, coarse to fine.
BLOB_SIGMAS = (6.0, 2.5, 1.0)
BLOB_COUNTS = (4, 12, 32)
BLOB_AMPLITUDES = (1.0, 0.5, 0.25)
TEXTURE_AMPLITUDE = 0.05
# Rows generated per compiled call, which bounds memory to about
# chunk * sum(BLOB_COUNTS) * 32 * 32 floats.
_CHUNK = 512


def _proxy_image(key: jax.Array, size: int) -> jax.Array:
  """Draw one proxy image, float32 [size, size] in (0, 1)."""
  center_key, weight_key, texture_key = jax.random.split(key, 3)
  # Per-blob width and weight scale, all scales concatenated: [num_blobs].
  sigmas = np.repeat(np.asarray(BLOB_SIGMAS, np.float32), BLOB_COUNTS)
  scales = np.repeat(np.asarray(BLOB_AMPLITUDES) / np.sqrt(BLOB_COUNTS), BLOB_COUNTS).astype(np.float32)
  num_blobs = sum(BLOB_COUNTS)

  centers = jax.random.uniform(center_key, (num_blobs, 2), maxval=size)  # [num_blobs, 2]
  weights = scales * jax.random.normal(weight_key, (num_blobs,))  # [num_blobs]
  coordinates = jnp.arange(size, dtype=jnp.float32) + 0.5
  row_distance = (coordinates[None, :] - centers[:, 0:1]) ** 2  # [num_blobs, size]
  column_distance = (coordinates[None, :] - centers[:, 1:2]) ** 2  # [num_blobs, size]
  squared = row_distance[:, :, None] + column_distance[:, None, :]  # [num_blobs, size, size]
  blobs = jnp.exp(-squared / (2.0 * sigmas[:, None, None] ** 2))
  signal = jnp.tensordot(weights, blobs, axes=1)
  signal += TEXTURE_AMPLITUDE * jax.random.normal(texture_key, (size, size))
  return 0.5 + 0.5 * jnp.tanh(signal)


@functools.partial(jax.jit, static_argnames=("size",))
def _proxy_images(seed: int, rows: jax.Array, size: int) -> jax.Array:
  keys = jax.vmap(lambda row: rng.fold(seed, rng.PROXY, row))(rows)
  return jax.vmap(lambda key: _proxy_image(key, size))(keys)


def make_proxy_data(
    layout: splits_lib.BlockLayout = splits_lib.BlockLayout(),
    seed: int = 0,
    source_size: int = celeba.CELEBA_NUM_FILES,
    size: int = celeba.IMAGE_SIZE,
) -> tuple[data_lib.ImageData, splits_lib.Splits]:
  """Generate the proxy rows that `layout` needs; return data and splits.

  The proxy behaves like a sorted source of `source_size` images, of which the
  training blocks are the first K*n rows and the held-out block the last m.
  Generation runs on the CPU so that the data hash does not depend on the
  accelerator.

  Returns:
    (data, splits) as from `celeba.load_celeba_folder`; the ids are the source
    rows as decimal strings.
  """
  rows = layout.source_rows(source_size)
  cpu = jax.devices("cpu")[0]
  chunks = []
  with jax.default_device(cpu):
    for start in range(0, rows.size, _CHUNK):
      chunk = rows[start:start + _CHUNK]
      # Pad every call to _CHUNK rows so that it compiles once; each image
      # depends only on its own row, so the padding changes nothing.
      padded = np.pad(chunk, (0, _CHUNK - chunk.size), mode="edge")
      generated = _proxy_images(seed, jnp.asarray(padded, dtype=jnp.int32), size)
      chunks.append(np.asarray(generated)[:chunk.size])
  images = np.concatenate(chunks).astype(np.float32)[..., None]

  metadata = {
      "source": "synthetic-proxy",
      "seed": seed,
      "key": "fold(seed, PROXY=2, row)",
      "source_size": source_size,
      "size": size,
      "blob_sigmas": list(BLOB_SIGMAS),
      "blob_counts": list(BLOB_COUNTS),
      "blob_amplitudes": list(BLOB_AMPLITUDES),
      "texture_amplitude": TEXTURE_AMPLITUDE,
      "jax_version": jax.__version__,
      "layout": dataclasses.asdict(layout),
      "source_rows": rows.tolist(),
  }
  data = data_lib.ImageData(images=images, ids=tuple(str(r) for r in rows), metadata=metadata)
  blocks, heldout = layout.stored_splits_indices()
  splits = splits_lib.make_splits(
      data,
      blocks,
      heldout,
      metadata={"kind": "consecutive-blocks", "layout": dataclasses.asdict(layout)},
  )
  logging.info("Proxy: %d images from seed %d, data SHA-256 %s.", data.num_images, seed, data.sha256)
  return data, splits
