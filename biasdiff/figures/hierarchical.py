"""Figures of the tree-data setting, drawn from the pipeline's summaries.

Each `plot_*` function takes summaries (dicts from
`biasdiff.pipeline.hierarchical.summarise` plus the U-turn and KL-along-time
stages), draws one figure, and `save` writes it as PNG and PDF together with
the plotted numbers as JSON, so every figure can be redrawn or checked.
Training-time axes are in epochs; error bands are +-1 SE as the summary
defines it.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from biasdiff import io  # pylint: disable=g-import-not-at-top

_K_COLOURS = plt.get_cmap("viridis")


def save(figure, data: dict, output_dir: str, name: str) -> list:
  """Write <name>.png, <name>.pdf and <name>.json (the plotted data); return the paths."""
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for extension in ("png", "pdf"):
    path = os.path.join(output_dir, f"{name}.{extension}")
    figure.savefig(path, dpi=150, bbox_inches="tight")
    paths.append(path)
  plt.close(figure)
  path = os.path.join(output_dir, f"{name}.json")
  io.write_file_atomically(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
  return paths + [path]


def _band(axis, x, curve: dict, **style):
  mean, se = np.asarray(curve["mean"], float), np.asarray(curve["se"], float)
  line, = axis.plot(x, mean, **style)
  if np.all(np.isfinite(se)):
    axis.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
  return line


def _mark(axis, epoch, label, colour):
  if epoch is not None:
    axis.axvline(epoch, color=colour, ls=":", lw=1.2, label=label)


def _split_panel(axis, summary: dict, which: str):
  """KL(BP_k || model) on the left axis and the pair KL on the right axis."""
  epochs = np.asarray(summary["epochs"])
  depth = summary["depth"]
  oracle = summary["kl_bp_model" if which != "train" else "kl_bp_model_train"]
  for k in range(depth + 1):
    _band(axis, epochs, oracle[str(k)], color=_K_COLOURS(k / max(depth, 1)), label=f"BP$_{k}$")
  axis.set_xscale("log")
  axis.set_yscale("log")
  axis.set_xlabel("epoch")
  axis.set_ylabel(r"KL(BP$_k$ $\|$ model) [nats/seq]")
  right = axis.twinx()
  if which == "control":
    pair = summary["same_data_kl"]
    label = "same data, two seeds"
  else:
    pair = summary["sample_split_kl" if which == "test" else "sample_split_kl_train"]
    label = "KL(A $\\|$ B), disjoint data"
  if pair and pair["mean"]:
    _band(right, epochs, pair, color="crimson", lw=2, label=label)
  right.set_yscale("log")
  right.set_ylabel("KL(A $\\|$ B) [nats/seq]", color="crimson")
  _mark(axis, summary["epoch_min_sample_split_kl"], "min KL(A$\\|$B)", "crimson")
  _mark(axis, summary["epoch_min_kl_bp_model"]["0"], "min KL(BP$_0\\|$model)", "black")
  axis.set_title({"test": "held-out inputs", "train": "A's training inputs",
                  "control": "same-data control"}[which])
  return right


def plot_fig1b(summary: dict):
  """Fig. 1(b): KL(BP_k || model) and the sample-split KL at t*, three panels."""
  figure, axes = plt.subplots(1, 3, figsize=(17, 4.4), layout="constrained")
  rights = [_split_panel(axis, summary, which)
            for axis, which in zip(axes, ("test", "train", "control"))]
  handles = axes[0].get_legend_handles_labels()
  handles_right = rights[0].get_legend_handles_labels()
  axes[0].legend(handles[0] + handles_right[0], handles[1] + handles_right[1], fontsize=7)
  figure.suptitle(f"Sample-split KL at t = {summary['t_star']} (n = {summary['n']}, "
                  f"{summary['parameters']} parameters)")
  data = {k: summary[k] for k in ("epochs", "kl_bp_model", "kl_bp_model_train",
                                  "sample_split_kl", "sample_split_kl_train", "same_data_kl",
                                  "epoch_min_sample_split_kl", "epoch_min_kl_bp_model")}
  return figure, data


def plot_fig6(summaries: dict):
  """Fig. 6: the held-out panel of Fig. 1(b) for every training-set size of the profile."""
  figure, axes = plt.subplots(1, len(summaries), figsize=(5.8 * len(summaries), 4.4),
                              squeeze=False, layout="constrained")
  for axis, (label, summary) in zip(axes[0], summaries.items()):
    _split_panel(axis, summary, "test")
    axis.set_title(f"n = {summary['n']}")
  axes[0][0].legend(fontsize=7)
  data = {label: {k: s[k] for k in ("epochs", "kl_bp_model", "sample_split_kl")}
          for label, s in summaries.items()}
  return figure, data


def plot_fig3b(summaries: dict):
  """Fig. 3(b): KL(BP_0 || BP_k)(t) (dashed) and KL(BP_0 || model)(t) at the test-loss minimum."""
  figure, axis = plt.subplots(figsize=(7, 4.5), layout="constrained")
  data = {}
  first = next(iter(summaries.values()))["kl_time"]
  num_steps = next(iter(summaries.values()))["num_steps_diffusion"]
  times = np.asarray(first["times"]) / num_steps
  for k, curve in first["kl_bp0_bpk"].items():
    depth = len(first["kl_bp0_bpk"])
    _band(axis, times, {"mean": curve, "se": first["kl_bp0_bpk_se"][k]}, ls="--",
          color=_K_COLOURS(int(k) / depth), label=f"KL(BP$_0\\|$BP$_{k}$)")
  data["kl_bp0_bpk"] = {"t_over_T": times.tolist(), **first["kl_bp0_bpk"]}
  for label, summary in summaries.items():
    kl_time = summary["kl_time"]
    per_model = np.asarray(kl_time["kl_bp0_model"])  # [models, T]
    mean = per_model.mean(axis=0)
    se = per_model.std(axis=0, ddof=1) / np.sqrt(len(per_model)) if len(per_model) > 1 else \
        np.asarray(kl_time["kl_bp0_model_se"])[0]
    _band(axis, np.asarray(kl_time["times"]) / num_steps, {"mean": mean, "se": se}, lw=2,
          label=f"KL(BP$_0\\|$model), n = {summary['n']}, epoch {kl_time['epoch']}")
    data[label] = {"t_over_T": (np.asarray(kl_time["times"]) / num_steps).tolist(),
                   "mean": mean.tolist(), "se": np.asarray(se).tolist()}
  axis.set_xlabel("t / T")
  axis.set_ylabel("KL [nats/seq]")
  axis.set_yscale("log")
  axis.legend(fontsize=7)
  axis.set_title("Where denoisers deviate from exact BP along diffusion time")
  return figure, data


def _nn_panel(axis, summary: dict):
  epochs = np.asarray(summary["epochs"])
  _band(axis, epochs, summary["nn_divergence"], color="tab:purple", lw=2, label="NN divergence")
  axis.set_xscale("log")
  axis.set_xlabel("epoch")
  axis.set_ylabel("NN divergence [nats]", color="tab:purple")
  right = axis.twinx()
  _band(right, epochs, summary["train_loss"], color="tab:blue", label="train loss")
  _band(right, epochs, summary["test_loss"], color="tab:orange", label="test loss")
  right.set_ylabel("cross-entropy [nats/token]")
  _mark(axis, summary["epoch_min_nn_divergence"], "min NN div.", "tab:purple")
  _mark(axis, summary["epoch_min_test_loss"], "min test loss", "tab:orange")
  lines = axis.get_legend_handles_labels()
  lines_right = right.get_legend_handles_labels()
  axis.legend(lines[0] + lines_right[0], lines[1] + lines_right[1], fontsize=7)
  axis.set_title(f"n = {summary['n']}")


def plot_fig4a(summary: dict):
  """Fig. 4(a): NN divergence and train/test loss, plus NN-distance histograms."""
  figure, (axis, histograms) = plt.subplots(1, 2, figsize=(13, 4.4), layout="constrained",
                                            gridspec_kw={"width_ratios": [1.6, 1]})
  _nn_panel(axis, summary)
  epochs = summary["epochs"]
  bins = np.arange(len(summary["nn_test_histogram"][0]))
  chosen = sorted({epochs[0], summary["epoch_min_nn_divergence"], epochs[-1]})
  for epoch in chosen:
    histograms.plot(bins, summary["nn_generated_histogram"][epochs.index(epoch)], marker="o",
                    label=f"generated, epoch {epoch}")
  histograms.plot(bins, summary["nn_test_histogram"][0], color="black", ls="--", label="fresh")
  histograms.set_xlabel("Hamming distance to nearest training sequence")
  histograms.set_ylabel("fraction")
  histograms.legend(fontsize=7)
  data = {k: summary[k] for k in ("epochs", "nn_divergence", "train_loss", "test_loss",
                                  "epoch_min_nn_divergence", "epoch_min_test_loss",
                                  "nn_generated_histogram", "nn_test_histogram")}
  return figure, data


def plot_fig4b(summary: dict):
  """Fig. 4(b): distillation L* and excess L~ on train (solid) and held-out (dashed) data."""
  figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, layout="constrained")
  epochs = np.asarray(summary["epochs"])
  data = {"epochs": summary["epochs"]}
  for row, mode in enumerate(("fixed", "mean")):
    for col, part in enumerate(("distillation", "excess")):
      axis = axes[row][col]
      for where, style in (("train", "-"), ("test", "--")):
        key = f"loss_decomposition_{mode}_{where}_{part}"
        _band(axis, epochs, summary[key], ls=style, color="tab:blue" if where == "train"
              else "tab:orange", label=where)
        data[key] = summary[key]
      axis.set_xscale("log")
      if part == "distillation":
        axis.set_yscale("log")
        axis.set_ylabel(r"$\ell^*$ [nats/token]")
      else:
        axis.set_yscale("symlog", linthresh=0.01)
        axis.axhline(0, color="grey", lw=0.8)
        axis.set_ylabel(r"$\tilde\ell$ [nats/token]")
      _mark(axis, summary["epoch_min_nn_divergence"], "min NN div.", "tab:purple")
      _mark(axis, summary["epoch_min_test_loss"], "min test loss", "tab:orange")
      axis.set_title(f"{'t = 0.3 T' if mode == 'fixed' else 'one random t per sequence'}")
  for axis in axes[1]:
    axis.set_xlabel("epoch")
  axes[0][0].legend(fontsize=7)
  return figure, data


def _uturn_rows(uturn: dict, name: str, kind: str):
  """Per set: times and [models, times] mean arrays from the U-turn stage."""
  record = uturn["checkpoints"][name][kind]
  out = {}
  for set_name in ("train", "test"):
    rows = [[r["mean"] for r in per_model[set_name]] for per_model in record.values()]
    ses = [[r["se"] for r in per_model[set_name]] for per_model in record.values()]
    out[set_name] = (np.asarray(rows), np.asarray(ses))
  return out


def plot_fig5(summary: dict):
  """Fig. 5: U-turn reconstruction ratio model/BP on training vs fresh sequences."""
  uturn = summary["uturn"]
  num_steps = summary["num_steps_diffusion"]
  x = np.asarray(uturn["times"]) / num_steps
  figure, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
  data = {"t_over_T": x.tolist()}
  for name, style in (("nn_minimum", "-"), ("loss_minimum", "--")):
    epoch = uturn["checkpoints"][name]["epoch"]
    rho = _uturn_rows(uturn, name, "rho")
    for set_name, colour in (("train", "tab:blue"), ("test", "tab:orange")):
      rows, _ = rho[set_name]
      mean, se = rows.mean(0), rows.std(0, ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else 0
      axes[0].errorbar(x, mean, yerr=se, ls=style, color=colour, marker="o",
                       label=f"{set_name}, epoch {epoch}")
      data[f"rho_{name}_{set_name}"] = {"mean": mean.tolist(), "per_model": rows.tolist()}
    gap = np.abs(rho["train"][0] - rho["test"][0]).mean(0)
    deviation = 0.5 * (np.abs(1 - rho["train"][0]) + np.abs(1 - rho["test"][0])).mean(0)
    axes[1].plot(x, gap, ls=style, marker="o", color="black", label=f"|gap|, epoch {epoch}")
    axes[1].plot(x, deviation, ls=style, marker="s", color="grey",
                 label=f"deviation from 1, epoch {epoch}")
    overlaps = _uturn_rows(uturn, name, "overlap")
    for set_name, colour in (("train", "tab:blue"), ("test", "tab:orange")):
      axes[2].plot(x, overlaps[set_name][0].mean(0), ls=style, marker="o", color=colour,
                   label=f"{set_name}, epoch {epoch}")
    data[f"gap_{name}"] = gap.tolist()
  axes[0].axhline(1, color="grey", lw=0.8)
  axes[0].set_ylabel(r"$\rho$ = model overlap / BP overlap")
  axes[1].set_ylabel("gap and deviation")
  axes[2].set_ylabel("network overlap")
  for axis in axes:
    axis.set_xlabel("t / T")
    axis.legend(fontsize=7)
  figure.suptitle(f"U-turns, n = {summary['n']}, models (block, replicate) "
                  f"{', '.join(uturn['checkpoints']['nn_minimum']['rho'])}")
  return figure, data


def plot_app9_10(summaries: dict):
  """App. Figs. 9-10: Fig. 4(a) left and Fig. 5 (ratio panel) for every size of the profile."""
  figure, axes = plt.subplots(len(summaries), 2, figsize=(13, 4.4 * len(summaries)),
                              squeeze=False, layout="constrained")
  data = {}
  for row, (label, summary) in zip(axes, summaries.items()):
    _nn_panel(row[0], summary)
    sub, sub_data = plot_fig5(summary)
    plt.close(sub)
    x = sub_data["t_over_T"]
    for key, value in sub_data.items():
      if key.startswith("rho_"):
        row[1].plot(x, value["mean"], marker="o", ls="-" if "nn_minimum" in key else "--",
                    label=key[4:].replace("_", " "))
    row[1].axhline(1, color="grey", lw=0.8)
    row[1].set_xlabel("t / T")
    row[1].set_ylabel(r"$\rho$")
    row[1].legend(fontsize=7)
    data[label] = sub_data
  return figure, data


def plot_app11(summary: dict):
  """App. Fig. 11: U-turns from uniformly random sequences with every denoiser."""
  random_uturn = summary["random_uturn"]
  x = np.asarray(random_uturn["times"]) / summary["num_steps_diffusion"]
  figure, axis = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
  for name, curve in random_uturn["curves"].items():
    if name.startswith("network"):
      style = "-"
    elif name.startswith("bp"):
      style = "--"
    else:
      style = ":"
    axis.errorbar(x, curve["mean"], yerr=curve["se"], ls=style, marker="o", label=name)
  axis.set_xlabel("t / T")
  axis.set_ylabel("overlap with the random start sequence")
  axis.legend(fontsize=7, ncol=2)
  axis.set_title("U-turns from uniformly random sequences")
  return figure, {"t_over_T": x.tolist(), **random_uturn["curves"]}


def write_all(summaries: dict, output_dir: str) -> list:
  """Draw every tree-data figure of the profile; returns the written paths."""
  paths = []
  for label, summary in summaries.items():
    paths += save(*plot_fig1b(summary), output_dir, f"fig1b_{label}")
    paths += save(*plot_fig4a(summary), output_dir, f"fig4a_{label}")
    paths += save(*plot_fig4b(summary), output_dir, f"fig4b_{label}")
    if "uturn" in summary:
      paths += save(*plot_fig5(summary), output_dir, f"fig5_{label}")
    if "random_uturn" in summary:
      paths += save(*plot_app11(summary), output_dir, f"app11_{label}")
  paths += save(*plot_fig6(summaries), output_dir, "fig6")
  every = lambda key: all(key in s for s in summaries.values())
  if every("kl_time"):
    paths += save(*plot_fig3b(summaries), output_dir, "fig3b")
  if every("uturn"):
    paths += save(*plot_app9_10(summaries), output_dir, "app9_10")
  return paths
