"""Tests of the device mesh and of training across devices and processes.

Runs with several CPU devices or two jax.distributed processes happen in
subprocesses (tests/helpers/train_subprocess.py), because the device count is
fixed when jax starts. Every run trains the same tiny pair for 6 steps and is
compared with a 1-device run.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from biasdiff import parallel

HELPER = os.path.join(os.path.dirname(__file__), "helpers", "train_subprocess.py")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SECONDS = 300


@pytest.mark.parametrize("num_models, num_devices, requested, expected", [
    (2, 1, 0, (1, 1)),
    (2, 4, 0, (2, 2)),
    (2, 4, 1, (1, 4)),
    (28, 8, 0, (4, 2)),
    (29, 8, 0, (1, 8)),
    (28, 8, 2, (2, 4)),
])
def test_choose_mesh_shape(num_models, num_devices, requested, expected):
  assert parallel.choose_mesh_shape(num_models, num_devices, requested) == expected


@pytest.mark.parametrize("num_models, num_devices, requested, message", [
    (3, 4, 2, "divide the number of models"),
    (4, 6, 4, "divide the number of devices"),
])
def test_choose_mesh_shape_rejects_bad_model_axis(num_models, num_devices, requested, message):
  with pytest.raises(ValueError, match=message):
    parallel.choose_mesh_shape(num_models, num_devices, requested)


def test_single_process_box_is_whole_array():
  mesh = parallel.make_mesh(1)
  sharding = parallel.batch_sharding(mesh)
  box = parallel.process_local_box(sharding, (3, 1, 8, 5))
  assert box == (slice(0, 3), slice(0, 1), slice(0, 8), slice(0, 5))
  array = np.arange(3 * 8 * 5).reshape(3, 1, 8, 5)
  global_array = parallel.put_global(array, sharding)
  np.testing.assert_array_equal(np.asarray(global_array), array)
  with pytest.raises(ValueError, match="expected"):
    parallel.make_global_array(sharding, (3, 1, 8, 5), lambda box: array[:, :, :4])


def test_initialize_distributed_single_process_is_noop():
  parallel.initialize_distributed()
  parallel.initialize_distributed(num_processes=1)
  assert jax.process_count() == 1
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("127.0.0.1:1", num_processes=2)


def _run_helper(workdir, out, *args, env_extra=None):
  command = [sys.executable, HELPER, "--workdir", str(workdir), "--out", str(out),
             "--batch-size", "8", *args]
  env = dict(os.environ, **(env_extra or {}))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process):
  output, _ = process.communicate(timeout=TIMEOUT_SECONDS)
  assert process.returncode == 0, output[-4000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_device_results(tmp_path_factory):
  """Parameters and losses of the 1-device run: keys "params/...", "ema/...", "loss"."""
  directory = tmp_path_factory.mktemp("one_device")
  out = directory / "results.npz"
  _finish(_run_helper(directory / "runs", out, "--devices", "1", "--model-axis-sizes", "0"))
  with np.load(out) as results:
    return {name[len("s0/"):]: results[name] for name in results.files}


def _assert_matches_one_device(results, size, reference):
  for name, expected in reference.items():
    np.testing.assert_allclose(results[f"s{size}/{name}"], expected, rtol=1e-5, atol=1e-6,
                               err_msg=f"model axis {size}: {name}")


def test_four_devices_match_one_device(tmp_path, one_device_results):
  out = tmp_path / "results.npz"
  # Model axis 1 x data axis 4, and 2 x 2 (the default for two models).
  _finish(_run_helper(tmp_path / "runs", out, "--devices", "4",
                      "--model-axis-sizes", "1,2"))
  with np.load(out) as results:
    for size in (1, 2):
      _assert_matches_one_device(results, size, one_device_results)
  # The per-model loss of a batch split over 4 devices is the global-batch mean,
  # so it equals the 1-device loss at every step.
  assert one_device_results["loss"].shape == (6, 2)


def test_two_processes_match_one_process(tmp_path, one_device_results):
  out = tmp_path / "results.npz"
  coordinator = f"127.0.0.1:{_free_port()}"
  processes = [
      _run_helper(tmp_path / "runs", out, "--devices", "2", "--model-axis-sizes", "1,2",
                  "--num-processes", "2", "--process-id", str(i),
                  "--coordinator", coordinator)
      for i in range(2)
  ]
  try:
    for process in processes:
      _finish(process)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  with np.load(out) as results:
    # Model axis 1: each model's batch is split over both processes, so the
    # gradient all-reduce crosses processes. Model axis 2: one model per process.
    for size in (1, 2):
      _assert_matches_one_device(results, size, one_device_results)
