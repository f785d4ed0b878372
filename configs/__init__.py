"""Config sections shared by every experiment that trains with biasdiff.training.

An experiment config (configs/<experiment>.py) exposes `get_config(variant)`
for ml_collections' `config_flags.DEFINE_config_file` and contains at least
the sections built here: `train`, `checkpoint` and `parallel`. Configs are
locked, so assigning a field that does not exist (a typo) raises an error
naming it instead of adding a new field. `biasdiff.training.fit` checks every
range noted below before it writes to the workdir.
"""

import ml_collections


def train_section() -> ml_collections.ConfigDict:
  """Optimizer, schedule and step settings read by `biasdiff.training.fit`."""
  train = ml_collections.ConfigDict()
  train.batch_size = 512  # rows per model and step (B); in [1, n] and divisible by the mesh's data axis
  train.num_epochs = 20_000  # epochs (N_ep); an epoch is ceil(n / batch_size) steps; >= 1
  train.learning_rate = 3e-4  # base Adam learning rate; > 0
  train.lr_schedule = "paper_epoch"  # "paper_epoch" (per-epoch lambda(e)), "warmup_cosine" (per step) or "constant"
  train.warmup_steps = 0  # steps of linear warm-up; warmup_cosine only; >= 0
  train.decay_steps = 0  # step where the cosine ends, warm-up included; warmup_cosine only; > warmup_steps
  train.lr_final_fraction = 0.0  # learning rate after decay_steps over the base rate; warmup_cosine only; in [0, 1]
  train.adam_b1 = 0.9  # Adam first-moment decay; in [0, 1)
  train.adam_b2 = 0.999  # Adam second-moment decay; in [0, 1)
  train.adam_eps = 1e-8  # Adam epsilon added to the root second moment; > 0
  train.ema_decay = 0.0  # per-step decay of the parameter EMA; in [0, 1), 0 disables the EMA
  train.steps_per_dispatch = 1  # optimizer steps per compiled call (a lax.scan); >= 1
  train.log_every_steps = 100  # steps between lines of metrics.jsonl; >= 1
  return train


def checkpoint_section() -> ml_collections.ConfigDict:
  """Grid and rolling checkpoint settings."""
  checkpoint = ml_collections.ConfigDict()
  checkpoint.grid = "log"  # permanent grid: "log" (log-spaced epochs), "linear" (linspace + final) or "none" (final only)
  checkpoint.grid_min_epoch = 100  # first grid epoch (E_min); in [1, num_epochs] ("log") or [1, num_epochs - 1] ("linear")
  checkpoint.grid_size = 25  # grid points (K) before duplicates are dropped; >= 2
  checkpoint.rolling_every_steps = 0  # steps between rolling checkpoints; >= 0, 0 disables
  checkpoint.rolling_every_minutes = 30.0  # minutes between rolling checkpoints; >= 0, 0 disables
  checkpoint.rolling_to_keep = 2  # rolling checkpoints kept on disk; >= 1
  checkpoint.async_save = False  # write checkpoints in a background thread
  return checkpoint


def parallel_section() -> ml_collections.ConfigDict:
  """Device mesh settings."""
  parallel = ml_collections.ConfigDict()
  parallel.model_axis_size = 0  # devices on the mesh's model axis; divides models and devices; 0 = gcd(models, devices)
  return parallel


def monitor_section() -> ml_collections.ConfigDict:
  """Bias monitor settings read by `biasdiff.monitor` (statistics at every grid checkpoint)."""
  monitor = ml_collections.ConfigDict()
  monitor.enabled = False  # measure the bias statistics at every grid checkpoint while training
  monitor.seed = 0  # seed of the probe noise and probe times, fold(seed, PROBE, set, index, t, r)
  monitor.use_ema = True  # measure the parameter EMA when the run keeps one, else the raw parameters
  monitor.split_time_fraction = 0.15  # t* = floor(fraction T) of the sample-split divergence; in (0, 1]
  monitor.mia_time_fraction = 0.05  # t of the membership-inference loss, floor(fraction T); in (0, 1]
  monitor.split_heldout_examples = 512  # held-out examples of the sample-split divergence; >= 1
  monitor.split_train_examples = 256  # training examples per block for the divergence on training data; 0 disables
  monitor.split_repeats = 1  # noisings per example at t*; >= 1
  monitor.loss_examples = 512  # held-out and own-block examples of the train/held-out loss gap, one random t each; >= 2
  monitor.mia_examples = 256  # training examples per block scored by the membership attack; >= 2
  monitor.mia_repeats = 2  # noisings per example averaged into its membership score; >= 1
  monitor.mia_fpr = 0.01  # false-positive rate at which the attack's TPR is reported; in [0, 1)
  monitor.image_divergence = "cosine"  # images: "cosine" (1 - cosine of predicted noises) or "mse"
  monitor.batch_size = 256  # probe examples per model and device call; >= 1
  monitor.rules = ("divergence_minimum", "test_loss_minimum", "mia_auc_threshold")  # names in biasdiff.monitor.rules.RULES
  monitor.patience = 3  # checkpoints without a new minimum before a minimum rule fires; >= 1
  monitor.min_delta = 0.0  # a new minimum must be lower than the best by more than this; >= 0
  monitor.mia_auc_threshold = 0.6  # bias budget of the rule mia_auc_threshold, in AUC units
  monitor.divergence_threshold = 1.0  # bias budget of the rule divergence_threshold, in the divergence's units
  monitor.stop_rule = "divergence_minimum"  # the rule that ends training when stop_training is True
  monitor.stop_training = False  # end training when stop_rule fires; False only marks the checkpoints
  return monitor
