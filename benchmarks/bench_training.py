"""Benchmarks of the paired training step: one vmapped step vs two sequential steps.

For each network the same optimizer step is compiled twice: once for a stack of
two models (the pair step, one `jax.vmap` over the model axis) and once for a
single model, run twice in a row. Both are timed in the same run, so their ratio
is comparable on a shared machine. FLOPs come from XLA's cost analysis of the
compiled step, and the achieved rate is reported as a fraction of the measured
matmul peak of this machine.

Run alone, `python benchmarks/bench_training.py --devices 2` prints the JSON of
one measurement on 2 forced CPU devices; `run` uses that to add multi-device rows.
"""

import argparse
import functools
import json
import os
import subprocess
import sys

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAME = "training"
TITLE = "Training: pair step vs two sequential single-model steps"


def _networks(device_mode: bool):
  from biasdiff import diffusion
  from biasdiff.models import Transformer, digits_unet
  from biasdiff.training import objectives
  sequences = objectives.SequenceX0Objective(diffusion.sequence_schedule(500), 6)
  images = objectives.ImageEpsObjective(diffusion.ddpm_schedule(1000))
  paper_batch = 512 if device_mode else 64
  # Unrolled layers on every backend: XLA's cost analysis counts a loop body once, so a
  # rolled layer loop would under-count the FLOPs by the number of layers.
  transformer = functools.partial(Transformer, unroll_layers=True)
  return [
      ("tiny transformer (2 layers, width 64), batch 256",
       transformer(6, 16, d_model=64, num_layers=2, num_heads=2, ffn_dim=128), sequences,
       (256, 16), "tokens"),
      ("quick transformer (3 layers, width 96, depth-3 trees), batch 256",
       transformer(6, 8, d_model=96, num_layers=3, num_heads=4, ffn_dim=192), sequences,
       (256, 8), "tokens"),
      (f"paper transformer (8 layers, width 512), batch {paper_batch}",
       transformer(6, 16), sequences, (paper_batch, 16), "tokens"),
      ("quick U-Net (digits, 8x8), batch 128", digits_unet(), images, (128, 8, 8, 1), "images"),
  ]


def _compiled_step(model, objective, num_models: int, batch_shape, kind: str):
  """Return (step, state, inputs, flops) of a one-step dispatch for a model stack."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from biasdiff import parallel
  from biasdiff.models import init_params
  from biasdiff.training import state as state_lib
  from biasdiff.training import step as step_lib

  mesh = parallel.make_mesh(num_models)
  optimizer = state_lib.make_optimizer(0.9, 0.999, 1e-8)
  if kind == "tokens":
    example = batch_shape + (6,)
    x0 = np.random.default_rng(0).integers(0, 6, (1, num_models) + batch_shape).astype(np.uint8)
  else:
    example = batch_shape
    x0 = np.random.default_rng(0).random((1, num_models) + batch_shape, dtype=np.float32) - 0.5
  init = state_lib.make_init_fn(lambda key: init_params(model, key, (1,) + example[1:]),
                                optimizer, use_ema=False)
  abstract = state_lib.abstract_state(init, num_models, mesh)
  models = [state_lib.ModelSpec(b, 0, b, b) for b in range(num_models)]
  state = state_lib.create_state(state_lib.compile_init(init, abstract), models, mesh)
  model_step = step_lib.make_model_step(step_lib.flax_apply_fn(model), objective, optimizer, 0.0)
  multi = step_lib.make_multi_step(step_lib.make_train_step(model_step))
  step = step_lib.compile_step(multi, state_lib.state_shardings(abstract, mesh), mesh)
  seeds = parallel.put_global(np.arange(num_models, dtype=np.int32), parallel.model_sharding(mesh))
  batch = parallel.batch_sharding(mesh)
  inputs = (seeds, jax.device_put(x0, batch),
            jax.device_put(np.ones((1, num_models, batch_shape[0]), bool), batch),
            jnp.full((1,), 1e-3, jnp.float32))
  cost = step.lower(state, *inputs).compile().cost_analysis()
  flops = float(cost.get("flops", float("nan"))) if isinstance(cost, dict) else float("nan")
  return step, state, inputs, flops


def _time_steps(step, state, inputs, repeats: int):
  """Median seconds per call of `step`; returns it with the final (donated-into) state."""
  import time
  import jax
  import numpy as np
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, *inputs)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), state


def measure(device_mode: bool, repeats: int) -> list:
  """Pair vs sequential rows for every network on the current devices."""
  import jax
  rows = []
  for name, model, objective, batch_shape, kind in _networks(device_mode):
    pair_step, pair_state, pair_inputs, pair_flops = _compiled_step(
        model, objective, 2, batch_shape, kind)
    single_step, single_state, single_inputs, _ = _compiled_step(
        model, objective, 1, batch_shape, kind)
    _, pair_state = _time_steps(pair_step, pair_state, pair_inputs, 1)  # Warm-up.
    _, single_state = _time_steps(single_step, single_state, single_inputs, 1)
    # Interleave rounds so that load changes on a shared machine hit both alike.
    pair_times, sequential_times = [], []
    for _ in range(3):
      seconds, pair_state = _time_steps(pair_step, pair_state, pair_inputs, repeats)
      pair_times.append(seconds)
      seconds, single_state = _time_steps(single_step, single_state, single_inputs, repeats)
      sequential_times.append(2 * seconds)
    pair_seconds = float(sorted(pair_times)[1])
    sequential_seconds = float(sorted(sequential_times)[1])
    rows.append({
        "network": name, "devices": jax.device_count(),
        "pair_step_s": pair_seconds, "two_sequential_steps_s": sequential_seconds,
        "speedup": sequential_seconds / pair_seconds,
        "model_steps_per_s": 2 / pair_seconds,
        "pair_step_gflop": pair_flops / 1e9,
        "achieved_gflop_per_s": pair_flops / pair_seconds / 1e9,
    })
  return rows


def _subprocess_rows(num_devices: int, device_mode: bool, repeats: int) -> list:
  """Run `measure` with `num_devices` forced CPU devices in a fresh process."""
  environment = dict(os.environ)
  environment["XLA_FLAGS"] = (environment.get("XLA_FLAGS", "") +
                              f" --xla_force_host_platform_device_count={num_devices}")
  command = [sys.executable, os.path.abspath(__file__), "--devices", str(num_devices),
             "--repeats", str(repeats)] + (["--device_mode"] if device_mode else [])
  output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True,
                          cwd=_REPOSITORY)
  return json.loads(output.stdout.strip().splitlines()[-1])


def run(device_mode: bool = False) -> dict:
  import jax
  from benchmarks import common
  repeats = 5 if device_mode else 3
  rows = measure(device_mode, repeats)
  notes = []
  if jax.default_backend() == "cpu":
    rows += _subprocess_rows(2, device_mode, repeats)
    notes.append("The 2-device rows split each batch over 2 forced CPU devices of the same "
                 "2 cores (`--xla_force_host_platform_device_count=2`), so they test the "
                 "sharded program, not extra hardware.")
  peak = common.measure_matmul_gflops()
  for row in rows:
    row["fraction_of_matmul_peak"] = row["achieved_gflop_per_s"] / peak
  notes.append(f"Measured fp32 matmul peak of this machine: {peak:.1f} GFLOP/s.")
  if not device_mode:
    notes.append("On CPU the paper transformer runs at batch 64 to keep the benchmark short; "
                 "`--device` uses the paper's batch of 512.")
  single_device = [r for r in rows if r["devices"] == rows[0]["devices"]]
  tiny = single_device[0]
  quick = single_device[1]
  goals = [
      {"goal": "pair step at least as fast as two sequential steps (quick transformer)",
       "value": quick["speedup"], "target": 1.0, "higher_is_better": True, "unit": "x"},
      {"goal": "tiny transformer (2 layers, width 64, batch 256): >= 56 model-steps/s",
       "value": tiny["model_steps_per_s"], "target": 56.0, "higher_is_better": True,
       "unit": "steps/s"},
  ]
  if device_mode:
    goals.append({"goal": "pair step >= 1.6x two sequential steps on an accelerator (quick)",
                  "value": quick["speedup"], "target": 1.6, "higher_is_better": True,
                  "unit": "x"})
  return {"rows": rows, "goals": goals, "notes": notes}


def _main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=1, help="expected device count")
  parser.add_argument("--repeats", type=int, default=3, help="timed steps per round")
  parser.add_argument("--device_mode", action="store_true", help="accelerator sizes")
  args = parser.parse_args()
  sys.path.insert(0, _REPOSITORY)
  import jax
  from biasdiff import rng
  rng.use_unrolled_threefry_on_cpu()
  if jax.device_count() != args.devices:
    raise SystemExit(f"expected {args.devices} devices, found {jax.device_count()}; set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count before starting")
  print(json.dumps(measure(args.device_mode, args.repeats)))


if __name__ == "__main__":
  _main()
