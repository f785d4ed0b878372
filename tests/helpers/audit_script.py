"""Load experiments/audit.py as a module, once per test process.

The script defines absl flags at import, and absl rejects a flag defined
again by a module of another name, so test files load the script through
this function, under one module name.
"""

import functools
import importlib.util
import os

AUDIT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments", "audit.py")


@functools.cache
def load():
  """Import experiments/audit.py and return the module."""
  spec = importlib.util.spec_from_file_location("audit_script", AUDIT_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
