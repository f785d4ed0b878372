r"""Run the real-image pipeline: paired U-Nets, their evaluation, summary and figures.

  python experiments/images.py --config=configs/images.py:quick \
      --workdir=runs/images_quick

Rerunning the same command reuses every finished stage and resumes an
interrupted one. summary.json and figures/ are written to --output_dir
(default: --workdir).
"""

import json
import logging

from absl import app
from absl import flags
from ml_collections import config_flags

import jax

from biasdiff import cli
from biasdiff.pipeline import images

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/images.py:quick.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; an existing run there is resumed.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where summary.json and figures/ are copied; default --workdir.")
flags.mark_flags_as_required(["config", "workdir"])
_OVERRIDE_HINT = ("experiments/images.py takes the fields of configs/images.py directly under "
                  "--config. (for example --config.eval.num_samples=64).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every checkpoint file operation at INFO through absl's logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.info("Local devices: %s", jax.local_devices())
  config = _CONFIG.value
  # Checked before the config is logged, so that a config of another file fails at once.
  images.check_config(config)
  cli.lock_workdir(_WORKDIR.value)
  logging.info("Config:\n%s", config)
  cli.use_compilation_cache(_WORKDIR.value)
  summary = images.run(config, _WORKDIR.value, output_dir=_OUTPUT_DIR.value)
  logging.info("Ordering of the minima: %s", json.dumps(summary["ordering"]))


if __name__ == "__main__":
  cli.run(main, override_hint=_OVERRIDE_HINT)
