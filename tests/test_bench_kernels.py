"""Smoke test of the kernel benchmark section on tiny sizes."""

import importlib
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(name="bench_kernels")
def fixture_bench_kernels(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO_ROOT))
  module = importlib.import_module("benchmarks.bench_kernels")
  monkeypatch.setitem(module.SIZES, "hamming", (300, 200))
  monkeypatch.setitem(module.SIZES, "images", (60, 40))
  monkeypatch.setitem(module.SIZES, "l2_cpu", (64, 128, 32))
  monkeypatch.setitem(module.SIZES, "l2_device", (64, 128, 32))
  monkeypatch.setitem(module.SIZES, "device_hamming", ((100, 150),))
  monkeypatch.setitem(module.SIZES, "device_images", ((30, 50),))
  # Above the default reference tiles, so the memory is already flat.
  monkeypatch.setitem(module.SIZES, "memory_references", (10_000, 100_000))
  monkeypatch.setitem(module.SIZES, "memory_queries", (100, 20))
  monkeypatch.setitem(module.SIZES, "tile_sweep", ((64, 128),))
  # One faiss-free run covers the notes and goals without the baseline.
  monkeypatch.setattr(module, "_try_import_faiss", lambda: None)
  yield module
  sys.modules.pop("benchmarks.bench_kernels", None)


def test_device_mode_smoke(bench_kernels):
  result = bench_kernels.run(device_mode=True)
  cases = [row["case"] for row in result["rows"]]
  assert any("100 x 150" in case for case in cases)
  assert any("30 x 50" in case for case in cases)
  # Every kernel row that was checked agrees with its reference.
  assert all(row.get("agrees_with_kernel", True) for row in result["rows"])
  goals = {goal["goal"]: goal for goal in result["goals"]}
  faiss_goal = goals["L2 kernel faster than faiss IndexFlatL2 (speed-up)"]
  assert faiss_goal["value"] is None
  memory_goal = goals[
      "hamming working memory at 100,000 vs 10,000 references"]
  assert memory_goal["value"] <= 1.05
  assert "faiss-cpu is not installed" in result["notes"][0]
  # The accelerator run skips the CPU-only time goal and the tile sweep.
  assert not any("2-core CPU" in goal for goal in goals)
  assert len(result["tables"]) == 2
