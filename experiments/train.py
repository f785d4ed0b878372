r"""Train a model zoo of the hierarchical setting.

  python experiments/train.py --config=configs/hierarchical.py:quick \
      --workdir=runs/hierarchical_quick

Rerunning the same command resumes from the newest checkpoint in --workdir.
On several hosts, start one process per host with --num_processes,
--process_id and --coordinator_address (or --distributed_auto on a cluster
that JAX detects).
"""

import logging

from absl import app
from absl import flags
from ml_collections import config_flags

import jax

from biasdiff import cli
from biasdiff import parallel
from biasdiff.training import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/hierarchical.py:quick.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; an existing run there is resumed.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes; unset for one.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
    "distributed_auto", False, "Read the process layout from the cluster environment.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every checkpoint file operation at INFO through absl's logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto_detect=_DISTRIBUTED_AUTO.value)
  logging.info("Process %d of %d; local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  config = _CONFIG.value
  cli.lock_workdir(_WORKDIR.value)
  if parallel.is_main_process():
    logging.info("Config:\n%s", config)
  cli.use_compilation_cache(_WORKDIR.value)
  result = loop.train(config, _WORKDIR.value)
  logging.info("Finished at step %d; grid checkpoints in %s/grid.", result.step, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
