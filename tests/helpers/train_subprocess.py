"""Train the tiny sequence task in a fresh process and save the final parameters.

Used by tests that need a device count or a process layout that the test
process cannot have: forced CPU devices, two jax.distributed processes, or a
run killed with SIGKILL. XLA_FLAGS must be set before jax is imported, so the
device count is applied here before any other import.

Writes <out> as an .npz with, for each model-axis size s, the arrays
"s{size}/params/<path>" and "s{size}/ema/<path>" and the per-model losses
"s{size}/loss" of every step (process 0 only).
"""

import argparse
import os
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True, help="parent of the run directories")
  parser.add_argument("--out", default="", help=".npz file for the results; empty skips")
  parser.add_argument("--devices", type=int, default=1, help="forced CPU devices per process")
  parser.add_argument("--model-axis-sizes", default="0",
                      help="comma-separated parallel.model_axis_size values, one run each")
  parser.add_argument("--num-epochs", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--steps-per-dispatch", type=int, default=1)
  parser.add_argument("--rolling-every-steps", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", default="", help="host:port of process 0")
  return parser.parse_args()


def main():
  args = parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, os.path.dirname(here))  # tests/
  sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # repository root

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from biasdiff import parallel
  from biasdiff.training import loop
  from helpers import tiny_training

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  parallel.initialize_distributed(
      args.coordinator or None, args.num_processes, args.process_id)

  results = {}
  task = tiny_training.sequence_task()
  for size in (int(s) for s in args.model_axis_sizes.split(",")):
    config = tiny_training.tiny_config(
        num_epochs=args.num_epochs, batch_size=args.batch_size,
        steps_per_dispatch=args.steps_per_dispatch)
    with config.unlocked():
      config.parallel.model_axis_size = size
      config.checkpoint.rolling_every_steps = args.rolling_every_steps
    workdir = os.path.join(args.workdir, f"s{size}")
    result = loop.fit(config, workdir, task,
                      compiler_options=tiny_training.COMPILER_OPTIONS)
    trees = {"params": result.state.params, "ema": result.state.ema_params}
    for name, tree in trees.items():
      tree = multihost_utils.process_allgather(tree, tiled=True)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        results[f"s{size}/{name}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    if parallel.is_main_process():
      with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
        import json
        lines = [json.loads(line) for line in f]
      results[f"s{size}/loss"] = np.array([line["loss"] for line in lines])
  if args.out and parallel.is_main_process():
    np.savez(args.out, **results)


if __name__ == "__main__":
  main()
