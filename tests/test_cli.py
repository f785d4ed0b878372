"""Tests of the one-line error output of the entry points (biasdiff.cli)."""

import json
import os
import subprocess
import sys

import pytest

from biasdiff import cli

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPRODUCE = os.path.join(REPOSITORY, "experiments", "reproduce.py")


def _run_reproduce(*args, traceback=False):
  env = dict(os.environ)
  env.pop(cli.TRACEBACK_VARIABLE, None)
  if traceback:
    env[cli.TRACEBACK_VARIABLE] = "1"
  return subprocess.run([sys.executable, REPRODUCE, *args], cwd=REPOSITORY, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture
def quick_workdir(tmp_path):
  """A workdir that the quick profile owns."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "pipeline.json").write_text(json.dumps({"profile": "quick"}))
  return workdir


def test_claimed_workdir_prints_one_line(quick_workdir):
  result = _run_reproduce("--config=configs/reproduce.py:smoke", f"--workdir={quick_workdir}")
  assert result.returncode == cli.EXIT_STATUS, result.stderr
  assert "Traceback" not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith(f"error: {str(quick_workdir)!r} contains a run of profile 'quick', "
                              "not 'smoke'")
  assert sorted(os.listdir(quick_workdir)) == ["pipeline.json"]


def test_traceback_variable_keeps_traceback(quick_workdir):
  result = _run_reproduce("--config=configs/reproduce.py:smoke", f"--workdir={quick_workdir}",
                          traceback=True)
  assert result.returncode != 0
  assert "Traceback" in result.stderr
  assert "ValueError" in result.stderr


def test_override_of_missing_field_gets_hint(tmp_path):
  result = _run_reproduce("--config=configs/reproduce.py:smoke", f"--workdir={tmp_path / 'run'}",
                          "--config.eval.num_samples=64")
  assert result.returncode == cli.EXIT_STATUS, result.stderr
  assert "Traceback" not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert "override names no field of the config: 'eval'." in last_line
  assert "--config.images.eval.num_samples=64" in last_line
  assert not os.path.exists(tmp_path / "run")


def test_override_message_keeps_suggestion():
  # ml_collections 1.1.0 raises an AttributeError that wraps a KeyError.
  error = AttributeError(KeyError("'num_sample'\nDid you mean \"num_samples\" instead of "
                                  "\"num_sample\"?"))
  message = cli.override_error_message(error, "Hint.")
  assert message == ("a --config.<field> override names no field of the config: 'num_sample'. "
                     "Did you mean \"num_samples\" instead of \"num_sample\"? Hint.")


@pytest.mark.parametrize("error", [ValueError("bad value"), FileNotFoundError("bad value")])
def test_input_error_exits_with_one_line(error, capsys, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)

  def main(argv):
    raise error

  with pytest.raises(SystemExit) as exit_info:
    cli.report_input_errors(main)([])
  assert exit_info.value.code == cli.EXIT_STATUS
  assert capsys.readouterr().err == "error: bad value\n"


def test_other_errors_keep_traceback(monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)

  def main(argv):
    raise KeyError("bug")

  with pytest.raises(KeyError, match="bug"):
    cli.report_input_errors(main)([])


def test_traceback_variable_reraises_input_error(monkeypatch):
  monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")

  def main(argv):
    raise ValueError("bad value")

  with pytest.raises(ValueError, match="bad value"):
    cli.report_input_errors(main)([])


_PRINT_CACHE_DIR = (
    "import sys, jax\n"
    "from biasdiff import cli\n"
    "cli.use_compilation_cache(sys.argv[1])\n"
    "print(jax.config.jax_compilation_cache_dir)\n")


def _cache_dir_after_use(workdir, env_dir=None):
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if env_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = env_dir
  result = subprocess.run([sys.executable, "-c", _PRINT_CACHE_DIR, str(workdir)], cwd=REPOSITORY,
                          env=env, capture_output=True, text=True, timeout=120, check=True)
  return result.stdout.strip().splitlines()[-1]


def test_compilation_cache_in_workdir(tmp_path):
  assert _cache_dir_after_use(tmp_path) == str(tmp_path / "jax_cache")


def test_compilation_cache_keeps_user_choice(tmp_path):
  chosen = str(tmp_path / "mine")
  assert _cache_dir_after_use(tmp_path / "run", env_dir=chosen) == chosen


# Holds the lock of argv[1] until its standard input closes or it is killed.
_HOLDER = ("import sys\n"
           "from biasdiff import cli\n"
           "cli.lock_workdir(sys.argv[1])\n"
           "print('locked', flush=True)\n"
           "sys.stdin.read()\n")


def _start_holder(workdir):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPOSITORY,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  return holder


def _try_lock(workdir):
  return subprocess.run([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPOSITORY,
                        input="", capture_output=True, text=True, timeout=120)


def test_locked_workdir_stops_second_train_run(tmp_path):
  workdir = tmp_path / "run"
  holder = _start_holder(workdir)
  try:
    result = subprocess.run(
        [sys.executable, os.path.join(REPOSITORY, "experiments", "train.py"),
         "--config=configs/hierarchical.py:smoke", f"--workdir={workdir}"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  assert result.returncode == cli.EXIT_STATUS, result.stderr
  assert "Traceback" not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line == (f"error: --workdir {str(workdir)!r} is in use by another run. Wait for "
                       "that run to finish, stop it, or pass another --workdir.")
  assert os.listdir(workdir) == []


def test_lock_released_when_holder_killed(tmp_path):
  workdir = tmp_path / "run"
  holder = _start_holder(workdir)
  blocked = _try_lock(workdir)
  assert blocked.returncode != 0
  assert "WorkdirInUseError" in blocked.stderr
  holder.kill()
  holder.wait(timeout=60)
  after_kill = _try_lock(workdir)
  assert after_kill.returncode == 0, after_kill.stderr
  assert after_kill.stdout.strip() == "locked"


def test_relock_in_same_process_is_noop(tmp_path):
  workdir = tmp_path / "run"
  cli.lock_workdir(str(workdir))
  status = os.stat(workdir)
  try:
    cli.lock_workdir(str(workdir))
    (tmp_path / "link").symlink_to(workdir)
    cli.lock_workdir(str(tmp_path / "link"))
    assert _try_lock(workdir).returncode != 0
  finally:
    descriptor = cli._HELD_LOCKS.pop((status.st_dev, status.st_ino))  # pylint: disable=protected-access
    os.close(descriptor)
  assert _try_lock(workdir).returncode == 0


def test_workdir_that_is_file_prints_one_line(tmp_path):
  workdir = tmp_path / "run"
  workdir.write_text("")
  result = subprocess.run(
      [sys.executable, os.path.join(REPOSITORY, "experiments", "train.py"),
       "--config=configs/hierarchical.py:smoke", f"--workdir={workdir}"],
      cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
  assert result.returncode == cli.EXIT_STATUS, result.stderr
  assert "Traceback" not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line == (f"error: --workdir {str(workdir)!r} is not a directory, because the path "
                       "or one of its parents is a file. Pass another --workdir.")


def test_workdir_under_file_raises_value_error(tmp_path):
  parent = tmp_path / "file"
  parent.write_text("")
  with pytest.raises(ValueError, match="is not a directory"):
    cli.lock_workdir(str(parent / "run"))
