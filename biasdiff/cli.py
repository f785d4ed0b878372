"""Error output and compilation cache shared by the command-line entry points in experiments/.

`run(main)` replaces `absl.app.run(main)`. Errors in the user's input print
as one line on stderr, `error: <message>`, and exit with status 1 without a
traceback:

- a ValueError or FileNotFoundError raised while `main` runs, which is how
  the pipelines reject config values, missing data and claimed workdirs;
- a WorkdirInUseError from `lock_workdir`, for a workdir that another run holds;
- a --config.<field> override that names no field of the config.

Every other exception keeps its traceback. Set the environment variable
BIASDIFF_TRACEBACK=1 to get the traceback of input errors too.

`use_compilation_cache(workdir)` keeps compiled XLA programs on disk, so a
resumed run, a rerun and every group of a zoo trained one fit at a time
compile each program once.

`lock_workdir(workdir)` stops a second run from writing into a workdir that a
running one holds, with a one-line error.
"""

import errno
import fcntl
import functools
import logging
import os
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app
import jax

from biasdiff import rng


class WorkdirInUseError(RuntimeError):
  """Raised when another process holds the lock of a run directory."""


TRACEBACK_VARIABLE = "BIASDIFF_TRACEBACK"
INPUT_ERRORS = (ValueError, FileNotFoundError, WorkdirInUseError)
EXIT_STATUS = 1
# ml_collections 1.1.0 resolves the field path of every --config.<field>
# override in this module, and raises KeyError or AttributeError there when a
# name on the path is not a field.
_OVERRIDE_MODULE = os.path.join("ml_collections", "config_flags", "config_path.py")


def use_compilation_cache(workdir: str) -> None:
  """Cache compiled programs in <workdir>/jax_cache, unless a cache directory is already set.

  A directory set through JAX_COMPILATION_CACHE_DIR or jax.config wins. Programs
  that compile in under a second are not cached (JAX's default threshold).
  """
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir),
                                                              "jax_cache"))


# (device, inode) of a locked directory -> its descriptor, kept open while the lock is
# held. The key is the same for every path that names the directory, symlinks included.
_HELD_LOCKS: dict[tuple[int, int], int] = {}


def lock_workdir(workdir: str) -> None:
  """Create `workdir` if needed and hold an exclusive lock on it until this process exits.

  Two runs that write one workdir would mix their checkpoints and results, so
  the second one raises WorkdirInUseError. The lock is flock(2) on the
  directory itself: it leaves no file behind, and the kernel releases it when
  the holder exits, also by kill -9. Only process 0 of a multi-process run
  takes it, and taking it again in the same process does nothing. A workdir
  that is a file, or that this user cannot create or open, raises ValueError,
  which the entry points print as one line.

  NOTE: on a filesystem without flock support the run goes on unlocked, with
  a warning. Network filesystems may not see a lock held on another host.
  """
  if jax.process_index() != 0:
    return
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  except (FileExistsError, NotADirectoryError):
    raise ValueError(f"--workdir {workdir!r} is not a directory, because the path or one of its "
                     "parents is a file. Pass another --workdir.") from None
  except PermissionError as error:
    raise ValueError(f"--workdir {workdir!r} could not be created or opened ({error.strerror}). "
                     "Pass a --workdir that this user can write.") from None
  status = os.fstat(descriptor)
  key = (status.st_dev, status.st_ino)
  if key in _HELD_LOCKS:
    os.close(descriptor)
    return
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as error:
    os.close(descriptor)
    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      raise WorkdirInUseError(
          f"--workdir {workdir!r} is in use by another run. Wait for that run to finish, "
          "stop it, or pass another --workdir.") from None
    logging.warning("Could not lock %s (%s); running without a lock.", path, error)
    return
  _HELD_LOCKS[key] = descriptor


def tracebacks_requested() -> bool:
  """Return whether BIASDIFF_TRACEBACK requests the traceback of input errors."""
  return os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")


def exit_with_error(message: str) -> NoReturn:
  """Print `error: <message>` on stderr and exit with EXIT_STATUS."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_STATUS)


def report_input_errors(main: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
  """Wrap an absl `main` so that the exceptions in INPUT_ERRORS exit with one line."""

  @functools.wraps(main)
  def wrapped(argv: Sequence[str]) -> Any:
    try:
      return main(argv)
    except INPUT_ERRORS as error:
      if tracebacks_requested():
        raise
      exit_with_error(str(error))

  return wrapped


def run(main: Callable[[Sequence[str]], Any], override_hint: str = "") -> None:
  """Run `main` like `absl.app.run`, with input errors printed as one line.

  Args:
    main: the entry point's main function, called with the arguments left
      after flag parsing.
    override_hint: a sentence added to the error of an override that names no
      field, e.g. where this script's config nests its fields.
  """
  rng.use_unrolled_threefry_on_cpu()
  app.run(report_input_errors(main),
          flags_parser=functools.partial(_parse_flags, override_hint=override_hint))


def _parse_flags(argv: Sequence[str], override_hint: str) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    if tracebacks_requested() or not _raised_by_override(error):
      raise
    exit_with_error(override_error_message(error, override_hint))


def _raised_by_override(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return any(frame.filename.endswith(_OVERRIDE_MODULE) for frame in frames)


def override_error_message(error: BaseException, hint: str = "") -> str:
  """Return the one-line message for an override whose field path names no field.

  ml_collections puts the quoted field name on the first line of the error
  and a "Did you mean ...?" suggestion, when it has one, on the next. Its
  AttributeError wraps a KeyError, and str() of a KeyError quotes the whole
  text, so the text is taken from the innermost exception's argument.
  """
  text = error
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]
  text = str(text)
  name, *suggestions = text.splitlines() or [text]
  message = f"a --config.<field> override names no field of the config: {name}."
  return " ".join([message, *suggestions, hint]).strip()
