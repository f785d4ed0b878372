"""Tests of checkpoint grids, checkpoint contents and exact resumption."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from biasdiff.training import checkpoints
from biasdiff.training import loop
from helpers import tiny_training as tiny

HELPER = os.path.join(os.path.dirname(__file__), "helpers", "train_subprocess.py")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_GRIDS = {
    20_000: [100, 124, 155, 193, 241, 301, 376, 468, 584, 729, 909, 1134, 1414, 1763, 2199,
             2742, 3419, 4264, 5318, 6632, 8270, 10313, 12861, 16038, 20000],
    30_000: [100, 126, 160, 204, 258, 328, 416, 527, 669, 849, 1076, 1365, 1732, 2196, 2786,
             3533, 4481, 5683, 7208, 9142, 11594, 14705, 18650, 23654, 30000],
    35_000: [100, 127, 162, 207, 265, 338, 432, 552, 704, 899, 1148, 1465, 1870, 2388, 3048,
             3890, 4966, 6339, 8091, 10328, 13184, 16829, 21481, 27419, 35000],
}

IMAGE_GRID_5000 = [
    10, 111, 213, 315, 417, 519, 620, 722, 824, 926, 1028, 1129, 1231, 1333, 1435, 1537,
    1639, 1740, 1842, 1944, 2046, 2148, 2249, 2351, 2453, 2555, 2657, 2759, 2860, 2962,
    3064, 3166, 3268, 3369, 3471, 3573, 3675, 3777, 3879, 3980, 4082, 4184, 4286, 4388,
    4489, 4591, 4693, 4795, 4897, 4999, 5000]


def _fit(config, workdir, **kwargs):
  return loop.fit(config, str(workdir), tiny.sequence_task(),
                  compiler_options=tiny.COMPILER_OPTIONS, **kwargs)


def _assert_trees_equal(actual, expected):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-6, atol=1e-7),
               actual, expected)


def _metric_lines(workdir):
  with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _resume_config(**overrides):
  config = tiny.tiny_config(num_epochs=4, **overrides)
  with config.unlocked():
    config.checkpoint.grid = "linear"
    config.checkpoint.grid_min_epoch = 1
    config.checkpoint.grid_size = 2  # epochs 1, 3 and the final 4
    config.checkpoint.rolling_every_steps = 2
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A 12-step run without interruption: (workdir, result)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, _fit(_resume_config(), workdir)


# ---------------------------------------------------------------------------
# Grids.


@pytest.mark.parametrize("num_epochs", sorted(PAPER_GRIDS))
def test_log_grid_reproduces_paper_lists(num_epochs):
  assert checkpoints.log_epoch_grid(num_epochs) == PAPER_GRIDS[num_epochs]


def test_log_grid_short_run():
  grid = checkpoints.log_epoch_grid(30, min_epoch=5, num_points=25)
  assert grid[0] == 5
  assert grid[-1] == 30
  assert grid == sorted(set(grid))
  assert len(grid) < 25
  with pytest.raises(ValueError, match="grid_min_epoch=100"):
    checkpoints.log_epoch_grid(50)


def test_linear_grid_is_image_recipe_grid():
  assert checkpoints.linear_epoch_grid(5000) == IMAGE_GRID_5000


# ---------------------------------------------------------------------------
# Checkpoints and resumption.


def test_grid_checkpoints_hold_final_state(uninterrupted):
  workdir, result = uninterrupted
  assert result.grid_epochs == [1, 3, 4]
  assert checkpoints.realised_grid(str(workdir)) == [1, 3, 4]
  params, meta = checkpoints.load_grid_checkpoint(str(workdir), 4, use_ema=False)
  _assert_trees_equal(params, result.state.params)
  ema, meta_ema = checkpoints.load_grid_checkpoint(str(workdir), 4, use_ema=True, models=[1])
  _assert_trees_equal(ema, jax.tree.map(lambda x: x[1:], result.state.ema_params))
  assert meta["parameters"] == "raw"
  assert meta_ema["parameters"] == "ema"
  assert meta["step"] == 12
  assert meta["epoch"] == 4
  assert [m["seed"] for m in meta["models"]] == [100, 101]
  assert [m["seed"] for m in meta_ema["models"]] == [101]
  assert meta["fingerprint"] == {"n": 10, "blocks": [0, 1]}
  assert meta["config"]["train"]["batch_size"] == 4
  with pytest.raises(ValueError, match="written epochs are"):
    checkpoints.load_grid_checkpoint(str(workdir), 2, use_ema=False)


def test_grid_load_hides_read_only_notice(uninterrupted, caplog):
  workdir, _ = uninterrupted
  with caplog.at_level(logging.INFO):
    checkpoints.load_grid_checkpoint(str(workdir), 4, use_ema=False)
  assert caplog.records, "orbax logged nothing, so the filter is not exercised"
  assert not [r for r in caplog.records if "read only" in r.getMessage()]


def test_grid_checkpoint_matches_state_at_its_epoch(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  stopped = _fit(_resume_config(), tmp_path, stop_at_step=3)  # epoch 1 = step 3
  params, _ = checkpoints.load_grid_checkpoint(str(workdir), 1, use_ema=False)
  _assert_trees_equal(params, stopped.state.params)


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir, expected = uninterrupted
  first = _fit(_resume_config(), tmp_path, stop_at_step=7)  # last checkpoint: rolling step 6
  assert first.step == 7
  resumed = _fit(_resume_config(), tmp_path)
  assert resumed.step == 12
  _assert_trees_equal(resumed.state.params, expected.state.params)
  _assert_trees_equal(resumed.state.ema_params, expected.state.ema_params)
  _assert_trees_equal(resumed.state.opt_state, expected.state.opt_state)
  lines = _metric_lines(tmp_path)
  assert [line["step"] for line in lines] == list(range(12))  # step 6 is not repeated
  for line, reference in zip(lines, _metric_lines(workdir)):
    np.testing.assert_allclose(line["loss"], reference["loss"], rtol=1e-6)


def test_async_save_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir, expected = uninterrupted
  config = _resume_config()
  with config.unlocked():
    config.checkpoint.async_save = True
  _fit(config, tmp_path, stop_at_step=9)
  resumed = _fit(config, tmp_path)
  _assert_trees_equal(resumed.state.params, expected.state.params)
  assert checkpoints.realised_grid(str(tmp_path)) == [1, 3, 4]


def test_training_without_ema(tmp_path):
  config = _resume_config(ema_decay=0.0)
  result = _fit(config, tmp_path, stop_at_step=3)
  assert result.state.ema_params is None
  params, _ = checkpoints.load_grid_checkpoint(str(tmp_path), 1, use_ema=False)
  _assert_trees_equal(params, result.state.params)
  with pytest.raises(ValueError, match="without an EMA"):
    checkpoints.load_grid_checkpoint(str(tmp_path), 1, use_ema=True)


def test_resume_with_other_dispatch_size_is_allowed(uninterrupted, tmp_path):
  workdir, expected = uninterrupted
  _fit(_resume_config(), tmp_path, stop_at_step=5)
  resumed = _fit(_resume_config(steps_per_dispatch=2), tmp_path)
  _assert_trees_equal(resumed.state.params, expected.state.params)


def test_sigkill_and_rerun_equals_uninterrupted(tmp_path):
  """Kill a training subprocess mid-run, rerun it, and compare with a clean run."""
  arguments = ["--devices", "1", "--num-epochs", "150", "--rolling-every-steps", "40",
               "--model-axis-sizes", "0"]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  killed_dir = tmp_path / "killed"
  process = subprocess.Popen(
      [sys.executable, HELPER, "--workdir", str(killed_dir), *arguments],
      cwd=REPOSITORY, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rolling = killed_dir / "s0" / checkpoints.ROLLING
  deadline = time.monotonic() + 240
  try:
    while time.monotonic() < deadline and process.poll() is None:
      if rolling.exists() and any(p.name.isdigit() for p in rolling.iterdir()):
        break
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
  finally:
    process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
  assert not (killed_dir / "s0" / checkpoints.GRID / "150").exists()

  rerun = subprocess.run(
      [sys.executable, HELPER, "--workdir", str(killed_dir),
       "--out", str(tmp_path / "results.npz"), *arguments],
      cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]

  # The same run, uninterrupted, in this process.
  config = tiny.tiny_config(num_epochs=150)
  with config.unlocked():
    config.checkpoint.rolling_every_steps = 40
  clean = _fit(config, tmp_path / "clean")
  with np.load(tmp_path / "results.npz") as resumed:
    for name, tree in (("params", clean.state.params), ("ema", clean.state.ema_params)):
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = f"s0/{name}/{jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(resumed[key], leaf, rtol=1e-6, atol=1e-7, err_msg=key)
    clean_losses = [line["loss"] for line in _metric_lines(tmp_path / "clean")]
    np.testing.assert_allclose(resumed["s0/loss"], clean_losses, rtol=1e-6)


def test_workdir_of_other_config_raises(uninterrupted):
  workdir, _ = uninterrupted
  config = _resume_config(learning_rate=1e-2)
  with pytest.raises(ValueError, match=r"config\.train\.learning_rate: stored 0\.03"):
    _fit(config, workdir)


def test_workdir_of_other_data_raises(uninterrupted):
  workdir, _ = uninterrupted
  task = dataclasses.replace(tiny.sequence_task(data=tiny.sequence_data(2, n=10, seed=1)),
                             fingerprint={"n": 10, "blocks": [0, 1], "hash": "other"})
  with pytest.raises(ValueError, match="fingerprint.hash"):
    loop.fit(_resume_config(), str(workdir), task, compiler_options=tiny.COMPILER_OPTIONS)


def test_eval_callback_runs_at_each_grid_checkpoint(tmp_path):
  calls = []

  def evaluate(point):
    calls.append((point.epoch, point.step))
    return {"mean_param": float(np.mean(point.state.params["Dense_2"]["bias"]))}

  _fit(_resume_config(), tmp_path, eval_callback=evaluate)
  assert calls == [(1, 3), (3, 9), (4, 12)]
  with open(tmp_path / loop.EVAL_METRICS_FILE) as f:
    records = [json.loads(line) for line in f]
  assert [(r["epoch"], r["step"]) for r in records] == calls
  assert all(np.isfinite(r["mean_param"]) for r in records)
