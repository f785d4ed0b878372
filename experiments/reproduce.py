r"""Reproduce the figures of Biased Generalization in Diffusion Models (ICML 2026).

Train, measure, summarise and plot:

  python experiments/reproduce.py --config=configs/reproduce.py:quick --workdir=runs/quick

Every stage is cached by content under --workdir, so rerunning after an
interruption, or with one changed setting, redoes only what changed. Summaries
and figures go to <workdir>/figures (or --output_dir).
"""

import logging
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPOSITORY)
from configs import hierarchical as hierarchical_configs  # pylint: disable=g-import-not-at-top
from biasdiff import parallel  # pylint: disable=g-import-not-at-top
from biasdiff.figures import hierarchical as hierarchical_figures  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import hierarchical as hierarchical_pipeline  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import stages  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPOSITORY, "configs", "reproduce.py:quick"),
    "Pipeline profile, e.g. configs/reproduce.py:quick.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of every stage's outputs.",
                               required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where summaries and figures go; default <workdir>/figures.")
_PARTS = flags.DEFINE_list("parts", ["hierarchical"], "Pipelines to run: hierarchical.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  parallel.initialize_distributed()
  logging.info("Devices: %s", jax.devices())
  config = _CONFIG.value
  output_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "figures")
  for part in _PARTS.value:
    if part != "hierarchical":
      raise app.UsageError(f"Unknown part {part!r}; use hierarchical.")
  stages.claim_workdir(_WORKDIR.value, config, parallel.is_main_process())
  summaries = hierarchical_pipeline.run(config, _WORKDIR.value, hierarchical_configs.get_config)
  if parallel.is_main_process():
    paths = hierarchical_pipeline.write_summaries(summaries, output_dir)
    paths += hierarchical_figures.write_all(summaries, output_dir)
    logging.info("Wrote %d files to %s", len(paths), output_dir)


if __name__ == "__main__":
  app.run(main)
