"""Tests of the bias monitor: membership statistics, stopping rules, trainer hook and audit."""

import itertools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)
import configs  # pylint: disable=g-import-not-at-top
from configs import hierarchical as hierarchical_configs  # pylint: disable=g-import-not-at-top
from biasdiff import diffusion  # pylint: disable=g-import-not-at-top
from biasdiff import hierarchical  # pylint: disable=g-import-not-at-top
from biasdiff import monitor  # pylint: disable=g-import-not-at-top
from biasdiff.metrics import images as image_metrics  # pylint: disable=g-import-not-at-top
from biasdiff.metrics import probes  # pylint: disable=g-import-not-at-top
from biasdiff.metrics import sequences as seq_metrics  # pylint: disable=g-import-not-at-top
from biasdiff.monitor import rules  # pylint: disable=g-import-not-at-top
from biasdiff.monitor import statistics  # pylint: disable=g-import-not-at-top
from biasdiff.training import loop  # pylint: disable=g-import-not-at-top
from biasdiff.training import state as state_lib  # pylint: disable=g-import-not-at-top
from biasdiff.training import tasks  # pylint: disable=g-import-not-at-top
from helpers import audit_script  # pylint: disable=g-import-not-at-top
from helpers import tiny_training as tiny  # pylint: disable=g-import-not-at-top


def _pair_credit(member, nonmember):
  """Credit of one (member, non-member) pair: 1 if ordered right, 1/2 on a tie."""
  if member > nonmember:
    return 1.0
  if member == nonmember:
    return 0.5
  return 0.0


def _brute_force_auc(members, nonmembers):
  wins = sum(_pair_credit(s, r) for s, r in itertools.product(members, nonmembers))
  return wins / (len(members) * len(nonmembers))


def _brute_force_delong(members, nonmembers):
  v1 = [np.mean([_pair_credit(s, r) for r in nonmembers]) for s in members]
  v0 = [np.mean([_pair_credit(s, r) for s in members]) for r in nonmembers]
  return np.sqrt(np.var(v1, ddof=1) / len(members) + np.var(v0, ddof=1) / len(nonmembers))


def _small_monitor_config(**overrides):
  config = configs.monitor_section()
  config.split_heldout_examples = 16
  config.split_train_examples = 8
  config.loss_examples = 8
  config.mia_examples = 8
  config.mia_repeats = 2
  config.batch_size = 8
  for name, value in overrides.items():
    config[name] = value
  return config


# ---------------------------------------------------------------------------
# AUC, its standard error and the calibrated threshold.


@pytest.mark.parametrize("seed,n1,n0,levels", [(0, 7, 5, 3), (1, 40, 33, 6), (2, 1, 9, 2),
                                               (3, 25, 25, 1000)])
def test_auc_equals_pair_count_with_ties(seed, n1, n0, levels):
  generator = np.random.default_rng(seed)
  members = generator.integers(0, levels, n1).astype(float)
  nonmembers = generator.integers(0, levels, n0).astype(float)
  assert statistics.roc_auc(members, nonmembers) == pytest.approx(
      _brute_force_auc(members, nonmembers), abs=1e-12)


def test_auc_extreme_cases():
  assert statistics.roc_auc([1.0, 2.0], [0.0, -1.0]) == 1.0
  assert statistics.roc_auc([0.0, -1.0], [1.0, 2.0]) == 0.0
  assert statistics.roc_auc([3.0, 3.0], [3.0, 3.0, 3.0]) == 0.5
  with pytest.raises(ValueError, match="NaN or infinite"):
    statistics.roc_auc([np.nan, 1.0], [0.0])


def test_delong_se_matches_placements():
  generator = np.random.default_rng(4)
  members = generator.integers(0, 5, 30).astype(float)
  nonmembers = generator.integers(0, 5, 21).astype(float)
  assert statistics.auc_standard_error(members, nonmembers) == pytest.approx(
      _brute_force_delong(members, nonmembers), rel=1e-10)
  assert np.isnan(statistics.auc_standard_error([1.0], [0.0, 2.0]))
  assert statistics.null_auc_standard_error(256, 256) == pytest.approx(
      np.sqrt(513 / (12 * 256 * 256)))


def test_threshold_flags_at_most_fpr_of_reference():
  reference = np.arange(200, dtype=float)  # 0 ... 199
  threshold = statistics.calibrate_threshold(reference, 0.01)
  assert threshold == 197.0  # k = 2 scores (198, 199) lie above it
  assert statistics.positive_rate(reference, threshold) == pytest.approx(0.01)
  ties = np.array([5.0] * 10 + [1.0] * 90)
  tied_threshold = statistics.calibrate_threshold(ties, 0.05)
  assert tied_threshold == 5.0
  assert statistics.positive_rate(ties, tied_threshold) == 0.0


def test_threshold_ignores_scored_labels():
  generator = np.random.default_rng(5)
  calibration = generator.normal(size=300)
  members = generator.normal(1.0, 1.0, size=100)
  nonmembers = generator.normal(size=120)
  attack = statistics.membership_inference(members, nonmembers, calibration, fpr=0.01)
  swapped = statistics.membership_inference(nonmembers, members, calibration, fpr=0.01)
  shuffled = np.concatenate([members, nonmembers])
  generator.shuffle(shuffled)
  relabelled = statistics.membership_inference(shuffled[:50], shuffled[50:], calibration, fpr=0.01)
  expected = statistics.calibrate_threshold(calibration, 0.01)
  assert attack.threshold == expected
  assert swapped.threshold == expected
  assert relabelled.threshold == expected
  assert attack.tpr == pytest.approx(np.mean(members > expected))
  assert attack.fpr == pytest.approx(np.mean(nonmembers > expected))
  assert attack.auc == pytest.approx(_brute_force_auc(members, nonmembers))
  assert swapped.auc == pytest.approx(1.0 - attack.auc)


def test_pair_attack_calibrates_each_model_on_the_other():
  generator = np.random.default_rng(6)
  a_on_a, a_on_b, b_on_b, b_on_a = (generator.normal(size=64) for _ in range(4))
  attack_a, attack_b = statistics.pair_membership_inference(a_on_a, a_on_b, b_on_b, b_on_a, 0.05)
  assert attack_a.threshold == statistics.calibrate_threshold(b_on_a, 0.05)
  assert attack_b.threshold == statistics.calibrate_threshold(a_on_b, 0.05)
  # Changing A's own scores moves neither threshold that attacks A.
  moved_a, _ = statistics.pair_membership_inference(a_on_a + 3.0, a_on_b - 1.0, b_on_b, b_on_a, 0.05)
  assert moved_a.threshold == attack_a.threshold
  assert moved_a.tpr == 1.0 or moved_a.tpr > attack_a.tpr


# ---------------------------------------------------------------------------
# Probe inputs.


def test_probe_noise_matches_metric_probes():
  schedule = tiny.sequence_objective().schedule
  adapter = statistics.SequenceAdapter(None, schedule, tiny.NUM_SYMBOLS)
  tokens = tiny.sequence_data(1, n=6)[0]
  fixed, random_time = statistics.build_probe_sets(adapter, 3, [
      statistics.ProbeRequest(tokens, 4, t=7, repeats=2), statistics.ProbeRequest(tokens, 4)])
  rows = np.repeat(np.arange(6), 2)
  expected = probes.probe_noise(3, 4, rows, 7, np.tile([0, 1], 6), (tiny.LENGTH, tiny.NUM_SYMBOLS))
  np.testing.assert_array_equal(fixed.noise, expected)
  np.testing.assert_array_equal(fixed.t, np.full(12, 7))
  np.testing.assert_array_equal(fixed.example, rows)
  # The random-time probes are the mean-t loss probes of the sequence metrics.
  loss_inputs = seq_metrics.loss_probes(tokens, schedule, seed=3, set_id=4,
                                        num_symbols=tiny.NUM_SYMBOLS)
  np.testing.assert_array_equal(random_time.t, loss_inputs.t)
  clean = jax.nn.one_hot(tokens, tiny.NUM_SYMBOLS)
  np.testing.assert_allclose(diffusion.forward_noise(schedule, clean, random_time.t,
                                                     random_time.noise), loss_inputs.x_t,
                             rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Membership inference with the exact and the memorising denoisers.


@pytest.fixture(scope="module")
def tree_data():
  grammar = hierarchical.paper_grammar()
  depth = 4
  pool = hierarchical.sample_sequences(grammar, depth, 1024, seed=11, stream=1)
  return grammar, depth, pool


def _denoiser_monitor(apply_fn, grammar, blocks, heldout, **overrides):
  schedule = diffusion.sequence_schedule(500)
  adapter = statistics.SequenceAdapter(apply_fn, schedule, grammar.num_symbols)
  models = [state_lib.ModelSpec(block=b, replicate=0, seed=b, init_seed=b) for b in sorted(blocks)]
  config = _small_monitor_config(mia_examples=256, mia_repeats=2, loss_examples=16,
                                 split_train_examples=0, batch_size=128, **overrides)
  return monitor.Monitor(adapter, models, heldout, blocks, config)


def test_mia_auc_chance_for_exact_bp(tree_data):
  grammar, _, pool = tree_data
  schedule = diffusion.sequence_schedule(500)

  def bp_logits(params, x_t, t):  # params: [M] unused; x_t [M, B, L, q]
    del params
    return jnp.log(hierarchical.exact_denoiser(grammar, x_t, schedule.alpha_bar(t)))

  # Neither "block" was ever seen by BP: members and non-members are both fresh.
  blocks = {0: pool[:256], 1: pool[256:512]}
  watcher = _denoiser_monitor(bp_logits, grammar, blocks, pool[512:600])
  record = watcher.measure(jnp.zeros((2,)))
  tolerance = 3.0 * statistics.null_auc_standard_error(256, 256)  # 3 SE = 0.077
  for auc in record["per_pair"]["mia_auc"][0]:
    assert abs(auc - 0.5) < tolerance
  assert abs(record["mia_auc"] - 0.5) < tolerance
  # Both models are the same function, so their divergence is 0.
  assert record["divergence"] == pytest.approx(0.0, abs=1e-5)


def test_mia_auc_near_one_for_memorising_denoiser(tree_data):
  grammar, _, pool = tree_data
  schedule = diffusion.sequence_schedule(500)

  def empirical_logits(params, x_t, t):  # params: [M, P, L] each model's reference set
    def one(references, x, time):
      p = hierarchical.empirical_denoiser(references, x, schedule.alpha_bar(time),
                                          grammar.num_symbols)
      return jnp.log(p + 1e-30)
    return jax.vmap(one)(params, x_t, t)

  blocks = {0: pool[:256], 1: pool[256:512]}
  references = jnp.asarray(np.stack([blocks[0], blocks[1]]).astype(np.int32))
  watcher = _denoiser_monitor(empirical_logits, grammar, blocks, pool[512:600])
  record = watcher.measure(references)
  for auc in record["per_pair"]["mia_auc"][0]:
    assert auc > 0.95
  for tpr in record["per_pair"]["mia_tpr"][0]:
    assert tpr > 0.5
  # A memoriser fits its own block better than held-out data.
  assert record["loss_gap"] < 0.0
  expected_overlap = [monitor.callback.content_overlap(blocks[1], blocks[0]),
                      monitor.callback.content_overlap(blocks[0], blocks[1])]
  assert record["per_pair"]["mia_nonmember_overlap"] == [expected_overlap]


def test_content_overlap_counts_equal_rows():
  reference = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
  queries = np.array([[3, 4, 5], [0, 1, 1], [0, 1, 2], [5, 4, 3]], np.int32)
  assert monitor.callback.content_overlap(queries, reference) == 0.5


# ---------------------------------------------------------------------------
# Images: each model in its own centred coordinates.


def test_image_adapter_centres_each_model():
  schedule = diffusion.ddpm_schedule(100)
  centres = np.stack([np.full((4, 4, 1), 0.2), np.full((4, 4, 1), 0.5)]).astype(np.float32)
  echo = lambda params, x_t, t: x_t  # a "network" that returns its input
  adapter = statistics.ImageAdapter(echo, schedule, centres)
  generator = np.random.default_rng(7)
  x0 = generator.uniform(size=(3, 4, 4, 1)).astype(np.float32)
  noise = generator.normal(size=(3, 4, 4, 1)).astype(np.float32)
  t = np.array([0, 50, 99], np.int32)
  stacked = lambda x: jnp.broadcast_to(x, (2,) + x.shape)
  predicted = adapter.predict(None, stacked(x0), stacked(t), stacked(noise))
  expected = image_metrics.centred_inputs(x0, centres, schedule, t, noise)  # [2, 3, 4, 4, 1]
  np.testing.assert_allclose(predicted, expected, rtol=1e-6, atol=1e-6)
  loss = adapter.example_loss(predicted, stacked(x0), stacked(noise))
  np.testing.assert_allclose(loss, np.mean((expected - noise)**2, axis=(2, 3, 4)), rtol=1e-5)
  cosine = adapter.divergence(predicted[0], predicted[1])
  np.testing.assert_allclose(cosine, 1.0 - image_metrics.noise_cosine(expected[0], expected[1]),
                             rtol=1e-5, atol=1e-6)
  mse = statistics.ImageAdapter(echo, schedule, centres, divergence_kind="mse")
  np.testing.assert_allclose(mse.divergence(predicted[0], predicted[1]),
                             np.mean((expected[0] - expected[1])**2, axis=(1, 2, 3)), rtol=1e-5)
  with pytest.raises(ValueError, match="divergence_kind='l1'"):
    statistics.ImageAdapter(echo, schedule, centres, divergence_kind="l1")


def test_image_monitor_measures_tiny_network():
  generator = np.random.default_rng(8)
  images = generator.uniform(size=(2, 12, 4, 4, 1)).astype(np.float32)
  heldout = generator.uniform(size=(20, 4, 4, 1)).astype(np.float32)
  task = tiny.image_task(images - images.mean(axis=(1, 2, 3, 4), keepdims=True))
  params = jax.vmap(lambda key: task.model.init(key, *task.example_input, train=False)["params"])(
      jax.random.split(jax.random.key(0), 2))
  watcher = monitor.image_monitor(task.model, tiny.image_objective().schedule, task.models, heldout,
                                  {0: images[0], 1: images[1]}, images.mean(axis=(1, 2, 3, 4)),
                                  _small_monitor_config(image_divergence="cosine"))
  record = watcher.measure(params)
  assert record["divergence"] > 0.0
  assert np.isfinite(record["divergence_train"])
  assert 0.0 <= record["mia_auc"] <= 1.0
  assert record["test_loss"] > 0.0
  assert len(record["per_model"]["loss_gap"]) == 2
  assert record["divergence"] <= 2.0  # 1 - cosine


# ---------------------------------------------------------------------------
# Stopping rules.


def test_minimum_rule_waits_for_patience():
  curve = [5.0, 4.0, 3.0, 3.5, 2.9, 3.2, 3.3, 3.4, 3.0]
  assert rules.minimum_with_patience(curve, patience=3) == (4, 7)
  assert rules.minimum_with_patience(curve, patience=5) == (4, None)
  # With min_delta = 0.2, 2.9 does not improve on 3.0.
  assert rules.minimum_with_patience(curve, patience=3, min_delta=0.2) == (2, 5)
  with pytest.raises(ValueError, match="patience must be >= 1"):
    rules.minimum_with_patience(curve, patience=0)


def test_threshold_rule_needs_upward_crossing():
  divergence = [2.0, 1.5, 0.8, 0.9, 1.2, 1.6]
  assert rules.upward_crossing(divergence, 1.0) == (3, 4)
  auc = [0.5, 0.52, 0.55, 0.61, 0.7]
  assert rules.upward_crossing(auc, 0.6) == (2, 3)
  assert rules.upward_crossing([0.7, 0.8], 0.6) == (None, None)
  assert rules.upward_crossing([0.5, 0.55], 0.6) == (None, None)


def test_decisions_record_epochs_and_test_loss_cost():
  epochs = [10, 20, 40, 80, 160, 320, 640]
  steps = [2 * e for e in epochs]
  divergence = [1.0, 0.6, 0.5, 0.55, 0.7, 0.8, 0.9]
  test_loss = [3.0, 2.5, 2.2, 2.0, 1.9, 1.85, 1.95]
  auc = [0.5, 0.5, 0.52, 0.58, 0.66, 0.75, 0.8]
  history = [{"epoch": e, "step": s, "divergence": d, "test_loss": l, "mia_auc": a}
             for e, s, d, l, a in zip(epochs, steps, divergence, test_loss, auc)]
  config = configs.monitor_section()
  config.patience = 2
  config.mia_auc_threshold = 0.6
  decisions = rules.evaluate_rules(rules.rules_from_config(config), history)

  divergence_rule = decisions["divergence_minimum"]
  assert (divergence_rule.release_epoch, divergence_rule.stop_epoch) == (40, 160)
  assert divergence_rule.release_step == 80
  assert divergence_rule.test_loss_at_release == 2.2
  assert divergence_rule.test_loss_cost == pytest.approx(2.2 - 1.85)
  assert divergence_rule.test_loss_cost_relative == pytest.approx((2.2 - 1.85) / 1.85)

  loss_rule = decisions["test_loss_minimum"]
  assert loss_rule.fired is False
  assert loss_rule.release_epoch == 320
  assert loss_rule.test_loss_cost == 0.0

  auc_rule = decisions["mia_auc_threshold"]
  assert (auc_rule.release_epoch, auc_rule.stop_epoch) == (80, 160)
  assert auc_rule.release_value == 0.58
  assert auc_rule.test_loss_cost == pytest.approx(2.0 - 1.85)


def test_rule_config_errors_name_the_field():
  config = configs.monitor_section()
  config.rules = ("divergence_minimum", "early_bird")
  with pytest.raises(ValueError, match="Unknown stopping rule 'early_bird'"):
    rules.rules_from_config(config)
  config = configs.monitor_section()
  config.stop_training = True
  config.stop_rule = "divergence_threshold"
  with pytest.raises(ValueError, match="monitor.stop_rule='divergence_threshold' must be one of"):
    rules.rules_from_config(config)


# ---------------------------------------------------------------------------
# The trainer hook.


def _tiny_run_config(num_epochs=4):
  config = tiny.tiny_config(num_epochs=num_epochs)
  with config.unlocked():
    config.checkpoint.grid = "linear"
    config.checkpoint.grid_min_epoch = 1
    config.checkpoint.grid_size = 3  # epochs 1, 2, 3 and the final 4
  return config


def _tiny_monitor(task, **overrides):
  heldout = tiny.sequence_data(1, n=20, seed=5)[0]
  adapter = statistics.SequenceAdapter(statistics.stack_apply(task.model),
                                       tiny.sequence_objective().schedule, tiny.NUM_SYMBOLS)
  blocks = {m.block: task.train_data[i] for i, m in enumerate(task.models)}
  return monitor.Monitor(adapter, task.models, heldout, blocks, _small_monitor_config(**overrides))


def _fit(workdir, task, callback=None):
  return loop.fit(_tiny_run_config(), str(workdir), task, eval_callback=callback,
                  compiler_options=tiny.COMPILER_OPTIONS)


def _eval_records(workdir):
  with open(os.path.join(workdir, loop.EVAL_METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_monitor_leaves_training_bit_identical(tmp_path):
  task = tiny.sequence_task()
  plain = _fit(tmp_path / "plain", task)
  watched = _fit(tmp_path / "watched", task, _tiny_monitor(task))
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 getattr(plain.state, name), getattr(watched.state, name))
  records = _eval_records(tmp_path / "watched")
  assert [r["epoch"] for r in records] == [1, 2, 3, 4]
  for record in records:
    statistics_record = record[monitor.callback.MONITOR_KEY]
    assert statistics_record["parameters"] == "ema"
    assert np.isfinite(statistics_record["divergence"])
    assert 0.0 <= statistics_record["mia_auc"] <= 1.0
    assert record["stop_training"] is False
    assert set(record[monitor.callback.RULES_KEY]) == {
        "divergence_minimum", "test_loss_minimum", "mia_auc_threshold"}


def _tiny_image_monitor(task, images, **overrides):
  heldout = np.random.default_rng(9).uniform(size=(20,) + images.shape[2:]).astype(np.float32)
  blocks = {m.block: images[i] for i, m in enumerate(task.models)}
  return monitor.image_monitor(task.model, tiny.image_objective().schedule, task.models, heldout,
                               blocks, images.mean(axis=(1, 2, 3, 4)),
                               _small_monitor_config(**overrides))


def test_image_monitor_leaves_training_bit_identical(tmp_path):
  images = np.random.default_rng(8).uniform(size=(2, 12, 4, 4, 1)).astype(np.float32)
  task = tiny.image_task(images - images.mean(axis=(1, 2, 3, 4), keepdims=True))
  plain = _fit(tmp_path / "plain", task)
  watched = _fit(tmp_path / "watched", task, _tiny_image_monitor(task, images))
  for name in ("params", "ema_params", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 getattr(plain.state, name), getattr(watched.state, name))
  records = _eval_records(tmp_path / "watched")
  assert [r["epoch"] for r in records] == [1, 2, 3, 4]
  for record in records:
    statistics_record = record[monitor.callback.MONITOR_KEY]
    assert np.isfinite(statistics_record["divergence"])
    assert 0.0 <= statistics_record["mia_auc"] <= 1.0


def test_monitor_rejects_parameters_of_fewer_models():
  images = np.random.default_rng(8).uniform(size=(2, 12, 4, 4, 1)).astype(np.float32)
  task = tiny.image_task(images)
  watcher = _tiny_image_monitor(task, images)
  one_model = jax.vmap(lambda key: task.model.init(key, *task.example_input, train=False)["params"])(
      jax.random.split(jax.random.key(0), 1))
  with pytest.raises(ValueError, match="measures 2 models but got parameters of 1"):
    watcher.with_earlier_models(one_model, epoch=1, use_ema=False)
  watcher.earlier_parameters = lambda epoch, use_ema: one_model
  both = watcher.with_earlier_models(one_model, epoch=1, use_ema=False)
  assert jax.tree.leaves(both)[0].shape[0] == 2

def test_callback_stop_ends_training_and_holds_on_restart(tmp_path):
  task = tiny.sequence_task()

  def stop_at_epoch_two(point):
    return {"seen": point.epoch, loop.STOP_TRAINING_KEY: point.epoch == 2}

  stopped = _fit(tmp_path, task, stop_at_epoch_two)
  assert stopped.stopped_early
  assert stopped.step == 2 * stopped.steps_per_epoch
  assert [r["seen"] for r in _eval_records(tmp_path)] == [1, 2]
  restarted = _fit(tmp_path, task, stop_at_epoch_two)
  assert restarted.stopped_early
  assert restarted.step == stopped.step
  full = _fit(tmp_path / "full", task)
  assert not full.stopped_early
  assert full.step == 4 * full.steps_per_epoch


def test_monitor_asks_to_stop_when_its_rule_fires(monkeypatch):
  task = tiny.sequence_task()
  watcher = _tiny_monitor(task, stop_training=True, stop_rule="divergence_minimum", patience=2)
  divergences = iter([0.9, 0.5, 0.6, 0.7, 0.8])
  monkeypatch.setattr(watcher, "measure", lambda params: {
      "divergence": next(divergences), "test_loss": 1.0, "loss_gap": 0.0, "mia_auc": 0.5,
      "mia_tpr": 0.0, "seconds": 0.0})
  state = state_lib.TrainState(step=jnp.int32(0), params={"w": jnp.zeros((2, 1))},
                               opt_state=None, ema_params=None)
  stops = []
  for epoch in range(1, 6):
    point = loop.GridPoint(epoch=epoch, step=epoch, state=state, models=task.models, mesh=None)
    result = watcher(point)
    stops.append(result[loop.STOP_TRAINING_KEY])
  assert stops == [False, False, False, True, True]
  assert result[monitor.callback.RULES_KEY]["divergence_minimum"]["release_epoch"] == 2
  assert result[monitor.callback.MONITOR_KEY]["parameters"] == "raw"


def test_combined_callbacks_merge_and_stop():
  first = lambda point: {"a": 1, loop.STOP_TRAINING_KEY: False}
  second = lambda point: {"b": 2, loop.STOP_TRAINING_KEY: True}
  merged = monitor.combine_callbacks(first, None, second)(None)
  assert merged == {"a": 1, "b": 2, loop.STOP_TRAINING_KEY: True}
  with pytest.raises(ValueError, match=r"same keys \['a'\]"):
    monitor.combine_callbacks(first, first)(None)


# ---------------------------------------------------------------------------
# A tiny tree-data run and its audit.


def _tiny_hierarchical_config(enabled: bool):
  config = hierarchical_configs.get_config("smoke")
  with config.unlocked():
    config.data.depth = 3
    config.data.n = 64
    config.data.train_pool_size = 128
    config.data.heldout_size = 256
    config.model.d_model = 16
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.ffn_dim = 32
    config.zoo.replicates = (0,)
    config.train.batch_size = 32
    config.train.num_epochs = 6
    config.train.steps_per_dispatch = 1  # one compiled step length
    config.checkpoint.grid = "linear"
    config.checkpoint.grid_min_epoch = 1
    config.checkpoint.grid_size = 3  # epochs 1, 3, 5 and the final 6
    config.checkpoint.rolling_every_steps = 0
    monitor_config = _small_monitor_config(enabled=enabled)
    for name in monitor_config:
      config.monitor[name] = monitor_config[name]
  return config


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
  """A tiny tree-data run trained with the monitor of its config."""
  workdir = str(tmp_path_factory.mktemp("monitored"))
  config = _tiny_hierarchical_config(enabled=True)
  # loop.train does the same without the fast-compile options.
  result = loop.fit(config, workdir, tasks.hierarchical_task(config, workdir),
                    eval_callback=monitor.monitor_from_config(config, workdir),
                    compiler_options=tiny.COMPILER_OPTIONS)
  return workdir, result


def test_train_adds_monitor_when_enabled(tmp_path, monkeypatch):
  seen = {}

  def fake_fit(config, workdir, task, eval_callback=None):
    seen["callback"] = eval_callback
    return None

  monkeypatch.setattr(loop, "fit", fake_fit)
  loop.train(_tiny_hierarchical_config(enabled=False), str(tmp_path / "off"))
  assert seen["callback"] is None
  loop.train(_tiny_hierarchical_config(enabled=True), str(tmp_path / "on"),
             eval_callback=lambda point: {"extra": 1})
  assert seen["callback"] is not None
  assert monitor.monitor_from_config(_tiny_hierarchical_config(enabled=False), "unused") is None


def test_audit_reads_monitor_records(monitored_run, tmp_path, capsys):
  workdir, _ = monitored_run
  audit = audit_script.load()
  result = audit.audit(workdir, str(tmp_path))
  assert result["source"] == "eval_metrics.jsonl"
  assert result["epochs"] == [1, 3, 5, 6]
  for name in ("audit.json", "audit_table.txt", "audit.png", "audit.pdf"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "audit.json") as f:
    stored = json.load(f)
  assert set(stored["decisions"]) == {"divergence_minimum", "test_loss_minimum",
                                      "mia_auc_threshold"}
  assert len(stored["records"]) == 4
  table = (tmp_path / "audit_table.txt").read_text()
  assert table == capsys.readouterr().out
  assert len([line for line in table.splitlines() if line.strip().startswith(("1 ", "3 ", "5 ",
                                                                              "6 "))]) == 4
  # The test-loss rule releases the checkpoint with the lowest recorded test loss so far.
  losses = [r["test_loss"] for r in stored["records"]]
  assert stored["decisions"]["test_loss_minimum"]["release_index"] == int(np.argmin(losses))


def test_audit_recomputes_run_without_monitor(monitored_run, tmp_path):
  workdir, _ = monitored_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, loop.EVAL_METRICS_FILE))
  audit = audit_script.load()
  recomputed = audit.audit(copy, str(tmp_path / "audit"))
  read = audit.audit(workdir, str(tmp_path / "read"))
  assert recomputed["source"] == "recomputed from the grid checkpoints"
  assert recomputed["epochs"] == read["epochs"]
  # Measuring the stored EMA parameters reproduces what the monitor saw in training.
  for offline, online in zip(recomputed["records"], read["records"]):
    for name in ("test_loss", "train_loss", "divergence", "mia_auc", "mia_tpr"):
      assert offline[name] == pytest.approx(online[name], rel=1e-5, abs=1e-6), name
  for extension in ("png", "pdf"):
    assert os.path.getsize(tmp_path / "audit" / f"audit.{extension}") > 0


def test_audit_override_changes_rules(monitored_run, tmp_path):
  workdir, _ = monitored_run
  audit = audit_script.load()
  result = audit.audit(workdir, str(tmp_path), overrides=["rules=('test_loss_minimum',)",
                                                          "patience=1"])
  assert list(result["decisions"]) == ["test_loss_minimum"]
  assert result["monitor"]["patience"] == 1
  with pytest.raises(ValueError, match="must be field=value"):
    audit.monitor_settings({}, ["patiense=2"])


@pytest.mark.parametrize("override", ["patience=two", "patience=(2"])
def test_audit_override_needs_literal(override):
  audit = audit_script.load()
  with pytest.raises(ValueError, match=r"is not a Python literal; give the value in the form of "
                     r"the current one, patience=\d+"):
    audit.monitor_settings({}, [override])
