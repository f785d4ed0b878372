"""Paired training engine: one compiled step trains a whole stack of models.

Public API:
  fit, train, TrainingTask, GridPoint        the loop (generic, and hierarchical)
  SequenceX0Objective, ImageEpsObjective     denoising losses
  ModelSpec, zoo_models, derive_train_seed   model lists and training seeds
  TrainState                                 stacked parameters, Adam state, EMA
  log_epoch_grid, linear_epoch_grid          checkpoint epochs
  load_grid_checkpoint, realised_grid        reading checkpoints for analysis
"""

from biasdiff.training.checkpoints import (linear_epoch_grid, load_grid_checkpoint,
                                           log_epoch_grid, realised_grid)
from biasdiff.training.loop import GridPoint, TrainingTask, TrainResult, fit, train
from biasdiff.training.objectives import ImageEpsObjective, SequenceX0Objective
from biasdiff.training.state import ModelSpec, TrainState, derive_train_seed, zoo_models
