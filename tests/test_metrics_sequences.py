"""Tests of the tree-data measures against numpy, closed forms and exact denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biasdiff import diffusion
from biasdiff import hierarchical as hier
from biasdiff import rng
from biasdiff.metrics import probes
from biasdiff.metrics import sequences as seq

Q = 6


@pytest.fixture(scope="module")
def grammar():
  return hier.paper_grammar()


@pytest.fixture(scope="module")
def schedule():
  return diffusion.sequence_schedule(500)


@pytest.fixture(scope="module")
def corpus(grammar):
  return hier.build_corpus(grammar, 4, 512, 512, data_seed=0)


def random_log_probs(rng_np, shape):
  logits = rng_np.standard_normal(shape)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def numpy_kl(p, q):
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(axis=(-2, -1))


# ---------------------------------------------------------------------------
# KL divergence.


def test_kl_zero_for_identical_inputs():
  log_p = random_log_probs(np.random.default_rng(0), (5, 16, Q))
  np.testing.assert_allclose(seq.kl_divergence(log_p, log_p), np.zeros(5), atol=1e-6)
  np.testing.assert_allclose(seq.kl_divergence(log_p, log_p, parity=True), np.zeros(5), atol=1e-6)


def test_kl_matches_numpy_sum_over_positions():
  generator = np.random.default_rng(1)
  log_p = random_log_probs(generator, (4, 3, Q))
  log_q = random_log_probs(generator, (4, 3, Q))
  expected = numpy_kl(np.exp(log_p), np.exp(log_q))
  np.testing.assert_allclose(seq.kl_divergence(log_p, log_q), expected, rtol=1e-5)
  # With one position, the KL is that position's term alone.
  single = seq.kl_divergence(log_p[:, :1], log_q[:, :1])
  np.testing.assert_allclose(single, numpy_kl(np.exp(log_p[:, :1]), np.exp(log_q[:, :1])),
                             rtol=1e-5)


def test_kl_zero_probability_terms_contribute_zero():
  p = np.array([[[0.5, 0.5, 0.0]]])
  q = np.array([[[0.25, 0.25, 0.5]]])
  with np.errstate(divide="ignore"):
    kl = seq.kl_divergence(np.log(p), np.log(q))
  np.testing.assert_allclose(kl, [np.log(2.0)], rtol=1e-6)


def test_kl_infinite_where_q_misses_support_of_p():
  p = np.array([[[0.5, 0.5]]])
  q = np.array([[[1.0, 0.0]]])
  with np.errstate(divide="ignore"):
    assert np.isinf(seq.kl_divergence(np.log(p), np.log(q))[0])


def test_kl_parity_mode_clips_without_renormalising():
  p = np.array([[[0.6, 0.4 - 1e-10, 1e-10]], [[1.0, 0.0, 0.0]]])
  q = np.array([[[0.3, 0.7 - 1e-12, 1e-12]], [[0.5, 0.5, 0.0]]])
  with np.errstate(divide="ignore"):
    got = seq.kl_divergence(np.log(p), np.log(q), parity=True)
  p_clip, q_clip = np.maximum(p, 1e-8), np.maximum(q, 1e-8)
  expected = np.sum(p_clip * np.log(p_clip / q_clip), axis=(-2, -1))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_kl_parity_finite_off_support():
  p = np.array([[[0.5, 0.5]]])
  q = np.array([[[1.0, 0.0]]])
  with np.errstate(divide="ignore"):
    got = seq.kl_divergence(np.log(p), np.log(q), parity=True)
  # 0.5 log(0.5 / 1) + 0.5 log(0.5 / 1e-8), with Q's clipped entry kept as it is.
  expected = 0.5 * np.log(0.5) + 0.5 * np.log(0.5 / 1e-8)
  np.testing.assert_allclose(got, [expected], rtol=1e-5)


def test_kl_broadcasts_leading_axes():
  generator = np.random.default_rng(2)
  log_p = random_log_probs(generator, (3, 1, 4, Q))
  log_q = random_log_probs(generator, (2, 4, Q))
  assert seq.kl_divergence(log_p, log_q).shape == (3, 2)


@pytest.mark.parametrize("log_p, log_q, message", [
    (np.zeros((2, 4, Q)), np.zeros((2, 5, Q)), "same L and q"),
    (np.zeros((Q,)), np.zeros((Q,)), r"\[..., L, q\]"),
    (np.full((1, 2, Q), np.nan), np.zeros((1, 2, Q)), "NaN"),
    (np.zeros((1, 2, Q)), np.full((1, 2, Q), np.inf), r"\+inf"),
])
def test_kl_rejects_bad_input(log_p, log_q, message):
  with pytest.raises(ValueError, match=message):
    seq.kl_divergence(log_p, log_q)


def test_log_softmax_fn_is_fp32_and_cached():
  logits_fn = lambda x, t, scale: scale * x
  wrapped = seq.log_softmax_fn(logits_fn)
  assert seq.log_softmax_fn(logits_fn) is wrapped
  x = np.random.default_rng(3).standard_normal((2, 4, Q)).astype(np.float32)
  out = wrapped(jnp.asarray(x, jnp.bfloat16), None, 2.0)
  assert out.dtype == jnp.float32
  expected = 2 * x - np.log(np.exp(2 * x).sum(-1, keepdims=True))
  np.testing.assert_allclose(out, expected, atol=0.05)  # bf16 input rounding


# ---------------------------------------------------------------------------
# Probe packs and the sample-split divergences.


def test_probe_pack_noise_is_pure_function_of_ids(corpus, schedule):
  tokens = corpus.heldout(0, 6)
  pack = seq.build_probe_pack(tokens, schedule, t=75, repeats=3, seed=11, set_id=0, num_symbols=Q)
  assert pack.x_t.shape == (18, 16, Q)
  np.testing.assert_array_equal(pack.sequence_of_input, np.repeat(np.arange(6), 3))
  # Rebuilding a subset with the same indices reproduces its rows exactly.
  part = seq.build_probe_pack(tokens[2:4], schedule, t=75, repeats=3, seed=11, set_id=0,
                              num_symbols=Q, indices=np.array([2, 3]))
  np.testing.assert_array_equal(part.x_t, pack.x_t[6:12])
  # The noise is fold(seed, PROBE, set, index, t, r).
  clean = np.eye(Q)[tokens[4]]
  noise = jax.random.normal(rng.fold(11, rng.PROBE, 0, 4, 75, 2), (16, Q))
  expected = (np.sqrt(schedule.alpha_bars[74]) * clean
              + np.sqrt(1 - schedule.alpha_bars[74]) * np.asarray(noise))
  np.testing.assert_allclose(pack.x_t[4 * 3 + 2], expected, atol=1e-5)
  # Another set id or seed gives other noise.
  other = seq.build_probe_pack(tokens, schedule, t=75, repeats=3, seed=11, set_id=1, num_symbols=Q)
  assert not np.allclose(other.x_t, pack.x_t)


def test_probe_pack_rejects_bad_input(schedule):
  with pytest.raises(ValueError, match="outside"):
    seq.build_probe_pack(np.full((2, 16), 7), schedule, t=75, repeats=1, seed=0, set_id=0,
                         num_symbols=Q)
  with pytest.raises(ValueError, match="outside the schedule"):
    seq.build_probe_pack(np.zeros((2, 16), int), schedule, t=0, repeats=1, seed=0, set_id=0,
                         num_symbols=Q)
  with pytest.raises(TypeError, match="integer tokens"):
    seq.build_probe_pack(np.zeros((2, 16)), schedule, t=75, repeats=1, seed=0, set_id=0,
                         num_symbols=Q)
  with pytest.raises(ValueError, match="indices must have shape"):
    seq.build_probe_pack(np.zeros((2, 16), int), schedule, t=75, repeats=1, seed=0, set_id=0,
                         num_symbols=Q, indices=np.arange(3))


@pytest.fixture(scope="module")
def small_pack(corpus, schedule):
  return seq.build_probe_pack(corpus.heldout(0, 20), schedule, t=75, repeats=2, seed=3,
                              set_id=probes.HELDOUT_SET, num_symbols=Q)


@pytest.fixture(scope="module")
def small_pack_bp(grammar, schedule, small_pack):
  return seq.pack_bp_log_marginals(grammar, schedule, small_pack, batch_size=16)


def test_pack_bp_log_marginals_match_exact_denoiser(grammar, schedule, small_pack, small_pack_bp):
  assert small_pack_bp.shape == (5, 40, 16, Q)
  for k in (0, 3):
    expected = hier.exact_denoiser(grammar, small_pack.x_t, schedule.alpha_bar(jnp.int32(75)), k)
    np.testing.assert_allclose(np.exp(small_pack_bp[k]), expected, atol=1e-6)


def test_split_divergences_match_cached_path_and_batching(grammar, schedule, small_pack,
                                                          small_pack_bp):
  # Stand-in "models": a filtered BP and a tempered copy of it.
  model_fn = lambda x, t, temperature: jax.nn.log_softmax(
      seq.bp_log_prob_fn(grammar, schedule, 2)(x, t) / temperature, axis=-1)
  result = seq.split_divergences(model_fn, (1.0,), (1.5,), small_pack,
                                 bp_log_marginals=small_pack_bp, batch_size=7)
  log_a = seq.pack_log_probs(model_fn, small_pack, fn_args=(1.0,), batch_size=40)
  log_b = seq.pack_log_probs(model_fn, small_pack, fn_args=(1.5,), batch_size=40)
  np.testing.assert_allclose(result.pair, seq.kl_divergence(log_a, log_b), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(result.oracle_a, seq.oracle_divergences(small_pack_bp, log_a),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(result.oracle_b, seq.oracle_divergences(small_pack_bp, log_b),
                             rtol=1e-4, atol=1e-6)
  assert result.pair.shape == (40,)
  assert result.oracle_a.shape == (5, 40)
  # Model A is BP_2 itself, so its oracle divergence to BP_2 vanishes and others do not.
  np.testing.assert_allclose(result.oracle_a[2], np.zeros(40), atol=1e-5)
  assert float(result.oracle_a[0].mean()) > 0.01
  summaries = result.summaries()
  assert summaries["pair"].count == 40
  np.testing.assert_allclose(summaries["pair"].se, np.std(result.pair, ddof=1) / np.sqrt(40),
                             rtol=1e-4)


def test_split_divergence_of_identical_models_is_zero(grammar, schedule, small_pack):
  fn = seq.bp_log_prob_fn(grammar, schedule, 1)
  result = seq.split_divergences(fn, (), (), small_pack)
  np.testing.assert_allclose(result.pair, np.zeros(40), atol=1e-6)
  assert result.oracle_a is None


def test_split_divergences_support_model_stacks(grammar, schedule, small_pack, small_pack_bp):
  # A stack of two "models": [2, B, L, q].
  stack_fn = seq.bp_log_prob_fn(grammar, schedule, (0, 4))
  single_fn = seq.bp_log_prob_fn(grammar, schedule, 1)
  result = seq.split_divergences(stack_fn, (), (), small_pack, log_prob_fn_b=single_fn,
                                 bp_log_marginals=small_pack_bp)
  assert result.pair.shape == (2, 40)
  assert result.oracle_a.shape == (2, 5, 40)
  np.testing.assert_allclose(result.oracle_a[0, 0], np.zeros(40), atol=1e-5)
  np.testing.assert_allclose(result.oracle_a[1, 4], np.zeros(40), atol=1e-5)
  np.testing.assert_allclose(result.oracle_b[1], np.zeros(40), atol=1e-5)


def test_split_divergences_reject_mismatched_bp_cache(grammar, schedule, small_pack, small_pack_bp):
  fn = seq.bp_log_prob_fn(grammar, schedule, 0)
  with pytest.raises(ValueError, match="bp_log_marginals must have shape"):
    seq.split_divergences(fn, (), (), small_pack, bp_log_marginals=small_pack_bp[:, :10])


# ---------------------------------------------------------------------------
# KL along diffusion time.


@pytest.fixture(scope="module")
def bp_curve(grammar, schedule, corpus):
  return seq.kl_along_time(
      seq.bp_log_prob_fn(grammar, schedule, 0), seq.bp_log_prob_fn(grammar, schedule, (1, 2, 3, 4)),
      corpus.heldout(0, 60), schedule, seed=5, set_id=0, repeats=2, num_symbols=Q,
      times=[1, 75, 500], batch_size=64, times_per_call=2)


def test_kl_bp0_bpk_vanishes_at_both_ends(bp_curve):
  assert bp_curve.mean.shape == (4, 3)
  assert bp_curve.count == 120
  assert np.all(np.abs(bp_curve.mean[:, 0]) < 1e-3)
  assert np.all(np.abs(bp_curve.mean[:, 2]) < 1e-3)


def test_kl_bp0_bpk_grows_with_k(bp_curve):
  middle = np.asarray(bp_curve.mean[:, 1])
  assert middle[0] > 0.02
  assert np.all(np.diff(middle) > 0), middle
  assert np.all(middle > 100 * np.asarray(bp_curve.mean[:, 0]))


def test_kl_along_time_matches_probe_pack(grammar, schedule, corpus, bp_curve):
  pack = seq.build_probe_pack(corpus.heldout(0, 60), schedule, t=75, repeats=2, seed=5,
                              set_id=0, num_symbols=Q)
  bp_log = seq.pack_bp_log_marginals(grammar, schedule, pack)
  per_input = seq.kl_divergence(bp_log[0], bp_log[1:])  # [4, N]
  np.testing.assert_allclose(bp_curve.mean[:, 1], per_input.mean(-1), rtol=1e-4)
  np.testing.assert_allclose(bp_curve.se[:, 1], np.std(per_input, axis=-1, ddof=1) / np.sqrt(120),
                             rtol=1e-3)


# ---------------------------------------------------------------------------
# Nearest-neighbour divergence.


def test_nearest_distances_match_brute_force():
  generator = np.random.default_rng(7)
  queries = generator.integers(0, Q, (30, 16))
  references = generator.integers(0, Q, (50, 16))
  references[3] = queries[5]
  expected = (queries[:, None, :] != references[None]).sum(-1).min(-1)
  got = seq.nearest_distances(queries, references, Q)
  np.testing.assert_array_equal(got, expected)
  assert got[5] == 0


def test_histogram_kl_matches_numpy_floor_definition():
  p_gen = np.array([0.5, 0.5, 0.0, 0.0])
  p_test = np.array([0.0, 0.25, 0.25, 0.5])
  floored_gen, floored_test = np.maximum(p_gen, 1e-8), np.maximum(p_test, 1e-8)
  expected = np.sum(floored_gen * np.log(floored_gen / floored_test))
  assert seq.histogram_kl(p_gen, p_test) == pytest.approx(expected, rel=1e-12)
  assert seq.histogram_kl(p_test, p_test) == pytest.approx(0.0, abs=1e-12)


def test_nn_divergence_copies_and_random_sequences(grammar, corpus):
  training = corpus.training_block(0, 256)
  test_tokens = corpus.heldout(0, 200)
  copies = training[:40]
  result = seq.nn_divergence(copies, training, grammar, test_tokens=test_tokens, seed=0,
                             num_resamples=50)
  assert float(result.fraction_exact.mean) == 1.0
  assert float(result.fraction_invalid.mean) == 0.0
  assert result.fraction_exact.count == 40
  np.testing.assert_array_equal(result.generated_histogram, np.eye(17)[0])
  test_distances = (test_tokens[:, None] != training[None]).sum(-1).min(-1)
  np.testing.assert_allclose(result.test_histogram, np.bincount(test_distances, minlength=17) / 200)
  expected = seq.histogram_kl(result.generated_histogram, result.test_histogram)
  assert result.divergence == pytest.approx(expected)
  assert result.divergence > 0
  assert np.isfinite(result.se)
  assert result.se >= 0
  # Precomputed test distances give the same numbers.
  again = seq.nn_divergence(copies, training, grammar, test_distances=test_distances, seed=0,
                            num_resamples=50)
  assert again.divergence == result.divergence
  assert again.se == result.se
  # Uniformly random sequences almost never parse.
  noise = seq.random_sequences(1, 40, 16, Q)
  random_result = seq.nn_divergence(noise, training, grammar, test_distances=test_distances,
                                    seed=0, num_resamples=0)
  assert float(random_result.fraction_invalid.mean) == 1.0
  assert float(random_result.fraction_exact.mean) == 0.0
  assert np.isnan(random_result.se)


def test_nn_divergence_fresh_samples_are_close_to_test(grammar, corpus):
  training = corpus.training_block(0, 256)
  fresh = corpus.heldout(200, 500)
  result = seq.nn_divergence(fresh, training, grammar, test_tokens=corpus.heldout(0, 200),
                             seed=0, num_resamples=0)
  copies = seq.nn_divergence(training[:300], training, grammar,
                             test_tokens=corpus.heldout(0, 200), seed=0, num_resamples=0)
  assert result.divergence < 0.2 * copies.divergence


def test_nn_divergence_rejects_bad_input(grammar):
  with pytest.raises(ValueError, match="exactly one"):
    seq.nn_divergence(np.zeros((2, 16), int), np.zeros((3, 16), int), grammar, seed=0)
  with pytest.raises(ValueError, match="same length"):
    seq.nearest_distances(np.zeros((2, 16), int), np.zeros((3, 8), int), Q)
  with pytest.raises(ValueError, match="outside"):
    seq.distance_histogram(np.array([0, 17]), 16)


# ---------------------------------------------------------------------------
# Loss decomposition.


def decompose(log_prob_fn, grammar, schedule, tokens, set_id, t):
  inputs = seq.loss_probes(tokens, schedule, seed=0, set_id=set_id, num_symbols=Q, t=t)
  oracle = seq.loss_oracle(grammar, schedule, inputs)
  return seq.loss_decomposition(log_prob_fn, inputs, oracle, batch_size=128), inputs, oracle


@pytest.mark.parametrize("t", [150, None], ids=["fixed_t", "mean_t"])
@pytest.mark.parametrize("which", ["train", "heldout"])
def test_loss_excess_of_exact_denoiser_is_zero(grammar, schedule, corpus, which, t):
  if which == "train":
    tokens, set_id = corpus.training_block(0, 256), probes.training_set_id(0)
  else:
    tokens, set_id = corpus.heldout(0, 256), probes.HELDOUT_SET
  result, _, _ = decompose(seq.bp_log_prob_fn(grammar, schedule, 0), grammar, schedule, tokens,
                           set_id, t)
  assert result.excess.count == 256
  assert abs(float(result.excess.mean)) < 3 * float(result.excess.se)
  assert float(result.excess.se) > 0
  # The decomposition L = L* + L~ holds per sequence.
  np.testing.assert_allclose(result.per_sequence_total,
                             result.per_sequence_distillation + result.per_sequence_excess,
                             atol=1e-5)


def test_loss_excess_of_empirical_denoiser_is_negative_on_its_data(grammar, schedule, corpus):
  references = corpus.training_block(0, 64)
  alpha_bar = schedule.alpha_bar
  # A small uniform mixture keeps every log-probability finite.
  memorising = lambda x, t: jnp.log((1 - 1e-6) * hier.empirical_denoiser(
      references, x, alpha_bar(t), Q) + 1e-6 / Q)
  result, _, _ = decompose(memorising, grammar, schedule, references, 1, 150)
  assert float(result.excess.mean) + 3 * float(result.excess.se) < 0


def test_loss_terms_match_numpy(grammar, schedule, corpus):
  tokens = corpus.heldout(0, 256)
  fn = seq.bp_log_prob_fn(grammar, schedule, 4)
  result, inputs, oracle = decompose(fn, grammar, schedule, tokens, 0, 150)
  log_p = np.asarray(fn(inputs.x_t, inputs.t))
  one_hot = np.eye(Q)[tokens]
  total = -(one_hot * log_p).sum(-1).mean(-1)
  distillation = -(np.asarray(oracle) * log_p).sum(-1).mean(-1)
  np.testing.assert_allclose(result.per_sequence_total, total, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.per_sequence_distillation, distillation, rtol=1e-5)
  np.testing.assert_allclose(result.total.mean, total.mean(), rtol=1e-5)
  np.testing.assert_allclose(result.excess.se,
                             np.std(total - distillation, ddof=1) / np.sqrt(256), rtol=1e-3)


def test_loss_probes_modes(schedule, corpus):
  tokens = corpus.heldout(0, 64)
  fixed = seq.loss_probes(tokens, schedule, seed=0, set_id=0, num_symbols=Q, t=150)
  mean_t = seq.loss_probes(tokens, schedule, seed=0, set_id=0, num_symbols=Q)
  again = seq.loss_probes(tokens, schedule, seed=0, set_id=0, num_symbols=Q)
  np.testing.assert_array_equal(fixed.t, np.full(64, 150))
  np.testing.assert_array_equal(mean_t.t, again.t)
  np.testing.assert_array_equal(mean_t.x_t, again.x_t)
  assert mean_t.t.min() >= 1 and mean_t.t.max() <= 500
  assert len(np.unique(np.asarray(mean_t.t))) > 40


def test_loss_decomposition_rejects_mismatched_oracle(grammar, schedule, corpus):
  inputs = seq.loss_probes(corpus.heldout(0, 4), schedule, seed=0, set_id=0, num_symbols=Q, t=150)
  with pytest.raises(ValueError, match="oracle has shape"):
    seq.loss_decomposition(seq.bp_log_prob_fn(grammar, schedule, 0), inputs, np.zeros((3, 16, Q)))


# ---------------------------------------------------------------------------
# U-turns.


@pytest.fixture(scope="module")
def bp_denoiser(grammar, schedule):
  return hier.make_denoiser("bp", schedule.alpha_bar, grammar=grammar)


@pytest.fixture(scope="module")
def late_uturns(schedule, corpus, bp_denoiser):
  return seq.uturn_overlaps(bp_denoiser, schedule, corpus.heldout(0, 16), t0=60,
                            num_repetitions=2, seed=0, set_id=0, denoiser_id=0, num_symbols=Q,
                            batch_size=16)


def test_bp_uturns_recover_fresh_sequences_at_small_t(schedule, corpus, bp_denoiser, late_uturns):
  overlaps = seq.uturn_overlaps(bp_denoiser, schedule, corpus.heldout(0, 16), t0=5,
                                num_repetitions=2, seed=0, set_id=0, denoiser_id=0,
                                num_symbols=Q, batch_size=16)
  assert overlaps.shape == (2, 16)
  assert float(overlaps.mean()) > 0.99
  assert float(late_uturns.mean()) < float(overlaps.mean())


def test_uturn_noise_depends_on_ids_only(schedule, corpus, bp_denoiser, late_uturns):
  tokens = corpus.heldout(0, 16)
  kwargs = dict(t0=60, seed=0, set_id=0, num_symbols=Q, batch_size=16)
  # Repetition r gives the same overlaps whichever window of repetitions is run.
  again = seq.uturn_overlaps(bp_denoiser, schedule, tokens, num_repetitions=1, denoiser_id=0,
                             first_repetition=1, **kwargs)
  np.testing.assert_array_equal(late_uturns[1], again[0])
  # Another denoiser id draws other reverse noise from the same starts.
  other = seq.uturn_overlaps(bp_denoiser, schedule, tokens, num_repetitions=2, denoiser_id=1,
                             **kwargs)
  assert not np.array_equal(late_uturns, other)
  start = seq.uturn_starts(tokens, schedule, t0=60, repetition=1, seed=0, set_id=0,
                           num_symbols=Q)
  noise = jax.random.normal(rng.fold(0, rng.START, 60, 1, 0, 3), (16, Q))
  abar = schedule.alpha_bars[59]
  np.testing.assert_allclose(start[3], np.sqrt(abar) * np.eye(Q)[tokens[3]]
                             + np.sqrt(1 - abar) * np.asarray(noise), atol=1e-5)


@pytest.fixture(scope="module")
def empirical(grammar, schedule, corpus):
  """An empirical-score denoiser on 256 sequences drawn from block 0."""
  _, references = seq.reference_subset(corpus.training_block(0, 512), 256, seed=0, block=0)
  denoiser = hier.make_denoiser("empirical", schedule.alpha_bar, grammar=grammar,
                                references=references)
  return references, denoiser


def test_empirical_uturn_returns_reference_member(schedule, empirical):
  references, denoiser = empirical
  overlaps = seq.uturn_overlaps(denoiser, schedule, references[:12], t0=15, num_repetitions=2,
                                seed=0, set_id=1, denoiser_id=2, num_symbols=Q)
  np.testing.assert_array_equal(overlaps, np.ones((2, 12)))


def test_empirical_sampler_generates_reference_members(grammar, schedule, corpus):
  references = corpus.training_block(0, 32)
  denoiser = hier.make_denoiser("empirical", schedule.alpha_bar, grammar=grammar,
                                references=references)
  x0 = diffusion.sample_in_batches(schedule, denoiser, 0, 24, 24, kind=diffusion.X0,
                                   event_shape=(16, Q))
  generated = np.asarray(diffusion.to_tokens(x0))
  np.testing.assert_array_equal(seq.nearest_distances(generated, references, Q), np.zeros(24))


def test_uturn_ratio_matches_numpy_with_exclusions():
  model = np.array([[[1.0, 0.5, 0.25, 0.0]], [[0.5, 0.5, 0.75, 1.0]]])  # [R=2, N=4] as [2, 1, 4]
  model = model[:, 0]
  bp_overlaps = np.array([[1.0, 1.0, 0.5, 0.0], [0.5, 1.0, 0.5, 0.0]])
  result = seq.uturn_ratio(model, bp_overlaps)
  m = model.mean(0)
  b = bp_overlaps.mean(0)
  rho = m[:3] / b[:3]
  assert result.count == 3
  assert result.num_excluded == 1
  assert np.isnan(result.rho[3])
  np.testing.assert_allclose(result.rho[:3], rho)
  np.testing.assert_allclose(result.mean, rho.mean())
  np.testing.assert_allclose(result.se, rho.std(ddof=1) / np.sqrt(3))
  np.testing.assert_allclose(result.model_overlap.mean, m.mean(), rtol=1e-6)
  assert result.model_overlap.count == 4


def test_uturn_ratio_supports_model_stacks_and_rejects_bad_input():
  model = np.random.default_rng(0).uniform(size=(3, 5, 7))
  bp_overlaps = np.full((4, 7), 0.5)
  result = seq.uturn_ratio(model, bp_overlaps)
  assert result.mean.shape == (3,)
  np.testing.assert_allclose(result.mean, model.mean(1).mean(-1) / 0.5)
  with pytest.raises(ValueError, match="same sequences"):
    seq.uturn_ratio(model, np.full((4, 6), 0.5))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    seq.uturn_ratio(model + 1.0, bp_overlaps)
  with pytest.raises(ValueError, match="b = 0 everywhere"):
    seq.uturn_ratio(model, np.zeros((4, 7)))


def test_random_uturn_inputs_are_fixed_and_uniform(corpus):
  first = seq.random_sequences(4, 500, 16, Q)
  np.testing.assert_array_equal(first, seq.random_sequences(4, 500, 16, Q))
  np.testing.assert_array_equal(first[:10], seq.random_sequences(4, 10, 16, Q))
  counts = np.bincount(first.ravel(), minlength=Q)
  assert np.all(np.abs(counts / first.size - 1 / Q) < 0.02)
  block = corpus.training_block(0, 512)
  rows, subset = seq.reference_subset(block, 256, seed=4, block=0)
  assert len(np.unique(rows)) == 256
  np.testing.assert_array_equal(subset, block[rows])
  rows_again, _ = seq.reference_subset(block, 256, seed=4, block=0)
  np.testing.assert_array_equal(rows, rows_again)
  with pytest.raises(ValueError, match="Cannot draw"):
    seq.reference_subset(block, 600, seed=4, block=0)


def test_random_uturns_with_filtered_bp_and_empirical(grammar, schedule, empirical):
  tokens = seq.random_sequences(0, 12, 16, Q)
  filtered = hier.make_denoiser("bp", schedule.alpha_bar, grammar=grammar, filtered_levels=4)
  results = {}
  for name, denoiser, denoiser_id in (("empirical", empirical[1], 2), ("bp4", filtered, 7)):
    overlaps = seq.uturn_overlaps(denoiser, schedule, tokens, t0=15, num_repetitions=2, seed=0,
                                  set_id=probes.RANDOM_SET, denoiser_id=denoiser_id,
                                  num_symbols=Q)
    assert np.all(np.isfinite(overlaps))
    results[name] = seq.overlap_summary(overlaps)
  # Random inputs are far from the 256 references, so the memorising denoiser
  # cannot return them; the factorised BP_4 keeps more of the observed tokens.
  assert results["empirical"].count == 12
  assert float(results["empirical"].mean) < float(results["bp4"].mean)
