"""The bias monitor of the image pipeline: in the train stage and for audits.

The train stage trains the zoo in groups of zoo.models_per_fit models, one
`fit` call per group, one group after another. The monitor of group g
measures the models of groups 0 ... g together. The earlier groups'
parameters come from their grid checkpoints of the same epoch, so the
sample-split divergence and the membership attack cover every pair of models
trained so far. While training, only the last group runs its monitor, and its
records cover the whole zoo. An audit of an earlier group recomputes that
group's records from the checkpoints.

Before it trains, each group directory gets monitor_inputs.json: where the
prepared dataset and the earlier groups' directories lie, relative to the
group directory. `stored_run_monitor` rebuilds the same monitor from it and
the run's config, which is how experiments/audit.py measures an image run.
"""

import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import diffusion
from biasdiff import images as images_lib
from biasdiff import io
from biasdiff import monitor
from biasdiff.pipeline import stages
from biasdiff.training import checkpoints
from biasdiff.training import state as state_lib

INPUTS_FILE = "monitor_inputs.json"


def stack_grid_checkpoints(directories: Sequence[str], epoch: int, use_ema: bool) -> Any:
  """Load grid checkpoint `epoch` of each run directory; return the models stacked in order.

  Returns:
    Parameters [M_1 + ... + M_k, ...] as numpy arrays.
  """
  parts = [checkpoints.load_grid_checkpoint(d, epoch, use_ema=use_ema)[0] for d in directories]
  return jax.tree.map(lambda *leaves: np.concatenate(leaves, axis=0), *parts)


def build_monitor(config, network, monitor_config, data: images_lib.ImageData,
                  splits: images_lib.Splits, models: Sequence[state_lib.ModelSpec],
                  earlier_directories: Sequence[str], *,
                  workdir: Optional[str] = None) -> monitor.Monitor:
  """Build the monitor of `models`, whose first ones were trained in `earlier_directories`.

  Args:
    config: the run's config (configs/images.py, or the config stored with a
      training group); reads data.centering, diffusion.num_steps and
      train.ema_decay.
    network: the run's U-Net; the monitor applies it in float32.
    monitor_config: the monitor section to measure with.
    data, splits: the prepared dataset.
    models: the earlier groups' models in their order, then the fit's own.
    earlier_directories: the run directories of the earlier groups, in order.
    workdir: the fit's run directory, whose monitor records seed the history;
      None starts from an empty history.
  """
  heldout = images_lib.block_images(data, splits, images_lib.splits.HELDOUT)
  blocks = {m.block: images_lib.block_images(data, splits, m.block) for m in models}
  centres = [images_lib.centering_shift(splits, m.block, config.data.centering) for m in models]
  earlier_parameters = None
  if earlier_directories:
    earlier_parameters = functools.partial(stack_grid_checkpoints, tuple(earlier_directories))
  return monitor.image_monitor(
      network.clone(dtype=jnp.float32), diffusion.ddpm_schedule(config.diffusion.num_steps),
      models, heldout, blocks, centres, monitor_config, workdir=workdir,
      use_ema=bool(monitor_config.use_ema and config.train.ema_decay > 0),
      earlier_parameters=earlier_parameters)


def write_inputs(directory: str, prepared_directory: str,
                 earlier_directories: Sequence[str]) -> None:
  """Record in `directory` where its monitor's dataset and earlier groups lie."""
  os.makedirs(directory, exist_ok=True)
  io.write_json_atomically(os.path.join(directory, INPUTS_FILE), {
      "prepared_data": os.path.relpath(prepared_directory, directory),
      "earlier_groups": [os.path.relpath(d, directory) for d in earlier_directories],
  })


def stored_run_monitor(config, network, workdir: str, monitor_config, *,
                       read_records: bool = True) -> monitor.Monitor:
  """Rebuild the monitor of a training group from its run directory.

  Args:
    config: the config stored in the group's run.json.
    network: the U-Net of config.model.
    workdir: the group's run directory, <workdir>/stages/train/<key>/group_<g>.
    monitor_config: the monitor section to measure with.
    read_records: start the history from the group's eval_metrics.jsonl.

  Raises:
    ValueError: when `workdir` has no monitor_inputs.json.
  """
  path = os.path.join(workdir, INPUTS_FILE)
  inputs = stages.load_json(path)
  if inputs is None:
    raise ValueError(
        f"{path} not found: the image pipeline writes it into every training group before "
        "training. Pass a group directory <workdir>/stages/train/<key>/group_<g> of that "
        "pipeline.")
  resolve = lambda relative: os.path.normpath(os.path.join(workdir, relative))
  data, splits = images_lib.load_prepared(resolve(inputs["prepared_data"]),
                                          expected_sha256=config.data.sha256)
  earlier = [resolve(directory) for directory in inputs["earlier_groups"]]
  models = []
  for directory in earlier + [workdir]:
    info = checkpoints.read_json(os.path.join(directory, checkpoints.RUN_INFO_FILE))
    models += [state_lib.ModelSpec.from_json(m) for m in info["models"]]
  return build_monitor(config, network, monitor_config, data, splits, models, earlier,
                       workdir=workdir if read_records else None)
