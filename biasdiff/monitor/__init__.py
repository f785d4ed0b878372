"""A privacy monitor: bias statistics measured while training, and stopping rules.

Stopping at the minimum of the test loss can come after the models have
started to favour their own training data. The monitor measures that bias at
every grid checkpoint, on fixed probes and on device, and marks (or stops at)
the checkpoint each stopping rule picks.

Modules:
  statistics  sample-split divergence at t*, train/held-out loss gap,
              membership-inference AUC and TPR at a calibrated FPR
  rules       stopping rules: minimum with patience, threshold crossing
  callback    the `Monitor` trainer hook and its builders for the tree data
              and for image models

Enable it in a tree-data run with --config.monitor.enabled=True. The image
pipeline (biasdiff.pipeline.images) runs it by default. Audit a finished run
with experiments/audit.py --workdir=RUN.
"""

from biasdiff.monitor import callback, rules, statistics
from biasdiff.monitor.callback import (Monitor, build_monitor, combine_callbacks,
                                       hierarchical_monitor, image_monitor, monitor_from_config,
                                       read_history, register_builder)
from biasdiff.monitor.rules import Decision, RuleSpec, evaluate_rules, rules_from_config
from biasdiff.monitor.statistics import (ImageAdapter, MembershipInference, SequenceAdapter,
                                         membership_inference, pair_membership_inference, roc_auc)
