r"""Reproduce the figures of Biased Generalization in Diffusion Models (ICML 2026).

Train, measure, summarise and plot:

  python experiments/reproduce.py --config=configs/reproduce.py:quick --workdir=runs/quick

Every stage is cached by content under --workdir, so rerunning after an
interruption, or with one changed setting, redoes only what changed. The
tree-data summaries and figures go to <workdir>/figures (or --output_dir),
the image part's summary.json and figures/ to its images/ subdirectory.
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
from biasdiff import cli  # pylint: disable=g-import-not-at-top
from biasdiff import parallel  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import reproduce  # pylint: disable=g-import-not-at-top
from biasdiff.pipeline import stages  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPOSITORY, "configs", "reproduce.py:quick"),
    "Pipeline profile, e.g. configs/reproduce.py:quick.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of every stage's outputs.",
                               required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where summaries and figures go; default <workdir>/figures.")
_PARTS = flags.DEFINE_list(
    "parts", None, "Pipelines to run, from hierarchical and images; default every part of the "
    "profile (the demo profile has no images part).")
_OVERRIDE_HINT = ("experiments/reproduce.py takes the image fields under --config.images. (for "
                  "example --config.images.eval.num_samples=64) and the tree-data fields under "
                  "--config.hierarchical.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  parallel.initialize_distributed()
  logging.info("Devices: %s", jax.devices())
  config = _CONFIG.value
  reproduce.check_profile(config)
  output_dir = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "figures")
  parts = _PARTS.value or reproduce.profile_parts(config)
  reproduce.check_parts(config, parts)
  cli.lock_workdir(_WORKDIR.value)
  stages.claim_workdir(_WORKDIR.value, config, parallel.is_main_process())
  cli.use_compilation_cache(_WORKDIR.value)
  reproduce.run(config, _WORKDIR.value, output_dir, parts, hierarchical_configs.get_config)
  logging.info("Parts %s done; summaries and figures are in %s.", ", ".join(parts), output_dir)


if __name__ == "__main__":
  cli.run(main, override_hint=_OVERRIDE_HINT)
