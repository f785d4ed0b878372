"""Tests of exact and filtered BP, the free energy and the baseline denoisers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force
from biasdiff import hierarchical as hier


def sequence_alpha_bar(t: int, num_steps: int = 500) -> float:
  """abar_t of the rescaled linear schedule (float64), written out independently."""
  steps = np.arange(1, num_steps + 1)
  betas = (1000 / num_steps) * (1e-4 + (0.02 - 1e-4) * (steps - 1) / (num_steps - 1))
  return float(np.prod(1 - betas[:t]))


def noisy(tokens, alpha_bar, seed):
  q = 6
  one_hot = np.eye(q)[tokens]
  noise = np.random.default_rng(seed).standard_normal(one_hot.shape)
  return (np.sqrt(alpha_bar) * one_hot + np.sqrt(1 - alpha_bar) * noise).astype(np.float32)


SMALL_CASES = [
    # (num_symbols, num_allowed, depth, grammar seed)
    (3, 3, 3, 1),
    (3, 2, 3, 2),  # forbidden pairs
    (2, 1, 3, 3),  # one pair per parent
    (3, 2, 2, 4),
    (4, 3, 2, 5),
]


@pytest.mark.parametrize("q, q_eff, depth, seed", SMALL_CASES)
def test_bp_matches_brute_force_for_every_k(q, q_eff, depth, seed):
  grammar = hier.make_grammar(q, q_eff, sigma=1.0, seed=seed)
  field = 1.5 * np.random.default_rng(seed).standard_normal((4, 2**depth, q))
  for k in range(depth + 1):
    joint = brute_force.leaf_joint(grammar, depth, k)
    np.testing.assert_allclose(joint.sum(), 1.0, atol=1e-12)
    expected = brute_force.posterior_marginals(joint, field)
    got = hier.posterior_marginals(grammar, jnp.asarray(field, jnp.float32), k)
    np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=f"BP_{k}")


@pytest.mark.parametrize("k", range(3))
def test_bp_matches_brute_force_on_paper_grammar_under_strong_field(k):
  # q = 6 at depth 2 keeps the enumeration small; the field is large but finite.
  grammar = hier.paper_grammar()
  field = 6.0 * np.random.default_rng(k).standard_normal((3, 4, 6))
  expected = brute_force.posterior_marginals(brute_force.leaf_joint(grammar, 2, k), field)
  got = hier.posterior_marginals(grammar, jnp.asarray(field, jnp.float32), k)
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_probability_and_log_space_agree():
  grammar = hier.paper_grammar()
  tokens = hier.sample_sequences(grammar, 4, 32, seed=1)
  for t in (5, 42, 75, 150, 400):
    x_t = noisy(tokens, sequence_alpha_bar(t), seed=t)
    got = np.asarray(hier.exact_denoiser(grammar, x_t, sequence_alpha_bar(t)))
    alpha_bar = sequence_alpha_bar(t)
    field = np.sqrt(alpha_bar) / (1 - alpha_bar) * x_t.astype(np.float64)
    expected = np.stack([brute_force.log_space_bp(grammar.rules, f) for f in field])
    np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"t = {t}")


def test_bp_recovers_clean_sequence_at_first_step():
  grammar = hier.paper_grammar()
  tokens = hier.sample_sequences(grammar, 4, 256, seed=2)
  x_1 = noisy(tokens, sequence_alpha_bar(1), seed=0)
  for k in range(5):
    got = hier.exact_denoiser(grammar, x_1, sequence_alpha_bar(1), filtered_levels=k)
    np.testing.assert_allclose(got, np.eye(6)[tokens], atol=1e-6, err_msg=f"BP_{k}")


def test_zero_field_gives_prior_leaf_marginals():
  grammar = hier.paper_grammar()
  expected = grammar.leaf_marginals(4)
  for k in range(5):
    got = hier.posterior_marginals(grammar, jnp.zeros((2, 16, 6)), k)
    np.testing.assert_allclose(got[0], expected, atol=3e-7, err_msg=f"BP_{k}")


def test_last_step_is_close_to_prior_leaf_marginals():
  grammar = hier.paper_grammar()
  tokens = hier.sample_sequences(grammar, 4, 64, seed=3)
  got = hier.exact_denoiser(grammar, noisy(tokens, sequence_alpha_bar(500), 1),
                            sequence_alpha_bar(500))
  np.testing.assert_allclose(got, np.broadcast_to(grammar.leaf_marginals(4), got.shape),
                             atol=0.01)


def test_bp_is_finite_on_random_sequences_at_every_time():
  grammar = hier.paper_grammar()
  tokens = np.random.default_rng(0).integers(0, 6, (64, 16))
  for t in (1, 2, 5, 25, 75, 250, 500):
    x_t = noisy(tokens, sequence_alpha_bar(t), seed=t)
    for k in range(5):
      got = np.asarray(hier.exact_denoiser(grammar, x_t, sequence_alpha_bar(t), k))
      assert np.isfinite(got).all(), f"t = {t}, BP_{k}"
      np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_bp_is_finite_for_extreme_inputs():
  grammar = hier.paper_grammar()
  x_t = jnp.asarray([1e30, -1e30, 0, 3e38, -3e38, 1]) * jnp.ones((16, 6))
  for k in range(5):
    assert np.isfinite(hier.exact_denoiser(grammar, x_t[None], 0.9998, k)).all()


def test_bp_batches_over_leading_axes_with_per_sequence_times():
  grammar = hier.paper_grammar()
  tokens = hier.sample_sequences(grammar, 4, 6, seed=4)
  alpha_bars = np.array([sequence_alpha_bar(t) for t in (10, 75, 300)] * 2)
  x_t = np.stack([noisy(tokens[i], alpha_bars[i], i) for i in range(6)])
  batched = hier.exact_denoiser(grammar, x_t.reshape(2, 3, 16, 6), alpha_bars.reshape(2, 3))
  for i in range(6):
    single = hier.exact_denoiser(grammar, x_t[i], alpha_bars[i])
    np.testing.assert_allclose(batched.reshape(6, 16, 6)[i], single, atol=1e-6)
  jitted = jax.jit(lambda x, a: hier.exact_denoiser(grammar, x, a, filtered_levels=2))
  np.testing.assert_allclose(jitted(x_t, alpha_bars),
                             hier.exact_denoiser(grammar, x_t, alpha_bars, filtered_levels=2),
                             atol=1e-6)


def test_filtered_bp_with_zero_levels_is_exact_bp():
  grammar = hier.paper_grammar()
  x_t = noisy(hier.sample_sequences(grammar, 4, 8, seed=0), sequence_alpha_bar(75), 0)
  np.testing.assert_array_equal(hier.exact_denoiser(grammar, x_t, sequence_alpha_bar(75), 0),
                                hier.exact_denoiser(grammar, x_t, sequence_alpha_bar(75)))


@pytest.mark.parametrize("q, q_eff, depth", [(3, 2, 2), (2, 2, 3), (3, 3, 2)])
def test_log_likelihood_sums_to_one(q, q_eff, depth):
  grammar = hier.make_grammar(q, q_eff, sigma=1.0, seed=11)
  every = np.array(list(itertools.product(range(q), repeat=2**depth)))
  log_p = np.asarray(hier.log_likelihood(grammar, every), dtype=np.float64)
  np.testing.assert_allclose(np.exp(log_p).sum(), 1.0, atol=1e-5)
  expected = brute_force.leaf_joint(grammar, depth).reshape(-1)
  np.testing.assert_allclose(np.exp(log_p), expected, atol=1e-6)


def test_log_likelihood_equals_parser_log_prob():
  grammar = hier.paper_grammar()
  tokens = hier.sample_sequences(grammar, 4, 500, seed=6)
  _, exact = hier.parse(grammar, tokens)
  np.testing.assert_allclose(hier.log_likelihood(grammar, tokens), exact, rtol=1e-5)
  invalid = np.zeros((1, 16), dtype=np.int32)
  assert hier.log_likelihood(grammar, invalid)[0] == -np.inf


def test_log_likelihood_with_mask_sums_over_masked_positions():
  grammar = hier.make_grammar(3, 2, sigma=1.0, seed=12)
  joint = brute_force.leaf_joint(grammar, 2)  # [3, 3, 3, 3]
  tokens = hier.sample_sequences(grammar, 2, 2, seed=13).astype(np.int32)
  mask = np.array([[True, False, True, False], [False, False, False, True]])
  (a, _, c, _), (_, _, _, d) = tokens
  expected = [np.log(joint[a, :, c, :].sum()), np.log(joint[:, :, :, d].sum())]
  assert np.all(np.isfinite(expected))
  np.testing.assert_allclose(hier.log_likelihood(grammar, tokens, mask), expected, rtol=1e-5)


def test_empirical_denoiser_matches_brute_force_posterior():
  grammar = hier.paper_grammar()
  references = hier.sample_sequences(grammar, 2, 5, seed=7)
  x_t = noisy(references[:2], 0.6, seed=0)
  got = hier.empirical_denoiser(references, x_t, 0.6, num_symbols=6)
  one_hot = np.eye(6)[references]
  for i in range(2):
    log_w = -((x_t[i] - np.sqrt(0.6) * one_hot) ** 2).sum(axis=(1, 2)) / (2 * 0.4)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    np.testing.assert_allclose(got[i], np.einsum("p,plq->lq", w, one_hot), atol=1e-5)


def test_empirical_denoiser_returns_member_at_small_time():
  grammar = hier.paper_grammar()
  references = hier.sample_sequences(grammar, 4, 256, seed=8)
  x_t = noisy(references[:10], sequence_alpha_bar(5), seed=1)
  got = hier.empirical_denoiser(references, x_t, sequence_alpha_bar(5), num_symbols=6)
  np.testing.assert_allclose(got, np.eye(6)[references[:10]], atol=1e-5)


def test_prior_denoiser_is_positionwise_softmax():
  x_t = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
  gamma = np.sqrt(0.5) / 0.5
  expected = np.exp(gamma * x_t) / np.exp(gamma * x_t).sum(-1, keepdims=True)
  np.testing.assert_allclose(hier.prior_denoiser(x_t, 0.5), expected, rtol=1e-5)


def test_make_denoiser_dispatches_by_kind():
  grammar = hier.paper_grammar()
  x_t = noisy(hier.sample_sequences(grammar, 4, 4, seed=9), 0.8, 0)
  alpha_bar_fn = lambda t: jnp.full(jnp.shape(t), 0.8)
  t = jnp.full((4,), 75)
  bp2 = hier.make_denoiser("bp", alpha_bar_fn, grammar=grammar, filtered_levels=2)
  np.testing.assert_allclose(bp2(x_t, t), hier.exact_denoiser(grammar, x_t, 0.8, 2), atol=1e-6)
  prior = hier.make_denoiser("prior", alpha_bar_fn)
  np.testing.assert_allclose(prior(x_t, t), hier.prior_denoiser(x_t, 0.8), atol=1e-6)
  with pytest.raises(ValueError, match="unknown denoiser kind 'oracle'"):
    hier.make_denoiser("oracle", alpha_bar_fn)


@pytest.mark.parametrize("shape, kwargs, message", [
    ((2, 16, 5), {}, "has size 5, but the grammar has q = 6"),
    ((2, 12, 6), {}, "power of two"),
    ((16,), {}, r"shape \[\.\.\., L, q\]"),
    ((2, 16, 6), dict(filtered_levels=5), r"filtered_levels must be an integer in \[0, 4\]"),
    ((2, 16, 6), dict(filtered_levels=-1), "filtered_levels"),
    ((2, 16, 6), dict(depth=3), "depth 3 does not match sequence length 16"),
    ((2, 16, 6), dict(epsilon=-1.0), "epsilon must be finite and >= 0"),
])
def test_exact_denoiser_rejects_bad_input(shape, kwargs, message):
  with pytest.raises(ValueError, match=message):
    hier.exact_denoiser(hier.paper_grammar(), jnp.zeros(shape), 0.5, **kwargs)


@pytest.mark.parametrize("alpha_bar, message", [
    (1.0, r"alpha_bar must lie in \(0, 1\)"),
    (-0.5, r"alpha_bar must lie in \(0, 1\)"),
    (1.5, r"alpha_bar must lie in \(0, 1\)"),
    (np.full((2, 1), 0.5), r"alpha_bar of shape \(2, 1\) must be a scalar or broadcast"),
])
def test_exact_denoiser_rejects_bad_alpha_bar(alpha_bar, message):
  with pytest.raises(ValueError, match=message):
    hier.exact_denoiser(hier.paper_grammar(), jnp.zeros((2, 16, 6)), alpha_bar)


def test_log_likelihood_rejects_out_of_range_tokens():
  with pytest.raises(ValueError, match=r"tokens must lie in \[0, 6\), got values in \[0, 6\]"):
    hier.log_likelihood(hier.paper_grammar(), np.array([[6, 0, 0, 0]]))
  with pytest.raises(TypeError, match="mask must be boolean"):
    hier.log_likelihood(hier.paper_grammar(), np.zeros((1, 4), int), np.full((1, 4), 0.5))


def test_empirical_denoiser_rejects_bad_references():
  x_t = jnp.zeros((1, 4, 6))
  with pytest.raises(ValueError, match=r"references must lie in \[0, 6\)"):
    hier.empirical_denoiser(np.array([[6, 0, 0, 0]]), x_t, 0.5, num_symbols=6)
  with pytest.raises(TypeError, match="references must be integer tokens"):
    hier.empirical_denoiser(np.zeros((1, 4)) + 0.3, x_t, 0.5, num_symbols=6)
