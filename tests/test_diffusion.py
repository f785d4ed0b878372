"""Tests for the schedules, reverse steps and the coupled ancestral sampler."""

import decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff import diffusion
from biasdiff import rng

# (t, abar_t, gamma_t) for the sequence schedule at T = 500, as published with
# the schedule. They are strings so each check can use half a unit of the last
# printed digit as its tolerance.
SEQUENCE_TABLE = [
    (1, "0.9998000", "4999.5"),
    (5, "0.9982037", "556.19"),
    (15, "0.9886846", "87.873"),
    (25, "0.9714663", "34.543"),
    (31, "0.9575988", "23.079"),
    (37, "0.9412158", "16.504"),
    (42, "0.9257385", "12.956"),
    (43, "0.9224523", "12.385"),
    (50, "0.8977579", "9.2672"),
    (60, "0.8577627", "6.5113"),
    (75, "0.7891346", "4.2128"),
    (100, "0.6597201", "2.3870"),
    (150, "0.3965079", "1.0434"),
    (250, "0.0781085", "0.30316"),
    (375, "0.0032607", "0.057289"),
    (500, "3.76609e-5", "0.0061371"),
]

# (t, abar_t, sqrt(1 - abar_t)) for the DDPM schedule at T = 1000.
DDPM_TABLE = [
    (0, 0.99990, 0.0100),
    (1, 0.99978, 0.0148),
    (10, 0.99781, 0.0468),
    (50, 0.96995, 0.1733),
    (100, 0.89514, 0.3238),
    (150, 0.78589, 0.4627),
    (200, 0.65635, 0.5862),
    (300, 0.39401, 0.7785),
    (400, 0.19357, 0.8980),
    (500, 0.07780, 0.9603),
    (800, 0.00151, 0.9992),
    (999, 4.04e-5, 1.0000),
]


def _half_last_digit(printed: str) -> float:
  """Half a unit in the last printed digit of a decimal string."""
  return 0.5 * 10.0 ** decimal.Decimal(printed).as_tuple().exponent


# ---------------------------------------------------------------------------
# Schedules.


def test_sequence_schedule_matches_brute_force_product():
  schedule = diffusion.sequence_schedule(500)
  assert schedule.first_t == 1
  assert schedule.last_t == 500
  assert schedule.num_steps == 500
  alpha_bar = 1.0
  expected = []
  for t in range(1, 501):
    beta = 2.0 * (1e-4 + (0.02 - 1e-4) * (t - 1) / 499)
    alpha_bar *= 1.0 - beta
    expected.append(alpha_bar)
  np.testing.assert_allclose(schedule.alpha_bars, expected, rtol=1e-9, atol=0)
  assert schedule.betas[0] == pytest.approx(2e-4, rel=1e-12)
  assert schedule.betas[-1] == pytest.approx(0.04, rel=1e-12)


@pytest.mark.parametrize("t, alpha_bar, gamma", SEQUENCE_TABLE)
def test_sequence_schedule_published_values(t, alpha_bar, gamma):
  schedule = diffusion.sequence_schedule(500)
  table_alpha_bar = schedule.alpha_bars[t - 1]
  table_gamma = np.sqrt(table_alpha_bar) / (1.0 - table_alpha_bar)
  assert table_alpha_bar == pytest.approx(float(alpha_bar), abs=_half_last_digit(alpha_bar))
  assert table_gamma == pytest.approx(float(gamma), abs=_half_last_digit(gamma))
  # The float32 accessors return the same numbers at the same 1-based t.
  assert float(schedule.alpha_bar(t)) == pytest.approx(table_alpha_bar, rel=1e-6)
  assert float(schedule.field(t)) == pytest.approx(table_gamma, rel=1e-6)


def test_sequence_posterior_is_exact_at_t1():
  schedule = diffusion.sequence_schedule(500)
  c0, cx, variance = schedule.posterior_coefficients(jnp.array([1]))
  assert float(c0[0]) == pytest.approx(1.0, abs=1e-7)
  assert float(cx[0]) == 0.0
  assert float(variance[0]) == 0.0
  assert float(schedule.alpha_bar_prev(1)) == 1.0


def test_posterior_coefficients_match_gaussian_conditioning():
  # Posterior of x_{t-1} given x_t and x0 from the two Gaussians
  # q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and
  # q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t). The DDPM abar table
  # is a float32 cumulative product, so it obeys abar_t = abar_{t-1} alpha_t
  # only to about 1e-4 relative in 1 - abar at small t.
  for schedule, rtol in ((diffusion.sequence_schedule(500), 2e-6),
                         (diffusion.ddpm_schedule(1000), 5e-4)):
    t = schedule.times[1:]
    index = t - schedule.first_t
    beta = schedule.betas[index]
    prev = schedule.alpha_bars[index - 1]
    precision = 1.0 / (1.0 - prev) + (1.0 - beta) / beta
    variance = 1.0 / precision
    c0_expected = variance * np.sqrt(prev) / (1.0 - prev)
    cx_expected = variance * np.sqrt(1.0 - beta) / beta
    c0, cx, v = schedule.posterior_coefficients(jnp.asarray(t))
    np.testing.assert_allclose(c0, c0_expected, rtol=rtol)
    np.testing.assert_allclose(cx, cx_expected, rtol=rtol)
    np.testing.assert_allclose(v, variance, rtol=rtol)


@pytest.mark.parametrize("t, alpha_bar, noise_scale", DDPM_TABLE)
def test_ddpm_schedule_published_values(t, alpha_bar, noise_scale):
  schedule = diffusion.ddpm_schedule(1000)
  assert schedule.first_t == 0
  assert schedule.last_t == 999
  assert float(schedule.alpha_bar(t)) == pytest.approx(alpha_bar, abs=1e-5)
  assert float(schedule.noise_scale(t)) == pytest.approx(noise_scale, abs=6e-5)


def test_ddpm_schedule_endpoints():
  schedule = diffusion.ddpm_schedule(1000)
  assert schedule.betas[0] == pytest.approx(1e-4, rel=1e-6)
  assert schedule.betas[-1] == pytest.approx(0.02, rel=1e-6)
  # abar_0 = alpha_0 < 1 in the 0-based convention.
  assert schedule.alpha_bars[0] == pytest.approx(1.0 - 1e-4, rel=1e-7)
  assert schedule.alpha_bars[-1] == pytest.approx(4.0358e-5, rel=1e-4)


def test_schedule_rejects_float_time():
  schedule = diffusion.sequence_schedule(25)
  with pytest.raises(TypeError, match="integer"):
    schedule.alpha_bar(jnp.array([1.0]))


@pytest.mark.parametrize("t", [0, 26, -1])
def test_schedule_rejects_concrete_time_out_of_range(t):
  schedule = diffusion.sequence_schedule(25)
  with pytest.raises(ValueError, match="out of range"):
    schedule.alpha_bar(jnp.array([t]))


def test_schedule_traced_time_out_of_range_is_nan():
  schedule = diffusion.sequence_schedule(25)
  values = jax.jit(schedule.alpha_bar)(jnp.array([0, 1, 25, 26]))
  assert np.isnan(values[0])
  assert np.isnan(values[3])
  assert values[1] == pytest.approx(schedule.alpha_bars[0], rel=1e-7)
  assert values[2] == pytest.approx(schedule.alpha_bars[24], rel=1e-6)


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True])
def test_schedule_rejects_bad_num_steps(num_steps):
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sequence_schedule(num_steps)


# ---------------------------------------------------------------------------
# Forward process and single steps.


def test_forward_noise_broadcasts_one_time_per_sample():
  schedule = diffusion.sequence_schedule(500)
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 6))
  noise = jax.random.normal(jax.random.key(1), (3, 4, 6))
  t = jnp.array([1, 75, 500])
  x_t = diffusion.forward_noise(schedule, x0, t, noise)
  for i, ti in enumerate([1, 75, 500]):
    abar = schedule.alpha_bars[ti - 1]
    expected = np.sqrt(abar) * np.asarray(x0[i]) + np.sqrt(1 - abar) * np.asarray(noise[i])
    np.testing.assert_allclose(x_t[i], expected, rtol=1e-5, atol=1e-6)


def test_forward_noise_rejects_mismatched_times():
  schedule = diffusion.sequence_schedule(500)
  x0 = jnp.zeros((3, 4, 6))
  with pytest.raises(ValueError, match="leading axes"):
    diffusion.forward_noise(schedule, x0, jnp.array([1, 2]), jnp.zeros_like(x0))


def test_sequence_steps_share_one_based_time():
  """Forward noising, field and posterior step agree on what t means."""
  schedule = diffusion.sequence_schedule(500)
  q = 6
  one_hot = jnp.eye(q)  # [q, q]: row a is e_a
  for t in [1, 2, 75, 500]:
    t_rows = jnp.full((q,), t)
    # Forward process at t: mean sqrt(abar_t) e_a and variance 1 - abar_t.
    means = diffusion.forward_noise(schedule, one_hot, t_rows, jnp.zeros((q, q)))
    std = diffusion.forward_noise(schedule, jnp.zeros((1, q)), jnp.full((1,), t), jnp.ones((1, q)))[0, 0]
    x_t = jax.random.normal(jax.random.key(t), (q,))
    log_likelihood = -jnp.sum((x_t[None, :] - means) ** 2, axis=-1) / (2 * std**2)
    # The field at the same t is the slope of that log-likelihood in x_t[a].
    gamma = schedule.field(t)
    differences = log_likelihood - log_likelihood[0]
    np.testing.assert_allclose(differences, gamma * (x_t - x_t[0]), rtol=2e-4, atol=2e-4 * float(gamma))

    # The posterior step at t maps the marginal at t to the marginal at t - 1.
    c0, cx, variance = schedule.posterior_coefficients(t)
    mean_prev = c0 + cx * schedule.signal_scale(t)
    var_prev = cx**2 * (1 - schedule.alpha_bar(t)) + variance
    if t == 1:
      assert float(mean_prev) == pytest.approx(1.0, abs=1e-6)
      assert float(var_prev) == pytest.approx(0.0, abs=1e-9)
    else:
      prev = diffusion.forward_noise(schedule, jnp.ones((1,)), jnp.array([t - 1]), jnp.zeros((1,)))[0]
      prev_std = diffusion.forward_noise(schedule, jnp.zeros((1,)), jnp.array([t - 1]), jnp.ones((1,)))[0]
      assert float(mean_prev) == pytest.approx(float(prev), rel=1e-5)
      assert float(var_prev) == pytest.approx(float(prev_std) ** 2, rel=1e-4)


def test_sampler_calls_denoiser_at_t_down_to_one():
  schedule = diffusion.sequence_schedule(24)
  seen = []

  def record(t_batch):
    seen.append(np.asarray(t_batch).copy())

  def denoise(x_t, t_batch):
    jax.debug.callback(record, t_batch, ordered=True)
    return jnp.full_like(x_t, 1.0 / x_t.shape[-1])

  diffusion.sample(schedule, denoise, 0, jnp.arange(3), kind="x0", event_shape=(4, 5))
  assert [int(t[0]) for t in seen] == list(range(24, 0, -1))
  assert all(t.shape == (3,) for t in seen)


def test_eps_step_noise_convention():
  schedule = diffusion.ddpm_schedule(1000)
  x = jnp.ones((2, 3))
  eps = jnp.zeros((2, 3))
  z = jnp.ones((2, 3))
  for t in [0, 1]:
    t_batch = jnp.full((2,), t)
    clean = diffusion.eps_step(schedule, x, t_batch, eps, jnp.zeros((2, 3)))
    np.testing.assert_array_equal(diffusion.eps_step(schedule, x, t_batch, eps, z), clean)
  t_batch = jnp.full((2,), 1)
  single = diffusion.eps_step(schedule, x, t_batch, eps, z, last_noisy_t=1)
  clean = diffusion.eps_step(schedule, x, t_batch, eps, jnp.zeros((2, 3)))
  np.testing.assert_allclose(single - clean, np.sqrt(schedule.betas[1]), rtol=1e-5)
  t_batch = jnp.full((2,), 2)
  noisy = diffusion.eps_step(schedule, x, t_batch, eps, z)
  clean = diffusion.eps_step(schedule, x, t_batch, eps, jnp.zeros((2, 3)))
  np.testing.assert_allclose(noisy - clean, np.sqrt(schedule.betas[2]), rtol=1e-5)


# ---------------------------------------------------------------------------
# Sampler.


def _prior_denoiser(schedule):
  """x0_hat = softmax(gamma_t x_t): independent positions with a uniform prior."""

  def denoise(x_t, t_batch):
    gamma = schedule.field(t_batch)
    return jax.nn.softmax(gamma[..., None, None] * x_t, axis=-1)

  return denoise


def test_sampler_same_samples_for_batch_sizes_1_7_n():
  schedule = diffusion.sequence_schedule(40)
  denoise = _prior_denoiser(schedule)
  num_samples = 15
  reference = diffusion.sample(schedule, denoise, 3, jnp.arange(num_samples), kind="x0",
                               event_shape=(8, 6))
  assert reference.shape == (num_samples, 8, 6)
  for batch_size in [1, 7]:
    batched = diffusion.sample_in_batches(schedule, denoise, 3, num_samples, batch_size, kind="x0",
                                          event_shape=(8, 6))
    np.testing.assert_array_equal(batched, reference)
  # Distinct noise per sample: no two samples coincide.
  flat = np.asarray(reference).reshape(num_samples, -1)
  distances = np.linalg.norm(flat[:, None] - flat[None, :], axis=-1)
  assert np.all(distances[~np.eye(num_samples, dtype=bool)] > 1e-3)


def test_sampler_noise_depends_on_global_index_only():
  schedule = diffusion.sequence_schedule(25)
  denoise = _prior_denoiser(schedule)
  ids = jnp.array([5, 9, 2])
  full = diffusion.sample(schedule, denoise, 1, ids, kind="x0", event_shape=(4, 3))
  single = diffusion.sample(schedule, denoise, 1, jnp.array([9]), kind="x0", event_shape=(4, 3))
  np.testing.assert_array_equal(single[0], full[1])
  other_seed = diffusion.sample(schedule, denoise, 2, ids, kind="x0", event_shape=(4, 3))
  assert not np.allclose(other_seed, full)


def test_sampler_matches_documented_recursion():
  # The scan carries x flat over the event axes. The hand-written recursion below
  # draws event-shaped noise from the documented keys and must give the same values.
  schedule = diffusion.sequence_schedule(25)
  event_shape = (3, 5)
  ids = jnp.array([2, 7])
  gain = jnp.linspace(0.5, 1.5, 15).reshape(event_shape)

  def denoise(x_t, t_batch):
    return jax.nn.softmax(gain * x_t + 0.1 * t_batch[:, None, None], axis=-1)

  def normal(*stream_ids):
    return jnp.stack([jax.random.normal(rng.fold(3, *stream_ids, k), event_shape, jnp.float32)
                      for k in ids.tolist()])

  x = normal(rng.SAMPLE_INIT)
  for t in range(25, 0, -1):
    t_batch = jnp.full((2,), t, jnp.int32)
    x = diffusion.x0_posterior_step(schedule, x, t_batch, denoise(x, t_batch),
                                    normal(rng.SAMPLE_STEP, t))
  out = diffusion.sample(schedule, denoise, 3, ids, kind="x0", event_shape=event_shape)
  assert out.shape == (2,) + event_shape
  np.testing.assert_allclose(out, x, rtol=1e-6, atol=1e-6)


def test_sampler_start_noise_uses_sample_init_stream():
  # With one step and a denoiser that returns x_t itself, the output is
  # c0 x_T + cx x_T + sqrt(v) z; at T = 1 this is x_T exactly.
  schedule = diffusion.sequence_schedule(1)
  out = diffusion.sample(schedule, lambda x, t: x, 7, jnp.array([4, 11]), kind="x0",
                         event_shape=(2, 3))
  for row, k in enumerate([4, 11]):
    expected = jax.random.normal(rng.fold(7, rng.SAMPLE_INIT, k), (2, 3), jnp.float32)
    np.testing.assert_allclose(out[row], expected, rtol=1e-6, atol=1e-7)


def test_image_sampler_identity_returns_clean_image():
  schedule = diffusion.ddpm_schedule(1000)
  target = jax.random.normal(jax.random.key(0), (4, 4, 1)) * 0.3

  def denoise(x_t, t_batch):
    signal = schedule.signal_scale(t_batch)[:, None, None, None]
    noise = schedule.noise_scale(t_batch)[:, None, None, None]
    return (x_t - signal * target) / noise

  out = diffusion.sample(schedule, denoise, 0, jnp.arange(3), kind="eps", event_shape=(4, 4, 1))
  for k in range(3):
    np.testing.assert_allclose(out[k], target, atol=1e-5)


def test_sequence_sampler_single_sequence_denoiser_is_exact():
  schedule = diffusion.sequence_schedule(50)
  tokens = jnp.array([0, 3, 1, 5, 2, 2, 4, 0])
  one_hot = jax.nn.one_hot(tokens, 6)

  def denoise(x_t, t_batch):
    return jnp.broadcast_to(one_hot, x_t.shape)

  out = diffusion.sample(schedule, denoise, 0, jnp.arange(4), kind="x0", event_shape=(8, 6))
  np.testing.assert_array_equal(out, jnp.broadcast_to(one_hot, out.shape))
  np.testing.assert_array_equal(diffusion.to_tokens(out), jnp.broadcast_to(tokens, (4, 8)))


def test_sequence_sampler_empirical_denoiser_returns_members():
  # The exact posterior mean for the empirical distribution of a few sequences:
  # weights softmax_p(sum_i gamma_t x_t[i, y_p[i]]) over the sequences y_p.
  schedule = diffusion.sequence_schedule(100)
  sequences = jnp.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 1, 1, 2, 2]])
  members = jax.nn.one_hot(sequences, 6)  # [P, L, q]

  def denoise(x_t, t_batch):
    gamma = schedule.field(t_batch)  # [B]
    logits = gamma[:, None] * jnp.einsum("blq,plq->bp", x_t, members)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bp,plq->blq", weights, members)

  out = diffusion.sample(schedule, denoise, 0, jnp.arange(16), kind="x0", event_shape=(6, 6))
  tokens = np.asarray(diffusion.to_tokens(out))
  for row in tokens:
    assert any(np.array_equal(row, s) for s in np.asarray(sequences))
  np.testing.assert_allclose(out, jax.nn.one_hot(tokens, 6), atol=1e-5)


def _uturn(schedule, denoise, tokens, t0, extra_ids, batch_size=None):
  x0 = jax.nn.one_hot(tokens, 6)
  num = tokens.shape[0]
  noise = jax.random.normal(rng.fold(0, rng.START, t0), x0.shape)
  x_start = diffusion.forward_noise(schedule, x0, jnp.full((num,), t0), noise)
  kwargs = dict(kind="x0", event_shape=(8, 6), x_start=x_start, t_start=t0, extra_ids=extra_ids)
  if batch_size is None:
    return diffusion.sample(schedule, denoise, 0, jnp.arange(num), **kwargs)
  return diffusion.sample_in_batches(schedule, denoise, 0, num, batch_size, **kwargs)


def test_uturn_start_and_extra_ids():
  schedule = diffusion.sequence_schedule(100)
  denoise = _prior_denoiser(schedule)
  tokens = jax.random.randint(jax.random.key(0), (5, 8), 0, 6)
  first = _uturn(schedule, denoise, tokens, 10, (1, 10, 0))
  again = _uturn(schedule, denoise, tokens, 10, (1, 10, 0))
  np.testing.assert_array_equal(first, again)
  # The prior denoiser from t0 = 10 (gamma about 140) recovers nearly every token.
  assert np.mean(np.asarray(diffusion.to_tokens(first)) == np.asarray(tokens)) > 0.9
  batched = _uturn(schedule, denoise, tokens, 10, (1, 10, 0), batch_size=2)
  np.testing.assert_array_equal(batched, first)
  # From t0 = 80 the reverse noise matters: another repetition id gives other tokens.
  rep0 = diffusion.to_tokens(_uturn(schedule, denoise, tokens, 80, (1, 80, 0)))
  rep1 = diffusion.to_tokens(_uturn(schedule, denoise, tokens, 80, (1, 80, 1)))
  assert not np.array_equal(rep0, rep1)


def test_uturn_requires_start_below_t():
  schedule = diffusion.sequence_schedule(100)
  with pytest.raises(ValueError, match="x_start is required"):
    diffusion.sample(schedule, _prior_denoiser(schedule), 0, jnp.arange(2), kind="x0",
                     event_shape=(8, 6), t_start=10)
  with pytest.raises(ValueError, match="outside"):
    diffusion.sample(schedule, _prior_denoiser(schedule), 0, jnp.arange(2), kind="x0",
                     event_shape=(8, 6), t_start=0, x_start=jnp.zeros((2, 8, 6)))


def test_sampler_rejects_bad_arguments():
  schedule = diffusion.sequence_schedule(25)
  denoise = _prior_denoiser(schedule)
  with pytest.raises(ValueError, match="kind"):
    diffusion.sample(schedule, denoise, 0, jnp.arange(2), kind="score", event_shape=(8, 6))
  with pytest.raises(TypeError, match="integer"):
    diffusion.sample(schedule, denoise, 0, jnp.arange(2.0), kind="x0", event_shape=(8, 6))
  with pytest.raises(ValueError, match="shape"):
    diffusion.sample(schedule, lambda x, t: x[..., :3], 0, jnp.arange(2), kind="x0",
                     event_shape=(8, 6))


def test_model_stack_shares_noise_across_models():
  schedule = diffusion.sequence_schedule(30)
  temperatures = jnp.array([1.0, 0.5])  # two "models" of a stack

  def one_model(temperature, x_t, t_batch):
    gamma = schedule.field(t_batch)
    return jax.nn.softmax(temperature * gamma[:, None, None] * x_t, axis=-1)

  def stacked(x_t, t_batch, temps):
    # x_t: [models, batch, L, q]
    return jax.vmap(one_model)(temps, x_t, t_batch)

  ids = jnp.array([0, 3, 8])
  together = diffusion.sample(schedule, stacked, 4, ids, kind="x0", event_shape=(8, 6),
                              shared_shape=(2,), denoise_args=(temperatures,))
  assert together.shape == (2, 3, 8, 6)
  for m in range(2):

    def single(x_t, t_batch, temp):
      return one_model(temp, x_t, t_batch)

    alone = diffusion.sample(schedule, single, 4, ids, kind="x0", event_shape=(8, 6),
                             denoise_args=(temperatures[m],))
    np.testing.assert_allclose(together[m], alone, rtol=1e-6, atol=1e-6)
  batched = diffusion.sample_in_batches(schedule, stacked, 4, ids, 2, kind="x0",
                                        event_shape=(8, 6), shared_shape=(2,),
                                        denoise_args=(temperatures,))
  np.testing.assert_array_equal(batched, together)


def test_sampler_with_exact_bp_yields_valid_sequences():
  hierarchical = pytest.importorskip("biasdiff.hierarchical")
  grammar = hierarchical.paper_grammar()
  schedule = diffusion.sequence_schedule(500)
  denoise = hierarchical.make_denoiser("bp", schedule.alpha_bar, grammar=grammar)
  x0 = diffusion.sample(schedule, denoise, 0, jnp.arange(16), kind="x0", event_shape=(16, 6))
  tokens = np.asarray(diffusion.to_tokens(x0))
  valid = hierarchical.is_valid(grammar, tokens)
  assert valid.shape == (16,)
  assert valid.all(), f"invalid samples: {tokens[~valid]}"
  # Distinct noise paths give distinct sequences (about 6.4e9 are valid).
  assert len({tuple(row) for row in tokens}) == 16
