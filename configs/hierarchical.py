r"""Training configs of the hierarchical (tree-grammar) setting.

"The paper" below is Garnier-Brun, Biggio, Beltrame, Mezard and Saglietti,
Biased Generalization in Diffusion Models (ICML 2026, arXiv 2603.03469).

Launch, from the repository root:

  python experiments/train.py --config=configs/hierarchical.py:quick \
      --workdir=runs/hierarchical_quick

and override single fields with, for example, `--config.train.batch_size=64`
or `--config.zoo.replicates="(0, 1)"`.

Variants:
  smoke      tiny network and data, a few epochs; exercises every code path
  quick      depth-3 trees, a 230k-parameter network and one disjoint pair
             (blocks 0 and 1), sized for minutes on a 2-core CPU; add the
             same-data controls with --config.zoo.replicates="(0, 1)"
  small      the depth-4 trees of the paper with a 2.1M-parameter network and
             4 blocks x 2 replicates, for one accelerator
  paper_5k   the paper's network and recipe at n = 5,000 and 20,000 epochs
  paper_12k  the same at n = 12,000 and 30,000 epochs
  paper_70k  the same at n = 70,000 and 35,000 epochs

The paper variants train the zoo of blocks 0-13 x replicates {0, 1} plus
(block 14, replicate 0), the 29 models that every hierarchical figure draws
from.
"""

import os
import sys

import ml_collections

# ml_collections loads this file by path, so the sibling package is found
# through the repository root.
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPOSITORY not in sys.path:
  sys.path.insert(0, _REPOSITORY)
import configs  # pylint: disable=g-import-not-at-top

VARIANTS = ("smoke", "quick", "small", "paper_5k", "paper_12k", "paper_70k")

# (n, num_epochs) of the paper's three training-set sizes.
_PAPER_SIZES = {
    "paper_5k": (5_000, 20_000),
    "paper_12k": (12_000, 30_000),
    "paper_70k": (70_000, 35_000),
}


def _data() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.num_symbols = 6  # alphabet size q; >= 2
  data.num_allowed = 4  # allowed child pairs per parent symbol (q_eff); in [1, q]
  data.sigma = 1.0  # standard deviation of the grammar logits; >= 0
  data.grammar_seed = 0  # seed of the grammar tensor (0 is the paper's grammar)
  data.depth = 4  # tree depth; sequences have 2**depth tokens
  data.data_seed = 0  # seed of the tree sampler, separate from the grammar seed
  data.train_pool_size = 1_050_000  # training-pool sequences; >= (max block + 1) * n
  data.heldout_size = 100_000  # held-out sequences, never trained on
  data.n = 12_000  # training sequences per model (block size)
  data.corpus_dir = ""  # where the corpus is stored; "" = <workdir>/corpus
  return data


def _model() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.d_model = 512  # transformer width; divisible by num_heads
  model.num_layers = 8  # post-norm encoder layers; >= 1
  model.num_heads = 4  # attention heads; divides d_model
  model.ffn_dim = 1024  # hidden width of the feed-forward blocks
  model.dropout = 0.1  # dropout rate in training; in [0, 1)
  model.tie_initial_layers = False  # start every layer from one initialisation, as the authors' code does
  model.dtype = "bfloat16"  # matmul input dtype in training, "float32" or "bfloat16"; parameters and logits stay float32
  return model


def _zoo() -> ml_collections.ConfigDict:
  zoo = ml_collections.ConfigDict()
  zoo.blocks = tuple(range(14))  # data blocks trained (block b = pool rows [b n, (b + 1) n))
  zoo.replicates = (0, 1)  # replicates per block, each with its own training seed
  zoo.extra_models = ((14, 0),)  # further (block, replicate) models
  zoo.share_init_across_blocks = False  # models of one replicate start from block 0's initialisation
  return zoo


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
  """Return the locked config of `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(
        f"Unknown variant {variant!r} of configs/hierarchical.py; choose one of "
        f"{VARIANTS}, e.g. --config=configs/hierarchical.py:quick.")
  config = ml_collections.ConfigDict()
  config.experiment = "hierarchical"  # fixed: selects the tree-grammar training task
  config.variant = variant  # the variant this config was built from
  config.seed = 0  # base of the training seeds; model (n, block, replicate) gets a seed derived from all four
  config.data = _data()
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.num_steps = 500  # diffusion steps T; times t = 1 ... T
  config.model = _model()
  config.zoo = _zoo()
  config.train = configs.train_section()
  config.checkpoint = configs.checkpoint_section()
  config.parallel = configs.parallel_section()
  config.monitor = configs.monitor_section()

  if variant == "smoke":
    _smoke(config)
  elif variant == "quick":
    _quick(config)
  elif variant == "small":
    _small(config)
  else:
    _paper(config, *_PAPER_SIZES[variant])
  config.lock()
  return config


def _smoke(config) -> None:
  config.data.train_pool_size = 2_048  # 4 blocks of 512
  config.data.heldout_size = 1_024
  config.data.n = 512
  config.model.d_model = 64
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.ffn_dim = 128
  config.model.dtype = "float32"  # bfloat16 matmuls are slow on CPUs
  config.zoo.blocks = (0, 1)
  config.zoo.replicates = (0, 1)
  config.zoo.extra_models = ()
  config.train.batch_size = 128  # 4 steps per epoch
  config.train.num_epochs = 30
  config.train.learning_rate = 1e-3
  config.train.ema_decay = 0.99
  config.train.steps_per_dispatch = 4
  config.train.log_every_steps = 4
  config.checkpoint.grid_min_epoch = 5
  config.checkpoint.grid_size = 6
  config.checkpoint.rolling_every_steps = 40
  config.checkpoint.rolling_every_minutes = 0.0


def _quick(config) -> None:
  config.data.depth = 3  # 8 tokens: a depth-4 pair never came close to BP on 2 CPU cores
  config.data.train_pool_size = 7_680  # 15 blocks of 512
  config.data.heldout_size = 10_000
  config.data.n = 512
  config.model.d_model = 96
  config.model.num_layers = 3
  config.model.num_heads = 4
  config.model.ffn_dim = 192
  config.model.dtype = "float32"  # bfloat16 matmuls are slow on CPUs
  config.zoo.blocks = (0, 1)
  config.zoo.replicates = (0,)
  config.zoo.extra_models = ()
  config.train.batch_size = 256  # 2 steps per epoch
  config.train.num_epochs = 2_000  # 4,000 steps
  config.train.learning_rate = 1e-3
  config.train.lr_schedule = "warmup_cosine"
  config.train.warmup_steps = 200
  config.train.decay_steps = 4_000
  # Like the paper's schedule, the cosine ends at 10% of the base rate rather than 0, so
  # the test loss can still move (and turn up) in the last checkpoints.
  config.train.lr_final_fraction = 0.1
  config.train.ema_decay = 0.999
  config.train.steps_per_dispatch = 10
  config.train.log_every_steps = 10
  config.checkpoint.grid_min_epoch = 25  # step 50: the sample-split minimum came at steps 800-1,400 in a pilot
  config.checkpoint.rolling_every_steps = 500
  config.checkpoint.rolling_every_minutes = 0.0


def _small(config) -> None:
  config.data.n = 5_000
  config.model.d_model = 256
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.ffn_dim = 512
  config.zoo.blocks = (0, 1, 2, 3)
  config.zoo.replicates = (0, 1)
  config.zoo.extra_models = ()
  config.train.num_epochs = 5_000  # 50,000 steps at 10 steps per epoch
  config.train.ema_decay = 0.999
  config.train.steps_per_dispatch = 10  # one epoch per dispatch
  config.train.log_every_steps = 50


def _paper(config, n: int, num_epochs: int) -> None:
  config.data.n = n
  config.train.num_epochs = num_epochs
  # One epoch per dispatch keeps every grid checkpoint on a dispatch boundary.
  config.train.steps_per_dispatch = -(-n // config.train.batch_size)
  config.train.log_every_steps = 100
  config.checkpoint.async_save = True
