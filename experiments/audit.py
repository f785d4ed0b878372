r"""Audit a finished training run: bias statistics and stopping rules, checkpoint by checkpoint.

  python experiments/audit.py --workdir=runs/hierarchical_quick
  python experiments/audit.py --workdir=runs/quick/hierarchical/train/<key> \
      --override=patience=5 --override=mia_auc_threshold=0.55
  python experiments/audit.py --workdir=runs/images_quick/stages/train/<key>/group_5

The workdir is a training run directory with grid checkpoints (run.json,
checkpoints.json, grid/<epoch>). An image run trains its zoo in groups, one
directory each; the audit of group g measures the models of groups 0 ... g,
so the last group's audit covers the whole zoo. When the eval_metrics.jsonl
of the workdir contains a monitor record for every grid checkpoint, those
records are read; otherwise (or with --recompute) the statistics are measured
again from the checkpoints. The monitor settings are the run's `monitor`
config section (the defaults of configs.monitor_section() for runs without
one), changed by --override.

Writes to --output_dir (default <workdir>/audit): audit.json (every record and
every rule's decision), audit_table.txt (the printed table) and audit.png /
audit.pdf (all statistics on one epoch axis, with the epoch each rule
releases marked).
"""

import ast
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

from absl import app
from absl import flags

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY not in sys.path:
  sys.path.insert(0, _REPOSITORY)
import configs  # pylint: disable=g-import-not-at-top
import matplotlib  # pylint: disable=g-import-not-at-top

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from biasdiff import cli  # pylint: disable=g-import-not-at-top
from biasdiff import io  # pylint: disable=g-import-not-at-top
from biasdiff import monitor  # pylint: disable=g-import-not-at-top
# Imported for its side effect: it registers the monitor builder of image runs.
from biasdiff.pipeline import images as _images_pipeline  # pylint: disable=g-import-not-at-top,unused-import
from biasdiff.training import checkpoints  # pylint: disable=g-import-not-at-top

logger = logging.getLogger(__name__)

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory with grid checkpoints.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where the audit files go; default <workdir>/audit.")
_RECOMPUTE = flags.DEFINE_bool("recompute", False,
                               "Measure every checkpoint again even if the run has monitor records.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "A monitor setting as field=value, e.g. patience=5 or "
    "rules=\"('divergence_minimum',)\"; repeat for several.")

# One-letter marks of the rules in the table.
_MARKS = {"divergence_minimum": "D", "test_loss_minimum": "L", "mia_auc_threshold": "A",
          "divergence_threshold": "T"}
_COLOURS = {"divergence_minimum": "tab:red", "test_loss_minimum": "tab:blue",
            "mia_auc_threshold": "tab:purple", "divergence_threshold": "tab:orange"}


def monitor_settings(run_config: dict, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Return the monitor section of a stored run config, with `field=value` overrides applied."""
  settings = configs.monitor_section()
  stored = run_config.get("monitor", {})
  for name, value in stored.items():
    if name in settings:
      settings[name] = tuple(value) if isinstance(value, list) else value
  for item in overrides:
    name, separator, text = item.partition("=")
    if not separator or name not in settings:
      raise ValueError(f"--override={item!r} must be field=value with a field of the monitor "
                       f"section: {sorted(settings.keys())}.")
    current = settings[name]
    if isinstance(current, str):
      value = text
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError) as error:
        raise ValueError(f"--override={item!r}: {text!r} is not a Python literal; give the "
                         f"value in the form of the current one, {name}={current!r}.") from error
      if isinstance(current, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    settings[name] = value
  settings.lock()
  return settings


def _complete(history: list, epochs: Sequence[int]) -> bool:
  recorded = {r["epoch"] for r in history}
  return bool(epochs) and all(e in recorded for e in epochs)


def measure_checkpoints(config, workdir: str, settings, epochs: Sequence[int]) -> list:
  """Measure every grid checkpoint of a run with a fresh monitor; returns the records."""
  watcher = monitor.build_monitor(config, workdir, settings, read_records=False)
  history = []
  for i, epoch in enumerate(epochs):
    params, meta = watcher.load_checkpoint(workdir, epoch)
    record = watcher.measure(params)
    record["parameters"] = meta["parameters"]
    history.append({"epoch": int(epoch), "step": int(meta["step"]), **record})
    logger.info("Measured checkpoint %d of %d (epoch %d) in %.1f s.", i + 1, len(epochs), epoch,
                record["seconds"])
  return history


def audit(workdir: str, output_dir: Optional[str] = None, overrides: Sequence[str] = (),
          recompute: bool = False) -> dict:
  """Audit a run directory; writes the table, JSON and figure, and returns the JSON record."""
  info_path = os.path.join(workdir, checkpoints.RUN_INFO_FILE)
  if not os.path.exists(info_path):
    raise ValueError(f"{info_path} not found: --workdir must be a training run directory.")
  with open(info_path) as f:
    info = json.load(f)
  config = ml_collections.ConfigDict(info["config"])
  settings = monitor_settings(info["config"], overrides)
  epochs = checkpoints.realised_grid(workdir)
  if not epochs:
    raise ValueError(f"{workdir!r} has no grid checkpoints; train it first.")
  history = [r for r in monitor.read_history(workdir) if r["epoch"] in epochs]
  source = "eval_metrics.jsonl"
  if recompute or not _complete(history, epochs):
    history = measure_checkpoints(config, workdir, settings, epochs)
    source = "recomputed from the grid checkpoints"
  history = sorted({r["epoch"]: r for r in history}.values(), key=lambda r: r["step"])
  specs = monitor.rules_from_config(settings)
  decisions = monitor.evaluate_rules(specs, history)

  output_dir = output_dir or os.path.join(workdir, "audit")
  os.makedirs(output_dir, exist_ok=True)
  table = format_table(history, decisions)
  io.write_file_atomically(os.path.join(output_dir, "audit_table.txt"),
                           lambda f: f.write(table.encode()))
  result = {
      "workdir": os.path.abspath(workdir),
      "source": source,
      "monitor": settings.to_dict(),
      "epochs": [r["epoch"] for r in history],
      "steps": [r["step"] for r in history],
      "records": history,
      "decisions": {name: d.to_json() for name, d in decisions.items()},
  }
  io.write_json_atomically(os.path.join(output_dir, "audit.json"), _finite_json(result))
  plot(history, decisions, output_dir, specs)
  print(table, end="")
  return result


def _finite_json(value: Any) -> Any:
  """Replace NaN and infinities by None, so the file is strict JSON."""
  if isinstance(value, dict):
    return {k: _finite_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_json(v) for v in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def _cell(record: dict, name: str, width: int, digits: int) -> str:
  value = record.get(name)
  if value is None:
    return "-".rjust(width)
  return f"{value:{width}.{digits}f}"


def format_table(history: list, decisions: dict) -> str:
  """Format one row per checkpoint; marks name the rules that release (*) or stop (!) there."""
  header = (f"{'epoch':>7} {'step':>8} {'test loss':>10} {'train loss':>10} {'gap':>8} "
            f"{'div t*':>9} {'div train':>9} {'MIA AUC':>8} {'TPR':>6} {'FPR':>6}  rules")
  lines = [header, "-" * len(header)]
  for index, record in enumerate(history):
    marks = []
    for name, decision in decisions.items():
      mark = _MARKS.get(name, name)
      if decision.release_index == index:
        marks.append(f"{mark}*")
      if decision.stop_index == index:
        marks.append(f"{mark}!")
    lines.append(
        f"{record['epoch']:>7d} {record['step']:>8d} {_cell(record, 'test_loss', 10, 4)} "
        f"{_cell(record, 'train_loss', 10, 4)} {_cell(record, 'loss_gap', 8, 4)} "
        f"{_cell(record, 'divergence', 9, 4)} {_cell(record, 'divergence_train', 9, 4)} "
        f"{_cell(record, 'mia_auc', 8, 3)} {_cell(record, 'mia_tpr', 6, 3)} "
        f"{_cell(record, 'mia_fpr', 6, 3)}  {' '.join(marks)}")
  lines.append("")
  legend = ", ".join(f"{mark} = {name}" for name, mark in _MARKS.items() if name in decisions)
  lines.append(f"Rules: {legend}; * released checkpoint, ! where the rule fired.")
  lines.append("TPR and FPR: the attack's rates at the threshold calibrated on the other model "
               "of each pair; an FPR far from its target means the calibration did not transfer.")
  for name, decision in decisions.items():
    if decision.release_epoch is None:
      lines.append(f"  {name}: no checkpoint qualifies.")
      continue
    state = (f"fired at epoch {decision.stop_epoch}" if decision.fired
             else "not fired: the best so far, unconfirmed")
    lines.append(
        f"  {name}: releases epoch {decision.release_epoch} ({state}); test loss "
        f"{decision.test_loss_at_release:.4f}, {decision.test_loss_cost:+.4f} "
        f"({100 * (decision.test_loss_cost_relative or 0.0):+.2f}%) against the minimum.")
  return "\n".join(lines) + "\n"


def _series(history: list, name: str) -> tuple[np.ndarray, np.ndarray]:
  values = np.array([r.get(name, np.nan) for r in history], dtype=np.float64)
  errors = np.array([r.get(f"{name}_se", np.nan) for r in history], dtype=np.float64)
  return values, errors


def _draw(axis, epochs, history, name, label, colour):
  values, errors = _series(history, name)
  if np.all(np.isnan(values)):
    return
  axis.plot(epochs, values, marker="o", ms=3, color=colour, label=label)
  if np.any(np.isfinite(errors)):
    axis.fill_between(epochs, values - errors, values + errors, color=colour, alpha=0.2, lw=0)


def plot(history: list, decisions: dict, output_dir: str,
         specs: Sequence[monitor.RuleSpec] = ()) -> list:
  """Draw every statistic against epoch on one shared axis; returns the PNG and PDF paths.

  Vertical lines mark the epoch each rule releases (solid once it fired),
  horizontal dashed lines the thresholds of the threshold rules.
  """
  epochs = np.array([r["epoch"] for r in history], dtype=np.float64)
  figure, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True)

  _draw(axes[0], epochs, history, "test_loss", "test loss (held-out)", "tab:blue")
  _draw(axes[0], epochs, history, "train_loss", "train loss (own block)", "tab:cyan")
  axes[0].set_ylabel("denoising loss")

  _draw(axes[1], epochs, history, "divergence", "held-out inputs", "tab:red")
  _draw(axes[1], epochs, history, "divergence_train", "training inputs", "tab:orange")
  axes[1].set_ylabel("sample-split divergence at t*")
  divergence, _ = _series(history, "divergence")
  if np.all(divergence[np.isfinite(divergence)] > 0):
    axes[1].set_yscale("log")  # the minimum sits far below the early values

  _draw(axes[2], epochs, history, "loss_gap", "train - held-out", "tab:green")
  axes[2].axhline(0.0, color="grey", lw=0.8)
  axes[2].set_ylabel("loss gap")

  _draw(axes[3], epochs, history, "mia_auc", "MIA AUC", "tab:purple")
  _draw(axes[3], epochs, history, "mia_tpr", "TPR at the calibrated threshold", "tab:pink")
  _draw(axes[3], epochs, history, "mia_fpr", "realised FPR there", "tab:gray")
  axes[3].axhline(0.5, color="grey", lw=0.8)
  axes[3].set_ylabel("membership inference")
  axes[3].set_xlabel("epoch")
  if epochs.size > 1 and epochs.min() > 0:
    axes[3].set_xscale("log")

  statistic_axes = {"divergence": axes[1], "mia_auc": axes[3]}
  for spec in specs:
    if spec.kind == monitor.rules.THRESHOLD and spec.statistic in statistic_axes:
      statistic_axes[spec.statistic].axhline(spec.threshold, color=_COLOURS.get(spec.name, "black"),
                                             ls="--", lw=0.8, label=f"{spec.name} threshold")
  for name, decision in decisions.items():
    if decision.release_epoch is None:
      continue
    style = "-" if decision.fired else ":"
    for axis in axes:
      axis.axvline(decision.release_epoch, color=_COLOURS.get(name, "black"), ls=style, lw=1.0,
                   label=f"{name} release" if axis is axes[0] else None)
  for axis in axes:
    axis.legend(fontsize=7, loc="best")
  figure.tight_layout()

  paths = []
  for extension in ("png", "pdf"):
    path = os.path.join(output_dir, f"audit.{extension}")
    figure.savefig(path, dpi=150, bbox_inches="tight")
    paths.append(path)
  plt.close(figure)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  result = audit(_WORKDIR.value, _OUTPUT_DIR.value, _OVERRIDES.value, _RECOMPUTE.value)
  output_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "audit")
  print(f"Audit of {len(result['epochs'])} checkpoints ({result['source']}) written to "
        f"{output_dir}.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
