"""Tests of the hierarchical configs, their command-line overrides and a smoke run."""

import os
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

from configs import hierarchical  # pylint: disable=g-import-not-at-top
from biasdiff.training import checkpoints
from biasdiff.training import loop
from biasdiff.training import tasks
from helpers import tiny_training as tiny

CONFIG_FILE = os.path.join(REPOSITORY, "configs", "hierarchical.py")


@pytest.mark.parametrize("variant", hierarchical.VARIANTS)
def test_every_variant_builds_a_valid_zoo(variant):
  config = hierarchical.get_config(variant)
  assert config.variant == variant
  models = tasks.zoo(config)
  blocks = max(m.block for m in models) + 1
  assert blocks * config.data.n <= config.data.train_pool_size
  assert config.checkpoint.grid_min_epoch <= config.train.num_epochs
  grid = checkpoints.epoch_grid(config.checkpoint, config.train.num_epochs)
  assert grid[-1] == config.train.num_epochs


@pytest.mark.parametrize("variant, n, num_epochs", [
    ("paper_5k", 5_000, 20_000), ("paper_12k", 12_000, 30_000), ("paper_70k", 70_000, 35_000)])
def test_paper_variants_have_paper_settings(variant, n, num_epochs):
  config = hierarchical.get_config(variant)
  assert (config.data.n, config.train.num_epochs) == (n, num_epochs)
  assert (config.data.num_symbols, config.data.num_allowed, config.data.depth) == (6, 4, 4)
  assert config.data.sigma == 1.0
  assert (config.data.train_pool_size, config.data.heldout_size) == (1_050_000, 100_000)
  assert config.diffusion.num_steps == 500
  model = config.model
  assert (model.d_model, model.num_layers, model.num_heads, model.ffn_dim) == (512, 8, 4, 1024)
  assert model.dropout == 0.1
  train = config.train
  assert (train.batch_size, train.learning_rate, train.lr_schedule) == (512, 3e-4, "paper_epoch")
  assert (train.adam_b1, train.adam_b2, train.adam_eps) == (0.9, 0.999, 1e-8)
  assert train.ema_decay == 0.0
  # One epoch per dispatch: 10, 24 and 137 steps.
  assert train.steps_per_dispatch == -(-n // 512)
  models = tasks.zoo(config)
  assert len(models) == 29
  pairs = {(m.block, m.replicate) for m in models}
  assert pairs == {(b, r) for b in range(14) for r in (0, 1)} | {(14, 0)}
  assert checkpoints.epoch_grid(config.checkpoint, num_epochs)[:3] == [100] + {
      20_000: [124, 155], 30_000: [126, 160], 35_000: [127, 162]}[num_epochs]


def test_quick_variant_matches_cpu_recipe():
  config = hierarchical.get_config("quick")
  assert (config.data.depth, config.data.n) == (3, 512)
  model = config.model
  assert (model.d_model, model.num_layers, model.num_heads, model.ffn_dim) == (96, 3, 4, 192)
  train = config.train
  assert (train.batch_size, train.learning_rate, train.ema_decay) == (256, 1e-3, 0.999)
  assert (train.lr_schedule, train.warmup_steps, train.decay_steps) == ("warmup_cosine", 200,
                                                                       4_000)
  assert train.num_epochs * 2 == 4_000  # 2 steps per epoch
  assert [(m.block, m.replicate) for m in tasks.zoo(config)] == [(0, 0), (1, 0)]


def test_mistyped_field_raises():
  config = hierarchical.get_config("quick")
  with pytest.raises(AttributeError, match="batch_sise"):
    config.train.batch_sise = 64
  with pytest.raises(AttributeError, match="lerning_rate"):
    _ = config.train.lerning_rate


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="'papr_12k'"):
    hierarchical.get_config("papr_12k")


def _parse(*overrides):
  argv = [__file__, f"--config={CONFIG_FILE}:quick", *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def test_command_line_overrides_apply():
  config = _parse("--config.train.batch_size=64", "--config.zoo.replicates=(0, 1)")
  assert config.train.batch_size == 64
  assert tuple(config.zoo.replicates) == (0, 1)
  assert config.data.depth == 3


def test_command_line_typo_raises():
  with pytest.raises(AttributeError, match="batch_sise"):
    _parse("--config.train.batch_sise=64")


def test_smoke_config_trains_end_to_end(tmp_path):
  """A shrunken smoke config through the hierarchical task, the loop and a checkpoint."""
  config = tiny.shrunken_smoke_config()
  task = tasks.hierarchical_task(config, str(tmp_path))
  assert task.train_data.shape == (4, 32, 16)
  assert task.train_data.dtype == np.uint8
  result = loop.fit(config, str(tmp_path), task, compiler_options=tiny.COMPILER_OPTIONS)
  assert result.step == 4
  assert checkpoints.realised_grid(str(tmp_path)) == [1, 2]
  params, meta = checkpoints.load_grid_checkpoint(str(tmp_path), 2, use_ema=True)
  assert params["logits"]["kernel"].shape == (4, 16, 6)
  assert meta["fingerprint"]["corpus"]["depth"] == 4
  assert [m["block"] for m in meta["models"]] == [0, 0, 1, 1]
  # Model (block 0) and model (block 1) trained on different pool rows.
  np.testing.assert_array_equal(task.train_data[2], task.train_data[3])
  assert not np.array_equal(task.train_data[0], task.train_data[2])
