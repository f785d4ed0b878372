"""Curves, minima and error bars of the image pipeline, from per-checkpoint arrays.

Statistics, for M models on disjoint blocks and P = M (M - 1) / 2 pairs:

- test loss L_m(e) = sum_t w(t) mean_i loss(m, t, i) for the two time
  averages (all t, and t >= 1); the curve is the median over models with a
  bootstrap SE across models, and tau_loss is the argmin of that median;
- cosine distance D(e) = 1 - median over pairs of m_ij(e), with
  m_ij = mean_k r_k the mean Pearson correlation of paired samples; its SE is
  the leave-one-model-out jackknife (pairs share models), tau_cos = argmin D;
- predicted-noise similarity S_train (ordered pairs, train probes of the
  first model) and S_test (unordered pairs, held-out probes) with jackknife
  SEs;
- memorised fraction over the pooled samples of all models, with a bootstrap
  SE and interval over samples;
- own-block share: over ordered pairs (m, j), the fraction of model m's
  samples that lie closer (Euclidean, to the nearest image) to block m than
  to block j, with a jackknife SE.
"""

import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from biasdiff.metrics import images as image_metrics
from biasdiff.metrics import stats
from biasdiff.pipeline import images_eval

logger = logging.getLogger(__name__)

# Bump when the summary's layout or statistics change, so stored summaries are redone.
SUMMARY_VERSION = 2
FIGURES_VERSION = 2
# First id of the bootstrap resamples drawn here, apart from those of the
# per-model memorised fractions (which use the checkpoint's epoch).
_BOOTSTRAP_IDS = {"all_t": 1_000_001, "trained_t": 1_000_002, "memorised": 1_000_003}


def _floats(values: Any) -> list:
  """Return nested JSON lists of floats; NaN and infinity become None."""
  array = np.asarray(values, np.float64)
  if array.ndim > 1:
    return [_floats(row) for row in array]
  return [float(v) if np.isfinite(v) else None for v in array.reshape(-1)]


def loss_curves(config, arrays: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Return the per-model time-averaged test losses [M, C] and per-t losses [C, M, T']."""
  times, all_weights, trained_weights = images_eval.loss_times(config.diffusion.num_steps,
                                                               config.eval.loss_num_times)
  per_time = np.stack([a["loss_per_image"].mean(axis=-1) for a in arrays])  # [C, M, T']
  return {
      "times": times,
      "per_time": per_time,
      "all_t": np.einsum("cmt,t->mc", per_time, all_weights),
      "trained_t": np.einsum("cmt,t->mc", per_time, trained_weights),
  }


def _median_curve(curves: np.ndarray, seed: int, first_id: int, num_resamples: int) -> dict:
  """Median over models of [M, C] curves with a bootstrap SE across models per checkpoint.

  With one model the SE is NaN.
  """
  se = []
  for c in range(curves.shape[1]):
    if curves.shape[0] < 2:
      se.append(np.nan)
      continue
    result = stats.bootstrap(curves[:, c], seed, "median", num_resamples=num_resamples,
                             ids=(first_id, c))
    se.append(result.se)
  return {"median": np.median(curves, axis=0), "se": np.asarray(se)}


def summarise(config, data_result: Mapping[str, Any], train_result: Mapping[str, Any],
              evaluate_result: Mapping[str, Any], arrays: Sequence[Mapping[str, np.ndarray]],
              sampler: Mapping[str, Any]) -> dict:
  """Build the summary dictionary (JSON-serialisable) of one evaluated run."""
  evaluation = config.eval
  epochs = np.asarray(evaluate_result["epochs"])
  sampling_epochs = np.asarray(evaluate_result["sampling_epochs"])
  steps_per_epoch = int(train_result["steps_per_epoch"])
  num_models = len(train_result["models"])
  pairs = image_metrics.unordered_pairs(num_models)
  summary: dict[str, Any] = {
      "experiment": "images",
      "variant": config.variant,
      "data": {
          "source": config.data.source,
          "sha256": data_result["sha256"],
          "image_shape": data_result["image_shape"],
          "block_size": data_result["block_size"],
          "heldout_size": data_result["heldout_size"],
          "centering": config.data.centering,
      },
      "models": [{"block": m["block"], "seed": m["seed"], "shift": s}
                 for m, s in zip(train_result["models"], train_result["shifts"])],
      "parameters": "ema" if evaluation.use_ema else "raw",
      "ema_decay": float(config.train.ema_decay),
      "steps_per_epoch": steps_per_epoch,
      "epochs": epochs.tolist(),
      "steps": (epochs * steps_per_epoch).tolist(),
      "sampling_epochs": sampling_epochs.tolist(),
      "sampler": dict(sampler),
      "counts": {
          "num_models": num_models,
          "num_pairs": int(pairs.shape[0]),
          "num_samples": int(evaluation.num_samples),
          "loss_images": len(evaluate_result["loss_indices"]),
          "loss_times": None,
          "num_probes": int(evaluation.num_probes),
          "probe_times": [int(t) for t in evaluation.probe_times],
          "num_bootstrap": int(evaluation.num_bootstrap),
      },
      "seeds": {
          "training": [m["seed"] for m in train_result["models"]],
          "data": int(config.data.data_seed),
          "sample": int(evaluation.sample_seed),
          "loss": int(evaluation.loss_seed),
          "probe": int(evaluation.probe_seed),
      },
      "loss_indices": list(evaluate_result["loss_indices"]),
      "stage_seconds": {name: result.get("seconds")
                        for name, result in (("data", data_result), ("train", train_result),
                                             ("evaluate", evaluate_result))},
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": [str(d) for d in jax.devices()]},
  }

  # Test loss on every evaluated checkpoint.
  losses = loss_curves(config, arrays)
  summary["counts"]["loss_times"] = int(losses["times"].size)
  test_loss = {"times": losses["times"].tolist(),
               "per_time_median": _floats(np.median(losses["per_time"], axis=1))}
  minima = {}
  for name in ("all_t", "trained_t"):
    curve = _median_curve(losses[name], evaluation.loss_seed,
                          _BOOTSTRAP_IDS[name], evaluation.num_bootstrap)
    test_loss[name] = {"median": _floats(curve["median"]), "se": _floats(curve["se"]),
                       "per_model": _floats(losses[name])}
    argmin = stats.grid_argmin(losses[name], epochs, aggregate="median")
    in_window = stats.grid_argmin(losses[name][:, :sampling_epochs.size],
                                  sampling_epochs, aggregate="median")
    minima[name] = {"epoch": int(argmin.value), "per_model": argmin.unit_values.tolist(),
                    "in_sampling_window": int(in_window.value)}
  summary["test_loss"] = test_loss
  summary["epoch_min_test_loss"] = minima

  # Paired samples.
  sampled = [a for a in arrays if "pair_correlations" in a]
  pair_means = np.stack([a["pair_correlations"].mean(axis=1) for a in sampled], axis=1)  # [P, S]
  distance = stats.jackknife(1.0 - pair_means, pairs, statistic="median")
  tau_index = int(np.argmin(distance.estimate))
  tau_cos = int(sampling_epochs[tau_index])
  loo_minima = sampling_epochs[np.argmin(distance.leave_one_out, axis=1)]
  per_pair_minima = sampling_epochs[np.argmin(1.0 - pair_means, axis=1)]
  summary["cosine_distance"] = {
      "epochs": sampling_epochs.tolist(),
      "value": _floats(distance.estimate),
      "se": _floats(distance.se),
      "error_bar": "leave-one-model-out jackknife over models",
      "per_pair": _floats(1.0 - pair_means),
      "pairs": pairs.tolist(),
      "histogram_bins": np.linspace(-1.0, 1.0, 41).tolist(),
      "per_pair_histogram": [
          np.stack([np.histogram(a["pair_correlations"][p], np.linspace(-1.0, 1.0, 41))[0]
                    for a in sampled]).tolist() for p in range(pairs.shape[0])],
  }
  summary["epoch_min_cosine_distance"] = tau_cos
  summary["epoch_min_cosine_distance_spread"] = {
      "leave_one_model_out": loo_minima.tolist(),
      "per_pair": per_pair_minima.tolist(),
  }
  summary["ordering"] = _ordering(distance, sampling_epochs, tau_index, minima, per_pair_minima,
                                  loo_minima)

  # Memorisation and own-block share over the paired samples.
  summary["memorised_fraction"] = _memorised(sampled, evaluation.sample_seed,
                                             evaluation.num_bootstrap)
  summary["own_block_share"] = _own_block_share(sampled, num_models)
  summary["nn_correlation_median"] = _floats([np.median(a["nn_correlation"]) for a in sampled])

  # Predicted-noise similarity.
  train_s, test_s, difference, argmax = {}, {}, {}, {}
  probe_loss = {}
  for p, t in enumerate(evaluation.probe_times):
    results = [image_metrics.noise_similarity(a["train_pair_means"][p], a["test_pair_means"][p])
               for a in arrays]
    train_curve = np.array([r.train.estimate for r in results], np.float64)
    train_s[str(t)] = {"value": _floats(train_curve),
                       "se": _floats([r.train.se for r in results])}
    test_s[str(t)] = {"value": _floats([r.test.estimate for r in results]),
                      "se": _floats([r.test.se for r in results])}
    difference[str(t)] = _difference(results)
    argmax[str(t)] = int(epochs[int(np.argmax(train_curve))])
    probe_loss[str(t)] = _floats([a["probe_loss"][p].mean() for a in arrays])
  summary["noise_similarity_train"] = train_s
  summary["noise_similarity_test"] = test_s
  summary["noise_similarity"] = {
      "figure_time": int(evaluation.figure_time),
      "epoch_max_train": argmax,
      "difference": difference,
      "probe_loss": probe_loss,
      "train_pairs": "ordered (a, b), a != b, on train probes of block a",
      "test_pairs": "unordered, on the held-out probes",
      "error_bar": "leave-one-model-out jackknife over models",
  }
  logger.info("Minimum of D at epoch %d, of the median test loss at epoch %d (all t) and %d "
              "(t >= 1).", tau_cos, minima["all_t"]["epoch"], minima["trained_t"]["epoch"])
  return summary


def _difference(results: Sequence[image_metrics.NoiseSimilarity]) -> dict:
  """S_test - S_train per checkpoint with the jackknife SE of the difference.

  Both statistics leave out the same models, so the SE comes from the
  leave-one-model-out differences.
  """
  value, se = [], []
  for result in results:
    value.append(result.difference)
    train, test = result.train, result.test
    if train.num_groups < 2 or not np.array_equal(train.groups, test.groups):
      se.append(np.nan)
      continue
    leave_one_out = test.leave_one_out - train.leave_one_out
    groups = leave_one_out.shape[0]
    se.append(np.sqrt((groups - 1) / groups * np.sum((leave_one_out - leave_one_out.mean())**2)))
  return {"value": _floats(value), "se": _floats(se)}


def _ordering(distance, sampling_epochs: np.ndarray, tau_index: int, minima: Mapping[str, Any],
              per_pair_minima: np.ndarray, loo_minima: np.ndarray) -> dict:
  """Compare tau_cos with tau_loss and measure the rise of D after its minimum.

  The rise is D(e_end) - D(tau_cos), where e_end is the last sampled epoch at or
  before tau_loss (all t). Its SE is the jackknife of the same difference over
  the leave-one-model-out curves.
  """
  tau_cos = int(sampling_epochs[tau_index])
  tau_loss = minima["all_t"]["epoch"]
  before = sampling_epochs[sampling_epochs <= tau_loss]
  end_index = int(before.size - 1) if before.size else tau_index
  rise = float(distance.estimate[end_index] - distance.estimate[tau_index])
  leave_one_out = distance.leave_one_out[:, end_index] - distance.leave_one_out[:, tau_index]
  groups = leave_one_out.shape[0]
  rise_se = float(np.sqrt((groups - 1) / groups * np.sum(
      (leave_one_out - leave_one_out.mean())**2))) if groups >= 2 else float("nan")
  return {
      "tau_cos": tau_cos,
      "tau_loss_all_t": tau_loss,
      "tau_loss_trained_t": minima["trained_t"]["epoch"],
      "tau_cos_before_tau_loss_all_t": bool(tau_cos < tau_loss),
      "tau_cos_before_tau_loss_trained_t": bool(tau_cos < minima["trained_t"]["epoch"]),
      "pairs_with_tau_cos_before_tau_loss": int(np.sum(per_pair_minima < tau_loss)),
      "leave_one_model_out_tau_cos_before_tau_loss": int(np.sum(loo_minima < tau_loss)),
      "rise": {"from_epoch": tau_cos, "to_epoch": int(sampling_epochs[end_index]),
               "value": rise, "se": rise_se},
  }


def _memorised(sampled: Sequence[Mapping[str, np.ndarray]], seed: int, num_resamples: int) -> dict:
  """Pooled memorised fraction per sampled checkpoint with a bootstrap over samples."""
  value, se, low, high, per_model = [], [], [], [], []
  for c, arrays in enumerate(sampled):
    result = stats.bootstrap(arrays["memorised"].reshape(-1), seed, "mean",
                             num_resamples=num_resamples, ids=(_BOOTSTRAP_IDS["memorised"], c))
    value.append(result.estimate)
    se.append(result.se)
    low.append(result.low)
    high.append(result.high)
    per_model.append(arrays["memorised_fraction"][:, 0])
  return {"value": _floats(value), "se": _floats(se), "low": _floats(low), "high": _floats(high),
          "per_model": _floats(np.stack(per_model, axis=1)),
          "rule": "nearest / second-nearest Euclidean distance to the own block < ratio",
          "interval": "95% percentile bootstrap over the pooled samples"}


def _own_block_share(sampled: Sequence[Mapping[str, np.ndarray]], num_models: int) -> dict:
  """Share of samples nearer their own block than another model's block, per checkpoint."""
  ordered = np.argwhere(~np.eye(num_models, dtype=bool))  # [M (M - 1), 2]
  value, se = [], []
  for arrays in sampled:
    distance = arrays["block_distance"]  # [M, M, N]
    own = distance[ordered[:, 0], ordered[:, 0]]  # [O, N]
    other = distance[ordered[:, 0], ordered[:, 1]]
    result = stats.jackknife((own < other).mean(axis=1), ordered)
    value.append(float(result.estimate))
    se.append(float(result.se))
  return {"value": _floats(value), "se": _floats(se),
          "pairs": "ordered (m, j), m != j; fraction of m's samples nearer block m than block j",
          "error_bar": "leave-one-model-out jackknife over models"}


def panel_data(config, inputs: images_eval.EvalInputs, summary: Mapping[str, Any],
               arrays: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Pick typical paired samples with their nearest neighbours for Fig. 1(a) right.

  For the pair (i, j) = eval.panel_pair at tau_cos and at the last sampled
  checkpoint, the rows are the eval.panel_rows samples whose r_k lies closest
  to the pair's mean m_ij; each row holds [NN of x^i in block i, x^i, x^j,
  NN of x^j in block j] with r_k and both NN correlations.

  Returns:
    epochs [2]; images [2, R, 4, H, W]; correlation [2, R]; nn_correlation
    [2, R, 2]; sample_index [2, R]; pair [2]; blocks [2].
  """
  i, j = (int(p) for p in config.eval.panel_pair)
  pairs = image_metrics.unordered_pairs(inputs.num_models)
  pair_index = int(np.flatnonzero((pairs[:, 0] == min(i, j)) & (pairs[:, 1] == max(i, j)))[0])
  epochs = np.asarray(summary["epochs"])
  sampling_epochs = summary["sampling_epochs"]
  chosen = [summary["epoch_min_cosine_distance"], sampling_epochs[-1]]
  rows = min(int(config.eval.panel_rows), int(config.eval.num_samples))
  images, correlation, nn_correlation, sample_index = [], [], [], []
  for epoch in chosen:
    item = arrays[int(np.flatnonzero(epochs == epoch)[0])]
    r = item["pair_correlations"][pair_index]  # [N]
    order = np.argsort(np.abs(r - r.mean()), kind="stable")[:rows]
    samples = item["samples"].astype(np.float32)[..., 0]  # [M, N, H, W]
    panel = []
    for k in order:
      neighbour_i = inputs.train_images[i, item["nn_index"][i, k], ..., 0]
      neighbour_j = inputs.train_images[j, item["nn_index"][j, k], ..., 0]
      panel.append(np.stack([neighbour_i, samples[i, k], samples[j, k], neighbour_j]))
    images.append(np.stack(panel))
    correlation.append(r[order])
    nn_correlation.append(np.stack([item["nn_correlation"][i, order],
                                    item["nn_correlation"][j, order]], axis=1))
    sample_index.append(order)
  return {
      "epochs": np.asarray(chosen, np.int64),
      "images": np.stack(images).astype(np.float32),
      "correlation": np.stack(correlation),
      "nn_correlation": np.stack(nn_correlation),
      "sample_index": np.stack(sample_index).astype(np.int64),
      "pair": np.array([i, j], np.int64),
      "blocks": np.array([int(inputs.blocks[i]), int(inputs.blocks[j])], np.int64),
  }
