"""End-to-end tests of the image pipeline on the smoke config."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

from configs import images as images_config  # pylint: disable=g-import-not-at-top
from configs import reproduce as reproduce_configs  # pylint: disable=g-import-not-at-top
from biasdiff import monitor
from biasdiff.pipeline import images as pipeline
from biasdiff.pipeline import images_eval
from biasdiff.pipeline import images_monitor
from biasdiff.pipeline import stages
from biasdiff.training import loop
from helpers import audit_script
from helpers import json_values

# Fast XLA compiles on CPU; the smoke run trains for only 8 steps.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

SUMMARY_KEYS = (
    "epochs", "steps", "sampling_epochs", "test_loss", "cosine_distance",
    "noise_similarity_train", "noise_similarity_test", "noise_similarity",
    "memorised_fraction", "own_block_share", "epoch_min_test_loss",
    "epoch_min_cosine_distance", "ordering", "counts", "seeds", "sampler", "parameters",
    "models", "nn_correlation_median")
FIGURES = ("fig1a_left", "fig1a_right", "fig2", "companion")


def _smoke_config(**eval_overrides):
  config = images_config.get_config("smoke")
  config.unlock()
  for name, value in eval_overrides.items():
    setattr(config.eval, name, value)
  config.lock()
  return config


def _group_directories(workdir):
  train_root = os.path.join(workdir, pipeline.STAGES_DIRECTORY, "train")
  (key,) = os.listdir(train_root)
  return sorted(os.path.join(train_root, key, name)
                for name in os.listdir(os.path.join(train_root, key))
                if name.startswith("group_"))


def _monitor_records(directory):
  with open(os.path.join(directory, loop.EVAL_METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("images_smoke"))
  summary = pipeline.run(_smoke_config(), workdir, compiler_options=COMPILER_OPTIONS)
  return workdir, summary


def test_smoke_summary_has_every_key(smoke_run):
  workdir, summary = smoke_run
  with open(os.path.join(workdir, "summary.json")) as f:
    stored = json.load(f)
  assert stored == summary
  for key in SUMMARY_KEYS:
    assert key in summary, key


def test_smoke_summary_values_are_finite(smoke_run):
  _, summary = smoke_run
  for key in ("test_loss", "cosine_distance", "noise_similarity_train",
              "noise_similarity_test", "memorised_fraction", "own_block_share",
              "epoch_min_test_loss", "ordering"):
    numbers = list(json_values.numbers(summary[key]))
    assert numbers, key
    assert all(math.isfinite(x) for x in numbers), key
  # None stands for NaN in the JSON; three models leave every jackknife defined.
  assert None not in summary["cosine_distance"]["se"]
  assert None not in summary["test_loss"]["all_t"]["median"]


def test_smoke_summary_records_the_run(smoke_run):
  _, summary = smoke_run
  config = images_config.get_config("smoke")
  # Grid epochs 1, 2, 3, 4; evaluation starts at epoch 2.
  assert summary["epochs"] == [2, 3, 4]
  assert summary["steps"] == [4, 6, 8]
  assert summary["sampling_epochs"] == [2, 3, 4]
  assert summary["parameters"] == "ema"
  assert summary["counts"]["num_models"] == 3
  assert summary["counts"]["num_pairs"] == 3
  assert summary["counts"]["num_samples"] == config.eval.num_samples
  assert summary["counts"]["loss_times"] == config.eval.loss_num_times + 1
  assert summary["seeds"]["training"] == [0, 1, 2]
  sampler = summary["sampler"]
  assert sampler["steps"] == config.eval.sampler_steps
  assert sampler["respaced"] is True
  assert sampler["kept_times"] == [0, 250, 500, 749, 999]
  assert summary["epoch_min_cosine_distance"] in summary["sampling_epochs"]
  assert summary["epoch_min_test_loss"]["all_t"]["epoch"] in summary["epochs"]
  distance = np.array(summary["cosine_distance"]["value"])
  assert np.all((distance >= 0.0) & (distance <= 2.0))
  share = np.array(summary["own_block_share"]["value"])
  assert np.all((share >= 0.0) & (share <= 1.0))
  # Models are centred by their own block means, which differ.
  shifts = [m["shift"] for m in summary["models"]]
  assert len(set(shifts)) == 3
  assert all(0.0 < s < 1.0 for s in shifts)


def test_smoke_writes_every_figure(smoke_run):
  workdir, _ = smoke_run
  figures = os.path.join(workdir, "figures")
  for name in FIGURES:
    for suffix in ("png", "pdf"):
      path = os.path.join(figures, f"{name}.{suffix}")
      assert os.path.getsize(path) > 1000, path
  for name in ("fig1a_left.csv", "fig2.csv", "companion.csv", "fig1a_right.json",
               "fig1a_right.npz"):
    assert os.path.getsize(os.path.join(figures, name)) > 0, name
  with np.load(os.path.join(figures, "fig1a_right.npz")) as panels:
    config = images_config.get_config("smoke")
    assert panels["images"].shape == (2, config.eval.panel_rows, 4, 8, 8)
    assert np.all(np.isfinite(panels["images"]))


def test_smoke_loss_curve_falls_with_training(smoke_run):
  _, summary = smoke_run
  per_model = np.array(summary["test_loss"]["all_t"]["per_model"])  # [M, C]
  # Eight Adam steps at 1e-3 from the PyTorch initialisation lower the loss.
  assert np.all(per_model[:, -1] < per_model[:, 0])


def test_rerun_reuses_every_stage(smoke_run, monkeypatch):
  workdir, summary = smoke_run

  def fail(*args, **kwargs):
    raise AssertionError("a finished stage was recomputed")

  monkeypatch.setattr(loop, "fit", fail)
  monkeypatch.setattr(images_eval, "evaluate_checkpoint", fail)
  again = pipeline.run(_smoke_config(), workdir, compiler_options=COMPILER_OPTIONS)
  assert again == summary


def test_interrupted_evaluation_redoes_only_missing_checkpoint(smoke_run, tmp_path, monkeypatch):
  source, summary = smoke_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)
  stage_root = os.path.join(workdir, pipeline.STAGES_DIRECTORY)
  for name in ("evaluate", "summarise", "figures"):
    shutil.rmtree(os.path.join(stage_root, name))
  shutil.copytree(os.path.join(source, pipeline.STAGES_DIRECTORY, "evaluate"),
                  os.path.join(stage_root, "evaluate"))
  (evaluate_directory,) = os.listdir(os.path.join(stage_root, "evaluate"))
  evaluate_directory = os.path.join(stage_root, "evaluate", evaluate_directory)
  # An interruption after epoch 3: no result.json, and no file for epoch 4.
  os.remove(os.path.join(evaluate_directory, "result.json"))
  os.remove(os.path.join(evaluate_directory, pipeline.CHECKPOINTS_DIRECTORY,
                         pipeline.checkpoint_item(4) + ".npz"))

  evaluated = []
  original = images_eval.evaluate_checkpoint

  def counting(inputs, params, epoch, with_samples):
    evaluated.append(epoch)
    return original(inputs, params, epoch, with_samples)

  monkeypatch.setattr(images_eval, "evaluate_checkpoint", counting)
  again = pipeline.run(_smoke_config(), workdir, compiler_options=COMPILER_OPTIONS)
  assert evaluated == [4]
  assert again["epochs"] == summary["epochs"]
  np.testing.assert_allclose(again["cosine_distance"]["value"],
                             summary["cosine_distance"]["value"], rtol=1e-6)
  np.testing.assert_allclose(again["test_loss"]["all_t"]["median"],
                             summary["test_loss"]["all_t"]["median"], rtol=1e-6)


def test_changed_evaluation_setting_keeps_training(smoke_run, tmp_path, monkeypatch):
  source, _ = smoke_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(source, workdir)

  def fail(*args, **kwargs):
    raise AssertionError("training ran again")

  monkeypatch.setattr(loop, "fit", fail)
  summary = pipeline.run(_smoke_config(num_bootstrap=10), workdir,
                         compiler_options=COMPILER_OPTIONS)
  assert summary["counts"]["num_bootstrap"] == 10


def test_smoke_monitor_records_every_checkpoint(smoke_run):
  workdir, _ = smoke_run
  (group,) = _group_directories(workdir)
  records = _monitor_records(group)
  assert [r["epoch"] for r in records] == [1, 2, 3, 4]
  for record in records:
    measured = record[monitor.callback.MONITOR_KEY]
    assert measured["parameters"] == "ema"
    assert measured["per_pair"]["pairs"] == [[0, 1], [0, 2], [1, 2]]
    for name in ("divergence", "divergence_train", "test_loss", "loss_gap"):
      assert math.isfinite(measured[name]), name
    assert 0.0 <= measured["mia_auc"] <= 1.0
    assert record[loop.STOP_TRAINING_KEY] is False


def test_image_audit_writes_table_and_figure(smoke_run, tmp_path, capsys):
  workdir, _ = smoke_run
  (group,) = _group_directories(workdir)
  result = audit_script.load().audit(group, str(tmp_path))
  assert result["source"] == "eval_metrics.jsonl"
  assert result["epochs"] == [1, 2, 3, 4]
  for name in ("audit.json", "audit_table.txt", "audit.png", "audit.pdf"):
    assert os.path.getsize(tmp_path / name) > 0, name
  table = (tmp_path / "audit_table.txt").read_text()
  assert table == capsys.readouterr().out
  assert set(result["decisions"]) == {"divergence_minimum", "test_loss_minimum",
                                      "mia_auc_threshold"}


def test_grouped_models_monitored_together(tmp_path):
  config = _smoke_config()
  with config.unlocked():
    config.zoo.blocks = (0, 1)
    config.zoo.models_per_fit = 1
  workdir = str(tmp_path / "run")
  root = os.path.join(workdir, pipeline.STAGES_DIRECTORY)
  data_result, data, splits = pipeline.data_stage(config, root, workdir)
  pipeline.train_stage(config, root, data_result, data, splits, COMPILER_OPTIONS)
  first, second = _group_directories(workdir)

  # Only the last group runs the monitor while training.
  first_records = (_monitor_records(first)
                   if os.path.exists(os.path.join(first, loop.EVAL_METRICS_FILE)) else [])
  assert not [r for r in first_records if monitor.callback.MONITOR_KEY in r]
  # The second group measures its model with the first group's checkpoints.
  online = _monitor_records(second)
  for record in online:
    measured = record[monitor.callback.MONITOR_KEY]
    assert measured["per_model"]["block"] == [0, 1]
    assert measured["per_pair"]["pairs"] == [[0, 1]]
    assert math.isfinite(measured["divergence"])
  with open(os.path.join(second, images_monitor.INPUTS_FILE)) as f:
    assert json.load(f)["earlier_groups"] == ["../group_0"]

  # The audit rebuilds the same two-model monitor from the stored run.
  recomputed = audit_script.load().audit(second, str(tmp_path / "audit"), recompute=True)
  assert recomputed["source"] == "recomputed from the grid checkpoints"
  for offline, record in zip(recomputed["records"], online):
    measured = record[monitor.callback.MONITOR_KEY]
    for name in ("test_loss", "train_loss", "divergence", "mia_auc", "mia_tpr"):
      assert offline[name] == pytest.approx(measured[name], rel=1e-5, abs=1e-6), name


def test_monitor_settings_keep_the_training_key():
  data_result = {"sha256": "0" * 64, "block_size": 32}
  reference = pipeline.train_spec(_smoke_config(), data_result)
  config = _smoke_config()
  with config.unlocked():
    config.monitor.patience = 7
    config.monitor.mia_examples = 8
  assert pipeline.train_spec(config, data_result) == reference
  with config.unlocked():
    config.monitor.stop_training = True
  assert pipeline.train_spec(config, data_result) != reference


def test_stopping_monitor_needs_one_fit():
  config = _smoke_config()
  with config.unlocked():
    config.monitor.stop_training = True
    config.zoo.models_per_fit = 1
  with pytest.raises(ValueError, match="monitor.stop_training=True needs every model in one fit"):
    pipeline.check_config(config)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match=r"Unknown variant 'huge'.*smoke.*quick.*pair.*paper"):
    images_config.get_config("huge")


def _celeba_folder(directory, data) -> str:
  """Write as many empty .jpg files as the blocks and held-out images of `data` need."""
  folder = directory / "img_align_celeba"
  folder.mkdir()
  for i in range(1, data.num_blocks * data.block_size + data.heldout_size + 1):
    (folder / f"{i:06d}.jpg").touch()
  return str(folder)


@pytest.mark.parametrize("variant", images_config.VARIANTS)
def test_every_variant_passes_the_checks(variant, tmp_path):
  config = images_config.get_config(variant)
  if config.data.source == "celeba_folder":
    with config.unlocked():
      config.data.path = _celeba_folder(tmp_path, config.data)
  pipeline.check_config(config)


def test_paper_variant_has_paper_settings():
  config = images_config.get_config("paper")
  assert config.zoo.blocks == tuple(range(15))
  assert [m.seed for m in pipeline.model_list(config)] == list(range(15))
  assert (config.data.block_size, config.data.heldout_size) == (1024, 2048)
  assert (config.train.batch_size, config.train.num_epochs) == (512, 5000)
  assert (config.train.learning_rate, config.train.lr_schedule) == (1e-4, "constant")
  assert config.train.ema_decay == 0.0
  assert not config.eval.use_ema
  assert (config.model.base_width, config.model.dropout) == (32, 0.1)
  assert (config.diffusion.num_steps, config.eval.sampler_steps) == (1000, 1000)
  assert (config.eval.num_samples, config.eval.num_sampling_checkpoints) == (512, 20)
  assert config.eval.probe_times == (50, 100, 150, 200)
  assert config.eval.num_probes == 512
  assert (config.eval.loss_num_images, config.eval.loss_num_times) == (50, 0)


@pytest.mark.parametrize("field, value, message", [
    ("eval.figure_time", 75, "figure_time=75"),
    ("eval.num_probes", 1000, "num_probes=1000"),
    ("eval.panel_pair", (1, 1), "panel_pair"),
    ("eval.model_loop", "pmap", "model_loop='pmap'"),
    ("zoo.blocks", (0,), "at least two distinct blocks"),
    ("zoo.blocks", (0, 5), r"must lie in \[0, data.num_blocks=3\)"),
    ("data.source", "mnist", "data.source='mnist'"),
    ("monitor.image_divergence", "l1", "monitor.image_divergence='l1'"),
    ("monitor.split_time_fraction", 1.0, "monitor.split_time_fraction=1.0 gives t=1000"),
    ("monitor.mia_examples", 1, "monitor.mia_examples=1"),
])
def test_bad_field_is_rejected(field, value, message):
  config = _smoke_config()
  section, name = field.split(".")
  setattr(getattr(config, section), name, value)
  with pytest.raises(ValueError, match=message):
    pipeline.check_config(config)


def test_celeba_without_path_is_rejected():
  config = images_config.get_config("pair")
  with pytest.raises(ValueError, match="needs data.path") as error:
    pipeline.check_config(config)
  assert "set --config.data.path=/path/to/img_align_celeba" in str(error.value)
  with pytest.raises(ValueError) as error:
    pipeline.check_config(config, flag_prefix="--config.images.")
  assert "set --config.images.data.path=/path/to/img_align_celeba" in str(error.value)
  assert "--config.data." not in str(error.value)


@pytest.mark.parametrize("files, message", [
    (None, "CelebA folder .* not found"),
    (0, "no .jpg files in"),
    (4095, "contains 4095 JPEG files, but 2 blocks of 1024 plus 2048 held-out images need 4096"),
])
def test_bad_celeba_folder_is_rejected(tmp_path, files, message):
  config = images_config.get_config("pair")
  folder = tmp_path / "img_align_celeba"
  if files is not None:
    folder.mkdir()
    for i in range(1, files + 1):
      (folder / f"{i:06d}.jpg").touch()
  with config.unlocked():
    config.data.path = str(folder)
  with pytest.raises(ValueError, match=message):
    pipeline.check_config(config)


def test_unprepared_tfds_source_is_rejected(tmp_path):
  config = images_config.get_config("pair")
  with config.unlocked():
    config.data.source = "celeba_tfds"
    config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"no prepared celeb_a dataset.*--config.data.data_dir"):
    pipeline.check_config(config)


def test_reproduce_profile_is_rejected():
  with pytest.raises(ValueError, match=r"needs a config from configs/images.py.*without an "
                     r"'experiment' field.*run it with experiments/reproduce.py"):
    pipeline.check_config(reproduce_configs.get_config("smoke"))


def test_workdir_of_other_variant_is_rejected(tmp_path):
  stages.claim_workdir(str(tmp_path), images_config.get_config("quick"))
  with pytest.raises(ValueError, match="contains a run of image variant 'quick', not 'smoke'"):
    pipeline.run(_smoke_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["pipeline.json"]


def test_run_claims_its_workdir(tmp_path, monkeypatch):

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop()

  monkeypatch.setattr(pipeline, "data_stage", stop)
  with pytest.raises(Stop):
    pipeline.run(_smoke_config(), str(tmp_path))
  assert stages.load_json(str(tmp_path / "pipeline.json")) == {"image_variant": "smoke"}


def test_loss_time_weights():
  times, all_weights, trained_weights = images_eval.loss_times(1000, 0)
  assert times.tolist() == list(range(1000))
  assert math.isclose(all_weights.sum(), 1.0)
  assert math.isclose(trained_weights.sum(), 1.0)
  assert trained_weights[0] == 0.0

  times, all_weights, trained_weights = images_eval.loss_times(1000, 4)
  # t = 0 plus the midpoints of 4 strata of 1 ... 999.
  assert times.tolist() == [0, 125, 375, 625, 875]
  assert math.isclose(all_weights.sum(), 1.0)
  assert math.isclose(all_weights[0], 1e-3)
  assert math.isclose(trained_weights.sum(), 1.0)
  # A loss that is constant per stratum is averaged exactly.
  assert math.isclose(float(np.dot(all_weights, [7.0, 1.0, 1.0, 1.0, 1.0])), 1.006)

  with pytest.raises(ValueError, match="loss_num_times=1000"):
    images_eval.loss_times(1000, 1000)
