"""End-to-end test of the tree-data figure pipeline on a tiny profile."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import hierarchical as hierarchical_configs  # pylint: disable=g-import-not-at-top
from configs import reproduce as reproduce_configs  # pylint: disable=g-import-not-at-top
from biasdiff.figures import hierarchical as figures  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import hierarchical as pipeline  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import stages  # pylint: disable=g-import-not-at-top

SUMMARY_KEYS = ("epochs", "test_loss", "train_loss", "sample_split_kl", "nn_divergence",
                "kl_bp_model", "epoch_min_test_loss", "epoch_min_sample_split_kl",
                "epoch_min_nn_divergence", "epoch_min_kl_bp_model", "orderings", "uturn",
                "kl_time", "random_uturn")
FIGURES = ("fig1b_n512", "fig4a_n512", "fig4b_n512", "fig5_n512", "app11_n512", "fig6", "fig3b",
           "app9_10")


def _finite_numbers(value):
  if isinstance(value, dict):
    return all(_finite_numbers(v) for k, v in value.items() if k != "se")
  if isinstance(value, list):
    return all(_finite_numbers(v) for v in value)
  if isinstance(value, float):
    return np.isfinite(value)
  return True


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  config = reproduce_configs.get_config("smoke")
  summaries = pipeline.run(config, workdir, hierarchical_configs.get_config)
  output = os.path.join(workdir, "figures")
  pipeline.write_summaries(summaries, output)
  figures.write_all(summaries, output)
  return workdir, output, config


def test_pipeline_writes_every_figure(smoke_run):
  _, output, _ = smoke_run
  for name in FIGURES:
    for extension in ("png", "pdf", "json"):
      path = os.path.join(output, f"{name}.{extension}")
      assert os.path.getsize(path) > 0, path


def test_summary_has_every_key_and_finite_values(smoke_run):
  _, output, _ = smoke_run
  with open(os.path.join(output, "summary_n512.json")) as f:
    summary = json.load(f)
  for key in SUMMARY_KEYS:
    assert key in summary, key
  assert len(summary["epochs"]) >= 2
  for key in ("test_loss", "train_loss", "sample_split_kl", "nn_divergence"):
    assert len(summary[key]["mean"]) == len(summary["epochs"])
    assert np.all(np.isfinite(summary[key]["mean"])), key
  assert summary["epoch_min_test_loss"] in summary["epochs"]
  assert _finite_numbers(summary["kl_bp_model"])
  # Exact BP loses against its filtered versions at t*: KL(BP_0 || BP_k) grows with k.
  at_t = [np.interp(75, summary["kl_time"]["times"], summary["kl_time"]["kl_bp0_bpk"][str(k)])
          for k in (1, 4)]
  assert at_t[0] < at_t[1]


def test_rerun_reuses_every_stage(smoke_run, monkeypatch):
  workdir, _, config = smoke_run

  def fail(*args, **kwargs):
    raise AssertionError("a finished stage was recomputed")

  monkeypatch.setattr(pipeline, "_train", fail)
  monkeypatch.setattr(pipeline, "_evaluate", fail)
  monkeypatch.setattr(pipeline, "_uturn", fail)
  summaries = pipeline.run(config, workdir, hierarchical_configs.get_config)
  assert "n512" in summaries


def test_workdir_of_another_profile_is_rejected(smoke_run):
  workdir, _, config = smoke_run
  stages.claim_workdir(workdir, config)
  with pytest.raises(ValueError, match="contains a run of profile 'smoke', not 'quick'"):
    stages.claim_workdir(workdir, reproduce_configs.get_config("quick"))


def test_bad_profile_name_is_rejected():
  with pytest.raises(ValueError, match="Unknown profile 'fast'"):
    reproduce_configs.get_config("fast")


def test_missing_checkpoint_is_an_error(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  train_root = os.path.join(workdir, "hierarchical", "train")
  run_dir = os.path.join(train_root, os.listdir(train_root)[0])
  with pytest.raises(ValueError, match="No grid checkpoint for epoch 3"):
    pipeline._load_params(run_dir, 3, use_ema=True)
