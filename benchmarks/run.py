"""Run the benchmark sections and write docs/benchmarks.md with a JSON record.

Usage:
  python benchmarks/run.py [--output docs/benchmarks.md] [--device] [--only NAME]

A section is a module `benchmarks/<module>.py` listed in SECTIONS with:

  NAME = "kernels"                    # the module name without "bench_"
  TITLE = "Nearest-neighbour kernels"  # heading on the page
  def run(device_mode: bool) -> dict

`run` returns a dict with these keys (all optional except "rows"):

  "rows":   list of dicts, one table row each; keys become the columns.
  "tables": list of {"title": str, "rows": [...]}, extra tables.
  "goals":  list of {"goal": str, "value": float or None, "target": float,
            "higher_is_better": bool, "unit": str, "note": str}. The runner
            marks each "met", "missed by X" or, when value is None,
            "not measured".
  "notes":  list of strings printed under the tables.

Ratios such as speed-ups are computed by the section within one run, so they
are comparable even on a shared machine. A module in SECTIONS that does not
exist yet is skipped with a note, and a section that raises is recorded
with its traceback while the others still run. Results are merged into the existing JSON
record, so `--only` updates one section and keeps the others. With `--device`
the page and record get a "_device" suffix and a separate heading, so the CPU
page is kept.
"""

import argparse
import datetime
import importlib
import json
import logging
import math
import pathlib
import shlex
import sys
import time
import traceback
from typing import Any, Optional

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # pylint: disable=wrong-import-position

# Section modules in page order. Add a module name here to add a section.
SECTIONS = [
    "bench_kernels",
    "bench_hierarchical",
    "bench_training",
    "bench_sampling",
]

DEVICE_SUFFIX = "_device"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--output", default="docs/benchmarks.md",
      help="Markdown page to write; the JSON record is written beside it "
           "with the suffix .json (default: docs/benchmarks.md).")
  parser.add_argument(
      "--device", action="store_true",
      help="Use accelerator-sized inputs and write to <output>_device.md.")
  parser.add_argument(
      "--only", action="append", default=None, metavar="NAME",
      help="Run only this section (its NAME or module name); repeatable.")
  return parser.parse_args(argv)


def section_name(module_name: str) -> str:
  """Return the --only name of a section module: bench_kernels -> kernels."""
  return module_name.removeprefix("bench_")


def load_section(module_name: str) -> Optional[Any]:
  """Import benchmarks.<module_name>; return None if that module is missing."""
  full_name = f"benchmarks.{module_name}"
  try:
    module = importlib.import_module(full_name)
  except ModuleNotFoundError as error:
    if error.name == full_name:
      return None
    raise
  if module.NAME != section_name(module_name):
    raise ValueError(
        f"{full_name} has NAME {module.NAME!r}; rename it to "
        f"{section_name(module_name)!r} so --only and the page agree.")
  return module


def goal_status(goal: dict[str, Any]) -> str:
  """Return "met", "missed by X (Y%)" or "not measured" for one goal."""
  value = goal.get("value")
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "not measured"
  target = goal["target"]
  higher_is_better = goal.get("higher_is_better", True)
  met = value >= target if higher_is_better else value <= target
  if met:
    return "met"
  gap = abs(value - target)
  unit = goal.get("unit", "")
  relative = f" ({gap / abs(target):.0%})" if target else ""
  return f"missed by {format_value(gap)}{(' ' + unit) if unit else ''}{relative}"


def format_value(value: Any) -> str:
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    if math.isnan(value):
      return "n/a"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
      return f"{value:.3g}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
  if value is None:
    return ""
  return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
  if not rows:
    return ["(no rows)"]
  columns: list[str] = []
  for row in rows:
    columns += [key for key in row if key not in columns]
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    cells = [format_value(row.get(column)).replace("|", "\\|")
             for column in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def render_section(name: str, record: dict[str, Any]) -> list[str]:
  machine = record["machine"]
  lines = [
      f"## {record['title']} (`{name}`)",
      "",
      f"Measured {record['date']} in {record['wall_seconds']:.0f} s on "
      f"{machine['cpu_model']} ({machine['cpu_cores']} cores), "
      f"{machine['device_count']} x {machine['device_kind']} "
      f"({machine['backend']}), JAX {machine['jax']}.",
      f"Command: `{record['command']}`",
      "",
  ]
  if "error" in record:
    return lines + ["**The section failed:**", "", "```",
                    record["error"].rstrip(), "```", ""]
  goals = record.get("goals", [])
  if goals:
    goal_rows = [{"goal": g["goal"],
                  "target": format_value(g["target"]) + (
                      " " + g["unit"] if g.get("unit") else ""),
                  "measured": format_value(g.get("value")) + (
                      " " + g["unit"] if g.get("unit") and
                      g.get("value") is not None else ""),
                  "status": g["status"],
                  "note": g.get("note", "")} for g in goals]
    lines += ["Goals:", ""] + markdown_table(goal_rows) + [""]
  lines += markdown_table(record.get("rows", [])) + [""]
  for table in record.get("tables", []):
    lines += [f"**{table['title']}**", ""] + markdown_table(table["rows"]) + [""]
  for note in record.get("notes", []):
    lines.append(f"- {note}")
  if record.get("notes"):
    lines.append("")
  return lines


def render_page(record: dict[str, Any], device_mode: bool) -> str:
  heading = ("# Benchmarks on an accelerator" if device_mode
             else "# Benchmarks on CPU")
  lines = [
      heading,
      "",
      "Written by `benchmarks/run.py`; the JSON beside this page holds the "
      "same numbers. Times are medians over repeated calls after a warm-up "
      "call (a row whose minimum equals its maximum was timed once); speed ratios "
      "are taken within one run. Each section measures the matmul rate it "
      "compares with when it runs, so the rates differ a little between sections. "
      "Threefry is lowered unrolled on CPU, as in the entry points "
      "(`biasdiff.rng.use_unrolled_threefry_on_cpu`).",
      "",
  ]
  for name in record["order"]:
    lines += render_section(name, record["sections"][name])
  missing = record.get("missing", [])
  if missing:
    lines += ["Sections listed in benchmarks/run.py with no results yet: "
              + ", ".join(f"`{m}`" for m in missing) + ".", ""]
  return "\n".join(lines)


def _utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")


def run_section(module: Any, device_mode: bool, command: str) -> dict[str, Any]:
  start = time.perf_counter()
  record: dict[str, Any] = {"title": module.TITLE, "date": _utc_now(),
                            "command": command,
                            "machine": common.machine_info()}
  try:
    result = module.run(device_mode)
  except Exception:  # pylint: disable=broad-except
    # One failing section must not lose the others; the page shows the error.
    logging.exception("Benchmark section %s failed", module.NAME)
    record["error"] = traceback.format_exc()
  else:
    for goal in result.get("goals", []):
      goal["status"] = goal_status(goal)
    record.update({key: result[key] for key in ("rows", "tables", "goals",
                                                  "notes") if key in result})
  record["wall_seconds"] = time.perf_counter() - start
  return record


def output_paths(output: str, device_mode: bool) -> tuple[pathlib.Path,
                                                          pathlib.Path]:
  page = pathlib.Path(output)
  if device_mode:
    page = page.with_name(page.stem + DEVICE_SUFFIX + page.suffix)
  return page, page.with_suffix(".json")


def main(argv: Optional[list[str]] = None) -> int:
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(message)s")
  args = parse_args(argv)
  from biasdiff import rng  # pylint: disable=g-import-not-at-top
  rng.use_unrolled_threefry_on_cpu()  # as the entry points in experiments/ do
  page_path, json_path = output_paths(args.output, args.device)
  command = shlex.join(["python", "benchmarks/run.py"] +
                       (sys.argv[1:] if argv is None else argv))

  record: dict[str, Any] = {"sections": {}}
  if json_path.exists():
    record = json.loads(json_path.read_text(encoding="utf-8"))

  selected = SECTIONS
  if args.only:
    unknown = set(args.only) - {section_name(m) for m in SECTIONS} - set(SECTIONS)
    if unknown:
      raise SystemExit(
          f"Unknown section(s) {sorted(unknown)}; available: "
          f"{[section_name(m) for m in SECTIONS]}.")
    selected = [m for m in SECTIONS
                if m in args.only or section_name(m) in args.only]

  failed = []
  for module_name in selected:
    try:
      module = load_section(module_name)
    except Exception:  # pylint: disable=broad-except
      # A broken module must not stop the other sections.
      logging.exception("Importing benchmarks.%s failed", module_name)
      name = section_name(module_name)
      failed.append(name)
      record["sections"][name] = {
          "title": f"benchmarks/{module_name}.py", "command": command,
          "date": _utc_now(), "machine": common.machine_info(),
          "wall_seconds": 0.0, "error": traceback.format_exc()}
      continue
    if module is None:
      logging.info("Skipping %s: benchmarks/%s.py does not exist yet",
                   section_name(module_name), module_name)
      continue
    logging.info("Running section %s", module.NAME)
    section = run_section(module, args.device, command)
    record["sections"][module.NAME] = section
    if "error" in section:
      failed.append(module.NAME)
    logging.info("Section %s took %.1f s", module.NAME, section["wall_seconds"])

  # Page order follows SECTIONS; sections recorded earlier are kept.
  listed = [section_name(m) for m in SECTIONS]
  record["order"] = ([n for n in listed if n in record["sections"]]
                     + [n for n in record["sections"] if n not in listed])
  record["missing"] = [n for n in listed if n not in record["sections"]]

  page_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(record, indent=1, default=float) + "\n",
                       encoding="utf-8")
  page_path.write_text(render_page(record, args.device), encoding="utf-8")
  logging.info("Wrote %s and %s", page_path, json_path)
  if failed:
    logging.error("Sections failed: %s", ", ".join(failed))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
