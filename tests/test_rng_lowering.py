"""The unrolled CPU lowering of threefry computes the same bits as JAX's default."""

import os
import subprocess
import sys

import numpy as np

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRAW = """
import sys
import jax, jax.numpy as jnp, numpy as np
from biasdiff import diffusion, rng
if sys.argv[2] == "unrolled":
  assert rng.use_unrolled_threefry_on_cpu()
key = rng.fold(7, rng.SAMPLE_STEP, 3)
normal = jax.jit(lambda k: jax.random.normal(k, (1000,)))(key)
schedule = diffusion.sequence_schedule(50)
prior = lambda x, t: jnp.full_like(x, 1 / 6)
samples = diffusion.sample(schedule, prior, 0, jnp.arange(64), kind="x0", event_shape=(4, 6))
np.savez(sys.argv[1], normal=np.asarray(normal), samples=np.asarray(samples))
"""


def _draw(path, lowering):
  subprocess.run([sys.executable, "-c", _DRAW, str(path), lowering], cwd=REPOSITORY,
                 check=True, capture_output=True, timeout=300)
  return np.load(path)


def test_unrolled_threefry_same_bits(tmp_path):
  rolled = _draw(tmp_path / "rolled.npz", "rolled")
  unrolled = _draw(tmp_path / "unrolled.npz", "unrolled")
  np.testing.assert_array_equal(rolled["normal"], unrolled["normal"])
  np.testing.assert_array_equal(rolled["samples"], unrolled["samples"])
