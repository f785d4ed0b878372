"""The tree-data figure pipeline: train the zoo, measure every checkpoint, summarise.

Stages per training-set size (each resumable and cached by content, see
`biasdiff.pipeline.stages`):

  train      the model zoo of the size (pairs on disjoint blocks, same-data
             controls), through `biasdiff.training.train`, which resumes itself
  evaluate   every grid checkpoint, one cached file per checkpoint
             (`hierarchical_eval.evaluate_checkpoint`)
  summary    curves with error bars and the epochs of their minima
  uturn      U-turns at the NN-divergence and test-loss minima
  kl_time    KL(BP_0 || BP_k)(t) and KL(BP_0 || model)(t) at the test-loss minimum
  random_uturn  U-turns from uniformly random sequences (network, empirical, BP_k)

Error bars: per-model quantities are mean +- SE across models (ddof 1); pair
quantities are the mean over pairs with a leave-one-block-out jackknife SE,
because pairs share models. Minima are argmins of the across-unit mean curve on
the checkpoint grid; per-unit argmins and their spread are reported beside them.
"""

import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from biasdiff import diffusion
from biasdiff import hierarchical
from biasdiff import io
from biasdiff.metrics import probes
from biasdiff.metrics import sequences as seq_metrics
from biasdiff.metrics import stats
from biasdiff.pipeline import hierarchical_eval as evaluation
from biasdiff.pipeline import stages
from biasdiff.training import checkpoints
from biasdiff.training import state as state_lib
from biasdiff.training import tasks

logger = logging.getLogger(__name__)

# Denoiser ids of the U-turns: distinct ids give independent reverse noise.
_NETWORK_ID, _BP_ID, _EMPIRICAL_ID = 0, 1, 2


def training_config(size, corpus_root: str, get_train_config) -> ml_collections.ConfigDict:
  """Build the training config of one pipeline size: `get_train_config(variant)` with overrides.

  `get_train_config` is `configs.hierarchical.get_config`, passed in by the entry
  point because the configs live beside the package, not inside it.
  """
  config = get_train_config(size.variant)
  with config.unlocked():
    config.data.n = size.n
    config.train.num_epochs = size.num_epochs
    config.zoo.blocks = tuple(size.blocks)
    config.zoo.replicates = tuple(size.replicates)
    config.zoo.extra_models = tuple(tuple(m) for m in size.extra_models)
    needed = (max(list(size.blocks) + [b for b, _ in size.extra_models]) + 1) * size.n
    if config.data.train_pool_size < needed:
      config.data.train_pool_size = needed
    data = {k: config.data[k] for k in ("num_symbols", "num_allowed", "sigma", "grammar_seed",
                                        "depth", "data_seed", "train_pool_size", "heldout_size")}
    config.data.corpus_dir = os.path.join(corpus_root, stages.spec_key(data))
  return config


def _training_spec(config) -> dict:
  """Return the config fields that decide the trained parameters (the train stage's key)."""
  spec = config.to_dict()
  spec["data"] = {k: v for k, v in spec["data"].items() if k != "corpus_dir"}
  monitor = spec.pop("monitor", None)
  if monitor and monitor.get("stop_training"):
    spec["monitor"] = monitor  # A monitor that ends training changes the result.
  return spec


def run_size(label: str, size, analysis, root: str, get_train_config) -> dict:
  """Run every stage of one training-set size; returns its summary."""
  config = training_config(size, os.path.join(root, "corpus"), get_train_config)
  train = stages.run_stage(root, "train", _training_spec(config),
                           lambda stage: _train(config, stage))
  workdir = train["stage_directory"]
  grammar = hierarchical.make_grammar(config.data.num_symbols, config.data.num_allowed,
                                      config.data.sigma, config.data.grammar_seed)
  schedule = diffusion.sequence_schedule(config.diffusion.num_steps)
  corpus = tasks.load_corpus(config, workdir)
  models = [state_lib.ModelSpec.from_json(m) for m in train["models"]]
  network = tasks.transformer(config).clone(dtype=jax.numpy.float32)
  upstream = {"train": train["stage_directory"].rsplit(os.sep, 1)[-1],
              "analysis": analysis.to_dict()}

  def context(cache_dir):
    return evaluation.build_context(analysis, grammar, schedule, corpus, config.data.n, models,
                                    network, cache_dir)

  evaluated = stages.run_stage(root, "evaluate", upstream,
                               lambda stage: _evaluate(stage, context, workdir, train, analysis))
  summary = summarise(label, config, train, evaluated, analysis)
  later = {**upstream, "epoch_nn": summary["epoch_min_nn_divergence"],
           "epoch_loss": summary["epoch_min_test_loss"]}
  ctx_args = (grammar, schedule, corpus, config, models, network, workdir, analysis)
  later_stages = {"uturn": _uturn, "kl_time": _kl_time, "random_uturn": _random_uturn}
  for name in analysis.later_stages:
    if name not in later_stages:
      raise ValueError(f"unknown stage {name!r} in analysis.later_stages; choose from "
                       f"{sorted(later_stages)}")
    summary[name] = stages.run_stage(
        root, name, later, lambda stage, f=later_stages[name]: f(stage, summary, *ctx_args))
  return summary


def _train(config, stage) -> dict:
  from biasdiff import training
  result = training.train(config, stage.directory)
  return {"models": [m.to_json() for m in result.models], "step": result.step,
          "grid_epochs": checkpoints.realised_grid(stage.directory),
          "steps_per_epoch": result.steps_per_epoch}


def _load_params(workdir: str, epoch: int, use_ema: bool, models=None):
  params, meta = checkpoints.load_grid_checkpoint(workdir, epoch, use_ema=use_ema, models=models)
  return params, meta["parameters"]


def _evaluate(stage, make_context, workdir: str, train: dict, analysis) -> dict:
  ctx = make_context(os.path.join(stage.directory, "references"))
  cache = stages.ItemCache(os.path.join(stage.directory, "checkpoints"))
  epochs = train["grid_epochs"]
  parameters = None
  for i, epoch in enumerate(epochs):
    logger.info("Evaluating checkpoint %d/%d (epoch %d)", i + 1, len(epochs), epoch)

    def compute(epoch=epoch):
      params, kind = _load_params(workdir, epoch, analysis.use_ema)
      return {**evaluation.evaluate_checkpoint(ctx, params), "parameters": kind}

    parameters = str(cache.get_or_compute(f"epoch_{epoch}", compute)["parameters"])
  return {"epochs": epochs, "parameters": parameters,
          "test_set_overlap": [hierarchical.content_overlap(
              ctx.corpus.heldout(0, analysis.split_test_sequences),
              ctx.corpus.training_block(b, ctx.n)) for b in ctx.layout.blocks],
          "layout": {"pairs": ctx.layout.pairs.tolist(), "controls": ctx.layout.controls.tolist(),
                     "generators": ctx.layout.generators.tolist()}}


def load_curves(evaluated: dict) -> dict:
  """Stack the per-checkpoint arrays into curves [checkpoints, ...]."""
  directory = os.path.join(evaluated["stage_directory"], "checkpoints")
  per_epoch = []
  for epoch in evaluated["epochs"]:
    with np.load(os.path.join(directory, f"epoch_{epoch}.npz"), allow_pickle=False) as f:
      per_epoch.append({k: f[k] for k in f.files})
  return {k: np.stack([p[k] for p in per_epoch]) for k in per_epoch[0]}


def _per_model(curve: np.ndarray) -> dict:
  """Mean and SE across models of a [checkpoints, models] curve."""
  summary = stats.mean_and_se(np.asarray(curve, np.float64), axis=1)
  return {"mean": np.asarray(summary.mean).tolist(), "se": np.asarray(summary.se).tolist(),
          "count": summary.count, "per_model": np.asarray(curve).T.tolist()}


def _pair_curve(curve: np.ndarray, input_se: np.ndarray, pair_blocks: np.ndarray) -> dict:
  """Mean over pairs with a leave-one-block-out jackknife SE, per checkpoint.

  With fewer than three blocks, leaving out any block removes every pair, so the
  jackknife SE is undefined. "se_inputs" is the SE over inputs of the
  pair-averaged KL, with pairs treated as independent. It is reported beside the
  jackknife SE and used for the error band when the jackknife SE is undefined.
  """
  if curve.shape[1] == 0:
    return {"mean": [], "se": [], "se_inputs": [], "count": 0, "per_pair": []}
  result = stats.jackknife(curve.T, pair_blocks, "mean")  # pairs first
  se_inputs = np.sqrt((input_se**2).sum(axis=1)) / curve.shape[1]
  jackknife_se = np.asarray(result.se, np.float64)
  return {"mean": np.asarray(result.estimate).tolist(),
          "se": np.where(np.isfinite(jackknife_se), jackknife_se, se_inputs).tolist(),
          "se_method": "jackknife over blocks" if np.all(np.isfinite(jackknife_se))
                       else "SE over inputs (fewer than three blocks)",
          "se_inputs": se_inputs.tolist(), "count": result.count,
          "per_pair": curve.T.tolist()}


def _argmin(curve_per_unit: np.ndarray, epochs: list) -> dict:
  """Argmin of the mean curve over the grid and the spread of per-unit argmins."""
  result = stats.grid_argmin(np.asarray(curve_per_unit).T, np.asarray(epochs))
  return {"epoch": int(result.value), "index": result.index,
          "per_unit_epochs": result.unit_values.tolist(),
          "per_unit_quartiles": result.unit_quartiles.tolist()}


def summarise(label: str, config, train: dict, evaluated: dict, analysis) -> dict:
  """Summarise one size: curves with uncertainties and the epochs of their minima."""
  curves = load_curves(evaluated)
  epochs = evaluated["epochs"]
  layout = evaluated["layout"]
  models = [state_lib.ModelSpec.from_json(m) for m in train["models"]]
  blocks = np.array([m.block for m in models])
  pairs = np.asarray(layout["pairs"], dtype=np.int64).reshape(-1, 2)
  controls = np.asarray(layout["controls"], dtype=np.int64).reshape(-1, 2)
  generators = np.asarray(layout["generators"], dtype=np.int64)
  depth = config.data.depth

  summary = {
      "label": label, "n": config.data.n, "depth": depth,
      "epochs": epochs, "steps": [e * train["steps_per_epoch"] for e in epochs],
      "models": train["models"], "parameters": evaluated["parameters"],
      "analysis_seed": analysis.seed, "num_steps_diffusion": config.diffusion.num_steps,
      "t_star": probes.time_at_fraction(analysis.split_time_fraction, config.diffusion.num_steps),
      "test_set_overlap_with_blocks": evaluated["test_set_overlap"],
      "error_bars": ("per-model curves: mean +- SE across models (ddof 1); pair curves: mean "
                     "over pairs +- leave-one-block-out jackknife SE"),
  }
  # Losses and NN divergence use the replicate-0 models, one per block.
  summary["test_loss"] = _per_model(curves["loss_mean_test_total"][:, generators])
  summary["train_loss"] = _per_model(curves["loss_mean_train_total"][:, generators])
  summary["nn_divergence"] = _per_model(curves["nn_divergence"])
  summary["fraction_exact_copies"] = _per_model(curves["fraction_exact"])
  summary["fraction_invalid"] = _per_model(curves["fraction_invalid"])
  summary["nn_generated_histogram"] = curves["nn_generated_histogram"].mean(axis=1).tolist()
  summary["nn_test_histogram"] = curves["nn_test_histogram"].mean(axis=1).tolist()
  for mode in ("fixed", "mean"):
    for where in ("train", "test"):
      for part in ("distillation", "excess", "total"):
        key = f"loss_{mode}_{where}_{part}"
        summary[f"loss_decomposition_{mode}_{where}_{part}"] = _per_model(
            curves[key][:, generators])

  summary["sample_split_kl"] = _pair_curve(curves["pair_test"], curves["pair_test_se"],
                                           blocks[pairs])
  summary["sample_split_kl_train"] = _pair_curve(curves["pair_train"], curves["pair_train_se"],
                                                 blocks[pairs])
  summary["same_data_kl"] = _per_model(curves["control_test"]) if len(controls) else None
  summary["same_data_kl_train"] = _per_model(curves["control_train"]) if len(controls) else None
  summary["kl_bp_model"] = {str(k): _per_model(curves["oracle_test"][:, :, k])
                            for k in range(depth + 1)}
  summary["kl_bp_model_train"] = {str(k): _per_model(curves["oracle_train"][:, :, k])
                                  for k in range(depth + 1)}

  loss_min = _argmin(curves["loss_mean_test_total"][:, generators], epochs)
  nn_min = _argmin(curves["nn_divergence"], epochs)
  summary["epoch_min_test_loss"] = loss_min["epoch"]
  summary["epoch_min_nn_divergence"] = nn_min["epoch"]
  summary["argmin_spread"] = {"test_loss": loss_min, "nn_divergence": nn_min}
  if len(pairs):
    split_min = _argmin(curves["pair_test"], epochs)
    summary["epoch_min_sample_split_kl"] = split_min["epoch"]
    summary["argmin_spread"]["sample_split_kl"] = split_min
  else:
    summary["epoch_min_sample_split_kl"] = None
  summary["epoch_min_kl_bp_model"] = {}
  for k in range(depth + 1):
    result = _argmin(curves["oracle_test"][:, :, k], epochs)
    summary["epoch_min_kl_bp_model"][str(k)] = result["epoch"]
    summary["argmin_spread"][f"kl_bp{k}_model"] = result
  summary["orderings"] = _orderings(summary, depth)
  return summary


def _orderings(summary: dict, depth: int) -> dict:
  """Evaluate the ordering claims; each is true only when the minima fall on different grid points."""
  epochs = summary["epochs"]
  index = lambda e: epochs.index(e) if e is not None else None
  split, bp0 = summary["epoch_min_sample_split_kl"], summary["epoch_min_kl_bp_model"]["0"]
  nn, loss = summary["epoch_min_nn_divergence"], summary["epoch_min_test_loss"]
  k_minima = [summary["epoch_min_kl_bp_model"][str(k)] for k in range(depth, -1, -1)]
  return {
      "sample_split_before_bp0": split is not None and index(split) < index(bp0),
      "nn_divergence_before_test_loss": index(nn) < index(loss),
      "sample_split_before_test_loss": split is not None and index(split) < index(loss),
      "sequential_learning_bp_k_minima_from_k_depth_to_0": k_minima,
      "sequential_learning_non_decreasing": all(a <= b for a, b in zip(k_minima, k_minima[1:])),
  }


def _uturn(stage, summary, grammar, schedule, corpus, config, models, network, workdir,
           analysis) -> dict:
  """U-turn reconstruction ratios at the NN-divergence and test-loss minima."""
  q = grammar.num_symbols
  n = config.data.n
  chosen = _uturn_models(models)
  _, denoise_fn = evaluation.network_functions(network)
  bp_denoise = hierarchical.make_denoiser("bp", schedule.alpha_bar, grammar=grammar)
  times = [probes.time_at_fraction(f, schedule.num_steps) for f in analysis.uturn_time_fractions]
  sets = {"test": (corpus.heldout(0, analysis.uturn_sequences), probes.HELDOUT_SET)}
  result = {"times": times, "models": [models[i].to_json() for i in chosen], "checkpoints": {}}
  cache = stages.ItemCache(stage.directory)
  common = dict(num_repetitions=analysis.uturn_repetitions, seed=analysis.seed, num_symbols=q,
                batch_size=analysis.eval_batch)
  for name, epoch in (("nn_minimum", summary["epoch_min_nn_divergence"]),
                      ("loss_minimum", summary["epoch_min_test_loss"])):
    params, kind = _load_params(workdir, epoch, analysis.use_ema, chosen)
    record = {"epoch": epoch, "parameters": kind, "rho": {}, "overlap": {}}
    for t0 in times:
      for model_row, index in enumerate(chosen):
        block = models[index].block
        model_sets = {**sets, "train": (corpus.training_block(block, n)[:analysis.uturn_sequences],
                                        probes.training_set_id(block))}
        single = state_lib.select_models(params, [model_row])
        for set_name, (tokens, set_id) in model_sets.items():

          def compute(tokens=tokens, set_id=set_id, single=single):
            network_overlaps = seq_metrics.uturn_overlaps(
                denoise_fn, schedule, tokens, t0=t0, set_id=set_id, denoiser_id=_NETWORK_ID,
                denoise_args=(single,), shared_shape=(1,), **common)[0]
            bp_overlaps = seq_metrics.uturn_overlaps(
                bp_denoise, schedule, tokens, t0=t0, set_id=set_id, denoiser_id=_BP_ID, **common)
            return {"network": network_overlaps, "bp": bp_overlaps}

          overlaps = cache.get_or_compute(f"{name}_t{t0}_m{index}_{set_name}", compute)
          ratio = seq_metrics.uturn_ratio(overlaps["network"], overlaps["bp"])
          label = f"{models[index].block},{models[index].replicate}"
          record["rho"].setdefault(label, {}).setdefault(set_name, []).append(
              {"t": t0, "mean": float(ratio.mean), "se": float(ratio.se),
               "count": ratio.count})
          raw = seq_metrics.overlap_summary(overlaps["network"])
          record["overlap"].setdefault(label, {}).setdefault(set_name, []).append(
              {"t": t0, "mean": float(raw.mean), "se": float(raw.se)})
    result["checkpoints"][name] = record
  return result


def _uturn_models(models) -> list:
  """Return the indices of models (0, 0), (0, 1) and (1, 0) as (block, replicate)."""
  requested = [(0, 0), (0, 1), (1, 0)]
  found = [i for w in requested for i, m in enumerate(models) if (m.block, m.replicate) == w]
  if not found:
    raise ValueError("the zoo has none of the U-turn models (block, replicate) in "
                     f"{requested}; add block 0 to the zoo")
  return found


def _kl_time(stage, summary, grammar, schedule, corpus, config, models, network, workdir,
             analysis) -> dict:
  """KL(BP_0 || BP_k)(t) for k >= 1 and KL(BP_0 || model)(t) at the test-loss minimum."""
  q = grammar.num_symbols
  depth = config.data.depth
  times = np.arange(1, schedule.num_steps + 1, analysis.kl_time_stride)
  tokens = corpus.heldout(0, analysis.kl_time_sequences)
  common = dict(seed=analysis.seed, set_id=probes.HELDOUT_SET, repeats=analysis.kl_time_repeats,
                num_symbols=q, times=times, batch_size=analysis.eval_batch)
  reference = seq_metrics.bp_log_prob_fn(grammar, schedule, 0)
  filtered = seq_metrics.bp_log_prob_fn(grammar, schedule, tuple(range(1, depth + 1)))
  bp_curve = seq_metrics.kl_along_time(reference, filtered, tokens, schedule, **common)
  generators = [i for i, m in enumerate(models) if m.replicate == 0][:analysis.kl_time_models]
  epoch = summary["epoch_min_test_loss"]
  params, kind = _load_params(workdir, epoch, analysis.use_ema, generators)
  log_prob_fn, _ = evaluation.network_functions(network)
  model_curve = seq_metrics.kl_along_time(reference, log_prob_fn, tokens, schedule,
                                          candidate_args=(params,), **common)
  io.write_npz_atomically(stage.path("curves.npz"), times=times,
                          bp_mean=np.asarray(bp_curve.mean), bp_se=np.asarray(bp_curve.se),
                          model_mean=np.asarray(model_curve.mean),
                          model_se=np.asarray(model_curve.se))
  model_mean = np.asarray(model_curve.mean).mean(axis=0)
  return {"times": times.tolist(), "epoch": epoch, "parameters": kind,
          "models": [models[i].to_json() for i in generators],
          "kl_bp0_bpk": {str(k + 1): np.asarray(bp_curve.mean[k]).tolist() for k in range(depth)},
          "kl_bp0_bpk_se": {str(k + 1): np.asarray(bp_curve.se[k]).tolist()
                            for k in range(depth)},
          "kl_bp0_model": np.asarray(model_curve.mean).tolist(),
          "kl_bp0_model_se": np.asarray(model_curve.se).tolist(),
          "inputs_per_time": bp_curve.count,
          "t_over_T_of_model_peak": float(times[int(np.argmax(model_mean))] / schedule.num_steps),
          "t_over_T_of_bp_peaks": {str(k + 1): float(times[int(np.argmax(bp_curve.mean[k]))] /
                                                     schedule.num_steps) for k in range(depth)}}


def _random_uturn(stage, summary, grammar, schedule, corpus, config, models, network, workdir,
                  analysis) -> dict:
  """U-turns from fixed uniformly random sequences, with every kind of denoiser."""
  q = grammar.num_symbols
  depth = config.data.depth
  index = _uturn_models(models)[0]
  block = models[index].block
  length = 2**depth
  tokens = seq_metrics.random_sequences(analysis.seed, analysis.random_uturn_sequences, length, q)
  _, references = seq_metrics.reference_subset(
      corpus.training_block(block, config.data.n), analysis.empirical_references,
      seed=analysis.seed, block=block)
  times = [probes.time_at_fraction(f, schedule.num_steps)
           for f in analysis.random_uturn_time_fractions]
  epochs = summary["epochs"]
  chosen = sorted({epochs[0], summary["epoch_min_nn_divergence"], summary["epoch_min_test_loss"],
                   epochs[-1]})
  _, denoise_fn = evaluation.network_functions(network)
  denoisers = {"empirical": (hierarchical.make_denoiser(
      "empirical", schedule.alpha_bar, grammar=grammar, references=references), _EMPIRICAL_ID)}
  for k in range(depth + 1):
    denoisers[f"bp{k}"] = (hierarchical.make_denoiser(
        "bp", schedule.alpha_bar, grammar=grammar, filtered_levels=k), _BP_ID + 10 * (k + 1))
  common = dict(num_repetitions=analysis.random_uturn_repetitions, seed=analysis.seed,
                set_id=probes.RANDOM_SET, num_symbols=q, batch_size=analysis.eval_batch)
  result = {"times": times, "model": models[index].to_json(), "epochs": chosen, "curves": {}}
  for name, (denoise, denoiser_id) in denoisers.items():
    rows = [seq_metrics.overlap_summary(seq_metrics.uturn_overlaps(
        denoise, schedule, tokens, t0=t0, denoiser_id=denoiser_id, **common)) for t0 in times]
    result["curves"][name] = {"mean": [float(r.mean) for r in rows],
                              "se": [float(r.se) for r in rows]}
  for epoch in chosen:
    params, kind = _load_params(workdir, epoch, analysis.use_ema, [index])
    rows = [seq_metrics.overlap_summary(seq_metrics.uturn_overlaps(
        denoise_fn, schedule, tokens, t0=t0, denoiser_id=_NETWORK_ID, denoise_args=(params,),
        shared_shape=(1,), **common)[0]) for t0 in times]
    result["curves"][f"network_epoch{epoch}"] = {"mean": [float(r.mean) for r in rows],
                                                 "se": [float(r.se) for r in rows],
                                                 "parameters": kind}
  return result


def run(config, workdir: str, get_train_config, sizes: Optional[list] = None) -> dict:
  """Run the tree-data pipeline of a configs/reproduce.py config; returns summaries by size.

  Args:
    config: a configs/reproduce.py config.
    workdir: the pipeline's directory; stages go to <workdir>/hierarchical.
    get_train_config: configs.hierarchical.get_config.
    sizes: labels of the sizes to run; default all of the profile's.
  """
  root = os.path.join(workdir, "hierarchical")
  os.makedirs(root, exist_ok=True)
  summaries = {}
  labels = sizes or list(config.hierarchical.sizes.keys())
  for label in labels:
    if label not in config.hierarchical.sizes:
      raise ValueError(f"unknown size {label!r}; the profile has {list(config.hierarchical.sizes)}")
    logger.info("Tree data, size %s", label)
    summaries[label] = run_size(label, config.hierarchical.sizes[label],
                                config.hierarchical.analysis, root, get_train_config)
  return summaries


def write_summaries(summaries: dict, output_dir: str) -> list:
  """Write summary_<size>.json files; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for label, summary in summaries.items():
    path = os.path.join(output_dir, f"summary_{label}.json")
    io.write_json_atomically(path, _jsonable(summary))
    paths.append(path)
  return paths


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items() if k != "stage_directory"}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def report(summary: dict) -> str:
  """Write a short Markdown report of one size: the minima and the orderings."""
  orderings = summary["orderings"]
  epochs = summary["epochs"]

  def at(curve, epoch):
    i = epochs.index(epoch)
    return f"{curve['mean'][i]:.4g} +- {curve['se'][i]:.2g}"

  split = summary["epoch_min_sample_split_kl"]
  loss = summary["epoch_min_test_loss"]
  nn = summary["epoch_min_nn_divergence"]
  bp0 = summary["epoch_min_kl_bp_model"]["0"]
  lines = [
      f"# Tree data, n = {summary['n']} (depth {summary['depth']})",
      "",
      f"Models: {len(summary['models'])}; probes use the {summary['parameters']} parameters; "
      f"{len(epochs)} checkpoints from epoch {epochs[0]} to {epochs[-1]}.",
      "",
      "| minimum of | epoch | value there |",
      "|---|---|---|",
  ]
  if split is not None:
    lines.append(f"| sample-split KL(A || B) at t = {summary['t_star']} | {split} | "
                 f"{at(summary['sample_split_kl'], split)} nats/seq |")
  lines += [
      f"| KL(BP_0 || model) at t = {summary['t_star']} | {bp0} | "
      f"{at(summary['kl_bp_model']['0'], bp0)} nats/seq |",
      f"| NN divergence | {nn} | {at(summary['nn_divergence'], nn)} nats |",
      f"| test loss | {loss} | {at(summary['test_loss'], loss)} nats/token |",
      "",
      f"- Sample-split minimum before the KL(BP_0 || model) minimum: "
      f"{orderings['sample_split_before_bp0']}.",
      f"- NN-divergence minimum before the test-loss minimum: "
      f"{orderings['nn_divergence_before_test_loss']}.",
      f"- Epochs of the KL(BP_k || model) minima for k = {summary['depth']} ... 0: "
      f"{orderings['sequential_learning_bp_k_minima_from_k_depth_to_0']} "
      f"(non-decreasing: {orderings['sequential_learning_non_decreasing']}).",
      "",
      "Each ordering counts only when the two minima fall on different checkpoints; the "
      "grid resolves a minimum to +-1 checkpoint. Error bars: " + summary["error_bars"] + ".",
  ]
  method = summary["sample_split_kl"].get("se_method")
  if method:
    lines.append(f"The sample-split KL's error bar here is the {method}.")
  return "\n".join(lines) + "\n"
