"""The real-image pipeline: data, paired training, evaluation, summary, figures.

`run(config, workdir)` runs five resumable stages under `workdir`/stages:

  data       load digits, CelebA or the synthetic proxy and store the images
             with their blocks (`save_prepared`);
  train      train one U-Net per block with `biasdiff.training.fit`, each on
             its own block centred by its own mean mu_b, and with
             monitor.enabled measure every grid checkpoint of the last
             training group, and with it the whole zoo, with the bias monitor
             (`images_monitor`);
  evaluate   per grid checkpoint (cached one file per checkpoint): the test
             denoising loss over time, the predicted-noise similarity on train
             vs held-out probes, and paired samples with their statistics;
  summarise  curves, minima and error bars, written as summary.json;
  figures    Fig. 1(a) left and right, Fig. 2 and a companion figure, each as
             PNG and PDF with the data behind it.

Each stage's directory is keyed by the settings it depends on, so a rerun
reuses finished stages and an interrupted one resumes: training from its
newest checkpoint, evaluation from its last finished checkpoint. The summary
and the figures are also copied to `output_dir` (by default `workdir`).
"""

import functools
import logging
import os
import shutil
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np

from biasdiff import diffusion
from biasdiff import images as images_lib
from biasdiff import io
from biasdiff import monitor
from biasdiff import parallel
from biasdiff.metrics import probes
from biasdiff.models import UNet
from biasdiff.monitor import statistics as monitor_statistics
from biasdiff.pipeline import images_eval
from biasdiff.pipeline import images_monitor
from biasdiff.pipeline import images_summary
from biasdiff.pipeline import stages
from biasdiff.training import batches
from biasdiff.training import checkpoints
from biasdiff.training import loop
from biasdiff.training import objectives
from biasdiff.training import state as state_lib

logger = logging.getLogger(__name__)

DATA_SOURCES = ("digits", "celeba_folder", "celeba_tfds", "proxy")
STAGES_DIRECTORY = "stages"
SUMMARY_FILE = "summary.json"
FIGURES_DIRECTORY = "figures"
CHECKPOINTS_DIRECTORY = "checkpoints"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Fields that change speed, logging or device layout but not the results;
# they are left out of the stage keys.
_TRAIN_RUNTIME_FIELDS = ("steps_per_dispatch", "log_every_steps")
_CHECKPOINT_RUNTIME_FIELDS = ("rolling_every_steps", "rolling_every_minutes", "rolling_to_keep",
                              "async_save")
_EVAL_RUNTIME_FIELDS = ("sample_batch_size", "batch_size", "loss_times_per_call", "model_loop",
                        "figure_time", "panel_pair", "panel_rows")


# ---------------------------------------------------------------------------
# Config checks.


def check_config(config, flag_prefix: str = "--config.") -> None:
  """Raise ValueError naming the field when `config` cannot run this pipeline.

  The CelebA sources are checked without decoding: a folder must exist and
  contain enough JPEGs for the blocks and the held-out images (one listing of
  its file names), and a TFDS data directory must contain a prepared dataset.

  Args:
    config: a config from configs/images.py.
    flag_prefix: how the caller's command line names the fields of `config`,
      used in the suggested fixes: "--config." for experiments/images.py,
      "--config.images." for experiments/reproduce.py.
  """
  experiment = config.get("experiment")
  if experiment != "images":
    found = ("without an 'experiment' field" if experiment is None
             else f"with experiment={experiment!r}")
    message = (f"The image pipeline (experiments/images.py) needs a config from configs/images.py,"
               f" for example --config=configs/images.py:quick, but got one {found}.")
    if "profile" in config:
      message += (" This is a profile of configs/reproduce.py: run it with "
                  "experiments/reproduce.py.")
    raise ValueError(message)
  data, zoo, evaluation = config.data, config.zoo, config.eval

  if data.source not in DATA_SOURCES:
    raise ValueError(f"data.source={data.source!r} is not one of {DATA_SOURCES}.")
  blocks = [int(b) for b in zoo.blocks]
  if len(blocks) < 2 or len(set(blocks)) != len(blocks):
    raise ValueError(
        f"zoo.blocks={tuple(zoo.blocks)} must list at least two distinct blocks, one model each.")
  if min(blocks) < 0 or max(blocks) >= data.num_blocks:
    raise ValueError(
        f"zoo.blocks={tuple(zoo.blocks)} must lie in [0, data.num_blocks={data.num_blocks}).")

  if zoo.models_per_fit < 0 or (zoo.models_per_fit and len(blocks) % zoo.models_per_fit):
    raise ValueError(
        f"zoo.models_per_fit={zoo.models_per_fit} must be 0 or divide the {len(blocks)} models.")

  if evaluation.use_ema and config.train.ema_decay <= 0.0:
    raise ValueError("eval.use_ema=True needs train.ema_decay > 0; enable the EMA or set "
                     "eval.use_ema=False.")
  if not 2 <= evaluation.sampler_steps <= config.diffusion.num_steps:
    raise ValueError(
        f"eval.sampler_steps={evaluation.sampler_steps} must lie in [2, diffusion.num_steps="
        f"{config.diffusion.num_steps}].")
  if evaluation.figure_time not in tuple(evaluation.probe_times):
    raise ValueError(
        f"eval.figure_time={evaluation.figure_time} must be one of eval.probe_times="
        f"{tuple(evaluation.probe_times)}.")
  if not 1 <= evaluation.num_probes <= data.block_size:
    raise ValueError(
        f"eval.num_probes={evaluation.num_probes} must lie in [1, data.block_size="
        f"{data.block_size}].")
  pair = tuple(evaluation.panel_pair)
  if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= p < len(blocks) for p in pair):
    raise ValueError(
        f"eval.panel_pair={pair} must name two different model positions in [0, {len(blocks)}).")
  if evaluation.model_loop not in images_eval.MODEL_LOOPS:
    raise ValueError(
        f"eval.model_loop={evaluation.model_loop!r} is not one of {images_eval.MODEL_LOOPS}.")
  if config.model.dtype not in _DTYPES:
    raise ValueError(f"model.dtype={config.model.dtype!r} is not one of {sorted(_DTYPES)}.")
  _check_monitor_config(config)
  # The train, checkpoint and parallel sections, before any data is loaded.
  loop.check_config(config)
  # Last, because it reads the file system.
  _check_celeba_source(data, flag_prefix)


def _check_celeba_source(data, flag_prefix: str) -> None:
  """Raise ValueError when the CelebA source of `data` is missing or too small."""
  if data.source not in ("celeba_folder", "celeba_tfds"):
    return
  if data.source == "celeba_folder" and not data.path:
    raise ValueError(
        "data.source='celeba_folder' needs data.path, the img_align_celeba folder; set "
        f"{flag_prefix}data.path=/path/to/img_align_celeba or {flag_prefix}data.source=proxy.")
  layout = images_lib.BlockLayout(data.block_size, data.num_blocks, data.heldout_size)
  try:
    if data.source == "celeba_folder":
      images_lib.celeba.check_folder(data.path, layout)
    else:
      images_lib.celeba_tfds.check_source(layout, data_dir=data.data_dir or None)
  except FileNotFoundError as error:
    if data.source == "celeba_folder":
      fix = f"The folder is set by {flag_prefix}data.path."
    else:
      fix = f"The data directory is set by {flag_prefix}data.data_dir."
    raise ValueError(f"{error} {fix}") from error


def _check_monitor_config(config) -> None:
  monitor_config = config.monitor
  if not monitor_config.enabled:
    return
  monitor.callback.check_config(monitor_config)
  if monitor_config.image_divergence not in monitor_statistics.IMAGE_DIVERGENCES:
    raise ValueError(f"monitor.image_divergence={monitor_config.image_divergence!r} is not one "
                     f"of {monitor_statistics.IMAGE_DIVERGENCES}.")
  schedule = diffusion.ddpm_schedule(config.diffusion.num_steps)
  for name in ("split_time_fraction", "mia_time_fraction"):
    t = probes.time_at_fraction(monitor_config[name], config.diffusion.num_steps)
    probes.check_time(schedule, t, f"monitor.{name}={monitor_config[name]} gives t")
  if monitor_config.stop_training and len(model_groups(config)) > 1:
    raise ValueError(
        f"monitor.stop_training=True needs every model in one fit, but zoo.models_per_fit="
        f"{config.zoo.models_per_fit} trains {len(model_groups(config))} groups one after "
        "another, which would stop at different epochs. Set zoo.models_per_fit=0.")


# ---------------------------------------------------------------------------
# Data.


def load_data(config, workdir: str) -> tuple[images_lib.ImageData, images_lib.Splits]:
  """Load the images and blocks named by config.data."""
  data = config.data
  if data.source == "digits":
    return images_lib.load_digits_data(
        block_size=data.block_size, num_blocks=data.num_blocks,
        heldout_size=data.heldout_size or None, seed=data.data_seed, size=data.image_size)
  layout = images_lib.BlockLayout(data.block_size, data.num_blocks, data.heldout_size)
  if data.source == "proxy":
    return images_lib.make_proxy_data(layout, seed=data.data_seed, size=data.image_size)
  cache_dir = data.cache_dir or os.path.join(workdir, "data_cache")
  if data.source == "celeba_folder":
    return images_lib.load_celeba_folder(data.path, layout, cache_dir=cache_dir,
                                         size=data.image_size)
  return images_lib.load_celeba_tfds(layout, data_dir=data.data_dir or None, cache_dir=cache_dir,
                                     size=data.image_size)


def data_spec(config) -> dict:
  """Return what the stored dataset depends on (paths and caches excluded)."""
  data = config.data.to_dict()
  for field in ("cache_dir", "centering"):
    data.pop(field)
  if config.data.source not in ("celeba_folder",):
    data.pop("path")
  if config.data.source != "celeba_tfds":
    data.pop("data_dir")
  return data


def data_stage(config, root: str,
               workdir: str) -> tuple[dict, images_lib.ImageData, images_lib.Splits]:
  """Run (or reuse) the data stage under `root`; return its result and the loaded data.

  CelebA's preprocessed arrays are cached in data.cache_dir, or in
  <workdir>/data_cache when it is empty.
  """

  def compute(stage: stages.Stage) -> dict:
    data, splits = load_data(config, workdir)
    if parallel.is_main_process():
      images_lib.save_prepared(data, splits, stage.path("prepared"))
    return {
        "sha256": data.sha256,
        "num_images": data.num_images,
        "image_shape": list(data.image_shape),
        "block_size": splits.block_size,
        "num_blocks": splits.num_blocks,
        "heldout_size": int(splits.heldout.size),
        "block_means": list(splits.block_means),
        "global_mean": splits.global_mean,
        "metadata": dict(data.metadata),
    }

  result = stages.run_stage(root, "data", data_spec(config), compute,
                            is_writer=parallel.is_main_process())
  data, splits = images_lib.load_prepared(os.path.join(result["stage_directory"], "prepared"),
                                          expected_sha256=result["sha256"])
  return result, data, splits


# ---------------------------------------------------------------------------
# Training.


def build_unet(config) -> UNet:
  """Return the U-Net of config.model."""
  model = config.model
  return UNet(
      base_width=model.base_width,
      channel_multipliers=tuple(model.channel_multipliers),
      blocks_per_resolution=model.blocks_per_resolution,
      attention_resolutions=tuple(model.attention_resolutions),
      mid_attention=model.mid_attention,
      dropout_rate=model.dropout,
      num_groups=model.num_groups,
      dtype=_DTYPES[model.dtype])


@functools.lru_cache(maxsize=8)
def _objective(num_steps: int, t_min: int) -> objectives.ImageEpsObjective:
  # One object per setting, so repeated fits reuse their compiled step.
  return objectives.ImageEpsObjective(diffusion.ddpm_schedule(num_steps), t_min=t_min)


def model_list(config) -> list[state_lib.ModelSpec]:
  """Return one model per block of config.zoo.blocks; block b trains with seed config.seed + b."""
  return [state_lib.ModelSpec(block=int(b), replicate=0, seed=int(config.seed) + int(b),
                              init_seed=int(config.seed) + int(b))
          for b in config.zoo.blocks]


def model_groups(config) -> list[list[int]]:
  """Return the model positions trained together by each call of `fit`."""
  num_models = len(config.zoo.blocks)
  size = config.zoo.models_per_fit or num_models
  return [list(range(start, start + size)) for start in range(0, num_models, size)]


def _without(section: ml_collections.ConfigDict, fields) -> dict:
  record = section.to_dict()
  for field in fields:
    record.pop(field, None)
  return record


def train_spec(config, data_result: Mapping[str, Any]) -> dict:
  """Return what the trained parameters depend on.

  The monitor only reads the parameters, so its settings enter only when it
  can end training (monitor.stop_training).
  """
  spec = {
      "data_sha256": data_result["sha256"],
      "block_size": data_result["block_size"],
      "centering": config.data.centering,
      "seed": config.seed,
      "model": config.model.to_dict(),
      "diffusion": {"num_steps": config.diffusion.num_steps,
                    "train_t_min": config.diffusion.train_t_min},
      "zoo": config.zoo.to_dict(),
      "train": _without(config.train, _TRAIN_RUNTIME_FIELDS),
      "checkpoint": _without(config.checkpoint, _CHECKPOINT_RUNTIME_FIELDS),
  }
  if config.monitor.enabled and config.monitor.stop_training:
    spec["monitor"] = config.monitor.to_dict()
  return spec


def training_config(config, data_result: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Return the config that `fit` stores with each run: everything that training reads.

  The evaluation settings and the data paths are left out, so changing them
  does not make `fit` reject its own checkpoints. The monitor section is kept
  for experiments/audit.py; `fit` ignores it when it resumes a run.
  """
  record = ml_collections.ConfigDict()
  record.experiment = "images"
  record.seed = config.seed
  record.data = ml_collections.ConfigDict({
      "sha256": data_result["sha256"],
      "block_size": data_result["block_size"],
      "centering": config.data.centering,
  })
  record.model = config.model
  record.diffusion = config.diffusion
  record.zoo = config.zoo
  record.train = config.train
  record.checkpoint = config.checkpoint
  record.parallel = config.parallel
  record.monitor = config.monitor
  return ml_collections.ConfigDict(record.to_dict())


def centring_shifts(config, splits: images_lib.Splits) -> np.ndarray:
  """Return mu_m of every model, [M] float64."""
  return np.array([images_lib.centering_shift(splits, int(b), config.data.centering)
                   for b in config.zoo.blocks])


def train_stage(config, root: str, data_result: Mapping[str, Any],
                data: images_lib.ImageData, splits: images_lib.Splits,
                compiler_options: Optional[Mapping[str, Any]] = None) -> dict:
  """Run (or resume, or reuse) the training of every model; return the stage result."""
  models = model_list(config)
  shifts = centring_shifts(config, splits)
  model = build_unet(config)
  objective = _objective(config.diffusion.num_steps, config.diffusion.train_t_min)
  fit_config = training_config(config, data_result)
  image_shape = tuple(data.image_shape)
  prepared = os.path.join(data_result["stage_directory"], "prepared")

  def compute(stage: stages.Stage) -> dict:
    groups = model_groups(config)
    group_directories = [_group_directory(g) for g in range(len(groups))]
    for g, group in enumerate(groups):
      train_data = np.stack([
          images_lib.center_block(data, splits, models[m].block, config.data.centering)[0]
          for m in group])  # [M_g, n, H, W, 1]
      task = loop.TrainingTask(
          model=model,
          objective=objective,
          train_data=train_data,
          models=[models[m] for m in group],
          fingerprint={
              "data_sha256": data.sha256,
              "blocks": [models[m].block for m in group],
              "shifts": [float(shifts[m]) for m in group],
              "centering": config.data.centering,
          },
          example_input=(np.zeros((1,) + image_shape, np.float32), np.zeros((1,), np.int32)))
      directory = stage.path(group_directories[g])
      earlier = [stage.path(d) for d in group_directories[:g]]
      if parallel.is_main_process():
        # Written with the monitor off too, so that experiments/audit.py can measure the run.
        images_monitor.write_inputs(directory, prepared, earlier)
      logger.info("Training models %s (blocks %s) in %s.", group, [models[m].block for m in group],
                  directory)
      callback = None
      # Only the last group's monitor runs while training: at each grid epoch it measures
      # every model, reading the earlier groups' checkpoints, so the earlier groups'
      # records would repeat a subset of its work. Their audits recompute from checkpoints.
      if config.monitor.enabled and g == len(groups) - 1:
        measured = [models[m] for members in groups[:g + 1] for m in members]
        callback = images_monitor.build_monitor(config, model, config.monitor, data, splits,
                                                measured, earlier, workdir=directory)
      loop.fit(fit_config, directory, task, eval_callback=callback,
               compiler_options=compiler_options)
    grids = [checkpoints.realised_grid(stage.path(d)) for d in group_directories]
    grid = sorted(set(grids[0]).intersection(*grids[1:]))
    return {
        "group_directories": group_directories,
        "groups": groups,
        "grid_epochs": grid,
        "steps_per_epoch": batches.steps_per_epoch(data_result["block_size"],
                                                   config.train.batch_size),
        "models": [m.to_json() for m in models],
        "shifts": shifts.tolist(),
    }

  return stages.run_stage(root, "train", train_spec(config, data_result), compute,
                          is_writer=parallel.is_main_process())


def _group_directory(group: int) -> str:
  return f"group_{group}"


def stored_run_monitor(config, workdir: str, monitor_config, *,
                       read_records: bool = True) -> monitor.Monitor:
  """Rebuild the monitor of a training group from the config in its run.json.

  This is the monitor builder of config.experiment "images", which
  experiments/audit.py finds through `biasdiff.monitor.build_monitor`.
  """
  return images_monitor.stored_run_monitor(config, build_unet(config), workdir, monitor_config,
                                           read_records=read_records)


monitor.register_builder("images", stored_run_monitor)


def load_parameters(train_result: Mapping[str, Any], epoch: int, use_ema: bool) -> Any:
  """Load the stacked parameters [M, ...] of every model at grid epoch `epoch`."""
  directories = [os.path.join(train_result["stage_directory"], d)
                 for d in train_result["group_directories"]]
  return images_monitor.stack_grid_checkpoints(directories, epoch, use_ema)


# ---------------------------------------------------------------------------
# Evaluation.


def evaluation_epochs(config, train_result: Mapping[str, Any]) -> tuple[list[int], list[int]]:
  """Return (evaluated epochs, epochs with paired samples), both increasing."""
  epochs = [int(e) for e in train_result["grid_epochs"] if e >= config.eval.min_epoch]
  if not epochs:
    raise ValueError(
        f"No grid checkpoint at or after eval.min_epoch={config.eval.min_epoch}; the grid is "
        f"{train_result['grid_epochs']}. Lower eval.min_epoch.")
  count = config.eval.num_sampling_checkpoints or len(epochs)
  return epochs, epochs[:count]


def sampler_record(config) -> dict:
  """Describe the ancestral sampler that makes the paired samples."""
  num_steps = config.diffusion.num_steps
  kept = diffusion.respaced_times(num_steps, config.eval.sampler_steps)
  return {
      "kind": "DDPM ancestral, eps prediction",
      "steps": int(config.eval.sampler_steps),
      "respaced": bool(config.eval.sampler_steps < num_steps),
      "kept_times": kept.tolist(),
      "respacing": "abar of the kept times, beta'_k = 1 - abar'_k / abar'_(k-1)",
      "variance": "beta'_k (beta_t when not respaced)",
      "noise_free_step_indices": list(range(config.diffusion.last_noisy_t)),
      "seed": int(config.eval.sample_seed),
      "noise_keys": "x_start[k] = fold(seed, SAMPLE_INIT, k); z_j[k] = fold(seed, SAMPLE_STEP, j, k)",
  }


def evaluation_spec(config, train_result: Mapping[str, Any]) -> dict:
  """Return what the per-checkpoint arrays depend on."""
  return {
      "train_stage": os.path.basename(train_result["stage_directory"]),
      "eval": _without(config.eval, _EVAL_RUNTIME_FIELDS),
      "diffusion": config.diffusion.to_dict(),
  }


def evaluation_inputs(config, data: images_lib.ImageData, splits: images_lib.Splits,
                      train_result: Mapping[str, Any]) -> images_eval.EvalInputs:
  """Gather the images, shifts and settings shared by every checkpoint."""
  evaluation = config.eval
  shifts = np.asarray(train_result["shifts"], np.float64)
  blocks = np.array([m["block"] for m in train_result["models"]])
  heldout = images_lib.block_images(data, splits, images_lib.splits.HELDOUT)
  num_loss = evaluation.loss_num_images or heldout.shape[0]
  if num_loss > heldout.shape[0] or evaluation.num_probes > heldout.shape[0]:
    raise ValueError(
        f"eval.loss_num_images={evaluation.loss_num_images} and eval.num_probes="
        f"{evaluation.num_probes} must not exceed the {heldout.shape[0]} held-out images.")
  loss_indices = np.random.default_rng(evaluation.loss_seed).permutation(heldout.shape[0])[:num_loss]
  times, _, _ = images_eval.loss_times(config.diffusion.num_steps, evaluation.loss_num_times)
  schedule = diffusion.ddpm_schedule(config.diffusion.num_steps)
  kept = diffusion.respaced_times(config.diffusion.num_steps, evaluation.sampler_steps)
  return images_eval.EvalInputs(
      model=build_unet(config),
      schedule=schedule,
      shifts=shifts,
      blocks=blocks,
      train_images=np.stack([images_lib.block_images(data, splits, int(b)) for b in blocks]),
      heldout_images=heldout,
      loss_indices=loss_indices.astype(np.int64),
      loss_times=times,
      probe_times=tuple(int(t) for t in evaluation.probe_times),
      num_probes=int(evaluation.num_probes),
      sample_schedule=diffusion.respaced_schedule(schedule, kept),
      kept_times=kept,
      num_samples=int(evaluation.num_samples),
      sample_batch_size=int(evaluation.sample_batch_size),
      last_noisy_t=int(config.diffusion.last_noisy_t),
      loss_seed=int(evaluation.loss_seed),
      probe_seed=int(evaluation.probe_seed),
      sample_seed=int(evaluation.sample_seed),
      memorisation_ratio=float(evaluation.memorisation_ratio),
      num_bootstrap=int(evaluation.num_bootstrap),
      batch_size=int(evaluation.batch_size),
      loss_times_per_call=int(evaluation.loss_times_per_call),
      model_loop=evaluation.model_loop)


def checkpoint_item(epoch: int) -> str:
  """Return the cache name of one checkpoint's arrays."""
  return f"epoch_{epoch:07d}"


def evaluate_stage(config, root: str, train_result: Mapping[str, Any],
                   inputs: images_eval.EvalInputs) -> dict:
  """Run (or resume, or reuse) the per-checkpoint evaluation; return the stage result."""
  epochs, sampling_epochs = evaluation_epochs(config, train_result)

  def compute(stage: stages.Stage) -> dict:
    cache = stages.ItemCache(stage.path(CHECKPOINTS_DIRECTORY),
                             is_writer=parallel.is_main_process())
    for epoch in epochs:
      with_samples = epoch in sampling_epochs

      def evaluate(epoch=epoch, with_samples=with_samples):
        params = load_parameters(train_result, epoch, config.eval.use_ema)
        return images_eval.evaluate_checkpoint(inputs, params, epoch, with_samples)

      cache.get_or_compute(checkpoint_item(epoch), evaluate)
    return {
        "epochs": epochs,
        "sampling_epochs": sampling_epochs,
        "loss_indices": inputs.loss_indices.tolist(),
        "items": CHECKPOINTS_DIRECTORY,
    }

  return stages.run_stage(root, "evaluate", evaluation_spec(config, train_result), compute,
                          is_writer=parallel.is_main_process())


def load_evaluations(evaluate_result: Mapping[str, Any]) -> list[dict]:
  """Read the cached arrays of every evaluated checkpoint, in epoch order."""
  cache = stages.ItemCache(os.path.join(evaluate_result["stage_directory"],
                                        evaluate_result["items"]), is_writer=False)
  arrays = []
  for epoch in evaluate_result["epochs"]:
    arrays.append(cache.get_or_compute(checkpoint_item(epoch), _missing(epoch)))
  return arrays


def _missing(epoch: int):

  def fail():
    raise FileNotFoundError(
        f"The evaluation of epoch {epoch} is missing from a finished evaluate stage; delete "
        "its result.json to recompute it.")

  return fail


# ---------------------------------------------------------------------------
# The whole pipeline.


def run(config, workdir: str, output_dir: Optional[str] = None,
        compiler_options: Optional[Mapping[str, Any]] = None) -> dict:
  """Run every stage of the image pipeline and return the summary.

  Args:
    config: a config from configs/images.py.
    workdir: where the stages live; an existing run there is resumed. The
      first run claims it for config.variant (see `stages.claim_workdir`), and
      a run of another variant there raises ValueError.
    output_dir: where summary.json and figures/ are copied; default workdir.
    compiler_options: XLA options for the training step (see `fit`).

  Returns:
    The summary dictionary that summary.json contains.
  """
  check_config(config)
  stages.claim_workdir(workdir, config, parallel.is_main_process())
  output_dir = output_dir or workdir
  root = os.path.join(workdir, STAGES_DIRECTORY)
  data_result, data, splits = data_stage(config, root, workdir)
  train_result = train_stage(config, root, data_result, data, splits, compiler_options)
  inputs = evaluation_inputs(config, data, splits, train_result)
  evaluate_result = evaluate_stage(config, root, train_result, inputs)

  def summarise(stage: stages.Stage) -> dict:
    arrays = load_evaluations(evaluate_result)
    summary = images_summary.summarise(config, data_result, train_result, evaluate_result, arrays,
                                       sampler_record(config))
    io.write_json_atomically(stage.path(SUMMARY_FILE), summary)
    panels = images_summary.panel_data(config, inputs, summary, arrays)
    io.write_npz_atomically(stage.path("panels.npz"), **panels)
    return {"summary": SUMMARY_FILE, "panels": "panels.npz"}

  summary_spec = {"evaluate_stage": os.path.basename(evaluate_result["stage_directory"]),
                  "summary_version": images_summary.SUMMARY_VERSION,
                  "config": config.to_dict()}
  summary_result = stages.run_stage(root, "summarise", summary_spec, summarise,
                                    is_writer=parallel.is_main_process())
  summary = stages.load_json(os.path.join(summary_result["stage_directory"], SUMMARY_FILE))

  def draw(stage: stages.Stage) -> dict:
    # Imported here: matplotlib is needed only for this stage.
    from biasdiff.figures import images as figures  # pylint: disable=g-import-not-at-top
    with np.load(os.path.join(summary_result["stage_directory"], "panels.npz")) as stored:
      panels = {name: stored[name] for name in stored.files}
    files = figures.draw_all(summary, panels, stage.path(FIGURES_DIRECTORY))
    return {"files": files}

  figures_spec = {"summarise_stage": os.path.basename(summary_result["stage_directory"]),
                  "figures_version": images_summary.FIGURES_VERSION}
  figures_result = stages.run_stage(root, "figures", figures_spec, draw,
                                    is_writer=parallel.is_main_process())

  if parallel.is_main_process():
    _publish(summary_result, figures_result, output_dir)
  return summary


def _publish(summary_result: Mapping[str, Any], figures_result: Mapping[str, Any],
             output_dir: str) -> None:
  """Copy summary.json and the figure files to `output_dir`."""
  target = os.path.join(output_dir, FIGURES_DIRECTORY)
  os.makedirs(target, exist_ok=True)
  shutil.copyfile(os.path.join(summary_result["stage_directory"], SUMMARY_FILE),
                  os.path.join(output_dir, SUMMARY_FILE))
  source = os.path.join(figures_result["stage_directory"], FIGURES_DIRECTORY)
  for name in figures_result["files"]:
    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
  logger.info("Summary and %d figure files written to %s.", len(figures_result["files"]),
              output_dir)
