"""Per-checkpoint evaluation of a stack of image models trained on disjoint blocks.

At one checkpoint, for M models with centring shifts mu_m, this module
computes:

- the test denoising loss per model, time and held-out image with fixed noise
  (each model in its own coordinates x0 - mu_m);
- the models' predicted noises on noised training probes of each block and on
  held-out probes at a few fixed times, reduced to [M, M] probe means of the
  raw cosine;
- paired samples: every model runs the ancestral sampler from the same start
  noise and step noise (sample k has one noise path for every model and
  checkpoint), and each sample is mapped back to image units by + mu_m;
- from the samples: per-pair Pearson correlations, each sample's nearest
  neighbour by Pearson correlation in its model's own block, its two nearest
  Euclidean distances to its own block (memorisation), and its nearest
  Euclidean distance to every block.

Everything returned is a dictionary of numpy arrays, which the pipeline
caches per checkpoint.
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import kernels
from biasdiff.metrics import images as image_metrics
from biasdiff.metrics import probes

logger = logging.getLogger(__name__)

MODEL_LOOPS = ("vmap", "map")


@functools.lru_cache(maxsize=16)
def stack_eps_fn(model: Any, model_loop: str) -> Callable[..., jax.Array]:
  """Return eps_fn(x_t, t, params) for a stack of M models of one architecture.

  x_t is [M, B, H, W, C], t is [B] or [M, B] (0-based DDPM times) and params
  has leaves [M, ...]; the result is eps_hat [M, B, H, W, C]. "vmap" batches
  the models into one call. "map" runs them one after another inside the
  compiled program, which avoids the grouped convolutions that vmap creates
  and ran about 2.8x faster for six 8 x 8 U-Nets on a 2-core CPU. The function
  is cached, so the jitted metrics that take it as a static argument compile
  once per (model, loop).
  """
  if model_loop not in MODEL_LOOPS:
    raise ValueError(f"model_loop must be one of {MODEL_LOOPS}, got {model_loop!r}.")

  def apply_one(params, x_t, t):
    return model.apply({"params": params}, x_t, t, train=False)

  def eps_fn(x_t, t, params):
    # x_t: [M, B, H, W, C]; t: [B] or [M, B]
    t = jnp.broadcast_to(t, x_t.shape[:2]).astype(jnp.int32)
    if model_loop == "vmap":
      return jax.vmap(apply_one)(params, x_t, t)
    return jax.lax.map(lambda inputs: apply_one(*inputs), (params, x_t, t))

  return eps_fn


@functools.lru_cache(maxsize=16)
def stack_sampler_fn(model: Any, model_loop: str) -> Callable[..., jax.Array]:
  """Return denoise(x, k, params, kept_times) for the (respaced) sampler.

  The sampler counts its own steps k = 0 ... K - 1; the network is called at
  the original time kept_times[k].
  """
  eps_fn = stack_eps_fn(model, model_loop)

  def denoise(x, k, params, kept_times):
    # x: [M, B, H, W, C]; k: [M, B] sampler step indices
    return eps_fn(x, kept_times[k], params)

  return denoise


def loss_times(num_steps: int, num_times: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Return the loss times and their weights for the two time averages.

  num_times = 0 takes every t = 0 ... T - 1. Otherwise the times are t = 0
  plus K stratified times t_j = 1 + floor((j + 1/2) (T - 1) / K), the midpoints
  of K equal strata of 1 ... T - 1, each standing for its stratum.

  Returns:
    (times [T'], all_weights [T'], trained_weights [T']): the weighted sums
    sum_t w(t) L(t) estimate the mean over all T times (t = 0 included) and
    over the trained times t >= 1.
  """
  if num_times == 0:
    times = np.arange(num_steps, dtype=np.int32)
    all_weights = np.full(num_steps, 1.0 / num_steps)
    trained_weights = np.where(times >= 1, 1.0 / (num_steps - 1), 0.0)
    return times, all_weights, trained_weights
  if not 1 <= num_times <= num_steps - 1:
    raise ValueError(
        f"eval.loss_num_times={num_times} must be 0 (every time) or lie in [1, T - 1 = "
        f"{num_steps - 1}].")
  strata = 1 + np.floor((np.arange(num_times) + 0.5) * (num_steps - 1) / num_times)
  times = np.concatenate([[0], strata]).astype(np.int32)
  all_weights = np.concatenate([[1.0 / num_steps],
                                np.full(num_times, (num_steps - 1) / (num_steps * num_times))])
  trained_weights = np.concatenate([[0.0], np.full(num_times, 1.0 / num_times)])
  return times, all_weights, trained_weights


@dataclasses.dataclass(frozen=True, eq=False)
class EvalInputs:
  """Data, randomness and settings shared by every checkpoint of a run.

  Images are uncentred, in [0, 1], [N, H, W, C]; `shifts` are the models'
  centring constants mu_m.
  """

  model: Any  # the flax U-Net
  schedule: diffusion.Schedule  # the training schedule, 0-based
  shifts: np.ndarray  # [M] float, mu_m
  blocks: np.ndarray  # [M] training block of each model
  train_images: np.ndarray  # [M, n, H, W, C] each model's own block
  heldout_images: np.ndarray  # [N_test, H, W, C]
  loss_indices: np.ndarray  # [N_loss] rows of heldout_images in the test loss
  loss_times: np.ndarray  # [T'] times of the test loss
  probe_times: tuple[int, ...]  # times of the predicted-noise similarity
  num_probes: int  # probes per block and held-out probes
  sample_schedule: diffusion.Schedule  # schedule the sampler steps through
  kept_times: np.ndarray  # [K] original time of each sampler step
  num_samples: int
  sample_batch_size: int
  last_noisy_t: int  # sampler step index below which no noise is added
  loss_seed: int
  probe_seed: int
  sample_seed: int
  memorisation_ratio: float
  num_bootstrap: int
  batch_size: int  # images per network call in the loss and the probes
  loss_times_per_call: int
  model_loop: str

  @property
  def num_models(self) -> int:
    return int(self.shifts.shape[0])

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.heldout_images.shape[1:])

  def centres(self) -> jax.Array:
    """Return each model's shift as an image, [M, H, W, C]."""
    shape = (self.num_models,) + self.image_shape
    return jnp.broadcast_to(jnp.asarray(self.shifts, jnp.float32)[:, None, None, None], shape)


def test_loss(inputs: EvalInputs, params: Any) -> dict[str, np.ndarray]:
  """Compute the per-image test denoising loss at every loss time.

  At time t held-out image i (row loss_indices[i]) is noised with eps from
  fold(loss_seed, PROBE, HELDOUT_SET, loss_indices[i], t, 0), the same for every
  model and checkpoint, and the loss is the mean over pixels of
  (eps_hat - eps)^2.

  Returns:
    {"loss_per_image": float32 [M, T', N_loss]}.
  """
  images = inputs.heldout_images[inputs.loss_indices]
  result = image_metrics.denoising_loss(
      stack_eps_fn(inputs.model, inputs.model_loop), images, inputs.centres(), inputs.schedule,
      seed=inputs.loss_seed, set_id=probes.HELDOUT_SET, indices=inputs.loss_indices,
      times=inputs.loss_times, fn_args=(params,), batch_size=inputs.batch_size,
      times_per_call=inputs.loss_times_per_call)
  return {"loss_per_image": np.asarray(result.per_image, np.float32)}


def noise_probes(inputs: EvalInputs, params: Any) -> dict[str, np.ndarray]:
  """Compute the models' predicted-noise agreement on train and held-out probes.

  Train probes of model a are the first num_probes images of its block (set id
  1 + block). Held-out probes are the first num_probes held-out images (set
  id 0). Probe i of a set gets eps from fold(probe_seed, PROBE, set, i, t, 0),
  and every model receives each probe in its own coordinates.

  Returns:
    train_pair_means [P_t, M, M]: entry (a, b) is the mean over the train
      probes of block a of cos(eps_hat_a, eps_hat_b); the diagonal is 1.
    test_pair_means [P_t, M, M]: the same over the held-out probes.
    probe_loss [P_t, M]: each model's mean (eps_hat - eps)^2 on the held-out
      probes at that time.
  """
  eps_fn = stack_eps_fn(inputs.model, inputs.model_loop)
  centres = inputs.centres()
  num_models = inputs.num_models
  indices = np.arange(inputs.num_probes)
  train_means, test_means, probe_loss = [], [], []
  for t in inputs.probe_times:
    eps_hat, eps = image_metrics.predict_noise(
        eps_fn, inputs.heldout_images[:inputs.num_probes], centres, inputs.schedule, t=int(t),
        seed=inputs.probe_seed, set_id=probes.HELDOUT_SET, indices=indices, fn_args=(params,),
        batch_size=inputs.batch_size)
    cosines = image_metrics.pairwise_noise_cosines(eps_hat)  # [M, M, N_p]
    test_means.append(np.asarray(jnp.mean(cosines, axis=-1)))
    probe_loss.append(np.asarray(jnp.mean((eps_hat - eps[None])**2, axis=(1, 2, 3, 4))))

    train = np.eye(num_models)
    for a in range(num_models):
      eps_hat, _ = image_metrics.predict_noise(
          eps_fn, inputs.train_images[a, :inputs.num_probes], centres, inputs.schedule, t=int(t),
          seed=inputs.probe_seed, set_id=probes.training_set_id(int(inputs.blocks[a])),
          indices=indices, fn_args=(params,), batch_size=inputs.batch_size)
      cosines = image_metrics.pairwise_noise_cosines(eps_hat)  # [M, M, N_p]
      train[a] = np.asarray(jnp.mean(cosines[a], axis=-1))
    train_means.append(train)
  return {
      "train_pair_means": np.asarray(train_means, np.float64),
      "test_pair_means": np.asarray(test_means, np.float64),
      "probe_loss": np.asarray(probe_loss, np.float64),
  }


def paired_samples(inputs: EvalInputs, params: Any) -> np.ndarray:
  """Sample every model from the shared noise and map the samples to image units.

  Sample k starts from fold(sample_seed, SAMPLE_INIT, k) and takes step noise
  fold(sample_seed, SAMPLE_STEP, j, k) at sampler step j, for every model.

  Returns:
    float32 [M, N_s, H, W, C], model m's samples plus mu_m.
  """
  denoise = stack_sampler_fn(inputs.model, inputs.model_loop)
  centred = diffusion.sample_in_batches(
      inputs.sample_schedule, denoise, inputs.sample_seed, inputs.num_samples,
      inputs.sample_batch_size, kind=diffusion.EPS, event_shape=inputs.image_shape,
      denoise_args=(params, jnp.asarray(inputs.kept_times, jnp.int32)),
      shared_shape=(inputs.num_models,), last_noisy_t=inputs.last_noisy_t)
  samples = np.asarray(centred, np.float32) + inputs.shifts.astype(np.float32)[:, None, None,
                                                                                None, None]
  probes.check_finite(samples, "the generated samples")
  return samples


def sample_statistics(inputs: EvalInputs, samples: np.ndarray,
                      bootstrap_ids: Sequence[int]) -> dict[str, np.ndarray]:
  """Compute the sample-level measures of one checkpoint's paired samples.

  Args:
    samples: [M, N_s, H, W, C] in image units.
    bootstrap_ids: an integer naming this checkpoint, so each checkpoint's
      bootstrap resamples are its own.

  Returns:
    pair_correlations [P, N_s]: Pearson r of x_k^i and x_k^j for pairs i < j.
    nn_index, nn_correlation [M, N_s]: each sample's nearest neighbour by
      Pearson correlation in its own block, and that correlation.
    block_distance [M, M, N_s]: Euclidean distance of model m's sample k to the
      nearest image of block j (model j's block).
    nearest_distance, second_distance, memorised [M, N_s]: the two smallest
      Euclidean distances to the own block and whether d1 / d2 is below the
      memorisation ratio.
    memorised_fraction [M, 4]: fraction, bootstrap SE, interval low and high.
  """
  num_models = inputs.num_models
  distance = image_metrics.cosine_distance(samples)
  nn_index = np.zeros(samples.shape[:2], np.int32)
  nn_correlation = np.zeros(samples.shape[:2], np.float64)
  block_distance = np.zeros((num_models,) + samples.shape[:2], np.float64)
  nearest = np.zeros(samples.shape[:2], np.float64)
  second = np.zeros(samples.shape[:2], np.float64)
  memorised = np.zeros(samples.shape[:2], bool)
  fractions = np.zeros((num_models, 4), np.float64)
  for m in range(num_models):
    cosine, index = kernels.nearest_neighbors(samples[m], inputs.train_images[m], "cosine", k=1)
    nn_index[m] = np.asarray(index)[:, 0]
    nn_correlation[m] = 1.0 - np.asarray(cosine, np.float64)[:, 0]
    for j in range(num_models):
      squared, _ = kernels.nearest_neighbors(samples[m], inputs.train_images[j], "sqeuclidean",
                                             k=1)
      block_distance[m, j] = np.sqrt(np.maximum(np.asarray(squared, np.float64)[:, 0], 0.0))
    result = image_metrics.memorised_fraction(
        samples[m], inputs.train_images[m], seed=inputs.sample_seed,
        threshold=inputs.memorisation_ratio, num_resamples=inputs.num_bootstrap,
        bootstrap_ids=(int(bootstrap_ids[0]), m))
    nearest[m], second[m], memorised[m] = (result.nearest_distance, result.second_distance,
                                           result.memorised)
    fractions[m] = (result.fraction, result.se, result.low, result.high)
  return {
      "pair_correlations": np.asarray(distance.per_sample, np.float64),
      "nn_index": nn_index,
      "nn_correlation": nn_correlation,
      "block_distance": block_distance,
      "nearest_distance": nearest,
      "second_distance": second,
      "memorised": memorised,
      "memorised_fraction": fractions,
  }


def evaluate_checkpoint(inputs: EvalInputs, params: Any, epoch: int,
                        with_samples: bool) -> dict[str, np.ndarray]:
  """Run every measure of one checkpoint; sampling only if `with_samples`.

  Samples are returned as float16 ("samples"), which is accurate to about
  1e-3 in [0, 1] and halves the cache.
  """
  params = jax.tree.map(jnp.asarray, params)
  arrays = {}
  arrays.update(test_loss(inputs, params))
  arrays.update(noise_probes(inputs, params))
  if with_samples:
    samples = paired_samples(inputs, params)
    arrays.update(sample_statistics(inputs, samples, (epoch,)))
    arrays["samples"] = samples.astype(np.float16)
  logger.info("Evaluated epoch %d (%s samples).", epoch, "with" if with_samples else "without")
  return arrays
