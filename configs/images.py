r"""Configs of the real-image setting: paired U-Nets on digits or CelebA.

"The paper" below is Garnier-Brun, Biggio, Beltrame, Mezard and Saglietti,
Biased Generalization in Diffusion Models (ICML 2026, arXiv 2603.03469).

Launch, from the repository root:

  python experiments/images.py --config=configs/images.py:quick \
      --workdir=runs/images_quick

and override single fields with, for example,
`--config.eval.num_samples=256` or
`--config.data.path=/data/celeba/img_align_celeba`.
Rerunning the same command reuses every finished stage.

Variants:
  smoke  digits, a 44k-parameter U-Net, 3 models and 8 steps; exercises
         every code path (set data.source="proxy" for the synthetic CelebA
         stand-in) and proves nothing
  quick  scikit-learn's handwritten digits (8 x 8, offline) with six
         160k-parameter U-Nets on disjoint blocks of 128 images, which make
         15 sample-split pairs. Samples come from a 50-step respaced sampler.
         Sized for a 2-core CPU.
  pair   CelebA 32 x 32, the paper's network (W = 32), one pair on splits 0
         and 1 (n = 1024), 10,000 steps, 10 checkpoints; for one accelerator
  paper  CelebA, 15 models on splits 0-14 (seed i for model i), Adam 1e-4,
         batch 512, 5,000 epochs on the 50-point linear grid plus the final
         epoch, 512 paired samples with the full 1000-step sampler

The CelebA variants read the aligned JPEGs from data.path
(source "celeba_folder"); set data.source="celeba_tfds" and data.data_dir to
read a tensorflow-datasets copy instead.

In every variant the bias monitor (configs.monitor_section(): the
sample-split divergence, the train/held-out loss gap and a membership attack)
measures every grid checkpoint while training, in the smoke variant with tiny
probe sets. It runs with the last training group and covers the whole zoo;
its records go to that group's eval_metrics.jsonl
(<workdir>/stages/train/<key>/group_<g>). Audit a run with

  python experiments/audit.py --workdir=runs/images_quick/stages/train/<key>/group_5

Monitor settings do not change the trained parameters, so they are not part
of the training stage's key, unless monitor.stop_training lets the monitor
end training. A run trained before its monitor settings changed keeps its
records; pass --recompute to experiments/audit.py to measure again.
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

VARIANTS = ("smoke", "quick", "pair", "paper")
DATA_SOURCES = ("digits", "celeba_folder", "celeba_tfds", "proxy")


def _data() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.source = "celeba_folder"  # one of DATA_SOURCES
  data.path = ""  # celeba_folder: img_align_celeba or a folder containing it
  data.data_dir = ""  # celeba_tfds: TFDS data directory; "" = the TFDS default
  data.cache_dir = ""  # CelebA: where preprocessed arrays are kept; "" = <workdir>/data_cache
  data.block_size = 1024  # images per training block (n); >= 2
  data.num_blocks = 15  # training blocks drawn from the source; > max(zoo.blocks)
  data.heldout_size = 2048  # held-out (test) images; digits: 0 = every image not in a block
  data.data_seed = 0  # digits: seed of the row permutation; proxy: seed of the images
  data.image_size = 32  # pixels per side: 32 for CelebA, 8 or 16 for digits, any for proxy
  data.centering = "block"  # "block" (model b subtracts the mean of block b) or "global"
  return data


def _model() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.base_width = 32  # channels W at full resolution; even, >= 4, divisible by num_groups
  model.channel_multipliers = (1, 2, 4)  # channels W m_l at level l; image side divisible by 2^(levels - 1)
  model.blocks_per_resolution = 2  # encoder residual blocks per level; >= 1
  model.attention_resolutions = (16, 8)  # feature-map sides (pixels) with self-attention
  model.mid_attention = True  # self-attention in the first bottleneck block
  model.dropout = 0.1  # channel dropout of each residual block's second conv; in [0, 1)
  model.num_groups = 8  # GroupNorm groups
  model.dtype = "float32"  # convolution input dtype, "float32" or "bfloat16"
  return model


def _diffusion() -> ml_collections.ConfigDict:
  diffusion = ml_collections.ConfigDict()
  diffusion.num_steps = 1000  # T; times t = 0 ... T - 1 of the linear DDPM schedule
  diffusion.train_t_min = 1  # smallest trained time; 1 leaves t = 0 untrained as the authors' code does
  diffusion.last_noisy_t = 2  # sampler adds no noise below this step index (2: none at the last two steps)
  return diffusion


def _zoo() -> ml_collections.ConfigDict:
  zoo = ml_collections.ConfigDict()
  zoo.blocks = tuple(range(15))  # training blocks, one model each; model of block b has seed config.seed + b
  zoo.models_per_fit = 0  # models trained as one vmapped stack; 0 = all; 1 trains them one by one
  return zoo


def _eval() -> ml_collections.ConfigDict:
  evaluation = ml_collections.ConfigDict()
  evaluation.use_ema = False  # evaluate the parameter EMA instead of the raw parameters; needs train.ema_decay > 0
  evaluation.min_epoch = 11  # grid checkpoints before this epoch are not evaluated (drops epoch 10)
  evaluation.num_sampling_checkpoints = 20  # paired samples at the first K evaluated checkpoints; 0 = all
  evaluation.sample_seed = 2  # seed of the shared sampling noise
  evaluation.num_samples = 512  # paired samples per model and checkpoint
  evaluation.sampler_steps = 1000  # kept steps of the ancestral sampler; T = full DDPM, fewer = respaced
  evaluation.sample_batch_size = 512  # samples per sampler call; does not change the samples
  evaluation.loss_seed = 0  # seed of the test-loss noise and of the test-image choice
  evaluation.loss_num_images = 50  # held-out images of the test loss; 0 = every held-out image
  evaluation.loss_num_times = 0  # 0 = every t; K > 0 = t = 0 plus K stratified times in 1 ... T - 1
  evaluation.probe_seed = 1  # seed of the probe noise of the predicted-noise similarity
  evaluation.probe_times = (50, 100, 150, 200)  # times of the predicted-noise similarity
  evaluation.figure_time = 100  # the probe time drawn in the predicted-noise figure; in probe_times
  evaluation.num_probes = 512  # train probes per block and held-out probes; <= block_size
  evaluation.memorisation_ratio = 1.0 / 3.0  # memorised iff nearest / second-nearest distance < this
  evaluation.num_bootstrap = 1000  # bootstrap resamples of medians and fractions; >= 2
  evaluation.panel_pair = (0, 1)  # positions in zoo.blocks of the pair drawn with nearest neighbours
  evaluation.panel_rows = 8  # typical sample pairs per panel column block
  evaluation.batch_size = 512  # images per network call in the loss and the probes
  evaluation.loss_times_per_call = 20  # diffusion times per compiled loss call
  evaluation.model_loop = "vmap"  # apply a model stack with "vmap" or sequentially with "map" (faster on CPUs)
  return evaluation


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
  """Return the locked config of `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(
        f"Unknown variant {variant!r} of configs/images.py; choose one of {VARIANTS}, "
        "e.g. --config=configs/images.py:quick.")
  config = ml_collections.ConfigDict()
  config.experiment = "images"  # fixed: selects the image pipeline
  config.variant = variant  # the variant this config was built from
  config.seed = 0  # base of the training seeds; model of block b trains with seed + b
  config.data = _data()
  config.model = _model()
  config.diffusion = _diffusion()
  config.zoo = _zoo()
  config.train = configs.train_section()
  config.checkpoint = configs.checkpoint_section()
  config.parallel = configs.parallel_section()
  config.eval = _eval()
  config.monitor = configs.monitor_section()
  _paper(config)
  if variant == "smoke":
    _smoke(config)
  elif variant == "quick":
    _quick(config)
  elif variant == "pair":
    _pair(config)
  config.lock()
  return config


def _paper(config) -> None:
  """Set the paper's recipe, which the other variants then shrink."""
  config.train.batch_size = 512  # 2 steps per epoch at n = 1024
  config.train.num_epochs = 5_000  # 10,000 steps
  config.train.learning_rate = 1e-4
  config.train.lr_schedule = "constant"
  config.train.ema_decay = 0.0  # the paper evaluates the raw parameters
  config.train.steps_per_dispatch = 2  # one epoch per dispatch
  config.train.log_every_steps = 20
  config.checkpoint.grid = "linear"  # floor(linspace(10, N_ep - 1, 50)) plus the final epoch
  config.checkpoint.grid_min_epoch = 10
  config.checkpoint.grid_size = 50
  config.checkpoint.rolling_every_minutes = 30.0
  config.checkpoint.async_save = True
  # The defaults of monitor_section() suit CelebA (T = 1000, n = 1024): t* = 150,
  # the membership attack at t = 50, and probe sets no larger than a block.
  config.monitor.enabled = True


def _smoke(config) -> None:
  config.data.source = "digits"
  config.data.block_size = 32
  config.data.num_blocks = 3
  config.data.heldout_size = 64
  config.data.image_size = 8

  config.model.base_width = 8
  config.model.channel_multipliers = (1, 2)
  config.model.blocks_per_resolution = 1
  config.model.attention_resolutions = (4,)  # exercises the attention path
  config.model.mid_attention = False

  config.zoo.blocks = (0, 1, 2)

  config.train.batch_size = 16  # 2 steps per epoch
  config.train.num_epochs = 4
  config.train.learning_rate = 1e-3
  config.train.ema_decay = 0.9
  config.train.steps_per_dispatch = 2
  config.train.log_every_steps = 2

  config.checkpoint.grid = "linear"
  config.checkpoint.grid_min_epoch = 1
  config.checkpoint.grid_size = 3  # epochs 1, 2, 3 and the final 4
  config.checkpoint.rolling_every_minutes = 0.0
  config.checkpoint.async_save = False

  config.eval.use_ema = True
  config.eval.min_epoch = 2
  config.eval.num_sampling_checkpoints = 0
  config.eval.num_samples = 16
  config.eval.sampler_steps = 5
  config.eval.sample_batch_size = 16
  config.eval.loss_num_images = 8
  config.eval.loss_num_times = 3
  config.eval.probe_times = (50, 100)
  config.eval.num_probes = 8
  config.eval.num_bootstrap = 20
  config.eval.panel_rows = 2
  config.eval.batch_size = 64
  config.eval.loss_times_per_call = 4

  config.monitor.split_heldout_examples = 32
  config.monitor.split_train_examples = 8
  config.monitor.loss_examples = 16
  config.monitor.mia_examples = 16
  config.monitor.mia_repeats = 1
  config.monitor.batch_size = 64

  config.diffusion.last_noisy_t = 1


def _quick(config) -> None:
  config.data.source = "digits"
  config.data.block_size = 128
  config.data.num_blocks = 6  # 768 training digits, 1,029 held out
  config.data.heldout_size = 0
  config.data.image_size = 8

  config.model.base_width = 16  # the 159,697-parameter digits U-Net
  config.model.channel_multipliers = (1, 2)
  config.model.blocks_per_resolution = 1
  config.model.attention_resolutions = ()
  config.model.mid_attention = False

  config.zoo.blocks = (0, 1, 2, 3, 4, 5)
  config.zoo.models_per_fit = 1  # on a CPU a vmapped stack of six ran 2.3x slower than six single models

  config.train.batch_size = 128  # 1 step per epoch
  config.train.num_epochs = 1_600
  config.train.learning_rate = 1e-3
  config.train.ema_decay = 0.99
  config.train.steps_per_dispatch = 10
  config.train.log_every_steps = 10

  config.checkpoint.grid = "log"  # 20 epochs from 25 to 1600, about 25% apart
  config.checkpoint.grid_min_epoch = 25
  config.checkpoint.grid_size = 20
  config.checkpoint.rolling_every_minutes = 0.0
  config.checkpoint.async_save = False

  config.eval.use_ema = True
  config.eval.min_epoch = 25
  config.eval.num_sampling_checkpoints = 0
  config.eval.num_samples = 128
  config.eval.sampler_steps = 50
  config.eval.sample_batch_size = 128
  config.eval.loss_num_images = 256
  config.eval.loss_num_times = 10
  config.eval.probe_times = (100,)
  config.eval.num_probes = 128
  config.eval.num_bootstrap = 1000
  config.eval.batch_size = 256
  config.eval.model_loop = "map"

  # The models train one by one (zoo.models_per_fit = 1), and the monitor runs
  # in the last fit, where it measures all six models at every grid epoch. With
  # these probe sets that took 40 s, 4% of the 1,019 s that training took without the
  # monitor, on 2 CPU cores.
  config.monitor.split_heldout_examples = 64
  config.monitor.split_train_examples = 16
  config.monitor.loss_examples = 32
  config.monitor.mia_examples = 32
  config.monitor.batch_size = 128

  config.diffusion.last_noisy_t = 1  # a respaced step is large, so only the last one stays noise-free


def _pair(config) -> None:
  config.zoo.blocks = (0, 1)
  config.data.num_blocks = 2
  config.checkpoint.grid_size = 10  # floor(linspace(10, 4999, 10)) plus epoch 5000
  config.eval.num_sampling_checkpoints = 0
  config.eval.num_samples = 128
  config.eval.loss_num_times = 100
  config.eval.probe_times = (100,)
