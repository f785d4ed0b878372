"""Tests of the respaced DDPM schedule used by the fast ancestral sampler."""

import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff import diffusion


def test_respaced_times_keep_both_ends():
  times = diffusion.respaced_times(1000, 50)
  assert times.shape == (50,)
  assert times[0] == 0
  assert times[-1] == 999
  assert np.all(np.diff(times) > 0)
  assert times[:4].tolist() == [0, 20, 41, 61]


def test_respaced_times_reject_bad_counts():
  with pytest.raises(ValueError, match="num_kept=1"):
    diffusion.respaced_times(1000, 1)
  with pytest.raises(ValueError, match="num_kept=1001"):
    diffusion.respaced_times(1000, 1001)


def test_respaced_schedule_keeps_marginals():
  schedule = diffusion.ddpm_schedule(1000)
  kept_times = diffusion.respaced_times(1000, 50)
  respaced = diffusion.respaced_schedule(schedule, kept_times)
  assert respaced.num_steps == 50
  assert respaced.first_t == 0
  np.testing.assert_array_equal(respaced.alpha_bars, schedule.alpha_bars[kept_times])
  # beta'_k = 1 - abar'_k / abar'_(k-1), so the cumulative product is abar'.
  np.testing.assert_allclose(np.cumprod(1.0 - respaced.betas), respaced.alpha_bars, rtol=1e-12)
  assert respaced.betas[0] == pytest.approx(1.0 - schedule.alpha_bars[0])
  # A jump of about 20 steps has a beta about 20 times the original one.
  assert respaced.betas[-1] == pytest.approx(1.0 - schedule.alpha_bars[999] / schedule.alpha_bars[979])


def test_respaced_schedule_with_every_time_is_the_schedule():
  schedule = diffusion.ddpm_schedule(100)
  assert diffusion.respaced_schedule(schedule, np.arange(100)) is schedule


def test_respaced_schedule_rejects_unsorted_times():
  schedule = diffusion.ddpm_schedule(100)
  with pytest.raises(ValueError, match="increase strictly"):
    diffusion.respaced_schedule(schedule, np.array([0, 50, 40, 99]))
  with pytest.raises(ValueError, match="0-based"):
    diffusion.respaced_schedule(diffusion.sequence_schedule(100), np.array([1, 50]))


def test_respaced_sampler_returns_the_single_training_image():
  # For a one-image dataset the exact noise prediction is
  # eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t); the last step
  # (k = 0, abar'_0 = abar_0) then returns x* whatever the noise before it.
  schedule = diffusion.ddpm_schedule(1000)
  kept_times = diffusion.respaced_times(1000, 25)
  respaced = diffusion.respaced_schedule(schedule, kept_times)
  target = jnp.linspace(-0.4, 0.6, 16).reshape(4, 4, 1)

  def exact_eps(x, k, target):
    signal = respaced.signal_scale(k)[..., None, None, None]
    noise = respaced.noise_scale(k)[..., None, None, None]
    return (x - signal * target) / noise

  samples = diffusion.sample(respaced, exact_eps, 3, jnp.arange(5), kind=diffusion.EPS,
                             event_shape=(4, 4, 1), denoise_args=(target,), last_noisy_t=1)
  np.testing.assert_allclose(samples, jnp.broadcast_to(target, (5, 4, 4, 1)), atol=2e-5)
