"""Resumable stages whose outputs are cached by the content of their inputs.

A stage is a named computation with a JSON-serialisable `spec`: every setting
and upstream result identity that its output depends on. Its directory is

    <root>/<name>/<key>,   key = first 16 hex digits of SHA-256(canonical spec)

so a changed setting gets a new directory and an unchanged one is reused. A
stage is complete when `result.json` exists in its directory; that file is
written last and atomically, after every other output, so an interrupted stage
is simply run again (and a computation that itself resumes, such as training,
picks up where it stopped). `spec.json` records the spec beside the outputs.

Per-item caching inside a stage (one file per checkpoint, say) uses
`ItemCache`, so an interrupted evaluation redoes only the missing items.
"""

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from biasdiff import io

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"


def canonical_json(value: Any) -> str:
  """JSON with sorted keys and no whitespace, the form that is hashed."""
  return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def spec_key(spec: Any) -> str:
  """First 16 hex digits of the SHA-256 of the canonical JSON of `spec`."""
  return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  raise TypeError(f"stage specs must be JSON-serialisable; got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage run: where its outputs live and what they depend on."""

  root: str
  name: str
  spec: Any

  @property
  def key(self) -> str:
    return spec_key(self.spec)

  @property
  def directory(self) -> str:
    return os.path.join(self.root, self.name, self.key)

  def path(self, filename: str) -> str:
    return os.path.join(self.directory, filename)

  def is_done(self) -> bool:
    return os.path.exists(self.path(RESULT_FILE))

  def result(self) -> dict:
    with open(self.path(RESULT_FILE)) as f:
      return json.load(f)


def run_stage(root: str, name: str, spec: Any,
              compute: Callable[[Stage], dict],
              *, is_writer: bool = True) -> dict:
  """Return the stage's result, computing it only if it is not complete yet.

  Args:
    root: directory holding every stage of a pipeline.
    name: the stage's name; its outputs go to <root>/<name>/<key>.
    spec: everything the output depends on (JSON-serialisable).
    compute: writes the stage's files into `stage.directory` and returns a
      JSON-serialisable result; it may resume from files a previous,
      interrupted attempt left there.
    is_writer: False on the processes of a multi-host run that must not write.

  Returns:
    The result dict, with "stage_directory" added.
  """
  stage = Stage(root, name, spec)
  if stage.is_done():
    logger.info("Stage %s: reusing %s", name, stage.directory)
    return {**stage.result(), "stage_directory": stage.directory}
  os.makedirs(stage.directory, exist_ok=True)
  if is_writer:
    io.write_json_atomically(stage.path(SPEC_FILE), spec)
  logger.info("Stage %s: running in %s", name, stage.directory)
  start = time.perf_counter()
  result = compute(stage)
  seconds = time.perf_counter() - start
  result = {**result, "seconds": seconds}
  if is_writer:
    io.write_json_atomically(stage.path(RESULT_FILE), result)
  logger.info("Stage %s: done in %.1f s", name, seconds)
  return {**result, "stage_directory": stage.directory}


class ItemCache:
  """Per-item `.npz` files inside a stage directory, each written atomically.

  `get_or_compute(name, compute)` returns the arrays stored under `name`, or
  calls `compute()` (which returns a dict of arrays), stores and returns them.
  """

  def __init__(self, directory: str, is_writer: bool = True):
    self.directory = directory
    self.is_writer = is_writer
    os.makedirs(directory, exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.directory, f"{name}.npz")

  def get_or_compute(self, name: str,
                     compute: Callable[[], dict]) -> dict:
    path = self.path(name)
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as stored:
        return {k: stored[k] for k in stored.files}
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    if self.is_writer:
      io.write_npz_atomically(path, **arrays)
    return arrays


def load_json(path: str, default: Optional[Any] = None) -> Any:
  """Read a JSON file, or return `default` when it does not exist."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def claim_workdir(workdir: str, config: Any, is_writer: bool = True) -> None:
  """Record which pipeline profile or image variant owns `workdir`, or raise if another one does.

  Stages of different configs would not collide (their keys differ), but the
  summaries and figures of a workdir would be overwritten, so one workdir
  serves one profile of configs/reproduce.py (experiments/reproduce.py) or
  one variant of configs/images.py (experiments/images.py). The record is
  <workdir>/pipeline.json. A profile's image part runs in <workdir>/images,
  which the image pipeline claims for the profile's image variant.

  Raises:
    ValueError: `workdir` belongs to another profile or variant.
  """
  path = os.path.join(workdir, "pipeline.json")
  claim = workdir_owner(config)
  owner = load_json(path)
  if owner is not None and owner != claim:
    kind, name = _describe_owner(owner)
    claim_kind, claim_name = _describe_owner(claim)
    requested = f"{claim_name!r}" if claim_kind == kind else f"of {claim_kind} {claim_name!r}"
    example = f"runs/{claim_name}" if "profile" in claim else f"runs/images_{claim_name}"
    raise ValueError(
        f"{workdir!r} contains a run of {kind} {name!r}, not {requested}; use another --workdir "
        f"(for example {example}) or delete this one.")
  if owner is None and is_writer:
    os.makedirs(workdir, exist_ok=True)
    io.write_json_atomically(path, claim)


def workdir_owner(config: Any) -> dict:
  """Return the pipeline.json record of `config`: its profile or its image variant."""
  if "profile" in config:
    return {"profile": config["profile"]}
  return {"image_variant": config["variant"]}


def _describe_owner(owner: dict) -> tuple[str, str]:
  if "profile" in owner:
    return "profile", owner["profile"]
  return "image variant", owner["image_variant"]
