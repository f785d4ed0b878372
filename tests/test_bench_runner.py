"""Tests for the benchmark runner: goal status, page layout and merging."""

import importlib.util
import json
import pathlib
import sys
import types

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(name="runner")
def fixture_runner(monkeypatch):
  spec = importlib.util.spec_from_file_location(
      "bench_run_under_test", REPO_ROOT / "benchmarks" / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # Machine details need jax.devices(); a fixed record keeps this test fast.
  monkeypatch.setattr(module.common, "machine_info", lambda: {
      "cpu_model": "Test CPU", "cpu_cores": 2, "python": "3.11", "jax": "x",
      "numpy": "y", "backend": "cpu", "device_kind": "cpu",
      "device_count": 1})
  return module


def fake_section(monkeypatch, module_name, name, result):
  module = types.ModuleType(f"benchmarks.{module_name}")
  module.NAME = name
  module.TITLE = f"Fake section {name}"
  calls = []

  def run(device_mode):
    calls.append(device_mode)
    if isinstance(result, Exception):
      raise result
    return json.loads(json.dumps(result))

  module.run = run
  monkeypatch.setitem(sys.modules, f"benchmarks.{module_name}", module)
  return calls


def test_goal_status_met_and_missed(runner):
  assert runner.goal_status(
      {"value": 0.3, "target": 0.4, "higher_is_better": False}) == "met"
  assert runner.goal_status(
      {"value": 0.5, "target": 0.4, "higher_is_better": False,
       "unit": "s"}) == "missed by 0.1 s (25%)"
  assert runner.goal_status(
      {"value": 0.6, "target": 0.5, "higher_is_better": True}) == "met"
  assert runner.goal_status(
      {"value": 0.25, "target": 0.5}) == "missed by 0.25 (50%)"
  assert runner.goal_status({"value": None, "target": 1.0}) == "not measured"


def test_page_and_json_written(runner, monkeypatch, tmp_path):
  calls = fake_section(monkeypatch, "bench_alpha", "alpha", {
      "rows": [{"case": "a", "seconds_median": 0.25, "count": 12000}],
      "tables": [{"title": "Extra", "rows": [{"x": 1}]}],
      "goals": [{"goal": "fast", "value": 0.25, "target": 0.4,
                 "higher_is_better": False, "unit": "s"},
                {"goal": "big", "value": 2.0, "target": 4.0}],
      "notes": ["a note"]})
  monkeypatch.setattr(runner, "SECTIONS", ["bench_alpha", "bench_not_yet"])
  output = tmp_path / "docs" / "bench.md"

  assert runner.main(["--output", str(output)]) == 0
  assert calls == [False]
  page = output.read_text()
  record = json.loads(output.with_suffix(".json").read_text())
  assert "# Benchmarks on CPU" in page
  assert "## Fake section alpha (`alpha`)" in page
  assert "| fast | 0.4 s | 0.25 s | met |" in page
  assert "| big | 4 | 2 | missed by 2 (50%) |" in page
  assert "| a | 0.25 | 12,000 |" in page
  assert "**Extra**" in page
  assert "- a note" in page
  assert "with no results yet: `not_yet`" in page
  assert "Test CPU" in page
  assert record["sections"]["alpha"]["goals"][1]["status"] == (
      "missed by 2 (50%)")


def test_only_keeps_other_sections(runner, monkeypatch, tmp_path):
  fake_section(monkeypatch, "bench_alpha", "alpha",
               {"rows": [{"case": "first"}]})
  beta_calls = fake_section(monkeypatch, "bench_beta", "beta",
                            {"rows": [{"case": "beta rows"}]})
  monkeypatch.setattr(runner, "SECTIONS", ["bench_alpha", "bench_beta"])
  output = tmp_path / "bench.md"
  assert runner.main(["--output", str(output)]) == 0

  fake_section(monkeypatch, "bench_alpha", "alpha",
               {"rows": [{"case": "second"}]})
  assert runner.main(["--output", str(output), "--only", "alpha"]) == 0
  page = output.read_text()
  assert "second" in page
  assert "first" not in page
  assert "beta rows" in page
  assert len(beta_calls) == 1
  assert page.index("(`alpha`)") < page.index("(`beta`)")


def test_device_mode_writes_separate_files(runner, monkeypatch, tmp_path):
  calls = fake_section(monkeypatch, "bench_alpha", "alpha",
                       {"rows": [{"case": "device"}]})
  monkeypatch.setattr(runner, "SECTIONS", ["bench_alpha"])
  output = tmp_path / "bench.md"
  assert runner.main(["--output", str(output), "--device"]) == 0
  assert calls == [True]
  assert not output.exists()
  device_page = tmp_path / "bench_device.md"
  assert "# Benchmarks on an accelerator" in device_page.read_text()
  assert (tmp_path / "bench_device.json").exists()


def test_failing_section_recorded(runner, monkeypatch, tmp_path):
  fake_section(monkeypatch, "bench_alpha", "alpha", RuntimeError("boom"))
  fake_section(monkeypatch, "bench_beta", "beta", {"rows": [{"case": "ok"}]})
  monkeypatch.setattr(runner, "SECTIONS", ["bench_alpha", "bench_beta"])
  output = tmp_path / "bench.md"
  assert runner.main(["--output", str(output)]) == 1
  page = output.read_text()
  assert "**The section failed:**" in page
  assert "RuntimeError: boom" in page
  assert "| ok |" in page


def test_unknown_only_name_rejected(runner, monkeypatch, tmp_path):
  monkeypatch.setattr(runner, "SECTIONS", ["bench_alpha"])
  with pytest.raises(SystemExit, match="Unknown section"):
    runner.main(["--output", str(tmp_path / "b.md"), "--only", "gamma"])


def test_broken_import_recorded(runner, monkeypatch, tmp_path):
  def broken_import(name):
    raise SyntaxError(f"invalid syntax in {name}")

  monkeypatch.setattr(runner.importlib, "import_module", broken_import)
  monkeypatch.setattr(runner, "SECTIONS", ["bench_alpha"])
  output = tmp_path / "bench.md"
  assert runner.main(["--output", str(output)]) == 1
  page = output.read_text()
  assert "## benchmarks/bench_alpha.py (`alpha`)" in page
  assert "SyntaxError: invalid syntax in benchmarks.bench_alpha" in page
