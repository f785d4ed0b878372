"""Measurement helpers shared by the benchmark sections.

Every timing blocks on the result (`jax.block_until_ready`) and reports the
median with the spread, because the benchmark machines may be shared.
"""

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of repeated calls after warm-up."""
  median: float
  minimum: float
  maximum: float
  repeats: int
  # Median process CPU seconds (all threads of this process). On a shared
  # CPU this varies less than wall time; for an accelerator it is host time.
  cpu_median: float

  def as_dict(self, prefix: str = "seconds") -> dict[str, float]:
    return {f"{prefix}_median": self.median, f"{prefix}_min": self.minimum,
            f"{prefix}_max": self.maximum}


def time_call(fn: Callable[..., Any], *args, repeats: int = 5,
              warmup: int = 1) -> Timing:
  """Time `fn(*args)`, blocking on its outputs, after `warmup` untimed calls.

  The warm-up calls absorb compilation, so the timed calls measure execution.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats}.")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  seconds, cpu_seconds = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(time.process_time() - cpu_start)
  return Timing(median=statistics.median(seconds), minimum=min(seconds),
                maximum=max(seconds), repeats=repeats,
                cpu_median=statistics.median(cpu_seconds))


def measure_matmul(dtype: Any = jnp.float32, n: int = 2048,
                   repeats: int = 5) -> Timing:
  """Time a jitted n x n x n matrix product (2 n^3 flops).

  The product accumulates in fp32, and fp32 inputs use full fp32 precision
  rather than a reduced-precision mode such as TF32.
  """
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  product = jax.jit(lambda a, b: jnp.matmul(
      a, b, precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32))
  return time_call(product, a, b, repeats=repeats)


def measure_matmul_gflops(dtype: Any = jnp.float32, n: int = 2048,
                          repeats: int = 5) -> float:
  """Return the GFLOP/s of a jitted n x n matrix product from its median time."""
  return 2 * n**3 / measure_matmul(dtype, n, repeats).median / 1e9


def compiled_memory(fn: Callable[..., Any], *args) -> dict[str, int]:
  """Return the compiled memory footprint of `jax.jit(fn)(*args)` in bytes.

  Arguments may be arrays or `jax.ShapeDtypeStruct`s, so large inputs need not
  be allocated. "temp" is XLA's working memory; "total" adds the arguments and
  outputs, which is the peak the program needs on one device.
  """
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError(
        f"XLA reports no memory analysis on backend {jax.default_backend()}.")
  temp = int(analysis.temp_size_in_bytes)
  arguments = int(analysis.argument_size_in_bytes)
  outputs = int(analysis.output_size_in_bytes)
  return {"temp": temp, "arguments": arguments, "outputs": outputs,
          "total": temp + arguments + outputs}


def cpu_model() -> str:
  """Return the CPU model name from /proc/cpuinfo, or platform's guess."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
  """Describe the machine and software that produced a measurement."""
  devices = jax.devices()
  return {
      "cpu_model": cpu_model(),
      "cpu_cores": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "numpy": np.__version__,
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
  }


def format_bytes(count: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(count) < 1024 or unit == "GiB":
      return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
    count /= 1024
  raise AssertionError("unreachable")
