"""Every part of the figure pipeline for one profile of configs/reproduce.py.

Parts:
  hierarchical  the tree-data pipeline (`biasdiff.pipeline.hierarchical`):
                stages in <workdir>/hierarchical, summary_<size>.json and the
                tree-data figures in <output_dir>
  images        the real-image pipeline (`biasdiff.pipeline.images`) with the
                profile's `images` config: stages in <workdir>/images,
                summary.json and figures/ in <output_dir>/images

Both parts share the workdir that `stages.claim_workdir` assigns to the
profile, each in its own subdirectory.
"""

import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from biasdiff import parallel
from biasdiff.figures import hierarchical as hierarchical_figures
from biasdiff.pipeline import hierarchical
from biasdiff.pipeline import images

logger = logging.getLogger(__name__)

PARTS = ("hierarchical", "images")
IMAGES_DIRECTORY = "images"
# The top-level fields of every profile of configs/reproduce.py.
PROFILE_FIELDS = ("profile", "hierarchical", "images")
# The prefix of the image fields in the command-line overrides of experiments/reproduce.py.
IMAGE_FLAG_PREFIX = "--config.images."


def check_profile(config) -> None:
  """Raise ValueError unless `config` is a profile of configs/reproduce.py.

  A config of configs/images.py or configs/hierarchical.py lacks the profile
  fields, and the message names the script that runs it.
  """
  missing = [field for field in PROFILE_FIELDS if field not in config]
  if not missing:
    return
  message = (f"experiments/reproduce.py needs a profile from configs/reproduce.py, for example "
             f"--config=configs/reproduce.py:quick, but got a config without a {missing[0]!r} "
             "field.")
  experiment = config.get("experiment")
  if experiment == "images":
    message += (" This is a config of configs/images.py: run it with experiments/images.py, or "
                f"set its fields here as {IMAGE_FLAG_PREFIX}<field>.")
  elif experiment == "hierarchical":
    message += " This is a config of configs/hierarchical.py: train it with experiments/train.py."
  raise ValueError(message)


def profile_parts(config) -> tuple[str, ...]:
  """Return the parts of a profile: both, or only hierarchical when config.images is None."""
  if config.images is None:
    return ("hierarchical",)
  return PARTS


def check_parts(config, parts: Sequence[str]) -> None:
  """Raise ValueError naming the first part that the profile cannot run.

  A part is rejected when it is unknown, when the profile lacks it, or, for
  the image part, when `images.check_config` rejects config.images, which
  includes a CelebA folder that is missing or has too few JPEGs.
  """
  check_profile(config)
  for part in parts:
    if part not in PARTS:
      raise ValueError(f"Unknown part {part!r}; choose from {PARTS}.")
    if part not in profile_parts(config):
      raise ValueError(f"Profile {config.profile!r} has no {part} part; its parts are "
                       f"{profile_parts(config)}.")
  if "images" in parts:
    try:
      images.check_config(config.images, flag_prefix=IMAGE_FLAG_PREFIX)
    except ValueError as error:
      raise ValueError(
          f"Invalid image config of profile {config.profile!r} (the fields under "
          f"{IMAGE_FLAG_PREFIX}): {error} To skip the image part, pass --parts=hierarchical."
      ) from error


def run(config, workdir: str, output_dir: str, parts: Sequence[str],
        get_train_config: Callable[[str], Any],
        image_compiler_options: Optional[Mapping[str, Any]] = None) -> dict:
  """Run `parts` of profile `config` in order; return each part's summary by part name.

  Args:
    config: a configs/reproduce.py config.
    workdir: the profile's directory (see `stages.claim_workdir`).
    output_dir: where summaries and figures go.
    parts: names from PARTS.
    get_train_config: configs.hierarchical.get_config, passed in by the entry
      point because the configs live beside the package, not inside it.
    image_compiler_options: XLA options of the image training step (see
      `biasdiff.training.fit`).

  Returns:
    {"hierarchical": summaries by size, "images": the image summary}, with
    the parts that ran.
  """
  parts = list(dict.fromkeys(parts))
  check_parts(config, parts)
  summaries = {}
  for part in parts:
    if part == "hierarchical":
      summaries[part] = hierarchical.run(config, workdir, get_train_config)
      if parallel.is_main_process():
        paths = hierarchical.write_summaries(summaries[part], output_dir)
        paths += hierarchical_figures.write_all(summaries[part], output_dir)
        logger.info("Tree data: wrote %d files to %s.", len(paths), output_dir)
    else:
      summaries[part] = images.run(config.images, os.path.join(workdir, IMAGES_DIRECTORY),
                                   output_dir=os.path.join(output_dir, IMAGES_DIRECTORY),
                                   compiler_options=image_compiler_options)
  return summaries
