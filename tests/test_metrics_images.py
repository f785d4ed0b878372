"""Tests of the image measures against numpy and closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff import diffusion
from biasdiff import rng
from biasdiff.metrics import images as img
from biasdiff.metrics import stats

SHAPE = (8, 8, 1)


def numpy_pearson(a, b):
  def z(x):
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    centred = flat - flat.mean(1, keepdims=True)
    scaled = centred / (flat.std(1, ddof=1, keepdims=True) + 1e-12)
    return scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
  return np.sum(z(a) * z(b), axis=1)


@pytest.fixture(scope="module")
def schedule():
  return diffusion.ddpm_schedule(1000)


# ---------------------------------------------------------------------------
# Similarities.


def test_pearson_matches_numpy():
  generator = np.random.default_rng(0)
  a = generator.standard_normal((5,) + SHAPE)
  b = a + generator.standard_normal((5,) + SHAPE)
  np.testing.assert_allclose(img.pearson_similarity(a, b), numpy_pearson(a, b), atol=1e-6)


def test_pearson_is_invariant_to_brightness_and_contrast():
  generator = np.random.default_rng(1)
  x = generator.standard_normal((4,) + SHAPE)
  y = generator.standard_normal((4,) + SHAPE)
  base = img.pearson_similarity(x, y)
  np.testing.assert_allclose(img.pearson_similarity(3.0 * x - 2.0, y), base, atol=1e-6)
  np.testing.assert_allclose(img.pearson_similarity(x, 0.2 * y + 7.0), base, atol=1e-6)
  np.testing.assert_allclose(img.pearson_similarity(x, x), np.ones(4), atol=1e-6)
  np.testing.assert_allclose(img.pearson_similarity(x, -x), -np.ones(4), atol=1e-6)


def test_pearson_of_constant_image_is_zero():
  x = np.random.default_rng(2).standard_normal((1,) + SHAPE)
  np.testing.assert_allclose(img.pearson_similarity(np.ones((1,) + SHAPE), x), [0.0], atol=1e-7)


def test_noise_cosine_matches_numpy_and_is_symmetric():
  generator = np.random.default_rng(3)
  u = generator.standard_normal((6,) + SHAPE)
  v = generator.standard_normal((6,) + SHAPE)
  flat_u, flat_v = u.reshape(6, -1), v.reshape(6, -1)
  expected = np.sum(flat_u * flat_v, 1) / (np.linalg.norm(flat_u, axis=1)
                                           * np.linalg.norm(flat_v, axis=1))
  np.testing.assert_allclose(img.noise_cosine(u, v), expected, atol=1e-6)
  np.testing.assert_allclose(img.noise_cosine(v, u), img.noise_cosine(u, v), atol=1e-7)
  np.testing.assert_allclose(img.noise_cosine(u, u), np.ones(6), atol=1e-6)
  # Raw cosine, not Pearson: adding a constant changes it.
  assert not np.allclose(img.noise_cosine(u + 3.0, v), img.noise_cosine(u, v), atol=1e-3)
  # The norm floor keeps a zero prediction at 0 rather than NaN.
  np.testing.assert_allclose(img.noise_cosine(np.zeros((1,) + SHAPE), v[:1]), [0.0])


@pytest.mark.parametrize("fn", [img.pearson_similarity, img.noise_cosine])
def test_similarities_reject_bad_input(fn):
  with pytest.raises(ValueError, match="Image shapes differ"):
    fn(np.zeros((2, 8, 8, 1)), np.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="do not broadcast"):
    fn(np.zeros((2,) + SHAPE), np.zeros((3,) + SHAPE))
  with pytest.raises(ValueError, match="NaN"):
    fn(np.full((1,) + SHAPE, np.nan), np.zeros((1,) + SHAPE))


# ---------------------------------------------------------------------------
# Paired samples.


def test_cosine_distance_matches_numpy_and_jackknife():
  generator = np.random.default_rng(4)
  shared = generator.standard_normal((10,) + SHAPE)
  samples = shared[None] + generator.uniform(0.2, 1.5, (4, 1, 1, 1, 1)) * \
      generator.standard_normal((4, 10) + SHAPE)
  result = img.cosine_distance(samples)
  pairs = list(itertools.combinations(range(4), 2))
  assert result.count == 6
  np.testing.assert_array_equal(result.pairs, pairs)
  per_sample = np.stack([numpy_pearson(samples[i], samples[j]) for i, j in pairs])
  np.testing.assert_allclose(result.per_sample, per_sample, atol=1e-5)
  np.testing.assert_allclose(result.pair_means, per_sample.mean(1), atol=1e-5)
  assert result.distance == pytest.approx(1 - np.median(per_sample.mean(1)), abs=1e-5)
  expected_se = stats.jackknife(1 - per_sample.mean(1), np.array(pairs), "median").se
  assert result.se == pytest.approx(float(expected_se), rel=1e-4)
  assert result.num_samples == 10


def test_cosine_distance_ignores_centring_shift():
  samples = np.random.default_rng(5).standard_normal((1, 6) + SHAPE)
  # Each model differs only by a brightness shift and contrast (its centring).
  stack = np.concatenate([samples, 2 * samples + 1, 0.5 * samples - 3])
  result = img.cosine_distance(stack)
  assert result.distance == pytest.approx(0.0, abs=1e-6)


def test_cosine_distance_rejects_bad_input():
  with pytest.raises(ValueError, match="M >= 2"):
    img.cosine_distance(np.zeros((1, 3) + SHAPE))
  with pytest.raises(ValueError, match="NaN"):
    img.cosine_distance(np.full((2, 3) + SHAPE, np.inf))


# ---------------------------------------------------------------------------
# Noise predictions on fixed probes.


def oracle_eps_fn(x_t, t, scale):
  """A stand-in model: returns scale * x_t, so outputs are predictable in numpy."""
  return scale * x_t


def test_centred_inputs_per_model(schedule):
  generator = np.random.default_rng(6)
  images = generator.uniform(size=(3,) + SHAPE)
  noise = generator.standard_normal((3,) + SHAPE)
  centres = generator.uniform(size=(2,) + SHAPE)
  x_t = img.centred_inputs(images, centres, schedule, 100, noise)
  abar = schedule.alpha_bars[100]
  for m in range(2):
    expected = np.sqrt(abar) * (images - centres[m]) + np.sqrt(1 - abar) * noise
    np.testing.assert_allclose(x_t[m], expected, atol=1e-6)
  single = img.centred_inputs(images, centres[0], schedule, 100, noise)
  np.testing.assert_allclose(single, x_t[0], atol=1e-7)
  with pytest.raises(ValueError, match="centres must have shape"):
    img.centred_inputs(images, np.zeros((4, 4, 1)), schedule, 100, noise)


def test_predict_noise_uses_fixed_probe_noise(schedule):
  generator = np.random.default_rng(7)
  images = generator.uniform(size=(5,) + SHAPE).astype(np.float32)
  centre = images.mean(0)
  eps_hat, eps = img.predict_noise(oracle_eps_fn, images, centre, schedule, t=50, seed=3,
                                   set_id=2, fn_args=(0.5,), batch_size=2)
  expected_eps = jax.random.normal(rng.fold(3, rng.PROBE, 2, 4, 50, 0), SHAPE)
  np.testing.assert_allclose(eps[4], expected_eps, atol=1e-7)
  abar = schedule.alpha_bars[50]
  x_t = np.sqrt(abar) * (images - centre) + np.sqrt(1 - abar) * np.asarray(eps)
  np.testing.assert_allclose(eps_hat, 0.5 * x_t, atol=1e-5)
  # The same probes at other indices give other noise; the same ids give the same.
  shifted, eps_shifted = img.predict_noise(oracle_eps_fn, images[1:], centre, schedule, t=50,
                                           seed=3, set_id=2, indices=np.arange(1, 5),
                                           fn_args=(0.5,))
  np.testing.assert_allclose(eps_shifted, eps[1:], atol=1e-7)


def test_pairwise_noise_cosines_and_train_test_summary():
  generator = np.random.default_rng(8)
  predictions = generator.standard_normal((3, 4) + SHAPE)
  cosines = img.pairwise_noise_cosines(predictions)
  assert cosines.shape == (3, 3, 4)
  for a, b in itertools.product(range(3), repeat=2):
    np.testing.assert_allclose(cosines[a, b], img.noise_cosine(predictions[a], predictions[b]),
                               atol=1e-6)
  train = generator.uniform(size=(3, 3))
  test = generator.uniform(size=(3, 3))
  test = (test + test.T) / 2
  result = img.noise_similarity(train, test)
  off_diagonal = train[~np.eye(3, dtype=bool)]
  assert result.train.count == 6
  assert float(result.train.estimate) == pytest.approx(off_diagonal.mean())
  assert result.test.count == 3
  assert float(result.test.estimate) == pytest.approx(test[np.triu_indices(3, 1)].mean())
  assert result.difference == pytest.approx(float(result.test.estimate - result.train.estimate))
  assert np.isfinite(result.train.se)


def test_denoising_loss_closed_form(schedule):
  # With eps_hat = 0 the per-image loss is mean(eps^2), known from the noise alone;
  # with eps_hat = x_t / sqrt(1 - abar) and x0 equal to the centre it is 0.
  images = np.random.default_rng(9).uniform(size=(4,) + SHAPE).astype(np.float32)
  times = np.array([0, 1, 500, 999])
  zero_fn = lambda x_t, t: jnp.zeros_like(x_t)
  result = img.denoising_loss(zero_fn, images, images.mean(0), schedule, seed=1, set_id=0,
                              times=times, batch_size=3, times_per_call=3)
  assert result.per_image.shape == (4, 4)
  for i, t in enumerate(times):
    for n in range(4):
      eps = np.asarray(jax.random.normal(rng.fold(1, rng.PROBE, 0, n, int(t), 0), SHAPE))
      assert result.per_image[i, n] == pytest.approx(np.mean(eps**2), rel=1e-5)
  per_image = np.asarray(result.per_image)
  np.testing.assert_allclose(result.all_times.mean, per_image.mean(0).mean(), rtol=1e-5)
  np.testing.assert_allclose(result.all_times.se, per_image.mean(0).std(ddof=1) / 2, rtol=1e-4)
  np.testing.assert_allclose(result.trained_times.mean, per_image[1:].mean(0).mean(), rtol=1e-5)
  assert result.all_times.count == 4

  noise_scale = schedule.noise_scale
  exact_fn = lambda x_t, t: x_t / noise_scale(t)[:, None, None, None]
  uniform = np.full((2,) + SHAPE, 0.5, np.float32)
  exact = img.denoising_loss(exact_fn, uniform, uniform[0], schedule, seed=1, set_id=0,
                             times=np.array([10, 300]))
  np.testing.assert_allclose(exact.per_image, np.zeros((2, 2)), atol=1e-8)


def test_denoising_loss_supports_model_stacks(schedule):
  images = np.random.default_rng(10).uniform(size=(3,) + SHAPE).astype(np.float32)
  centres = np.stack([images.mean(0), images.mean(0) + 0.1])
  scales = jnp.array([0.0, 1.0])
  stack_fn = lambda x_t, t, s: s[:, None, None, None, None] * x_t  # [2, B, H, W, C]
  result = img.denoising_loss(stack_fn, images, centres, schedule, seed=0, set_id=0,
                              times=np.array([100, 200]), fn_args=(scales,))
  assert result.per_image.shape == (2, 2, 3)
  assert result.all_times.mean.shape == (2,)
  single = img.denoising_loss(lambda x_t, t: jnp.zeros_like(x_t), images, centres[0], schedule,
                              seed=0, set_id=0, times=np.array([100, 200]))
  np.testing.assert_allclose(result.per_image[0], single.per_image, rtol=1e-6)


def test_denoising_loss_rejects_bad_input(schedule):
  zero_fn = lambda x_t, t: jnp.zeros_like(x_t)
  images = np.zeros((2,) + SHAPE, np.float32)
  with pytest.raises(ValueError, match="outside the schedule"):
    img.denoising_loss(zero_fn, images, images[0], schedule, seed=0, set_id=0,
                       times=np.array([1000]))
  with pytest.raises(ValueError, match="NaN"):
    img.denoising_loss(zero_fn, np.full((2,) + SHAPE, np.nan), images[0], schedule, seed=0,
                       set_id=0, times=np.array([1]))


# ---------------------------------------------------------------------------
# Memorised fraction.


@pytest.fixture(scope="module")
def training_images():
  return np.random.default_rng(11).uniform(size=(40,) + SHAPE).astype(np.float32)


def test_exact_copies_are_memorised(training_images):
  result = img.memorised_fraction(training_images[:10], training_images, seed=0,
                                  num_resamples=200)
  assert result.fraction == 1.0
  assert result.se == 0.0
  assert (result.low, result.high) == (1.0, 1.0)
  np.testing.assert_array_equal(result.nearest_distance, np.zeros(10))
  assert result.count == 10


def test_fresh_noise_is_not_memorised(training_images):
  fresh = np.random.default_rng(12).uniform(size=(30,) + SHAPE).astype(np.float32)
  result = img.memorised_fraction(fresh, training_images, seed=0, num_resamples=200)
  assert result.fraction == 0.0
  assert np.all(result.ratio > 1 / 3)
  flat_fresh = fresh.reshape(30, -1).astype(np.float64)
  flat_train = training_images.reshape(40, -1).astype(np.float64)
  distances = np.sort(np.linalg.norm(flat_fresh[:, None] - flat_train[None], axis=-1), axis=1)
  np.testing.assert_allclose(result.nearest_distance, distances[:, 0], rtol=1e-4)
  np.testing.assert_allclose(result.second_distance, distances[:, 1], rtol=1e-4)


def test_duplicated_training_images_use_zero_distance_rule(training_images):
  duplicated = np.concatenate([training_images, training_images[:3]])
  result = img.memorised_fraction(training_images[:5], duplicated, seed=0, num_resamples=100)
  # Samples 0-2 have two copies at distance 0: d2 = 0, memorised by the d1 = 0 rule.
  np.testing.assert_array_equal(result.second_distance[:3], np.zeros(3))
  assert np.all(np.isnan(result.ratio[:3]))
  np.testing.assert_array_equal(result.memorised, np.ones(5, bool))


def test_near_copies_and_bootstrap_interval(training_images):
  generator = np.random.default_rng(13)
  near = training_images[:20] + 0.01 * generator.standard_normal((20,) + SHAPE).astype(np.float32)
  far = generator.uniform(size=(20,) + SHAPE).astype(np.float32)
  result = img.memorised_fraction(np.concatenate([near, far]), training_images, seed=4,
                                  num_resamples=500)
  assert result.fraction == 0.5
  np.testing.assert_array_equal(result.memorised, np.repeat([True, False], 20))
  assert result.low < 0.5 < result.high
  assert result.se == pytest.approx(np.sqrt(0.25 / 40), rel=0.25)
  again = img.memorised_fraction(np.concatenate([near, far]), training_images, seed=4,
                                 num_resamples=500)
  assert again.se == result.se


def test_memorised_fraction_rejects_bad_input(training_images):
  with pytest.raises(ValueError, match="k must satisfy"):
    img.memorised_fraction(training_images[:2], training_images[:1], seed=0)
  with pytest.raises(ValueError, match="NaN"):
    img.memorised_fraction(np.full((2,) + SHAPE, np.nan, np.float32), training_images, seed=0)
  with pytest.raises(ValueError, match="feature shape"):
    img.memorised_fraction(np.zeros((2, 4, 4, 1), np.float32), training_images, seed=0)
