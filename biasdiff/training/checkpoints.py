"""Checkpoint grids, orbax checkpoint storage and the run directory's records.

A run directory holds:

  run.json           config, model list, data fingerprint, steps per epoch and
                     the planned grid; a later start must match it
  checkpoints.json   the grid checkpoints written so far (the realised list)
  metrics.jsonl      one JSON line per logged step
  grid/<epoch>/      permanent checkpoints after <epoch> completed epochs
  rolling/<step>/    recent checkpoints for resuming after preemption

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so an interrupted write never looks like a checkpoint. Nothing is
pickled: arrays go through orbax and records are JSON.
"""

import json
import logging
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from biasdiff.training.state import TrainState

GRID = "grid"
ROLLING = "rolling"
# Values of config.checkpoint.grid, see `epoch_grid`.
GRID_KINDS = ("log", "linear", "none")
RUN_INFO_FILE = "run.json"
_ARRAY_ITEMS = ("params", "opt_state", "ema_params")
REALISED_GRID_FILE = "checkpoints.json"

# Config fields that may change between a run and its resumption: they change
# speed, logging or device layout, never the trained parameters.
RUNTIME_FIELDS = (
    "parallel",
    "train.steps_per_dispatch",
    "train.log_every_steps",
    "checkpoint.rolling_every_steps",
    "checkpoint.rolling_every_minutes",
    "checkpoint.rolling_to_keep",
    "checkpoint.async_save",
    "data.corpus_dir",
    # The bias monitor only measures; a monitor that stops training is recorded in
    # the run's metrics, and resuming with other monitor settings is allowed.
    "monitor",
)


def log_epoch_grid(num_epochs: int, min_epoch: int = 100,
                   num_points: int = 25) -> list[int]:
  """Return the log-spaced checkpoint epochs between min_epoch and num_epochs.

  In float64, E_i = floor(E_min (N / E_min)^(i / (K - 1))) for i = 0 ... K - 1,
  with the last forced to N and duplicates dropped. With E_min = 100 and K = 25
  this is floor(10^(2 + i (log10 N - 2) / 24)), for example 100, 124, 155, ...,
  16038, 20000 at N = 20,000.
  """
  if num_points < 2:
    raise ValueError(f"num_points={num_points} must be >= 2.")
  if not 1 <= min_epoch <= num_epochs:
    raise ValueError(
        f"grid_min_epoch={min_epoch} must lie in [1, num_epochs={num_epochs}]; "
        "lower grid_min_epoch for short runs.")
  i = np.arange(num_points, dtype=np.float64)
  epochs = np.floor(min_epoch * (num_epochs / min_epoch)**(i / (num_points - 1)))
  epochs = epochs.astype(np.int64)
  epochs[-1] = num_epochs
  return sorted(set(int(e) for e in epochs))


def linear_epoch_grid(num_epochs: int, first_epoch: int = 10,
                      num_points: int = 50) -> list[int]:
  """Return floor(linspace(first_epoch, N - 1, num_points)) plus the final epoch N.

  At N = 5,000 this is 10, 111, 213, ..., 4897, 4999 and then 5000, the grid
  of the image recipe with its final model.
  """
  if num_points < 2:
    raise ValueError(f"num_points={num_points} must be >= 2.")
  if not 1 <= first_epoch <= num_epochs - 1:
    raise ValueError(
        f"grid_min_epoch={first_epoch} must lie in [1, num_epochs - 1 = "
        f"{num_epochs - 1}].")
  epochs = np.floor(np.linspace(first_epoch, num_epochs - 1, num_points))
  return sorted(set(int(e) for e in epochs) | {int(num_epochs)})


def epoch_grid(checkpoint_config, num_epochs: int) -> list[int]:
  """Return the grid that `checkpoint_config.grid` names ("log", "linear", "none")."""
  kind = checkpoint_config.grid
  if kind == "log":
    return log_epoch_grid(num_epochs, checkpoint_config.grid_min_epoch,
                          checkpoint_config.grid_size)
  if kind == "linear":
    return linear_epoch_grid(num_epochs, checkpoint_config.grid_min_epoch,
                             checkpoint_config.grid_size)
  if kind == "none":
    return [int(num_epochs)]
  raise ValueError(
      f"Invalid checkpoint.grid={kind!r}. Set checkpoint.grid to one of "
      f"{GRID_KINDS}.")


# ---------------------------------------------------------------------------
# Run records.


def write_json_atomic(path: str, record: Any) -> None:
  """Write `record` as JSON to a temporary file and rename it to `path`."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(handle, "w") as f:
      json.dump(record, f, indent=1, sort_keys=True)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _flatten(record: Any, prefix: str = "") -> dict:
  if isinstance(record, Mapping):
    flat = {}
    for key, value in record.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: record}


def _is_runtime(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in RUNTIME_FIELDS)


def check_run_info(workdir: str, info: Mapping[str, Any]) -> None:
  """Compare `info` with the workdir's run.json, if the workdir has one.

  Args:
    workdir: the run directory.
    info: JSON record with keys "config", "models", "fingerprint" and any
      derived values. Fields listed in RUNTIME_FIELDS are not compared.

  Raises:
    ValueError: if the workdir was written by a different config, model list
      or data, naming the fields that differ.
  """
  path = os.path.join(workdir, RUN_INFO_FILE)
  if not os.path.exists(path):
    return
  stored = _flatten(json.loads(json.dumps(read_json(path))))
  current = _flatten(json.loads(json.dumps(info)))
  differences = []
  for field in sorted(set(stored) | set(current)):
    if field.startswith("config.") and _is_runtime(field[len("config."):]):
      continue
    if stored.get(field, "<missing>") != current.get(field, "<missing>"):
      differences.append(
          f"{field}: stored {stored.get(field, '<missing>')!r}, now "
          f"{current.get(field, '<missing>')!r}")
  if differences:
    shown = "; ".join(differences[:10])
    more = f" (and {len(differences) - 10} more)" if len(differences) > 10 else ""
    raise ValueError(
        f"The workdir {workdir!r} belongs to a different run: {shown}{more}. "
        "Use a new workdir, or restore the original config to resume.")


def write_run_info(workdir: str, info: Mapping[str, Any]) -> None:
  """Store `info` as the workdir's run.json unless the workdir has one."""
  path = os.path.join(workdir, RUN_INFO_FILE)
  if not os.path.exists(path):
    write_json_atomic(path, info)


def record_grid_checkpoint(workdir: str, epoch: int, step: int) -> None:
  """Append a written grid checkpoint to checkpoints.json (process 0 only)."""
  path = os.path.join(workdir, REALISED_GRID_FILE)
  record = read_json(path) if os.path.exists(path) else {"written": []}
  written = [w for w in record["written"] if w["epoch"] != epoch]
  written.append({"epoch": int(epoch), "step": int(step)})
  record["written"] = sorted(written, key=lambda w: w["epoch"])
  write_json_atomic(path, record)


def realised_grid(workdir: str) -> list[int]:
  """Return the epochs of the grid checkpoints written in `workdir`.

  An epoch is listed only once orbax has renamed its checkpoint into place,
  so an asynchronous save cut short by a crash does not appear.
  """
  path = os.path.join(workdir, REALISED_GRID_FILE)
  if not os.path.exists(path):
    return []
  epochs = [w["epoch"] for w in read_json(path)["written"]]
  return [e for e in epochs if os.path.isdir(os.path.join(workdir, GRID, str(e)))]


# ---------------------------------------------------------------------------
# Orbax storage.


class _DropReadOnlyNotice(logging.Filter):
  """Logging filter that drops orbax's warning for managers opened with read_only=True.

  Every checkpoint load here opens its manager read-only on purpose.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_NOTICE_FILTER = _DropReadOnlyNotice()


def _manager(directory: str, max_to_keep: Optional[int],
             async_save: bool, read_only: bool = False) -> ocp.CheckpointManager:
  # Orbax logs through absl's logger, and adding the same filter again is a no-op.
  logging.getLogger("absl").addFilter(_READ_ONLY_NOTICE_FILTER)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
      # A reader saves nothing; zero keeps orbax from warning that it changed this.
      save_interval_steps=0 if read_only else 1)
  # Naming the handlers lets a reader list and restore items without knowing
  # the saved tree in advance.
  handlers = {name: ocp.StandardCheckpointHandler() for name in _ARRAY_ITEMS}
  handlers["meta"] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


class CheckpointStore:
  """Permanent grid checkpoints (by epoch) and rolling ones (by step).

  Each checkpoint contains the orbax items "params", "opt_state", "ema_params"
  (when the EMA is on) and "meta", a JSON record with the step, epoch, config,
  model list and data fingerprint. All processes must call every method,
  because orbax writes each process's shards and synchronises the processes.
  """

  def __init__(self, workdir: str, rolling_to_keep: int = 2,
               async_save: bool = False):
    self.workdir = workdir
    self._managers = {
        GRID: _manager(os.path.join(workdir, GRID), None, async_save),
        ROLLING: _manager(os.path.join(workdir, ROLLING), rolling_to_keep,
                          async_save),
    }

  def save(self, kind: str, key: int, state: TrainState,
           meta: Mapping[str, Any]) -> None:
    """Save `state` as checkpoint `key` (epoch for grid, step for rolling)."""
    items = {
        "params": ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "meta": ocp.args.JsonSave(dict(meta)),
    }
    if state.ema_params is not None:
      items["ema_params"] = ocp.args.StandardSave(state.ema_params)
    self._managers[kind].save(int(key), args=ocp.args.Composite(**items),
                              force=True)

  def latest(self, steps_per_epoch: int) -> Optional[tuple[str, int, int]]:
    """Return (kind, key, step) of the newest complete checkpoint, or None."""
    candidates = []
    epoch = self._managers[GRID].latest_step()
    if epoch is not None:
      candidates.append((epoch * steps_per_epoch, GRID, epoch))
    step = self._managers[ROLLING].latest_step()
    if step is not None:
      candidates.append((step, ROLLING, step))
    if not candidates:
      return None
    step, kind, key = max(candidates)
    return kind, key, step

  def restore(self, kind: str, key: int,
              abstract: TrainState) -> tuple[TrainState, dict]:
    """Restore checkpoint `key` into the shapes and shardings of `abstract`."""
    items = {
        "params": ocp.args.StandardRestore(abstract.params),
        "opt_state": ocp.args.StandardRestore(abstract.opt_state),
        "meta": ocp.args.JsonRestore(),
    }
    if abstract.ema_params is not None:
      items["ema_params"] = ocp.args.StandardRestore(abstract.ema_params)
    restored = self._managers[kind].restore(int(key),
                                            args=ocp.args.Composite(**items))
    meta = restored["meta"]
    step = jax.device_put(jnp.int32(meta["step"]), abstract.step.sharding)
    state = TrainState(
        step=step, params=restored["params"], opt_state=restored["opt_state"],
        ema_params=restored["ema_params"] if abstract.ema_params is not None else None)
    return state, meta

  def wait(self) -> None:
    """Block until asynchronous saves have finished."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


def _host_target(metadata_tree: Any) -> Any:
  """Abstract arrays on this process's first device for saved array metadata."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
      metadata_tree)


def load_grid_checkpoint(workdir: str, epoch: int, *, use_ema: bool,
                         models: Optional[Sequence[int]] = None) -> tuple[Any, dict]:
  """Load the parameters of grid checkpoint `epoch` for analysis.

  Args:
    workdir: the run directory.
    epoch: a written grid epoch (see `realised_grid`).
    use_ema: load the EMA of the parameters instead of the raw parameters.
    models: indices into the run's model list; None loads every model.

  Returns:
    (params, meta): stacked parameters [models, ...] as numpy arrays and the
    checkpoint's JSON record, with "parameters" set to "ema" or "raw" and
    "models" restricted to the selection.
  """
  directory = os.path.join(workdir, GRID)
  manager = _manager(directory, None, async_save=False, read_only=True)
  try:
    if epoch not in manager.all_steps():
      raise ValueError(
          f"No grid checkpoint for epoch {epoch} in {directory!r}; written "
          f"epochs are {sorted(manager.all_steps())}.")
    item = "ema_params" if use_ema else "params"
    metadata = manager.item_metadata(epoch)
    if item not in metadata or metadata[item] is None:
      raise ValueError(
          f"Checkpoint epoch {epoch} in {directory!r} has no {item!r}: the run "
          "trained without an EMA; load with use_ema=False.")
    target = _host_target(metadata[item])
    restored = manager.restore(
        epoch, args=ocp.args.Composite(**{
            item: ocp.args.StandardRestore(target),
            "meta": ocp.args.JsonRestore(),
        }))
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, restored[item])
  meta = dict(restored["meta"])
  if models is not None:
    index = np.asarray(models, dtype=np.int64)
    params = jax.tree.map(lambda x: x[index], params)
    meta["models"] = [meta["models"][i] for i in index]
  meta["parameters"] = "ema" if use_ema else "raw"
  return params, meta
