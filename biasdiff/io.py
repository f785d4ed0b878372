"""Atomic file writes: a file appears complete or not at all.

Every result, corpus and record file of biasdiff is written through these
functions, so an interrupted run never leaves a half-written file that a rerun
would trust.
"""

import json
import os
import pathlib
import tempfile
from typing import Any, BinaryIO, Callable, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def write_file_atomically(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
  """Write a file through `write(file)` so that `path` appears complete or not at all.

  The bytes go to a temporary file in the same directory, are flushed to disk
  and then renamed onto `path` with `os.replace`, which is atomic on POSIX and
  Windows when both names are on one file system.
  """
  path = pathlib.Path(path)
  handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as file:
      write(file)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def write_json_atomically(path: PathLike, value: Any) -> None:
  """Write `value` as indented JSON with `write_file_atomically`."""
  text = json.dumps(value, indent=1, sort_keys=True) + "\n"
  write_file_atomically(path, lambda file: file.write(text.encode("utf-8")))


def write_npy_atomically(path: PathLike, array: np.ndarray) -> None:
  """Write one array as `.npy` (no pickled objects) with `write_file_atomically`."""
  write_file_atomically(path, lambda file: np.save(file, np.asarray(array), allow_pickle=False))


def write_npz_atomically(path: PathLike, **arrays: np.ndarray) -> None:
  """Write named arrays as an uncompressed `.npz` with `write_file_atomically`."""
  write_file_atomically(path, lambda file: np.savez(file, **arrays))
