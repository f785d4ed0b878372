"""Figures of the real-image setting, drawn from the pipeline's summary.

Every figure is written as PNG and PDF next to the data it shows (CSV for
curves, NPZ and JSON for the image panels):

  fig1a_left    cosine distance D(e) of paired samples (left axis) and the
                median test loss (right axis) vs epoch, both minima marked
  fig1a_right   typical paired samples with their nearest neighbours in each
                model's own block, at tau_cos and at the last sampled epoch
  fig2          predicted-noise similarity on train vs held-out probes, with
                the test loss at the same time on a twin axis
  companion     own-block share, memorised fraction and the median
                nearest-neighbour correlation of the samples

The figures use matplotlib's object-oriented API (no pyplot), so drawing
changes no global backend state.
"""

import csv
import io as python_io
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from biasdiff import io

logger = logging.getLogger(__name__)

FORMATS = ("png", "pdf")
_DPI = 150


def _save(figure: Figure, directory: str, name: str) -> list[str]:
  """Write `figure` as name.png and name.pdf; return the file names."""
  names = []
  for suffix in FORMATS:
    filename = f"{name}.{suffix}"
    buffer = python_io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=_DPI, bbox_inches="tight")
    io.write_file_atomically(os.path.join(directory, filename),
                             lambda file, data=buffer.getvalue(): file.write(data))
    names.append(filename)
  return names


def _write_csv(directory: str, name: str, header: Sequence[str],
               columns: Sequence[Sequence[Any]]) -> str:
  """Write equal-length columns as name.csv (empty cells for None); return the file name."""
  lengths = {len(column) for column in columns}
  if len(lengths) != 1:
    raise ValueError(f"CSV columns of {name} differ in length: {sorted(lengths)}.")
  text = python_io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(header)
  for row in zip(*columns):
    writer.writerow(["" if value is None else value for value in row])
  filename = f"{name}.csv"
  io.write_file_atomically(os.path.join(directory, filename),
                           lambda file: file.write(text.getvalue().encode("utf-8")))
  return filename


def _values(values: Sequence[Any]) -> np.ndarray:
  """Convert a JSON list with None for missing values to a float array with NaN."""
  return np.array([np.nan if v is None else v for v in values], np.float64)


def _epoch_label(summary: Mapping[str, Any]) -> str:
  steps = summary["steps_per_epoch"]
  return f"epoch ({steps} optimizer step{'' if steps == 1 else 's'} per epoch)"


def draw_distance_and_loss(summary: Mapping[str, Any], directory: str) -> list[str]:
  """Draw Fig. 1(a) left: D(e) with its error bar and the median test loss vs epoch."""
  distance = summary["cosine_distance"]
  epochs = np.asarray(distance["epochs"])
  value, se = _values(distance["value"]), _values(distance["se"])
  per_pair = np.array([_values(p) for p in distance["per_pair"]])
  all_epochs = np.asarray(summary["epochs"])
  loss = summary["test_loss"]
  loss_all, loss_all_se = _values(loss["all_t"]["median"]), _values(loss["all_t"]["se"])
  loss_trained = _values(loss["trained_t"]["median"])
  tau_cos = summary["epoch_min_cosine_distance"]
  tau_loss = summary["epoch_min_test_loss"]["all_t"]["epoch"]

  figure = Figure(figsize=(6.4, 4.2))
  axis = figure.add_subplot()
  for curve in per_pair:
    axis.plot(epochs, curve, color="tab:blue", alpha=0.12, linewidth=0.8)
  axis.errorbar(epochs, value, yerr=np.nan_to_num(se), color="tab:blue", marker="o", markersize=3,
                capsize=2, label="D(e) = 1 - median over pairs of mean r")
  axis.set_xlabel(_epoch_label(summary))
  axis.set_ylabel("paired-sample cosine distance D(e)", color="tab:blue")
  axis.axvline(tau_cos, color="tab:blue", linestyle=":", label=f"min D at epoch {tau_cos}")
  twin = axis.twinx()
  twin.plot(all_epochs, loss_all, color="tab:red", marker="s", markersize=2,
            label="median test loss, all t")
  twin.fill_between(all_epochs, loss_all - np.nan_to_num(loss_all_se),
                    loss_all + np.nan_to_num(loss_all_se), color="tab:red", alpha=0.15)
  twin.plot(all_epochs, loss_trained, color="tab:red", linestyle="--", linewidth=0.8,
            label="median test loss, t >= 1")
  twin.axvline(tau_loss, color="tab:red", linestyle=":", label=f"min test loss at epoch {tau_loss}")
  twin.set_ylabel("test denoising loss", color="tab:red")
  if all_epochs.min() > 0 and all_epochs.max() / all_epochs.min() > 20:
    axis.set_xscale("log")
  lines = axis.get_legend_handles_labels()
  twin_lines = twin.get_legend_handles_labels()
  axis.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=7, loc="upper center")
  axis.set_title(f"{summary['counts']['num_models']} models, {summary['counts']['num_pairs']} "
                 f"pairs, {summary['counts']['num_samples']} paired samples each "
                 f"({summary['parameters']} parameters)", fontsize=9)
  names = _save(figure, directory, "fig1a_left")

  sampled = {int(e): c for c, e in enumerate(epochs)}
  rows = [sampled.get(int(e)) for e in all_epochs]
  names.append(_write_csv(
      directory, "fig1a_left",
      ["epoch", "step", "cosine_distance", "cosine_distance_se", "test_loss_all_t_median",
       "test_loss_all_t_se", "test_loss_trained_t_median"],
      [all_epochs.tolist(), summary["steps"],
       [None if r is None else distance["value"][r] for r in rows],
       [None if r is None else distance["se"][r] for r in rows],
       loss["all_t"]["median"], loss["all_t"]["se"], loss["trained_t"]["median"]]))
  return names


def draw_neighbour_panels(summary: Mapping[str, Any], panels: Mapping[str, np.ndarray],
                          directory: str) -> list[str]:
  """Draw Fig. 1(a) right: rows [NN in block i, x^i, x^j, NN in block j] at two epochs."""
  images = panels["images"]  # [2, R, 4, H, W]
  num_epochs, num_rows = images.shape[:2]
  block_i, block_j = (int(b) for b in panels["blocks"])
  height = 1.1 * num_rows + 0.8
  figure = Figure(figsize=(1.1 * 4 * num_epochs + 0.4, height))
  top = 1.0 - 0.55 / height
  grid = figure.add_gridspec(num_rows, 4 * num_epochs, wspace=0.08, hspace=0.45, top=top)
  titles = [f"NN in block {block_i}", f"x^{block_i}", f"x^{block_j}", f"NN in block {block_j}"]
  for e in range(num_epochs):
    for row in range(num_rows):
      for column in range(4):
        axis = figure.add_subplot(grid[row, 4 * e + column])
        axis.imshow(images[e, row, column], cmap="gray", vmin=0.0, vmax=1.0)
        axis.set_xticks([])
        axis.set_yticks([])
        if row == 0:
          axis.set_title(titles[column], fontsize=6)
        if column == 0:
          axis.set_xlabel(f"{panels['nn_correlation'][e, row, 0]:.2f}", fontsize=6, labelpad=1)
        if column == 1:
          axis.set_xlabel(f"r = {panels['correlation'][e, row]:.2f}", fontsize=6, labelpad=1)
        if column == 3:
          axis.set_xlabel(f"{panels['nn_correlation'][e, row, 1]:.2f}", fontsize=6, labelpad=1)
    left, right = grid[0, 4 * e].get_position(figure).x0, grid[0, 4 * e + 3].get_position(figure).x1
    figure.text((left + right) / 2, 1.0 - 0.1 / height, f"epoch {int(panels['epochs'][e])}",
                ha="center", va="top", fontsize=9)
  names = _save(figure, directory, "fig1a_right")

  io.write_npz_atomically(os.path.join(directory, "fig1a_right.npz"), **dict(panels))
  record = {
      "epochs": panels["epochs"].tolist(),
      "pair_positions": panels["pair"].tolist(),
      "blocks": panels["blocks"].tolist(),
      "columns": ["nearest neighbour of x^i in block i (max Pearson r)", "x^i", "x^j",
                  "nearest neighbour of x^j in block j"],
      "sample_index": panels["sample_index"].tolist(),
      "pair_correlation": panels["correlation"].tolist(),
      "nn_correlation": panels["nn_correlation"].tolist(),
      "selection": "samples whose r is closest to the pair's mean r at that epoch",
  }
  io.write_json_atomically(os.path.join(directory, "fig1a_right.json"), record)
  return names + ["fig1a_right.npz", "fig1a_right.json"]


def draw_noise_similarity(summary: Mapping[str, Any], directory: str) -> list[str]:
  """Draw Fig. 2: S_train and S_test +- SE with the test loss at the same t."""
  info = summary["noise_similarity"]
  t = str(info["figure_time"])
  epochs = np.asarray(summary["epochs"])
  train = summary["noise_similarity_train"][t]
  test = summary["noise_similarity_test"][t]
  loss = _values(info["probe_loss"][t])
  train_value, test_value = _values(train["value"]), _values(test["value"])

  figure = Figure(figsize=(6.4, 6.0))
  axis, lower = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
  axis.errorbar(epochs, train_value, yerr=np.nan_to_num(_values(train["se"])), color="tab:orange",
                marker="o", markersize=3, capsize=2, label="S_train (train probes of one model)")
  axis.errorbar(epochs, test_value, yerr=np.nan_to_num(_values(test["se"])), color="tab:green",
                marker="o", markersize=3, capsize=2, label="S_test (held-out probes)")
  axis.axvline(info["epoch_max_train"][t], color="tab:orange", linestyle="--",
               label=f"max S_train at epoch {info['epoch_max_train'][t]}")
  epoch_max_test = int(epochs[int(np.nanargmax(test_value))])
  axis.axvline(epoch_max_test, color="tab:green", linestyle="--",
               label=f"max S_test at epoch {epoch_max_test}")
  axis.set_ylabel(f"cosine similarity of predicted noise, t = {t}")
  twin = axis.twinx()
  twin.plot(epochs, loss, color="tab:red", linewidth=1.0, label=f"test loss at t = {t}")
  epoch_min_loss = int(epochs[int(np.nanargmin(loss))])
  twin.axvline(epoch_min_loss, color="tab:red", linestyle=":",
               label=f"min test loss at t = {t}: epoch {epoch_min_loss}")
  twin.set_ylabel(f"test denoising loss at t = {t}", color="tab:red")
  lines = axis.get_legend_handles_labels()
  twin_lines = twin.get_legend_handles_labels()
  axis.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=7, loc="lower right")

  difference = info["difference"][t]
  lower.errorbar(epochs, _values(difference["value"]), yerr=np.nan_to_num(_values(difference["se"])),
                 color="black", marker="o", markersize=3, capsize=2,
                 label="S_test - S_train (jackknife SE)")
  lower.axhline(0.0, color="gray", linewidth=0.8)
  lower.set_ylabel("S_test - S_train")
  lower.set_xlabel(_epoch_label(summary))
  lower.legend(fontsize=7, loc="upper left")
  if epochs.min() > 0 and epochs.max() / epochs.min() > 20:
    axis.set_xscale("log")
  names = _save(figure, directory, "fig2")

  columns = [epochs.tolist(), summary["steps"]]
  header = ["epoch", "step"]
  for probe_time in summary["noise_similarity_train"]:
    header += [f"S_train_t{probe_time}", f"S_train_se_t{probe_time}", f"S_test_t{probe_time}",
               f"S_test_se_t{probe_time}", f"S_test_minus_S_train_t{probe_time}",
               f"S_test_minus_S_train_se_t{probe_time}", f"test_loss_t{probe_time}"]
    columns += [summary["noise_similarity_train"][probe_time]["value"],
                summary["noise_similarity_train"][probe_time]["se"],
                summary["noise_similarity_test"][probe_time]["value"],
                summary["noise_similarity_test"][probe_time]["se"],
                info["difference"][probe_time]["value"],
                info["difference"][probe_time]["se"],
                info["probe_loss"][probe_time]]
  names.append(_write_csv(directory, "fig2", header, columns))
  return names


def draw_companion(summary: Mapping[str, Any], directory: str) -> list[str]:
  """Draw the own-block share, the memorised fraction and the NN correlation vs epoch."""
  epochs = np.asarray(summary["cosine_distance"]["epochs"])
  share = summary["own_block_share"]
  memorised = summary["memorised_fraction"]
  nn_median = _values(summary["nn_correlation_median"])
  tau_cos = summary["epoch_min_cosine_distance"]
  tau_loss = summary["epoch_min_test_loss"]["all_t"]["epoch"]

  figure = Figure(figsize=(6.4, 5.6))
  top, bottom = figure.subplots(2, 1, sharex=True)
  top.errorbar(epochs, _values(share["value"]), yerr=np.nan_to_num(_values(share["se"])),
               color="tab:purple", marker="o", markersize=3, capsize=2,
               label="share of samples nearer their own block than another model's")
  top.axhline(0.5, color="gray", linewidth=0.8)
  top.set_ylabel("own-block share")
  twin = top.twinx()
  twin.plot(epochs, nn_median, color="tab:brown", linewidth=1.0,
            label="median NN Pearson r in own block")
  twin.set_ylabel("NN correlation", color="tab:brown")
  lines = top.get_legend_handles_labels()
  twin_lines = twin.get_legend_handles_labels()
  top.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=7, loc="upper left")
  value = _values(memorised["value"])
  bottom.plot(epochs, value, color="black", marker="o", markersize=3,
              label="memorised fraction (d1 / d2 < 1/3)")
  bottom.fill_between(epochs, _values(memorised["low"]), _values(memorised["high"]),
                      color="gray", alpha=0.3, label="95% bootstrap interval")
  bottom.set_ylabel("memorised fraction")
  bottom.set_xlabel(_epoch_label(summary))
  for axis in (top, bottom):
    axis.axvline(tau_cos, color="tab:blue", linestyle=":")
    axis.axvline(tau_loss, color="tab:red", linestyle=":")
    if epochs.min() > 0 and epochs.max() / epochs.min() > 20:
      axis.set_xscale("log")
  bottom.legend(fontsize=7)
  figure.suptitle(f"dotted: min D (epoch {tau_cos}, blue) and min test loss (epoch {tau_loss}, red)",
                  fontsize=8)
  names = _save(figure, directory, "companion")
  names.append(_write_csv(
      directory, "companion",
      ["epoch", "own_block_share", "own_block_share_se", "memorised_fraction",
       "memorised_low", "memorised_high", "nn_correlation_median"],
      [epochs.tolist(), share["value"], share["se"], memorised["value"], memorised["low"],
       memorised["high"], summary["nn_correlation_median"]]))
  return names


def draw_all(summary: Mapping[str, Any], panels: Mapping[str, np.ndarray],
             directory: str) -> list[str]:
  """Draw every figure into `directory`; return the names of the files written."""
  os.makedirs(directory, exist_ok=True)
  names = []
  names += draw_distance_and_loss(summary, directory)
  names += draw_neighbour_panels(summary, panels, directory)
  names += draw_noise_similarity(summary, directory)
  names += draw_companion(summary, directory)
  logger.info("Wrote %d figure files to %s.", len(names), directory)
  return names
