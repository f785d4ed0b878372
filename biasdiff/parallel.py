"""Device mesh, shardings and multi-host helpers for training a stack of models.

Every trainer array has a leading `models` axis. The mesh has two axes:

- "model": the stacked models are split across it, so each device keeps whole
  models and never needs another device's parameters;
- "data": each model's batch is split across it, and the partitioner inserts
  the all-reduce of the gradients over this axis.

State is sharded `P("model")` and batches `P(None, "model", "data")` (a leading
steps axis when several optimizer steps run in one dispatch). This is data
parallelism written as `jax.jit` with explicit shardings; nothing here uses
`jax.pmap`.

On several hosts every process runs the same program. Each process builds only
the part of a global array that its own devices hold and hands it to
`jax.make_array_from_process_local_data`; only process 0 writes files and logs.
"""

import logging
import math
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

MODEL_AXIS = "model"
DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
    *,
    auto_detect: bool = False,
) -> None:
  """Start the multi-process JAX runtime, or do nothing for a single process.

  Args:
    coordinator_address: "host:port" of process 0's coordination service.
    num_processes: total number of processes; None or 1 means single-process.
    process_id: index of this process in [0, num_processes).
    local_device_ids: restrict this process to these local devices.
    auto_detect: call `jax.distributed.initialize()` without arguments so that
      JAX reads the cluster layout from the environment (SLURM, Cloud TPU,
      Open MPI). The explicit arguments must then be left unset.

  Must be called before any other JAX call touches a device.
  """
  if auto_detect:
    if coordinator_address or num_processes or process_id is not None:
      raise ValueError(
          "auto_detect=True reads the cluster layout from the environment; "
          "leave coordinator_address, num_processes and process_id unset.")
    jax.distributed.initialize()
  elif num_processes is None or num_processes == 1:
    logger.info("Single process: jax.distributed is not initialised.")
    return
  else:
    if not coordinator_address or process_id is None:
      raise ValueError(
          f"num_processes={num_processes} needs coordinator_address "
          f"(got {coordinator_address!r}) and process_id (got {process_id!r}).")
    if not 0 <= process_id < num_processes:
      raise ValueError(
          f"process_id={process_id} is outside [0, {num_processes}).")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids)
  logger.info("Process %d of %d, %d local and %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  """Return whether this process is the one that writes files and logs."""
  return jax.process_index() == 0


def choose_mesh_shape(num_models: int, num_devices: int,
                      model_axis_size: int = 0) -> tuple[int, int]:
  """Return the (model, data) mesh shape for `num_models` on `num_devices`.

  Splitting models across devices costs no communication, so by default the
  model axis takes as many devices as divide both counts,
  gcd(num_models, num_devices), and the rest go to the data axis.

  Args:
    num_models: size of the stacked models axis.
    num_devices: number of devices in the mesh.
    model_axis_size: devices on the model axis; 0 picks the default. It must
      divide both `num_models` and `num_devices`.
  """
  if num_models < 1 or num_devices < 1:
    raise ValueError(
        f"num_models={num_models} and num_devices={num_devices} must be >= 1.")
  if model_axis_size == 0:
    model_axis_size = math.gcd(num_models, num_devices)
  if model_axis_size < 1 or num_models % model_axis_size:
    raise ValueError(
        f"model_axis_size={model_axis_size} must be >= 1 and divide the "
        f"number of models ({num_models}); use 0 to choose automatically.")
  if num_devices % model_axis_size:
    raise ValueError(
        f"model_axis_size={model_axis_size} must divide the number of devices "
        f"({num_devices}); use 0 to choose automatically.")
  return model_axis_size, num_devices // model_axis_size


def make_mesh(num_models: int, model_axis_size: int = 0,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Build the ("model", "data") mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = choose_mesh_shape(num_models, len(devices), model_axis_size)
  # Auto axes: the partitioner propagates shardings from the jit boundaries.
  return jax.make_mesh(shape, (MODEL_AXIS, DATA_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def model_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays with a leading models axis: [models, ...]."""
  return NamedSharding(mesh, P(MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of stacked batches: [steps, models, batch, ...]."""
  return NamedSharding(mesh, P(None, MODEL_AXIS, DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays replicated in full on every device."""
  return NamedSharding(mesh, P())


def process_local_box(sharding: jax.sharding.Sharding,
                      global_shape: Sequence[int]) -> tuple[slice, ...]:
  """Return the box of the global array that this process's devices hold.

  The devices of one process must together hold a box (a product of index
  ranges), which is true of the meshes that `make_mesh` builds. Slices have
  explicit start and stop.
  """
  global_shape = tuple(global_shape)
  index_map = sharding.addressable_devices_indices_map(global_shape)
  box = []
  for dim, size in enumerate(global_shape):
    ranges = [index[dim].indices(size)[:2] for index in index_map.values()]
    box.append(slice(min(r[0] for r in ranges), max(r[1] for r in ranges)))
  volume = math.prod(s.stop - s.start for s in box)
  covered = set()
  for index in index_map.values():
    covered.add(tuple(index[d].indices(n)[:2] for d, n in enumerate(global_shape)))
  covered_volume = sum(math.prod(b - a for a, b in c) for c in covered)
  if covered_volume != volume:
    raise ValueError(
        f"The devices of process {jax.process_index()} do not hold a box of "
        f"the global array {global_shape} under {sharding}; build the mesh "
        "with biasdiff.parallel.make_mesh.")
  return tuple(box)


def make_global_array(
    sharding: jax.sharding.Sharding,
    global_shape: Sequence[int],
    build_local: Callable[[tuple[slice, ...]], np.ndarray],
) -> jax.Array:
  """Assemble a global array from the part each process builds for itself.

  Args:
    sharding: target sharding of the global array.
    global_shape: shape of the global array.
    build_local: called once with this process's box (see `process_local_box`)
      and returns the array content inside that box.
  """
  box = process_local_box(sharding, global_shape)
  local = np.asarray(build_local(box))
  expected = tuple(s.stop - s.start for s in box)
  if local.shape != expected:
    raise ValueError(
        f"build_local returned shape {local.shape} for box {box}; expected "
        f"{expected}.")
  return jax.make_array_from_process_local_data(sharding, local,
                                                tuple(global_shape))


def put_global(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Place a host array, present in full on every process, with `sharding`."""
  array = np.asarray(array)
  return make_global_array(sharding, array.shape, lambda box: array[box])
