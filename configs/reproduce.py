r"""Profiles of the figure pipeline: which models to train and how to measure them.

Launch, from the repository root:

  python experiments/reproduce.py --config=configs/reproduce.py:quick \
      --workdir=runs/reproduce_quick

or `make reproduce-figures PROFILE=quick` (the default) or PROFILE=paper.
Override a field with, for example, `--config.hierarchical.analysis.num_generated=256`
or `--config.images.data.path=/data/celeba/img_align_celeba`.

Profiles:
  smoke  every code path on tiny sizes, for the end-to-end test (seconds to minutes)
  demo   what `make demo` runs: one disjoint pair of the quick profile, measured
         at every checkpoint (sample-split KL, KL to exact BP, losses, NN
         divergence), without the U-turn and KL-along-time stages
  quick  the embedded default for a 2-core CPU: depth-3 trees, one training-set
         size, three data blocks plus a second seed on block 0 (five pairs on
         disjoint data and one same-data control), an EMA of the parameters for
         every probe
  small  the paper's depth-4 trees with a 2.1M-parameter network, for one
         accelerator
  paper  the paper's three sizes (5k, 12k, 70k), networks, recipes and analysis
         sizes, for an accelerator or a pod

Each entry of `hierarchical.sizes` names a variant of configs/hierarchical.py and
the fields that differ from it; `hierarchical.analysis` sets every measurement.

`images` is the config of configs/images.py that the image part runs: its
smoke variant in the smoke profile, the digits (quick) in the quick and small
profiles, and CelebA (paper, which needs images.data.path) in the paper
profile. The demo profile has no image part (images is None).
"""

import os
import sys

import ml_collections

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY not in sys.path:
  sys.path.insert(0, _REPOSITORY)
from configs import images as images_configs  # pylint: disable=g-import-not-at-top

PROFILES = ("smoke", "demo", "quick", "small", "paper")
# The variant of configs/images.py that each profile's image part runs (None: no image part).
IMAGE_VARIANTS = {"smoke": "smoke", "demo": None, "quick": "quick", "small": "quick",
                  "paper": "paper"}


def _size(variant: str, n: int, num_epochs: int, blocks, replicates,
          extra_models=()) -> ml_collections.ConfigDict:
  size = ml_collections.ConfigDict()
  size.variant = variant  # variant of configs/hierarchical.py
  size.n = n  # training sequences per model
  size.num_epochs = num_epochs  # training length in epochs
  size.blocks = tuple(blocks)  # data blocks of the zoo
  size.replicates = tuple(replicates)  # seeds per block; (0, 1) gives same-data controls
  size.extra_models = tuple(extra_models)  # further (block, replicate) models
  return size


def _analysis() -> ml_collections.ConfigDict:
  """The paper's analysis sizes; profiles shrink them."""
  a = ml_collections.ConfigDict()
  a.seed = 0  # analysis seed: every probe, start and sampling noise derives from it
  a.use_ema = False  # probe the EMA of the parameters instead of the raw ones
  a.split_time_fraction = 0.15  # t* = floor(fraction * T) of the sample-split KL
  a.split_test_sequences = 3_000  # held-out sequences of the test pack
  a.split_train_sequences = 3_000  # first sequences of each block in its train pack
  a.split_repeats = 5  # noisings per sequence in the packs
  a.loss_time_fraction = 0.3  # fixed t of the loss decomposition
  a.loss_test_sequences = 12_000  # held-out sequences for the test loss and decomposition
  a.num_generated = 50_000  # generated sequences per model and checkpoint (NN divergence)
  a.nn_test_sequences = 50_000  # held-out sequences of the fresh NN histogram
  a.generation_batch = 10_000  # sequences per sampler call
  a.eval_batch = 4_096  # inputs per network call in the probes
  a.uturn_sequences = 1_000  # train and test sequences of the U-turns
  a.uturn_repetitions = 100  # U-turn repetitions
  a.uturn_time_fractions = (0.01, 0.03, 0.05, 0.085, 0.12)  # U-turn start times as t/T
  a.kl_time_sequences = 2_000  # held-out sequences of the KL-along-time curves
  a.kl_time_repeats = 5  # noisings per sequence and time
  a.kl_time_stride = 1  # evaluate every stride-th time of 1 ... T
  a.kl_time_models = 5  # replicate-0 models (lowest blocks) in the model curves
  a.random_uturn_sequences = 100  # uniformly random sequences of the far-from-data U-turns
  a.random_uturn_repetitions = 100  # their repetitions
  a.random_uturn_time_fractions = (0.05, 0.0625, 0.075, 0.0875, 0.1)  # start times as t/T
  a.empirical_references = 256  # block sequences of the empirical-score denoiser
  a.later_stages = ("uturn", "kl_time", "random_uturn")  # stages after the checkpoint sweep
  return a


def get_config(profile: str = "quick") -> ml_collections.ConfigDict:
  """Return the locked pipeline config of `profile` (one of PROFILES)."""
  if profile not in PROFILES:
    raise ValueError(f"Unknown profile {profile!r}; choose one of {PROFILES}, "
                     "e.g. --config=configs/reproduce.py:quick or PROFILE=quick.")
  config = ml_collections.ConfigDict()
  config.profile = profile  # the profile this config was built from
  config.hierarchical = ml_collections.ConfigDict()
  config.hierarchical.sizes = ml_collections.ConfigDict()
  config.hierarchical.analysis = _analysis()
  sizes, a = config.hierarchical.sizes, config.hierarchical.analysis

  if profile == "smoke":
    sizes.n512 = _size("smoke", 512, 6, (0, 1), (0, 1))
    a.use_ema = True
    a.split_test_sequences = 64
    a.split_train_sequences = 64
    a.split_repeats = 2
    a.loss_test_sequences = 128
    a.num_generated = 64
    a.nn_test_sequences = 256
    a.generation_batch = 64
    a.eval_batch = 256
    a.uturn_sequences = 16
    a.uturn_repetitions = 2
    a.uturn_time_fractions = (0.05,)
    a.kl_time_sequences = 16
    a.kl_time_repeats = 1
    a.kl_time_stride = 100
    a.kl_time_models = 2
    a.random_uturn_sequences = 8
    a.random_uturn_repetitions = 2
    a.random_uturn_time_fractions = (0.05,)
    a.empirical_references = 32
  elif profile in ("demo", "quick"):
    if profile == "demo":
      sizes.n512 = _size("quick", 512, 2_000, (0, 1), (0,))
      a.later_stages = ()
    else:
      # Three blocks give a leave-one-block-out jackknife; with the second seed on
      # block 0 there are five pairs on disjoint data and one same-data control. Four
      # models of 230k parameters train in about the time the budget allows.
      sizes.n512 = _size("quick", 512, 2_000, (0, 1, 2), (0,), extra_models=((0, 1),))
    a.use_ema = True
    a.split_test_sequences = 1_000
    a.split_train_sequences = 512
    a.split_repeats = 4
    a.loss_test_sequences = 2_000
    a.num_generated = 256  # generation at 25 checkpoints costs as much as training here
    a.nn_test_sequences = 5_000
    a.generation_batch = 256
    a.eval_batch = 2_048
    a.uturn_sequences = 200
    a.uturn_repetitions = 10
    a.kl_time_sequences = 500
    a.kl_time_repeats = 2
    a.kl_time_stride = 10
    a.kl_time_models = 3
    a.random_uturn_sequences = 100
    a.random_uturn_repetitions = 10
    if profile == "demo":
      a.num_generated = 128  # keeps `make demo` to minutes; the quick profile uses 256
      a.generation_batch = 128
  elif profile == "small":
    sizes.n5000 = _size("small", 5_000, 5_000, (0, 1, 2, 3), (0, 1))
    a.use_ema = True
    a.split_test_sequences = 1_000
    a.split_train_sequences = 1_000
    a.split_repeats = 2
    a.loss_test_sequences = 5_000
    a.num_generated = 5_000
    a.nn_test_sequences = 20_000
    a.uturn_sequences = 200
    a.uturn_repetitions = 20
    a.kl_time_sequences = 1_000
    a.kl_time_repeats = 2
    a.kl_time_stride = 5
    a.kl_time_models = 4
    a.random_uturn_repetitions = 20
  else:
    # Blocks 0-13 with two seeds (the sample-split pairs and controls) and
    # replicate 0 of block 14: the 29 models every hierarchical figure uses.
    paper_zoo = dict(blocks=tuple(range(14)), replicates=(0, 1), extra_models=((14, 0),))
    sizes.n5000 = _size("paper_5k", 5_000, 20_000, **paper_zoo)
    sizes.n12000 = _size("paper_12k", 12_000, 30_000, **paper_zoo)
    sizes.n70000 = _size("paper_70k", 70_000, 35_000, **paper_zoo)

  variant = IMAGE_VARIANTS[profile]
  config.images = None if variant is None else images_configs.get_config(variant)
  config.lock()
  return config
