"""Bias measures of the image setting, computed on device.

Models predict the noise: `eps_fn(x_t, t, *fn_args)` maps noisy images
x_t [..., B, H, W, C] and integer times t [B] to eps_hat of the same shape.
Each model works in its own centred coordinates: for a model with training
mean mu_m, the same clean image x0 and noise eps give
    x_t^(m) = sqrt(abar_t) (x0 - mu_m) + sqrt(1 - abar_t) eps.
Passing `centres` [M, H, W, C] builds these inputs for a stack of M models at
once, as [M, B, H, W, C], which an eps_fn vmapped over its parameters takes.
A single centre [H, W, C] gives [B, H, W, C]. Functions are static jit arguments, so
reuse one function object; parameters go in fn_args.

Probe noise of image `index` of set `set_id` at time t is drawn from
fold(seed, PROBE, set_id, index, t, 0), the same at every checkpoint and for
every model. Images carry `image_ndim` trailing axes (3 for H, W, C).
These functions keep the caller's matmul precision and dtype policy.
"""

import functools
import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import kernels
from biasdiff import rng
from biasdiff.metrics import probes
from biasdiff.metrics import stats
from biasdiff.metrics.stats import Summary

logger = logging.getLogger(__name__)

# Added to each image's std (ddof 1) before dividing, as in the authors' code.
STD_OFFSET = 1e-12
# Lower bound on |e_a| |e_b| in the raw cosine of two noise predictions.
COSINE_NORM_FLOOR = 1e-8
# A sample is memorised when d1 / d2 is below this ratio.
MEMORISATION_RATIO = 1.0 / 3.0

EpsFn = Callable[..., jax.Array]


# ---------------------------------------------------------------------------
# Similarities.


def standardize(images: Any, image_ndim: int = 3) -> jax.Array:
  """Map each image to a unit vector z whose dot products are Pearson correlations.

  s = (x - mean(x)) / (std(x, ddof 1) + 1e-12) over the image's pixels, and
  z = s / max(||s||, 1e-12). A constant image maps to z = 0.

  Returns:
    float32 [..., D] with D the number of pixels.
  """
  images = jnp.asarray(images, jnp.float32)
  _check_image_ndim(images, image_ndim, "images")
  flat = images.reshape(images.shape[:images.ndim - image_ndim] + (-1,))
  if flat.shape[-1] < 2:
    raise ValueError(f"Images need at least 2 pixels for a std with ddof 1, got {flat.shape[-1]}.")
  centred = flat - jnp.mean(flat, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (flat.shape[-1] - 1))
  scaled = centred / (std + STD_OFFSET)
  norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=-1, keepdims=True))
  return scaled / jnp.maximum(norm, 1e-12)


def pearson_similarity(a: Any, b: Any, image_ndim: int = 3) -> jax.Array:
  """Compute the Pearson correlation r = <z_a, z_b> of paired images: [..., *image] -> [...].

  It ignores brightness, contrast and each model's centring shift:
  r(c x + d, y) = r(x, y) for c > 0.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  _check_same_image_shape(a, b, image_ndim)
  probes.check_finite(a, "a")
  probes.check_finite(b, "b")
  return jnp.sum(standardize(a, image_ndim) * standardize(b, image_ndim), axis=-1)


def noise_cosine(eps_a: Any, eps_b: Any, image_ndim: int = 3) -> jax.Array:
  """Compute the raw cosine s = <e_a, e_b> / max(|e_a| |e_b|, 1e-8): [..., *image] -> [...].

  Not standardised: the vectors are the noise predictions as they are.
  """
  eps_a = jnp.asarray(eps_a, jnp.float32)
  eps_b = jnp.asarray(eps_b, jnp.float32)
  _check_same_image_shape(eps_a, eps_b, image_ndim)
  probes.check_finite(eps_a, "eps_a")
  probes.check_finite(eps_b, "eps_b")
  return _noise_cosine(eps_a, eps_b, image_ndim)


def _noise_cosine(eps_a, eps_b, image_ndim):
  axes = tuple(range(-image_ndim, 0))
  inner = jnp.sum(eps_a * eps_b, axis=axes)
  norms = jnp.sqrt(jnp.sum(eps_a * eps_a, axis=axes) * jnp.sum(eps_b * eps_b, axis=axes))
  return inner / jnp.maximum(norms, COSINE_NORM_FLOOR)


def _check_image_ndim(x: jax.Array, image_ndim: int, name: str) -> None:
  if isinstance(image_ndim, bool) or not isinstance(image_ndim, int) or image_ndim < 1:
    raise ValueError(f"image_ndim must be a positive int, got {image_ndim!r}.")
  if x.ndim < image_ndim:
    raise ValueError(f"{name} has shape {x.shape}, fewer than image_ndim={image_ndim} axes.")


def _check_same_image_shape(a: jax.Array, b: jax.Array, image_ndim: int) -> None:
  _check_image_ndim(a, image_ndim, "the first input")
  _check_image_ndim(b, image_ndim, "the second input")
  if a.shape[a.ndim - image_ndim:] != b.shape[b.ndim - image_ndim:]:
    raise ValueError(
        f"Image shapes differ: {a.shape[a.ndim - image_ndim:]} and "
        f"{b.shape[b.ndim - image_ndim:]}; pair images of the same size.")
  try:
    jnp.broadcast_shapes(a.shape[:a.ndim - image_ndim], b.shape[:b.ndim - image_ndim])
  except ValueError as error:
    raise ValueError(
        f"Leading shapes {a.shape[:a.ndim - image_ndim]} and {b.shape[:b.ndim - image_ndim]} "
        "do not broadcast; pair the same number of images.") from error


def unordered_pairs(num_models: int) -> np.ndarray:
  """List the pairs (i, j) with i < j in lexicographic order: int [M (M - 1) / 2, 2]."""
  i, j = np.triu_indices(num_models, k=1)
  return np.stack([i, j], axis=1)


# ---------------------------------------------------------------------------
# Paired samples: the sample-split cosine distance.


class CosineDistance(NamedTuple):
  """D = 1 - median over model pairs of the mean paired-sample correlation."""
  distance: float
  se: float  # leave-one-model-out jackknife of D; NaN with fewer than 3 models
  pair_means: np.ndarray  # [P] m_ij = mean_k r_k
  pairs: np.ndarray  # [P, 2] model indices (i < j)
  per_sample: np.ndarray  # [P, N] r_k of every pair and sample
  count: int  # pairs
  num_samples: int


def cosine_distance(samples: Any, image_ndim: int = 3) -> CosineDistance:
  """Compute the sample-split cosine distance of models sampled from shared noise.

  samples[i, k] is sample k of model i, generated from the same noise path for
  every model. For each unordered pair (i, j), r_k = pearson(x_k^i, x_k^j) and
  m_ij = mean_k r_k; D = 1 - median_{pairs} m_ij. The SE is a
  leave-one-model-out jackknife, because pairs share models.

  Args:
    samples: [M, N, *image] with M >= 2 models.
  """
  samples = jnp.asarray(samples, jnp.float32)
  if samples.ndim != 2 + image_ndim or samples.shape[0] < 2 or samples.shape[1] < 1:
    raise ValueError(
        f"samples must have shape [M, N, *image] with M >= 2 models and image_ndim="
        f"{image_ndim}, got {samples.shape}.")
  probes.check_finite(samples, "samples")
  pairs = unordered_pairs(samples.shape[0])
  correlations = np.asarray(_all_pair_correlations(samples, image_ndim=image_ndim))  # [M, M, N]
  per_sample = correlations[pairs[:, 0], pairs[:, 1]]  # [P, N]
  pair_means = per_sample.mean(axis=1)
  distance = stats.jackknife(1.0 - pair_means, pairs, statistic="median")
  return CosineDistance(float(distance.estimate), float(distance.se), pair_means, pairs,
                        per_sample, int(pairs.shape[0]), int(samples.shape[1]))


@functools.partial(jax.jit, static_argnames=("image_ndim",))
def _all_pair_correlations(samples, *, image_ndim):
  z = standardize(samples, image_ndim)  # [M, N, D]
  return jnp.einsum("ind,jnd->ijn", z, z, precision=lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------
# Noise predictions on fixed probes.


def centred_inputs(images: Any, centres: Any, schedule: diffusion.Schedule, t: Any,
                   noise: Any) -> jax.Array:
  """Noise clean images in each model's coordinates.

  x_t = sqrt(abar_t) (x0 - mu) + sqrt(1 - abar_t) eps for each centre mu.

  Args:
    images: clean x0 [N, *image].
    centres: [*image] or [M, *image], one per model.
    t: an integer time, scalar or [N].
    noise: eps [N, *image].

  Returns:
    [N, *image] or [M, N, *image].
  """
  images = jnp.asarray(images, jnp.float32)
  centres = jnp.asarray(centres, jnp.float32)
  image_ndim = images.ndim - 1
  if centres.shape[centres.ndim - image_ndim:] != images.shape[1:] or centres.ndim > image_ndim + 1:
    raise ValueError(
        f"centres must have shape {images.shape[1:]} or [M, *{images.shape[1:]}] to match the "
        f"images, got {centres.shape}.")
  if jnp.shape(noise) != images.shape:
    raise ValueError(f"noise has shape {jnp.shape(noise)}, expected {images.shape}.")
  t = jnp.broadcast_to(jnp.asarray(t), images.shape[:1])
  shift = centres if centres.ndim == image_ndim else centres[:, None]
  unit = (slice(None),) + (None,) * image_ndim
  signal = schedule.signal_scale(t)[unit]
  noise_scale = schedule.noise_scale(t)[unit]
  return signal * (images - shift) + noise_scale * noise


def predict_noise(eps_fn: EpsFn, images: Any, centres: Any, schedule: diffusion.Schedule, *,
                  t: int, seed: rng.KeyLike, set_id: int, indices: Any = None,
                  fn_args: tuple = (), batch_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """Evaluate eps_fn on fixed noisy probes at one time.

  Image i gets eps from fold(seed, PROBE, set_id, indices[i], t, 0) and is
  noised in each model's coordinates (see `centred_inputs`).

  Returns:
    (eps_hat [..., N, *image], eps [N, *image]); ... are the leading axes of
    the eps_fn output (a model stack).
  """
  images = _check_images(images)
  centres = jnp.asarray(centres, jnp.float32)
  probes.check_finite(centres, "centres")
  t = probes.check_time(schedule, t)
  set_id = probes.check_nonnegative_int(set_id, "set_id")
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  indices = probes.check_indices(indices, images.shape[0])
  centred_inputs(images[:1], centres, schedule, t, jnp.zeros_like(images[:1]))  # shape check
  eps_hat, eps = _predict_noise(rng.as_key(seed), images, jnp.asarray(indices, jnp.int32), centres,
                                jnp.int32(t), jnp.int32(set_id), tuple(fn_args), fn=eps_fn,
                                schedule=schedule, batch_size=batch_size)
  probes.check_finite(eps_hat, "eps_fn output")
  return eps_hat, eps


@functools.partial(jax.jit, static_argnames=("fn", "schedule", "batch_size"))
def _predict_noise(key, images, indices, centres, t, set_id, fn_args, *, fn, schedule, batch_size):
  image_ndim = images.ndim - 1

  def evaluate(batch):
    x0, index = batch
    eps = probes.probe_noise(key, set_id, index, t, 0, x0.shape[1:])
    times = jnp.full(index.shape, t, jnp.int32)
    eps_hat = fn(centred_inputs(x0, centres, schedule, times, eps), times, *fn_args)
    return eps_hat, eps

  eps_hat, eps = probes.map_in_batches(evaluate, (images, indices), batch_size,
                                       out_axis=-(image_ndim + 1))
  return eps_hat, eps


def pairwise_noise_cosines(predictions: Any, image_ndim: int = 3) -> jax.Array:
  """Compute s(eps_hat_a, eps_hat_b) for every model pair on shared probes.

  [M, N, *image] -> [M, M, N].
  """
  predictions = jnp.asarray(predictions, jnp.float32)
  if predictions.ndim != 2 + image_ndim:
    raise ValueError(
        f"predictions must have shape [M, N, *image] with image_ndim={image_ndim}, got "
        f"{predictions.shape}.")
  probes.check_finite(predictions, "predictions")
  return _pairwise_noise_cosines(predictions, image_ndim=image_ndim)


@functools.partial(jax.jit, static_argnames=("image_ndim",))
def _pairwise_noise_cosines(predictions, *, image_ndim):
  flat = predictions.reshape(predictions.shape[:2] + (-1,))  # [M, N, D]
  inner = jnp.einsum("ind,jnd->ijn", flat, flat, precision=lax.Precision.HIGHEST)
  norms = jnp.sqrt(jnp.sum(flat * flat, axis=-1))  # [M, N]
  return inner / jnp.maximum(norms[:, None] * norms[None, :], COSINE_NORM_FLOOR)


class NoiseSimilarity(NamedTuple):
  """Agreement of two models' noise predictions on train vs test probes."""
  train: stats.JackknifeResult  # S_train: mean over ordered pairs (a, b), a != b
  test: stats.JackknifeResult  # S_test: mean over unordered pairs
  difference: float  # S_test - S_train
  ratio: float  # S_test / S_train


def noise_similarity(train_pair_means: Any, test_pair_means: Any) -> NoiseSimilarity:
  """Combine per-pair probe means into S_train and S_test with jackknife SEs.

  Args:
    train_pair_means: [M, M]; entry (a, b) is the mean over the train probes
      of split a (seen by a, unseen by b) of s(eps_hat_a, eps_hat_b). The
      diagonal is ignored.
    test_pair_means: [M, M]; entry (a, b) is the mean over the shared test
      probes; only a < b is used, since the cosine is symmetric.

  Both SEs come from a leave-one-model-out jackknife, because pairs share
  models.
  """
  train_pair_means = np.asarray(train_pair_means, np.float64)
  test_pair_means = np.asarray(test_pair_means, np.float64)
  num_models = train_pair_means.shape[0]
  for name, value in (("train_pair_means", train_pair_means),
                      ("test_pair_means", test_pair_means)):
    if value.shape != (num_models, num_models) or num_models < 2:
      raise ValueError(
          f"{name} must be a square [M, M] array with M >= 2 matching the other, got "
          f"{value.shape}.")
  ordered = np.argwhere(~np.eye(num_models, dtype=bool))  # [M (M - 1), 2]
  unordered = unordered_pairs(num_models)
  train = stats.jackknife(train_pair_means[ordered[:, 0], ordered[:, 1]], ordered)
  test = stats.jackknife(test_pair_means[unordered[:, 0], unordered[:, 1]], unordered)
  s_train, s_test = float(train.estimate), float(test.estimate)
  ratio = s_test / s_train if s_train != 0 else float("nan")
  return NoiseSimilarity(train, test, s_test - s_train, ratio)


# ---------------------------------------------------------------------------
# Test denoising loss over time.


class DenoisingLoss(NamedTuple):
  """Per-image MSE of eps_hat vs eps at every time, and its time averages."""
  times: np.ndarray  # [T]
  per_image: jax.Array  # [..., T, N] mean over pixels of (eps_hat - eps)^2
  all_times: Summary  # mean over every t given, SE across images
  trained_times: Summary  # the same over t >= 1 only


def denoising_loss(eps_fn: EpsFn, images: Any, centres: Any, schedule: diffusion.Schedule, *,
                   seed: rng.KeyLike, set_id: int, indices: Any = None, times: Any = None,
                   fn_args: tuple = (), batch_size: int = 256,
                   times_per_call: int = 50) -> DenoisingLoss:
  """Compute the denoising loss per time and image with fixed noise, and its averages over t.

  At time t image i is noised with eps from fold(seed, PROBE, set_id, index,
  t, 0), and the loss is mean over pixels of (eps_hat - eps)^2. all_times is
  the per-image mean over every time in `times` (by default all of the
  schedule, t = 0 included, as in the authors' code), then mean +- SE over
  images; trained_times does the same over t >= 1.

  Args:
    times: [T] integer times; default every time of the schedule.
    times_per_call: times evaluated per device call; a host loop runs the
      calls and logs progress.
  """
  images = _check_images(images)
  centres = jnp.asarray(centres, jnp.float32)
  probes.check_finite(centres, "centres")
  set_id = probes.check_nonnegative_int(set_id, "set_id")
  batch_size = probes.check_positive_int(batch_size, "batch_size")
  times_per_call = probes.check_positive_int(times_per_call, "times_per_call")
  indices = probes.check_indices(indices, images.shape[0])
  times = schedule.times if times is None else np.asarray(times)
  if times.ndim != 1 or times.size < 1:
    raise ValueError(f"times must be a non-empty 1-D array, got shape {times.shape}.")
  for t in times:
    probes.check_time(schedule, int(t), "times entry")
  times = times.astype(np.int32)
  centred_inputs(images[:1], centres, schedule, int(times[0]), jnp.zeros_like(images[:1]))

  key = rng.as_key(seed)
  call_size = min(times_per_call, times.size)
  chunks = []
  for start in range(0, times.size, call_size):
    chunk = times[start:start + call_size]
    padded = np.concatenate([chunk, np.full(call_size - chunk.size, chunk[-1], np.int32)])
    losses = _loss_chunk(key, jnp.asarray(padded), images, jnp.asarray(indices, jnp.int32),
                         centres, jnp.int32(set_id), tuple(fn_args), fn=eps_fn,
                         schedule=schedule, batch_size=batch_size)  # [C, ..., N]
    chunks.append(losses[:chunk.size])
    logger.info("Denoising loss: %d of %d times done.", start + chunk.size, times.size)
  per_image = jnp.moveaxis(jnp.concatenate(chunks), 0, -2)  # [..., T, N]
  probes.check_finite(per_image, "the per-image loss (eps_fn returned NaN or infinity)")
  all_times = stats.mean_and_se(jnp.mean(per_image, axis=-2))
  trained = times >= 1
  if trained.any():
    trained_times = stats.mean_and_se(jnp.mean(per_image[..., trained, :], axis=-2))
  else:
    empty = jnp.full(all_times.mean.shape, jnp.nan)
    trained_times = Summary(empty, empty, 0)
  return DenoisingLoss(times, per_image, all_times, trained_times)


@functools.partial(jax.jit, static_argnames=("fn", "schedule", "batch_size"))
def _loss_chunk(key, times, images, indices, centres, set_id, fn_args, *, fn, schedule,
                batch_size):
  image_axes = tuple(range(-(images.ndim - 1), 0))

  def at_time(t):

    def evaluate(batch):
      x0, index = batch
      eps = probes.probe_noise(key, set_id, index, t, 0, x0.shape[1:])
      batch_times = jnp.full(index.shape, t, jnp.int32)
      eps_hat = fn(centred_inputs(x0, centres, schedule, batch_times, eps), batch_times, *fn_args)
      return jnp.mean((eps_hat - eps)**2, axis=image_axes)  # [..., B]

    return probes.map_in_batches(evaluate, (images, indices), batch_size, out_axis=-1)

  return lax.map(at_time, times)


def _check_images(images: Any) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim < 2 or images.shape[0] < 1:
    raise ValueError(f"images must have shape [N, *image] with N >= 1, got {images.shape}.")
  probes.check_finite(images, "images")
  return images


# ---------------------------------------------------------------------------
# Memorisation.


class MemorisedFraction(NamedTuple):
  """Fraction of samples that are near-copies of a training image."""
  fraction: float
  se: float  # bootstrap SE over samples
  low: float  # percentile interval
  high: float
  confidence: float
  memorised: np.ndarray  # [N] bool
  ratio: np.ndarray  # [N] d1 / d2; NaN where d2 = 0
  nearest_distance: np.ndarray  # [N] d1
  second_distance: np.ndarray  # [N] d2
  count: int
  num_resamples: int


def memorised_fraction(samples: Any, training: Any, *, seed: rng.KeyLike,
                       threshold: float = MEMORISATION_RATIO, num_resamples: int = 1000,
                       confidence: float = 0.95, bootstrap_ids: Sequence[int] = (0, 0),
                       **kernel_options) -> MemorisedFraction:
  """Compute the fraction of samples memorised from their model's training split.

  With d1 <= d2 the two smallest Euclidean distances of a sample to the
  training images, the sample is memorised iff d1 / d2 < threshold (1/3); if
  d2 = 0 it is memorised iff d1 = 0, which then always holds. Distances come
  from the exact tiled search of `biasdiff.kernels` (k = 2), which recomputes
  the nearest candidates as exact squared differences. The SE and the
  interval come from a percentile bootstrap over samples, with resamples from
  fold(seed, SUBSET, SUBSET_BOOTSTRAP, *bootstrap_ids).

  Args:
    samples: [N, *image] generated images in image units (the model's mean
      added back).
    training: [R, *image] the model's training split, R >= 2.
  """
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must lie in (0, 1], got {threshold}.")
  samples = np.asarray(samples, np.float32)
  training = np.asarray(training, np.float32)
  if samples.ndim < 2 or samples.shape[0] < 1:
    raise ValueError(f"samples must have shape [N, *image] with N >= 1, got {samples.shape}.")
  squared, _ = kernels.nearest_neighbors(samples, training, "sqeuclidean", k=2, **kernel_options)
  distances = np.sqrt(np.maximum(np.asarray(squared, np.float64), 0.0))
  nearest, second = distances[:, 0], distances[:, 1]
  positive = second > 0
  ratio = np.where(positive, nearest / np.where(positive, second, 1.0), np.nan)
  memorised = np.where(positive, ratio < threshold, nearest == 0)
  result = stats.bootstrap(memorised, seed, "mean", num_resamples=num_resamples,
                           confidence=confidence, ids=bootstrap_ids)
  return MemorisedFraction(result.estimate, result.se, result.low, result.high, confidence,
                           memorised, ratio, nearest, second, result.count, num_resamples)
