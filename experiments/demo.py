r"""The main job on the embedded default: train one pair on disjoint tree data and measure it.

  python experiments/demo.py --workdir=runs/demo

Trains two transformers on disjoint blocks of depth-3 tree sequences (the
`demo` profile of configs/reproduce.py), measures every checkpoint, and writes
a short report and the main figures to <workdir>/figures. Rerunning reuses
every finished stage.
"""

import logging
import os
import sys

from absl import app
from absl import flags

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPOSITORY)
from configs import hierarchical as hierarchical_configs  # pylint: disable=g-import-not-at-top
from configs import reproduce as reproduce_configs  # pylint: disable=g-import-not-at-top
from biasdiff import cli  # pylint: disable=g-import-not-at-top
from biasdiff import io  # pylint: disable=g-import-not-at-top
from biasdiff.figures import hierarchical as figures  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import hierarchical as pipeline  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import stages  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Directory of the run's outputs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = reproduce_configs.get_config("demo")
  cli.lock_workdir(_WORKDIR.value)
  stages.claim_workdir(_WORKDIR.value, config)
  cli.use_compilation_cache(_WORKDIR.value)
  summaries = pipeline.run(config, _WORKDIR.value, hierarchical_configs.get_config)
  output_dir = os.path.join(_WORKDIR.value, "figures")
  pipeline.write_summaries(summaries, output_dir)
  written = []
  for label, summary in summaries.items():
    written += figures.save(*figures.plot_fig1b(summary), output_dir, f"fig1b_{label}")
    written += figures.save(*figures.plot_fig4a(summary), output_dir, f"fig4a_{label}")
    report_path = os.path.join(output_dir, f"report_{label}.md")
    text = pipeline.report(summary)
    io.write_file_atomically(report_path, lambda f, t=text: f.write(t.encode()))
    print(text)
    print(f"Report: {report_path}")
  print("Figures:", *[p for p in written if p.endswith(".png")], sep="\n  ")


if __name__ == "__main__":
  cli.run(main)
