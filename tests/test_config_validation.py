"""Tests that a bad config fails before the run writes anything to its workdir."""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import hierarchical  # pylint: disable=g-import-not-at-top
from biasdiff.training import checkpoints
from biasdiff.training import loop
from biasdiff.training import tasks
from helpers import tiny_training as tiny

# (field, bad value, text the error must contain); the tiny task has n = 10.
BAD_TRAIN_VALUES = [
    ("learning_rate", -1.0, "train.learning_rate=-1.0"),
    ("learning_rate", 0.0, "train.learning_rate=0.0"),
    ("adam_b1", 1.5, "train.adam_b1=1.5"),
    ("adam_b2", 1.0, "train.adam_b2=1.0"),
    ("adam_eps", -1.0, "train.adam_eps=-1.0"),
    ("adam_eps", 0.0, "train.adam_eps=0.0"),
    ("ema_decay", 1.0, "train.ema_decay=1.0"),
    ("log_every_steps", 0, "train.log_every_steps=0"),
    ("steps_per_dispatch", 0, "train.steps_per_dispatch=0"),
    ("num_epochs", 0, "train.num_epochs=0"),
    ("num_epochs", -1, "train.num_epochs=-1"),
    ("batch_size", 0, "train.batch_size=0"),
    ("batch_size", 11, "train.batch_size=11 for n=10"),
    ("lr_schedule", "cosine", "train.lr_schedule='cosine'"),
]


def _run_json(workdir):
  return os.path.join(str(workdir), checkpoints.RUN_INFO_FILE)


def _fit(config, workdir, **kwargs):
  return loop.fit(config, str(workdir), tiny.sequence_task(),
                  compiler_options=tiny.COMPILER_OPTIONS, **kwargs)


@pytest.mark.parametrize("field, value, message", BAD_TRAIN_VALUES)
def test_bad_train_value_writes_nothing(tmp_path, field, value, message):
  config = tiny.tiny_config(**{field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    _fit(config, tmp_path / "run")
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("section, field, value, message", [
    ("checkpoint", "grid", "cubic", "checkpoint.grid='cubic'"),
    ("checkpoint", "grid_size", 1, "checkpoint.grid_size=1"),
    ("checkpoint", "rolling_to_keep", 0, "checkpoint.rolling_to_keep=0"),
    ("checkpoint", "rolling_every_steps", -1, "checkpoint.rolling_every_steps=-1"),
    ("parallel", "model_axis_size", -1, "parallel.model_axis_size=-1"),
])
def test_bad_checkpoint_value_writes_nothing(tmp_path, section, field, value, message):
  config = tiny.tiny_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    _fit(config, tmp_path / "run")
  assert not os.path.exists(tmp_path / "run")


def test_bad_num_epochs_is_named_before_grid(tmp_path):
  config = tiny.tiny_config(num_epochs=0)
  with config.unlocked():
    config.checkpoint.grid = "log"
    config.checkpoint.grid_min_epoch = 1
  with pytest.raises(ValueError, match=r"train\.num_epochs=0") as error:
    _fit(config, tmp_path)
  assert "grid_min_epoch" not in str(error.value)


def test_bad_warmup_cosine_lengths_raise(tmp_path):
  config = tiny.tiny_config(lr_schedule="warmup_cosine", warmup_steps=5, decay_steps=5)
  with pytest.raises(ValueError, match=r"train\.decay_steps=5"):
    _fit(config, tmp_path)
  assert not os.path.exists(_run_json(tmp_path))


def test_workdir_accepts_config_after_failed_start(tmp_path):
  with pytest.raises(ValueError, match=r"train\.adam_b1"):
    _fit(tiny.tiny_config(adam_b1=1.5), tmp_path)
  result = _fit(tiny.tiny_config(num_epochs=1), tmp_path)
  assert result.step == 3
  stored = checkpoints.read_json(_run_json(tmp_path))
  assert stored["config"]["train"]["adam_b1"] == 0.9


def test_failure_before_first_checkpoint_leaves_no_run_json(tmp_path, monkeypatch):
  """A start that dies in its first step (out of memory, say) does not claim the workdir."""
  original = loop._Run._dispatch

  def out_of_memory(self, *args):
    raise MemoryError("simulated out-of-memory failure")

  monkeypatch.setattr(loop._Run, "_dispatch", out_of_memory)
  with pytest.raises(MemoryError):
    _fit(tiny.tiny_config(num_epochs=1, batch_size=5), tmp_path)
  assert not os.path.exists(_run_json(tmp_path))

  monkeypatch.setattr(loop._Run, "_dispatch", original)
  result = _fit(tiny.tiny_config(num_epochs=1), tmp_path)
  assert result.step == 3
  stored = checkpoints.read_json(_run_json(tmp_path))
  assert stored["config"]["train"]["batch_size"] == 4


def test_run_json_still_guards_a_checkpointed_run(tmp_path):
  _fit(tiny.tiny_config(num_epochs=1), tmp_path)
  with pytest.raises(ValueError, match=r"config\.train\.batch_size: stored 4"):
    _fit(tiny.tiny_config(num_epochs=1, batch_size=5), tmp_path)


# ---------------------------------------------------------------------------
# The hierarchical config, checked before its corpus is built.


def _smoke_config():
  return tiny.shrunken_smoke_config()


@pytest.mark.parametrize("section, field, value, message", [
    ("model", "dropout", 1.5, "model.dropout=1.5"),
    ("model", "num_heads", 3, "model.num_heads=3"),
    ("data", "n", 0, "data.n=0"),
    ("", "seed", -5, "seed=-5"),
    ("train", "batch_size", 100_000, "train.batch_size=100000. Set train.batch_size to a value <= data.n=32"),
    ("train", "num_epochs", -1, "train.num_epochs=-1"),
    ("train", "learning_rate", -1.0, "train.learning_rate=-1.0"),
    ("data", "train_pool_size", 50, "data.train_pool_size=50"),  # needs 2 blocks of 32
])
def test_bad_hierarchical_value_builds_nothing(tmp_path, section, field, value, message):
  config = _smoke_config()
  setattr(config[section] if section else config, field, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    loop.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_every_variant_passes_the_check():
  for variant in hierarchical.VARIANTS:
    tasks.check_config(hierarchical.get_config(variant))


def test_hierarchical_workdir_reusable_after_bad_dropout(tmp_path):
  bad = _smoke_config()
  bad.model.dropout = 1.5
  with pytest.raises(ValueError, match=r"model\.dropout=1\.5"):
    loop.train(bad, str(tmp_path))
  assert not os.path.exists(_run_json(tmp_path))

  config = _smoke_config()
  task = tasks.hierarchical_task(config, str(tmp_path))
  result = loop.fit(config, str(tmp_path), task, compiler_options=tiny.COMPILER_OPTIONS)
  assert result.step == 4
  assert checkpoints.read_json(_run_json(tmp_path))["config"]["model"]["dropout"] == 0.1
