"""Gaussian diffusion: noise schedules, forward noising, reverse steps, sampler.

Both settings use the variance-preserving forward process

  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),

on integer times t. Sequences (one-hot tokens) use 1-based times t = 1 … T
with abar_0 = 1 for clean data, and their denoiser predicts x_0. Images use
0-based times t = 0 … T - 1, where abar_0 = alpha_0 < 1, and their denoiser
predicts eps. `Schedule.first_t` records which convention a table follows, and
every accessor takes the same integer t that noising, the network and the
reverse step use.

The ancestral sampler draws every noise vector from a key that depends only on
(seed, stream, t, global sample index), so sample k receives the same noise
path for every model, checkpoint, batch size and device layout.
"""

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from biasdiff import rng

logger = logging.getLogger(__name__)

# Denoiser kinds accepted by the sampler.
X0 = "x0"  # denoise(x_t, t) returns a prediction of x_0 (probabilities for one-hot data)
EPS = "eps"  # denoise(x_t, t) returns a prediction of the noise eps
KINDS = (X0, EPS)

ArrayLike = Union[jax.Array, np.ndarray, int]


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete variance schedule on the integer times first_t … first_t + T - 1.

  With alpha_t = 1 - beta_t and abar_t = prod_{s = first_t}^{t} alpha_s, the
  time just before the first step is clean data, abar_{first_t - 1} = 1. Tables
  are float64 numpy arrays of length T, storing time t at index t - first_t.

  Accessors take integer t arrays of any shape (concrete or traced inside jit)
  and return float32 jnp arrays of the same shape. A concrete t outside the
  range raises ValueError; a traced one yields NaN, so a bad time is never
  silently clamped. Derived quantities are computed once, in float64, when the
  schedule is built, and rounded to float32 only at lookup.

  The dataclass compares and hashes by identity, so it can be a static
  argument of `jax.jit`.
  """

  name: str  # what the table is, for logs and run metadata
  first_t: int  # the first diffusion time: 1 for sequences, 0 for images
  betas: np.ndarray  # [T] float64: beta at t = first_t … last_t
  alpha_bars: np.ndarray  # [T] float64: abar at t = first_t … last_t
  _float32_tables: dict = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    betas = np.asarray(self.betas, dtype=np.float64)
    alpha_bars = np.asarray(self.alpha_bars, dtype=np.float64)
    if betas.ndim != 1 or betas.shape != alpha_bars.shape or betas.size < 1:
      raise ValueError(
          "betas and alpha_bars must be 1-D arrays of the same non-zero length, "
          f"got shapes {betas.shape} and {alpha_bars.shape}.")
    if not (np.all(betas > 0) and np.all(betas < 1)):
      raise ValueError(f"Every beta must lie in (0, 1); got range [{betas.min()}, {betas.max()}].")
    if not (np.all(alpha_bars > 0) and np.all(alpha_bars < 1)):
      raise ValueError(
          f"Every alpha_bar must lie in (0, 1); got range [{alpha_bars.min()}, {alpha_bars.max()}].")
    if isinstance(self.first_t, bool) or not isinstance(self.first_t, (int, np.integer)) or self.first_t < 0:
      raise ValueError(f"first_t must be a non-negative int, got {self.first_t!r}.")
    object.__setattr__(self, "betas", betas)
    object.__setattr__(self, "alpha_bars", alpha_bars)
    object.__setattr__(self, "first_t", int(self.first_t))

    alphas = 1.0 - betas
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    one_minus = 1.0 - alpha_bars
    tables = {
        "beta": betas,
        "alpha": alphas,
        "alpha_bar": alpha_bars,
        "alpha_bar_prev": alpha_bars_prev,
        "signal_scale": np.sqrt(alpha_bars),
        "noise_scale": np.sqrt(one_minus),
        "field": np.sqrt(alpha_bars) / one_minus,
        # Gaussian posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + cx x_t, v).
        "posterior_c0": np.sqrt(alpha_bars_prev) * betas / one_minus,
        "posterior_cx": np.sqrt(alphas) * (1.0 - alpha_bars_prev) / one_minus,
        "posterior_variance": betas * (1.0 - alpha_bars_prev) / one_minus,
        # DDPM mean from a noise prediction: (x_t - eps_scale eps_hat) / sqrt(alpha_t).
        "inverse_sqrt_alpha": 1.0 / np.sqrt(alphas),
        "eps_scale": betas / np.sqrt(one_minus),
    }
    object.__setattr__(self, "_float32_tables",
                       {k: v.astype(np.float32) for k, v in tables.items()})

  @property
  def num_steps(self) -> int:
    """The number T of diffusion steps."""
    return int(self.betas.shape[0])

  @property
  def last_t(self) -> int:
    """The noisiest time, first_t + T - 1, where sampling starts."""
    return self.first_t + self.num_steps - 1

  @property
  def times(self) -> np.ndarray:
    """All diffusion times in increasing order, as int32."""
    return np.arange(self.first_t, self.last_t + 1, dtype=np.int32)

  def _lookup(self, name: str, t: ArrayLike) -> jax.Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
      raise TypeError(
          f"Diffusion time t must be an integer array, got dtype {t.dtype}; "
          "cast it with .astype(jnp.int32).")
    if not isinstance(t, jax.core.Tracer) and t.size:
      t_min, t_max = int(jnp.min(t)), int(jnp.max(t))
      if t_min < self.first_t or t_max > self.last_t:
        raise ValueError(
            f"Diffusion time out of range for schedule {self.name!r}: got t in "
            f"[{t_min}, {t_max}], valid times are {self.first_t} … {self.last_t}.")
    index = t.astype(jnp.int32) - self.first_t
    valid = (index >= 0) & (index < self.num_steps)
    table = jnp.asarray(self._float32_tables[name])
    values = table[jnp.clip(index, 0, self.num_steps - 1)]
    return jnp.where(valid, values, jnp.nan)

  def beta(self, t: ArrayLike) -> jax.Array:
    """beta_t."""
    return self._lookup("beta", t)

  def alpha(self, t: ArrayLike) -> jax.Array:
    """alpha_t = 1 - beta_t."""
    return self._lookup("alpha", t)

  def alpha_bar(self, t: ArrayLike) -> jax.Array:
    """abar_t = prod_{s <= t} alpha_s."""
    return self._lookup("alpha_bar", t)

  def alpha_bar_prev(self, t: ArrayLike) -> jax.Array:
    """abar_{t-1}, which is 1 at t = first_t."""
    return self._lookup("alpha_bar_prev", t)

  def signal_scale(self, t: ArrayLike) -> jax.Array:
    """sqrt(abar_t), the coefficient of x_0 in x_t."""
    return self._lookup("signal_scale", t)

  def noise_scale(self, t: ArrayLike) -> jax.Array:
    """sqrt(1 - abar_t), the coefficient of eps in x_t."""
    return self._lookup("noise_scale", t)

  def field(self, t: ArrayLike) -> jax.Array:
    """Leaf field strength gamma_t = sqrt(abar_t) / (1 - abar_t).

    For one-hot data, p(x_t | x_0 = e_a) is proportional to exp(gamma_t x_t[a]),
    because ||e_a||^2 = 1, so gamma_t x_t is the log-evidence of each symbol.
    """
    return self._lookup("field", t)

  def posterior_coefficients(self, t: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return (c0, cx, v) of q(x_{t-1} | x_t, x_0) = N(c0 x_0 + cx x_t, v I).

    c0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t),
    cx = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
    v  = beta_t (1 - abar_{t-1}) / (1 - abar_t).
    At t = first_t, abar_{t-1} = 1 gives c0 = 1 (when first_t = 1), cx = 0, v = 0.
    """
    return (self._lookup("posterior_c0", t), self._lookup("posterior_cx", t),
            self._lookup("posterior_variance", t))

  def eps_coefficients(self, t: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Return (1 / sqrt(alpha_t), beta_t / sqrt(1 - abar_t)) of the DDPM mean."""
    return self._lookup("inverse_sqrt_alpha", t), self._lookup("eps_scale", t)


def sequence_schedule(num_steps: int = 500) -> Schedule:
  """Build the Diffusion-LM linear schedule for one-hot sequences, 1-based.

  beta_t = s (1e-4 + (0.02 - 1e-4) (t - 1) / (T - 1)) for t = 1 … T, with
  s = 1000 / T: T equally spaced values from s * 1e-4 to s * 0.02 inclusive
  (2e-4 to 0.04 at T = 500). abar_t is the float64 cumulative product, and
  abar_0 = 1. Because beta_T = 20 / T must stay below 1, T > 20 (or T = 1).
  """
  _check_num_steps(num_steps)
  scale = 1000.0 / num_steps
  betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  if betas.max() >= 1.0:
    raise ValueError(
        f"num_steps={num_steps} gives beta_T = {betas.max():g} >= 1 after rescaling by "
        "1000 / T; use num_steps > 20.")
  alpha_bars = np.cumprod(1.0 - betas)
  return Schedule(name=f"sequence_linear_T{num_steps}", first_t=1, betas=betas,
                  alpha_bars=alpha_bars)


def ddpm_schedule(num_steps: int = 1000) -> Schedule:
  """Build the DDPM linear schedule for images, 0-based.

  beta_t = 1e-4 + (0.02 - 1e-4) t / (T - 1) for t = 0 … T - 1, so abar_0 =
  alpha_0 < 1. Betas, alphas and their cumulative product are computed in
  float32, as the authors' PyTorch code does, and then stored as float64.
  """
  _check_num_steps(num_steps)
  if num_steps < 2:
    raise ValueError(f"ddpm_schedule needs num_steps >= 2, got {num_steps}.")
  t = np.arange(num_steps, dtype=np.float32)
  betas = np.float32(1e-4) + np.float32(0.02 - 1e-4) * (t / np.float32(num_steps - 1))
  alpha_bars = np.cumprod(np.float32(1.0) - betas, dtype=np.float32)
  return Schedule(name=f"ddpm_linear_T{num_steps}", first_t=0,
                  betas=betas.astype(np.float64), alpha_bars=alpha_bars.astype(np.float64))


def respaced_times(num_steps: int, num_kept: int) -> np.ndarray:
  """Return num_kept evenly spaced times of a 0-based schedule, first and last included.

  tau_k = round(k (T - 1) / (K - 1)) for k = 0 ... K - 1, as int32 in
  increasing order. K = T keeps every time.
  """
  _check_num_steps(num_steps)
  _check_num_steps(num_kept)
  if not 2 <= num_kept <= num_steps:
    raise ValueError(
        f"num_kept={num_kept} must lie in [2, num_steps={num_steps}] to keep the first "
        "and the last time.")
  times = np.round(np.linspace(0.0, num_steps - 1, num_kept)).astype(np.int32)
  if np.unique(times).size != num_kept:
    raise ValueError(f"Respacing {num_steps} steps to {num_kept} repeats a time; use fewer steps.")
  return times


def respaced_schedule(schedule: Schedule, kept_times: Sequence[int]) -> Schedule:
  """Build the DDPM schedule on a subset of the times of a 0-based schedule.

  For kept times tau_0 < ... < tau_{K-1} the new schedule has, at its own
  index k = 0 ... K - 1,

    abar'_k = abar_{tau_k},   beta'_k = 1 - abar'_k / abar'_{k-1},   abar'_{-1} = 1,

  so its marginals q(x_k | x_0) equal those of the original schedule at
  tau_k and each ancestral step jumps from tau_k to tau_{k-1}. A network
  trained on the original times must be called with tau_k, not k: map the
  sampler's index through `kept_times`. With every time kept it returns
  `schedule` itself (recomputing beta from the float32 abar table would
  differ from the stored betas by about 1e-7).
  """
  if schedule.first_t != 0:
    raise ValueError(
        f"respaced_schedule needs a 0-based schedule, got first_t={schedule.first_t} "
        f"for {schedule.name!r}.")
  times = np.asarray(kept_times)
  if times.ndim != 1 or times.size < 1 or not np.issubdtype(times.dtype, np.integer):
    raise ValueError(f"kept_times must be a non-empty 1-D integer array, got {times!r}.")
  if times[0] < 0 or times[-1] > schedule.last_t or np.any(np.diff(times) <= 0):
    raise ValueError(
        f"kept_times must increase strictly within 0 ... {schedule.last_t}, got "
        f"{times.tolist()[:5]} ... {times.tolist()[-3:]}.")
  if times.size == schedule.num_steps:
    return schedule
  alpha_bars = schedule.alpha_bars[times]
  previous = np.concatenate([[1.0], alpha_bars[:-1]])
  betas = 1.0 - alpha_bars / previous
  return Schedule(name=f"{schedule.name}_respaced{times.size}", first_t=0, betas=betas,
                  alpha_bars=alpha_bars)


def _check_num_steps(num_steps: int) -> None:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")


def _expand_to(coefficient: jax.Array, ndim: int) -> jax.Array:
  """Append unit axes so a per-sample coefficient broadcasts over trailing axes."""
  return coefficient.reshape(coefficient.shape + (1,) * (ndim - coefficient.ndim))


def _check_time_shape(t: jax.Array, x: jax.Array, x_name: str) -> None:
  if t.ndim > x.ndim or tuple(t.shape) != tuple(x.shape[:t.ndim]):
    raise ValueError(
        f"t of shape {tuple(t.shape)} must match the leading axes of {x_name} of "
        f"shape {tuple(x.shape)}: give one time per sample.")


def forward_noise(schedule: Schedule, x0: jax.Array, t: ArrayLike, noise: jax.Array) -> jax.Array:
  """Noise clean data to time t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

  t contains one integer time per sample and its shape is a prefix of x0.shape
  (a scalar applies to all); the coefficients broadcast over the trailing axes.
  """
  x0 = jnp.asarray(x0)
  t = jnp.asarray(t)
  _check_time_shape(t, x0, "x0")
  if jnp.shape(noise) != x0.shape:
    raise ValueError(f"noise shape {jnp.shape(noise)} must equal x0 shape {x0.shape}.")
  signal = _expand_to(schedule.signal_scale(t), x0.ndim)
  noise_scale = _expand_to(schedule.noise_scale(t), x0.ndim)
  return signal * x0 + noise_scale * noise


def x0_posterior_step(schedule: Schedule, x_t: jax.Array, t: ArrayLike, x0_hat: jax.Array,
                      z: jax.Array) -> jax.Array:
  """Sample x_{t-1} from the Gaussian posterior q(x_{t-1} | x_t, x_0 = x0_hat).

  x_{t-1} = c0 x0_hat + cx x_t + sqrt(v) z, with c0, cx and v from
  `Schedule.posterior_coefficients`, so the variance is the posterior variance.
  x0_hat is the soft prediction (per-position probabilities for one-hot data),
  never a sampled or argmax one-hot. At t = 1 of the sequence schedule the step
  returns x0_hat exactly.
  """
  x_t = jnp.asarray(x_t)
  t = jnp.asarray(t)
  _check_time_shape(t, x_t, "x_t")
  c0, cx, variance = (_expand_to(c, x_t.ndim) for c in schedule.posterior_coefficients(t))
  return c0 * x0_hat + cx * x_t + jnp.sqrt(variance) * z


def eps_step(schedule: Schedule, x_t: jax.Array, t: ArrayLike, eps_hat: jax.Array, z: jax.Array,
             last_noisy_t: int = 2) -> jax.Array:
  """Take one DDPM step from a noise prediction.

  x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t) + sigma_t z,
  with sigma_t = sqrt(beta_t) (not the posterior variance) for t >= last_noisy_t
  and 0 below. The default 2 adds no noise at t = 0 and t = 1, as the authors'
  image code does; last_noisy_t = 1 gives the convention of Ho et al., with
  noise skipped only at the final step t = 0.
  """
  if isinstance(last_noisy_t, bool) or not isinstance(last_noisy_t, (int, np.integer)):
    raise TypeError(f"last_noisy_t must be an int, got {last_noisy_t!r}.")
  x_t = jnp.asarray(x_t)
  t = jnp.asarray(t)
  _check_time_shape(t, x_t, "x_t")
  inverse_sqrt_alpha, eps_scale = (_expand_to(c, x_t.ndim) for c in schedule.eps_coefficients(t))
  sigma = jnp.where(t >= last_noisy_t, jnp.sqrt(schedule.beta(t)), 0.0)
  return inverse_sqrt_alpha * (x_t - eps_scale * eps_hat) + _expand_to(sigma, x_t.ndim) * z


# ---------------------------------------------------------------------------
# Ancestral sampler.


def _per_sample_normal(key: jax.Array, ids: jax.Array, event_shape: tuple[int, ...],
                       *ids_before_sample: Any) -> jax.Array:
  """Draw N(0, I) of event_shape per sample from fold(key, *ids_before_sample, k)."""
  flat_ids = ids.reshape(-1)

  def draw(sample_id):
    return jax.random.normal(rng.fold(key, *ids_before_sample, sample_id), event_shape,
                             jnp.float32)

  # [prod(id_shape), *event]
  noise = jax.vmap(draw)(flat_ids)
  return noise.reshape(ids.shape + event_shape)


@functools.partial(
    jax.jit,
    static_argnames=("schedule", "denoise", "kind", "event_shape", "shared_shape", "t_start",
                     "last_noisy_t"))
def _sample_jit(seed, sample_ids, x_start, extra_ids, denoise_args, *, schedule, denoise, kind,
                event_shape, shared_shape, t_start, last_noisy_t):
  key = rng.fold(seed, *extra_ids)
  batch_shape = shared_shape + sample_ids.shape
  # x is carried flat since XLA:CPU vectorises along the minor axis (q = 6 made the step
  # noise 6x slower, jax 0.10.2). JAX draws normals flat, so the noise is unchanged.
  flat_event = (math.prod(event_shape),)

  if x_start is None:
    # [*id_shape, event_size], the same for every entry of the shared axes.
    x = _per_sample_normal(key, sample_ids, flat_event, rng.SAMPLE_INIT)
    x = jnp.broadcast_to(x, batch_shape + flat_event)
  else:
    x = x_start.astype(jnp.float32).reshape(batch_shape + flat_event)

  def step(x, t):
    # x: [*shared, *id_shape, event_size]
    t_batch = jnp.full(batch_shape, t, dtype=jnp.int32)
    x_t = x.reshape(batch_shape + event_shape)
    prediction = denoise(x_t, t_batch, *denoise_args)
    if prediction.shape != x_t.shape:
      raise ValueError(
          f"The denoiser returned shape {prediction.shape} for x_t of shape {x_t.shape}; "
          "it must return an array of the input's shape.")
    prediction = prediction.astype(jnp.float32).reshape(x.shape)
    # Broadcasts over the shared axes: one noise vector per global sample index.
    z = _per_sample_normal(key, sample_ids, flat_event, rng.SAMPLE_STEP, t)
    if kind == X0:
      x = x0_posterior_step(schedule, x, t_batch, prediction, z)
    else:
      x = eps_step(schedule, x, t_batch, prediction, z, last_noisy_t=last_noisy_t)
    return x, None

  times = jnp.arange(t_start, schedule.first_t - 1, -1, dtype=jnp.int32)
  x, _ = jax.lax.scan(step, x, times)
  return x.reshape(batch_shape + event_shape)


def sample(schedule: Schedule,
           denoise: Callable[..., jax.Array],
           seed: rng.KeyLike,
           sample_ids: ArrayLike,
           *,
           kind: str,
           event_shape: Sequence[int],
           denoise_args: tuple = (),
           x_start: Optional[jax.Array] = None,
           t_start: Optional[int] = None,
           extra_ids: Sequence[Any] = (),
           shared_shape: Sequence[int] = (),
           last_noisy_t: int = 2) -> jax.Array:
  """Run the ancestral sampler from t_start down to first_t; return x at time first_t - 1.

  Each step calls `denoise(x_t, t_batch, *denoise_args)` once on the whole
  batch, with x_t of shape [*shared_shape, *id_shape, *event_shape] float32 and
  t_batch of shape [*shared_shape, *id_shape] int32, all entries equal to the
  current t. For kind "x0" it must return x0 probabilities, and the step is
  `x0_posterior_step`. For kind "eps" it returns the predicted noise, and the
  step is `eps_step`. Pass parameters through `denoise_args` (they are traced
  jit arguments), and reuse one `denoise` object: it is a static argument, so a
  new closure per call recompiles.

  Noise: with k = sample_ids[...] the global sample index and
  key = fold(seed, *extra_ids), the start x_T[k] comes from
  fold(key, SAMPLE_INIT, k) and the step noise z_t[k] from
  fold(key, SAMPLE_STEP, t, k). The noise therefore depends only on the seed,
  the extra ids, t and k: every model, checkpoint and batch size sees the same
  path for sample k. extra_ids (for example (denoiser_id, t0, repetition))
  give independent reverse noise for U-turns; with extra_ids = () the keys are
  exactly fold(seed, SAMPLE_INIT, k) and fold(seed, SAMPLE_STEP, t, k).

  shared_shape adds leading axes over which the noise is shared: for a model
  stack, shared_shape = (num_models,) runs every model on the same noise, and
  `denoise` is expected to vmap the network over that axis.

  U-turns: give x_start, the noisy x_{t_start} of shape
  [*shared_shape, *id_shape, *event_shape], and t_start; the first denoiser
  call is at t_start. Without x_start the sampler starts from N(0, I) at
  t_start = last_t.

  Returns the continuous output of the last step (at t = first_t), which is
  the generated x_0, of shape [*shared_shape, *id_shape, *event_shape] float32.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  sample_ids = jnp.asarray(sample_ids)
  if not jnp.issubdtype(sample_ids.dtype, jnp.integer):
    raise TypeError(f"sample_ids must be an integer array, got dtype {sample_ids.dtype}.")
  if not isinstance(sample_ids, jax.core.Tracer) and sample_ids.size and int(jnp.min(sample_ids)) < 0:
    raise ValueError("sample_ids must be non-negative global sample indices.")
  sample_ids = sample_ids.astype(jnp.int32)
  event_shape = tuple(int(n) for n in event_shape)
  shared_shape = tuple(int(n) for n in shared_shape)
  if t_start is None:
    t_start = schedule.last_t
  t_start = int(t_start)
  if not schedule.first_t <= t_start <= schedule.last_t:
    raise ValueError(
        f"t_start={t_start} is outside the schedule's times {schedule.first_t} … {schedule.last_t}.")
  expected_shape = shared_shape + tuple(sample_ids.shape) + event_shape
  if x_start is None:
    if t_start != schedule.last_t:
      raise ValueError(
          f"x_start is required when t_start={t_start} < T={schedule.last_t}: pass the noisy "
          "x_{t_start}, for example from forward_noise.")
  else:
    x_start = jnp.asarray(x_start)
    if x_start.shape != expected_shape:
      raise ValueError(
          f"x_start has shape {x_start.shape}, expected {expected_shape} "
          "(shared_shape + sample_ids.shape + event_shape).")
  extra_ids = tuple(jnp.asarray(i, dtype=jnp.int32) for i in extra_ids)
  return _sample_jit(
      seed, sample_ids, x_start, extra_ids, tuple(denoise_args),
      schedule=schedule, denoise=denoise, kind=kind, event_shape=event_shape,
      shared_shape=shared_shape, t_start=t_start, last_noisy_t=int(last_noisy_t))


def sample_in_batches(schedule: Schedule,
                      denoise: Callable[..., jax.Array],
                      seed: rng.KeyLike,
                      sample_ids: Union[int, ArrayLike],
                      batch_size: int,
                      *,
                      x_start: Optional[jax.Array] = None,
                      shared_shape: Sequence[int] = (),
                      **kwargs) -> jax.Array:
  """Run `sample` over a long 1-D list of sample indices, batch_size at a time.

  sample_ids is a 1-D integer array, or an int N meaning 0 … N - 1. The last
  batch is padded with copies of its final index, so one compiled program
  serves every batch, and the padding is dropped. Because the noise of sample
  k depends only on k, the result does not depend on batch_size. x_start, if
  given, is split along its sample axis (the axis after shared_shape). Other
  keyword arguments go to `sample`.

  Returns an array of shape [*shared_shape, N, *event_shape].
  """
  if isinstance(sample_ids, (int, np.integer)) and not isinstance(sample_ids, bool):
    sample_ids = np.arange(int(sample_ids), dtype=np.int32)
  sample_ids = np.asarray(sample_ids)
  if sample_ids.ndim != 1 or sample_ids.size == 0:
    raise ValueError(f"sample_ids must be a non-empty 1-D index array, got shape {sample_ids.shape}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  shared_shape = tuple(shared_shape)
  axis = len(shared_shape)
  num_samples = sample_ids.shape[0]
  batch_size = min(int(batch_size), num_samples)

  outputs = []
  for start in range(0, num_samples, batch_size):
    stop = min(start + batch_size, num_samples)
    # Pad a short last batch by repeating its last index.
    take = np.concatenate([np.arange(start, stop), np.full(start + batch_size - stop, stop - 1)])
    batch_x_start = None if x_start is None else jnp.take(jnp.asarray(x_start), take, axis=axis)
    batch = sample(schedule, denoise, seed, sample_ids[take], x_start=batch_x_start,
                   shared_shape=shared_shape, **kwargs)
    outputs.append(jax.lax.slice_in_dim(batch, 0, stop - start, axis=axis))
  logger.debug("Sampled %d indices in %d batches of %d.", num_samples, len(outputs), batch_size)
  return jnp.concatenate(outputs, axis=axis)


def to_tokens(x0: jax.Array) -> jax.Array:
  """Return the per-position argmax of a continuous one-hot sample: [..., L, q] -> [..., L]."""
  return jnp.argmax(x0, axis=-1)
