"""End-to-end test of the figure pipeline, tree data and images, on the smoke profile."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import hierarchical as hierarchical_configs  # pylint: disable=g-import-not-at-top
from configs import images as images_configs  # pylint: disable=g-import-not-at-top
from configs import reproduce as reproduce_configs  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import hierarchical as pipeline  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import images_eval  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import reproduce  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import stages  # pylint: disable=g-import-not-at-top
from biasdiff.training import loop  # pylint: disable=g-import-not-at-top
from helpers import json_values  # pylint: disable=g-import-not-at-top

SUMMARY_KEYS = ("epochs", "test_loss", "train_loss", "sample_split_kl", "nn_divergence",
                "kl_bp_model", "epoch_min_test_loss", "epoch_min_sample_split_kl",
                "epoch_min_nn_divergence", "epoch_min_kl_bp_model", "orderings", "uturn",
                "kl_time", "random_uturn")
FIGURES = ("fig1b_n512", "fig4a_n512", "fig4b_n512", "fig5_n512", "app11_n512", "fig6", "fig3b",
           "app9_10")
IMAGE_FIGURES = ("fig1a_left", "fig1a_right", "fig2", "companion")
# Fast XLA compiles on CPU for the image part, which trains for 8 steps.
IMAGE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


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
  output = os.path.join(workdir, "figures")
  stages.claim_workdir(workdir, config)
  reproduce.run(config, workdir, output, reproduce.profile_parts(config),
                hierarchical_configs.get_config, image_compiler_options=IMAGE_COMPILER_OPTIONS)
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


def test_image_part_writes_every_figure(smoke_run):
  _, output, _ = smoke_run
  figures = os.path.join(output, reproduce.IMAGES_DIRECTORY, "figures")
  for name in IMAGE_FIGURES:
    for extension in ("png", "pdf"):
      path = os.path.join(figures, f"{name}.{extension}")
      assert os.path.getsize(path) > 0, path


def test_image_summary_has_finite_minima(smoke_run):
  workdir, output, _ = smoke_run
  with open(os.path.join(output, reproduce.IMAGES_DIRECTORY, "summary.json")) as f:
    summary = json.load(f)
  assert summary["variant"] == "smoke"
  assert summary["epoch_min_cosine_distance"] in summary["sampling_epochs"]
  for where in ("all_t", "trained_t"):
    assert summary["epoch_min_test_loss"][where]["epoch"] in summary["epochs"], where
  for key in ("epoch_min_test_loss", "epoch_min_cosine_distance", "test_loss",
              "cosine_distance"):
    numbers = list(json_values.numbers(summary[key]))
    assert numbers, key
    assert all(math.isfinite(x) for x in numbers), key
  # The image stages live beside the tree-data stages in the profile's workdir.
  assert os.path.isdir(os.path.join(workdir, reproduce.IMAGES_DIRECTORY, "stages", "train"))
  assert os.path.isdir(os.path.join(workdir, "hierarchical", "train"))


def test_rerun_reuses_every_stage(smoke_run, monkeypatch):
  workdir, output, config = smoke_run

  def fail(*args, **kwargs):
    raise AssertionError("a finished stage was recomputed")

  monkeypatch.setattr(pipeline, "_train", fail)
  monkeypatch.setattr(pipeline, "_evaluate", fail)
  monkeypatch.setattr(pipeline, "_uturn", fail)
  monkeypatch.setattr(loop, "fit", fail)
  monkeypatch.setattr(images_eval, "evaluate_checkpoint", fail)
  summaries = reproduce.run(config, workdir, output, reproduce.PARTS,
                            hierarchical_configs.get_config)
  assert "n512" in summaries["hierarchical"]
  assert summaries["images"]["variant"] == "smoke"


def test_workdir_of_another_profile_is_rejected(smoke_run):
  workdir, _, config = smoke_run
  stages.claim_workdir(workdir, config)
  with pytest.raises(ValueError, match="contains a run of profile 'smoke', not 'quick'"):
    stages.claim_workdir(workdir, reproduce_configs.get_config("quick"))


def test_bad_profile_name_is_rejected():
  with pytest.raises(ValueError, match="Unknown profile 'fast'"):
    reproduce_configs.get_config("fast")


def test_profiles_map_to_image_variants():
  variants = {}
  for profile in reproduce_configs.PROFILES:
    images = reproduce_configs.get_config(profile).images
    variants[profile] = None if images is None else images.variant
  assert variants == {"smoke": "smoke", "demo": None, "quick": "quick", "small": "quick",
                      "paper": "paper"}
  assert reproduce.profile_parts(reproduce_configs.get_config("demo")) == ("hierarchical",)
  assert reproduce.profile_parts(reproduce_configs.get_config("quick")) == reproduce.PARTS


@pytest.mark.parametrize("profile, parts, message", [
    ("smoke", ["trees"], "Unknown part 'trees'"),
    ("demo", ["images"], "Profile 'demo' has no images part"),
    ("paper", ["images"], r"needs data.path.*--config.images.data.path"),
])
def test_invalid_parts_are_rejected(profile, parts, message):
  with pytest.raises(ValueError, match=message):
    reproduce.check_parts(reproduce_configs.get_config(profile), parts)


def test_paper_message_gives_only_reproduce_flags():
  with pytest.raises(ValueError) as error:
    reproduce.check_parts(reproduce_configs.get_config("paper"), ["hierarchical", "images"])
  message = str(error.value)
  assert "--config.images.data.path=/path/to/img_align_celeba" in message
  assert "--config.data." not in message


@pytest.mark.parametrize("config, message", [
    (images_configs.get_config("smoke"), "This is a config of configs/images.py"),
    (hierarchical_configs.get_config("smoke"), "This is a config of configs/hierarchical.py"),
])
def test_config_of_other_file_is_rejected(config, message):
  with pytest.raises(ValueError, match="experiments/reproduce.py needs a profile from "
                     "configs/reproduce.py") as error:
    reproduce.check_parts(config, ["hierarchical"])
  assert message in str(error.value)


def test_missing_checkpoint_is_an_error(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  train_root = os.path.join(workdir, "hierarchical", "train")
  run_dir = os.path.join(train_root, os.listdir(train_root)[0])
  with pytest.raises(ValueError, match="No grid checkpoint for epoch 3"):
    pipeline._load_params(run_dir, 3, use_ema=True)
