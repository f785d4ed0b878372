"""The stacked training state of a model list, and the model list itself.

Every model of a run (a pair, a same-data control or a whole zoo) has the same
architecture. Parameters, Adam state and the optional parameter EMA are
therefore stacked on a leading `models` axis and updated by one vmapped step.
A model is identified by its data block and replicate, and it carries its own
training seed, from which its initialisation, epoch order, diffusion noise and
dropout are folded.
"""

import dataclasses
import hashlib
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from biasdiff import parallel
from biasdiff import rng

# Largest training seed: seeds stay below 2**31 so they fit an int32 array.
_SEED_LIMIT = 2**31


@flax.struct.dataclass
class TrainState:
  """Optimizer state of M stacked models; every array leaf starts with [M]."""

  step: jax.Array  # [] int32: optimizer steps taken, shared by all models
  params: Any  # leaves [M, ...]
  opt_state: Any  # Adam moments and count, leaves [M, ...]
  ema_params: Any  # leaves [M, ...]; None when the EMA is disabled


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of a run: what it trains on and the seeds that drive it."""

  block: int  # index of its training block (or image split)
  replicate: int  # index among models of the same block, 0-based
  seed: int  # training seed: epoch order, diffusion noise, dropout
  init_seed: int  # initialisation seed; equal to `seed` unless inits are shared

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: dict) -> "ModelSpec":
    return cls(**record)

  def describe(self) -> str:
    """Return a short label such as "block 3, replicate 1"."""
    return f"block {self.block}, replicate {self.replicate}"


def derive_train_seed(base_seed: int, n: int, block: int, replicate: int) -> int:
  """Return the training seed of model (n, block, replicate).

  The seed is the first four bytes of SHA-256("...:base_seed:n:block:replicate")
  modulo 2**31. It is a fixed function of those four integers and does not
  depend on which other models are in the run, and distinct models share a
  seed only with probability about 2**-31 per pair.
  """
  for name, value in (("base_seed", base_seed), ("n", n), ("block", block),
                      ("replicate", replicate)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
  text = f"biasdiff-train-seed:{base_seed}:{n}:{block}:{replicate}"
  digest = hashlib.sha256(text.encode()).digest()
  return int.from_bytes(digest[:4], "big") % _SEED_LIMIT


def zoo_models(n: int,
               blocks: Sequence[int],
               replicates: Sequence[int],
               extra_models: Sequence[Sequence[int]] = (),
               base_seed: int = 0,
               share_init_across_blocks: bool = False) -> list[ModelSpec]:
  """Return the model list blocks x replicates plus extra (block, replicate) pairs.

  Models are ordered block-major, then the extra models in the order given.
  With `share_init_across_blocks`, every model of replicate r starts from the
  initialisation of model (block 0, replicate r), whatever its own block. Its
  training noise stays its own.

  Raises:
    ValueError: on an empty list or a repeated (block, replicate).
  """
  pairs = [(int(b), int(r)) for b in blocks for r in replicates]
  pairs += [(int(b), int(r)) for b, r in extra_models]
  if not pairs:
    raise ValueError("The model list is empty; give at least one block and one "
                     "replicate.")
  repeated = sorted({p for p in pairs if pairs.count(p) > 1})
  if repeated:
    raise ValueError(f"(block, replicate) pairs {repeated} appear more than once "
                     "in the model list; remove the duplicates from extra_models.")
  models = []
  for block, replicate in pairs:
    seed = derive_train_seed(base_seed, n, block, replicate)
    init_block = 0 if share_init_across_blocks else block
    init_seed = derive_train_seed(base_seed, n, init_block, replicate)
    models.append(ModelSpec(block, replicate, seed, init_seed))
  return models


def make_optimizer(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Return Adam without its learning rate, which the step applies itself.

  The learning rate is a per-step input of the train step, so a per-epoch
  schedule is exact and the optimizer state contains no schedule.
  """
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)


def make_init_fn(
    init_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    use_ema: bool,
) -> Callable[[jax.Array], TrainState]:
  """Return init(init_seeds [M] int32) -> TrainState of M stacked models.

  `init_params(key)` returns one model's parameters; model m's key is
  fold(init_seeds[m], INIT).
  """

  def init_one(init_seed):
    params = init_params(rng.fold(init_seed, rng.INIT))
    opt_state = optimizer.init(params)
    return params, opt_state

  def init(init_seeds):
    params, opt_state = jax.vmap(init_one)(init_seeds)
    ema = jax.tree.map(jnp.copy, params) if use_ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=opt_state, ema_params=ema)

  return init


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
  """Shard every [M, ...] leaf over the model axis and replicate scalars."""
  by_model = parallel.model_sharding(mesh)
  replicated = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda x: replicated if x.ndim == 0 else by_model,
                      abstract_state)


def abstract_state(init: Callable[[jax.Array], TrainState], num_models: int,
                   mesh) -> TrainState:
  """Return the state's shapes, dtypes and shardings without computing it."""
  seeds = jax.ShapeDtypeStruct((num_models,), jnp.int32)
  shapes = jax.eval_shape(init, seeds)
  shardings = state_shardings(shapes, mesh)
  return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes, shardings)


def compile_init(init: Callable[[jax.Array], TrainState], abstract: TrainState,
                 compiler_options: Optional[dict] = None) -> Callable:
  """Jit `init` so that it creates the state directly in its sharded layout."""
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  return jax.jit(init, out_shardings=shardings,
                 compiler_options=compiler_options)


def create_state(compiled_init: Callable, models: Sequence[ModelSpec],
                 mesh) -> TrainState:
  """Initialise the stacked state of `models` with a `compile_init` function."""
  seeds = parallel.put_global(
      np.array([m.init_seed for m in models], np.int32),
      parallel.model_sharding(mesh))
  return compiled_init(seeds)


def count_params(params: Any, stacked: bool = True) -> int:
  """Return the number of parameters of one model (of a stack, if `stacked`)."""
  leaves = jax.tree.leaves(params)
  if stacked:
    return int(sum(np.prod(x.shape[1:]) for x in leaves))
  return int(sum(np.prod(x.shape) for x in leaves))


def select_models(tree: Any, indices: Optional[Sequence[int]]) -> Any:
  """Return the models `indices` of a stacked tree (all models for None)."""
  if indices is None:
    return tree
  index = np.asarray(indices, dtype=np.int64)
  return jax.tree.map(lambda x: x[index], tree)
