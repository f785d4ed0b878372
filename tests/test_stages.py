"""Tests of the resumable, content-addressed pipeline stages."""

import os

import numpy as np
import pytest

from biasdiff.pipeline import stages


def test_stage_runs_once_and_is_reused(tmp_path):
  calls = []

  def compute(stage):
    calls.append(stage.key)
    np.save(stage.path("x.npy"), np.arange(3))
    return {"value": 7}

  first = stages.run_stage(str(tmp_path), "demo", {"a": 1}, compute)
  second = stages.run_stage(str(tmp_path), "demo", {"a": 1}, compute)
  assert first["value"] == second["value"] == 7
  assert len(calls) == 1
  assert os.path.exists(os.path.join(first["stage_directory"], "spec.json"))


def test_changed_spec_gets_new_directory(tmp_path):
  first = stages.run_stage(str(tmp_path), "demo", {"a": 1}, lambda s: {})
  second = stages.run_stage(str(tmp_path), "demo", {"a": 2}, lambda s: {})
  assert first["stage_directory"] != second["stage_directory"]


def test_interrupted_stage_is_run_again(tmp_path):
  def failing(stage):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    stages.run_stage(str(tmp_path), "demo", {"a": 1}, failing)
  result = stages.run_stage(str(tmp_path), "demo", {"a": 1}, lambda s: {"ok": True})
  assert result["ok"]


def test_spec_key_ignores_key_order_and_numpy_scalars():
  assert stages.spec_key({"a": 1, "b": [2.5]}) == stages.spec_key({"b": [np.float64(2.5)],
                                                                   "a": np.int64(1)})
  with pytest.raises(TypeError, match="JSON-serialisable"):
    stages.spec_key({"a": object()})


def test_item_cache_stores_and_returns_arrays(tmp_path):
  cache = stages.ItemCache(str(tmp_path / "items"))
  calls = []

  def compute():
    calls.append(1)
    return {"x": np.arange(4.0), "n": 3}

  first = cache.get_or_compute("epoch_10", compute)
  second = cache.get_or_compute("epoch_10", compute)
  np.testing.assert_array_equal(first["x"], second["x"])
  assert int(second["n"]) == 3
  assert len(calls) == 1


def test_image_part_claim_beside_profile(tmp_path):
  profile = {"profile": "quick"}
  image_variant = {"experiment": "images", "variant": "quick"}
  stages.claim_workdir(str(tmp_path), profile)
  # experiments/reproduce.py runs the image part in <workdir>/images.
  stages.claim_workdir(str(tmp_path / "images"), image_variant)
  stages.claim_workdir(str(tmp_path), profile)
  stages.claim_workdir(str(tmp_path / "images"), image_variant)
  assert stages.load_json(str(tmp_path / "pipeline.json")) == {"profile": "quick"}
  assert stages.load_json(str(tmp_path / "images" / "pipeline.json")) == {"image_variant": "quick"}


def test_claim_of_other_kind_is_rejected(tmp_path):
  stages.claim_workdir(str(tmp_path), {"profile": "quick"})
  with pytest.raises(ValueError, match=r"contains a run of profile 'quick', not of image variant "
                     r"'quick'; use another --workdir \(for example runs/images_quick\)"):
    stages.claim_workdir(str(tmp_path), {"experiment": "images", "variant": "quick"})
