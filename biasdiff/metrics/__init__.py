"""The paper's bias measures as jitted library functions, with their error bars.

Modules:
  sequences   tree-data measures: KL of x0-predictions (sample split, BP_k,
              along time), nearest-neighbour divergence, loss decomposition,
              U-turns
  images      image measures: paired-sample cosine distance, noise-prediction
              similarity on train vs test probes, denoising loss over time,
              memorised fraction
  stats       mean and SE, pair jackknife, bootstrap, argmin over a grid
  probes      fixed probe randomness and batched evaluation shared by both
"""

from biasdiff.metrics import images, probes, sequences, stats
from biasdiff.metrics.probes import HELDOUT_SET, RANDOM_SET, time_at_fraction, training_set_id
from biasdiff.metrics.stats import (BootstrapResult, GridArgmin, JackknifeResult, Summary,
                                    bootstrap, grid_argmin, jackknife, mean_and_se)
