"""Chapter 8: Adafactor from scratch, and OpenMoE's learning-rate schedule.

Adafactor (Shazeer & Stern 2018, arXiv 1804.04235) is Adam without momentum whose second moment
of a matrix is kept as one row vector and one column vector: n + m numbers instead of n·m.
OpenMoE trained with it (paper App. A.4 and B, Table 12) because AdamW "frequently" gave NaN
losses, and because the memory it frees on 16 GiB TPU v3 cores buys data parallelism instead of
model parallelism. The released run (T5X `adafactor.py` with the rules of
`contrib/moe/adafactor_utils.py`, set in the fork's gins) used T5X's Adafactor:
β₂ₜ = 1 − t^−0.8, no momentum, factored when a matrix's smaller side is ≥ 128, updates clipped
at RMS 1, scaled by the parameter's RMS (floor ε₂ = 1e-3), no weight decay, MoE factor rules in
which the expert axis is a batch axis (each expert is factored, clipped and scaled on its own);
learning rate 1/√max(step, 10⁴) (`openmoe_schedule`).
`adafactor()` is one `optax.GradientTransformation` with two modes:
  optax mode (default): equal to `optax.adafactor` to float32 round-off, checked in the tests;
  T5X mode (`logical_axes=`): factoring from logical axis names, clipping and parameter scale per
  expert, statistics in f32 — every difference from optax is listed in `t5x_plan`.
`frozen_from` stops chosen leaves from a given step: their update is zero and their statistics
keep their values; `routing_frozen_from` and `with_balanced_biases` are the two rules of §5's
router variants (router kernels frozen after warm-up; aux-loss-free biases, Wang et al. 2024).
Left out: T5X's step_offset, global-norm clipping, max_parameter_scale and NaN skipping, and the
paper's relative step size min(1e-2, 1/√t) (OpenMoE gives an explicit schedule instead).
Run the self-test: `python 08_adafactor.py` (`--help` for options).
"""

import functools
import importlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from support import cli

router_lib = importlib.import_module("04_router")
model_lib = importlib.import_module("06_model")


@dataclass(frozen=True)
class AdafactorConfig:
    decay_rate: float = 0.8  # c in β₂ₜ = 1 − t^−c: the second moment averages over ~t^c steps
    min_dim_size_to_factor: int = 128  # factor only if the second-largest axis is at least this
    clipping_threshold: float | None = 1.0  # d: updates are scaled down to RMS ≤ d; None: off
    eps1: float = 1e-30  # ε₁, added to g² so that 1/√v stays finite
    eps2: float = 1e-3  # ε₂, floor of the parameter scale, so zero-initialized params move
    multiply_by_parameter_scale: bool = True  # step relative to RMS(param), not absolute
    beta1: float | None = None  # momentum β₁ (OpenMoE: none, which saves a full copy of params)
    weight_decay: float | None = None  # decoupled: p ← (1 − wd)·p − update; not scaled by lr

    def __post_init__(self):
        _validate(self, {
            "decay_rate": (self.decay_rate > 0, "> 0 (OpenMoE: 0.8)"),
            "min_dim_size_to_factor": (isinstance(self.min_dim_size_to_factor, int)
                                       and self.min_dim_size_to_factor >= 1, "an int >= 1 (128)"),
            "clipping_threshold": (self.clipping_threshold is None or self.clipping_threshold > 0,
                                   "> 0 or None (OpenMoE: 1.0)"),
            "eps1": (self.eps1 >= 0, ">= 0 (OpenMoE: 1e-30)"),
            "eps2": (self.eps2 >= 0, ">= 0 (OpenMoE: 1e-3)"),
            "beta1": (self.beta1 is None or 0 <= self.beta1 < 1,
                      "in [0, 1) or None (OpenMoE: None)"),
            "weight_decay": (self.weight_decay is None or 0 <= self.weight_decay < 1,
                             "in [0, 1) or None (OpenMoE: None)")})


@dataclass(frozen=True)
class ScheduleConfig:
    peak: float = 0.01  # learning rate during warmup; T5X: 1/√warmup_steps = 0.01
    warmup_steps: int = 10_000  # after this, lr = peak·√(warmup_steps / step)
    warmup_shape: str = "flat"  # T5X holds peak; "linear" ramps 0 → peak (a common reading)

    def __post_init__(self):
        _validate(self, {
            "peak": (self.peak > 0, "> 0 (OpenMoE: 0.01)"),
            "warmup_steps": (isinstance(self.warmup_steps, int) and self.warmup_steps >= 1,
                             "an int >= 1 (OpenMoE: 10000)"),
            "warmup_shape": (self.warmup_shape in ("flat", "linear"),
                             "'flat' (T5X, OpenMoE) or 'linear'")})


def _validate(config, checks: dict[str, tuple[bool, str]]) -> None:
    """Raise ValueError naming the first field whose check failed, its value and what is allowed."""
    for field, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r}: "
                             f"must be {allowed}")


def openmoe_schedule(cfg: ScheduleConfig = ScheduleConfig()) -> Callable[[Any], jax.Array]:
    """lr(step) = peak · √(warmup / max(step, warmup)), steps counted from 0.

    OpenMoE's gin says `constant * rsqrt_decay`, base 1.0, warmup 10⁴, i.e. 1/√max(step, 10⁴):
    the same function, since 1/√10⁴ = 0.01. So the "warmup" is a flat plateau, not a ramp.
    E.g. steps 0 and 9,999 → 0.01; 40,000 → 0.005; 500,000 → 0.00141; 1,000,000 → 0.001.
    """
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = cfg.peak * jnp.sqrt(cfg.warmup_steps / jnp.maximum(step, cfg.warmup_steps))
        if cfg.warmup_shape == "linear":
            lr = lr * jnp.minimum(1.0, step / cfg.warmup_steps)
        return lr

    return schedule


# Which role each logical axis plays in T5X mode: t5x/adafactor.py `standard_logical_factor_rules`
# plus t5x/contrib/moe/adafactor_utils.py, and "pair" for 03's [D, 2, F] view of T5X's [D, 2F]
# kernel (column, like the F it was part of). "row"/"column": the two factored sides; "batch":
# independent copies (a separate factorization, clipping and parameter scale per index);
# "none": averaged over but not factored.
OPENMOE_FACTOR_RULES = {
    "vocab": "column", "embed": "row", "mlp": "column", "pair": "column", "heads": "column", "kv": "column",
    "joined_kv": "column", "expert": "batch", "expert_mlp": "column", "mlp_embed": "row",
    "unmodeled": "none", "layers": "batch", "stack": "batch",
}
FACTOR_ROLES = ("row", "column", "batch", "none")


@dataclass(frozen=True)
class LeafPlan:
    """How one parameter is treated, decided from its shape (optax) or axis names (T5X)."""
    factored: tuple[tuple[int, ...], tuple[int, ...]] | None  # (row axes, column axes) or None
    rms_axes: tuple[int, ...]  # axes averaged for clipping and parameter scale: all but batch axes
    stats_dtype: Any  # dtype of the second-moment statistics v_row / v_col / v (AdafactorState)


def optax_plan(shape, dtype, min_dim_size_to_factor: int) -> LeafPlan:
    """optax's heuristic: factor over the two largest axes if the second largest is big enough.

    The second-largest axis is the "row" (v_row keeps it), the largest the "column"; any other
    axis is a batch axis of the factorization, e.g. [E, D, F] with E smallest gets v_row [E, D]
    and v_col [E, F]. But clipping and parameter scale always use the RMS of the whole tensor.
    """
    axes = tuple(range(len(shape)))
    order = np.argsort(shape)
    if len(shape) < 2 or shape[order[-2]] < min_dim_size_to_factor:
        return LeafPlan(None, axes, dtype)
    return LeafPlan(((int(order[-2]),), (int(order[-1]),)), axes, dtype)


def t5x_plan(name: str, shape, axes: tuple[str, ...], rules: Mapping[str, str],
             min_dim_size_to_factor: int) -> LeafPlan:
    """T5X's plan from logical axis names. Where it differs from optax:

    1. Roles come from names: an axis named "expert" (role "batch") is never averaged over, so
       update clipping and parameter scale are computed per expert, not over all experts.
    2. A parameter with a batch axis or rank > 2 is factored over its "row"/"column" axes
       whatever their size; rank ≤ 2 without batch axes uses optax's size heuristic.
    3. If row or column is missing (router ("embed", "unmodeled")), the tensor is not factored.
    4. Statistics (and updates) are f32 whatever the parameter dtype; optax uses the param dtype.
    5. An axis name with no rule, or row + column + none together, is an error.
    """
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r}: logical axes {axes} do not match shape {shape}")
    missing = [axis for axis in axes if axis not in rules]
    if missing:
        raise ValueError(f"parameter {name!r} has logical axes {axes}, but {missing} have no "
                         f"Adafactor factor rule; known: {sorted(rules)}. Add a rule to "
                         "factor_rules (roles: row, column, batch, none).")
    roles = [rules[axis] for axis in axes]
    if "row" in roles and "column" in roles and "none" in roles:
        raise ValueError(f"parameter {name!r}: axes {axes} give roles {roles}; a factored "
                         "tensor cannot also have an unfactored ('none') axis")
    if not ("row" in roles and "column" in roles):
        roles = ["none" if role in ("row", "column") else role for role in roles]
    batch = [i for i, role in enumerate(roles) if role == "batch"]
    if len(shape) <= 2 and not batch:
        return optax_plan(shape, jnp.float32, min_dim_size_to_factor)
    rows = tuple(i for i, role in enumerate(roles) if role == "row")
    cols = tuple(i for i, role in enumerate(roles) if role == "column")
    rms_axes = tuple(i for i in range(len(shape)) if i not in batch)
    return LeafPlan((rows, cols) if rows else None, rms_axes, jnp.float32)


def leaf_name(path) -> str:
    """'layers/0/mlp/wi_0' for a key path; an nnx.Variable's trailing `.value` is left out, so a
    State of nnx.Param and its pure-dict form give the same names."""
    keys = tuple(k for k in path
                 if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def logical_axes_by_name(params_state) -> dict[str, tuple[str, ...]]:
    """{name: logical axes} read from the `logical_axes` metadata of every nnx.Param in a State
    (also an abstract one from `nnx.eval_shape`)."""
    found = jax.tree_util.tree_flatten_with_path(
        params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    axes = {}
    for path, variable in found:
        if not isinstance(variable, nnx.Variable) or "logical_axes" not in variable.get_metadata():
            raise ValueError(f"parameter {leaf_name(path)!r} has no `logical_axes` metadata; "
                             "create it as nnx.Param(value, logical_axes=(...)) or use optax mode")
        axes[leaf_name(path)] = tuple(variable.get_metadata()["logical_axes"])
    return axes


class AdafactorState(NamedTuple):
    count: jax.Array  # steps taken so far (int32), t − 1
    v_row: Any  # per param: EMA of g² averaged over the column axes, or a [1] placeholder
    v_col: Any  # per param: EMA of g² averaged over the row axes, or a [1] placeholder
    v: Any  # per param: full EMA of g² where not factored, or a [1] placeholder
    m: Any  # per param: momentum (f32) if beta1 is set; None otherwise


def _rms(x, axes):
    return jnp.sqrt(jnp.mean(x * x, axis=axes, keepdims=True))


def _zeros_without(param, axes, dtype):
    """Zeros shaped like `param` summed over `axes`: in explicit sharding mode they inherit the
    param's sharding on the axes that remain, so no state is more replicated than its param."""
    return jnp.zeros_like(jax.eval_shape(lambda p: jnp.sum(p, axis=axes), param), dtype=dtype)


def _update_leaf(cfg, plan, grad, v_row, v_col, v, m, param, beta2, lr):
    """One parameter's step, written in the order optax computes it (round-off depends on it):

        g² + ε₁ ─EMA(β₂ₜ)→ v (or v_row = mean over columns, v_col = mean over rows)
        u = g / √v̂,   v̂ = v_row ⊗ v_col / mean(v_row)    (factored: a rank-1 estimate of v)
        u ← u / max(1, RMS(u) / d)                       (update clipping)
        u ← lr · u · max(RMS(param), ε₂)                 (relative step size)
        u ← (1 − β₁)·u + β₁·m;  u ← u + wd·param;  return −u
    """
    g = grad.astype(jnp.promote_types(grad.dtype, plan.stats_dtype))
    g_sq = g * g + cfg.eps1
    if plan.factored:
        rows, cols = plan.factored
        v_row = (beta2 * v_row + (1.0 - beta2) * jnp.mean(g_sq, axis=cols)).astype(plan.stats_dtype)
        v_col = (beta2 * v_col + (1.0 - beta2) * jnp.mean(g_sq, axis=rows)).astype(plan.stats_dtype)
        # Row axes' positions inside v_row, where the column axes are gone.
        rows_in_v_row = tuple(r - sum(c < r for c in cols) for r in rows)
        row_factor = (v_row / jnp.mean(v_row, axis=rows_in_v_row, keepdims=True)) ** -0.5
        u = g * jnp.expand_dims(row_factor, cols) * jnp.expand_dims(v_col ** -0.5, rows)
    else:
        v = (beta2 * v + (1.0 - beta2) * g_sq).astype(plan.stats_dtype)
        u = g * v ** -0.5
    if cfg.clipping_threshold is not None:
        u = u / jnp.maximum(1.0, _rms(u, plan.rms_axes) / cfg.clipping_threshold)
    if lr is not None:
        u = jnp.asarray(lr, u.dtype) * u
    if cfg.multiply_by_parameter_scale:
        u = u * jnp.maximum(_rms(param, plan.rms_axes), cfg.eps2)
    if cfg.beta1 is not None:
        u = (1 - cfg.beta1) * u + cfg.beta1 * m
        m = u.astype(jnp.float32)
    if cfg.weight_decay is not None:
        u = u + cfg.weight_decay * param
    return -u, v_row, v_col, v, m


def _frozen(count, start: int | None, update: Callable, statistics: tuple):
    """update() of one leaf, or, once the optimizer has taken `start` steps, no step and its
    `statistics` (v_row, v_col, v, m) as they were. A `lax.cond` runs one branch, so a frozen
    leaf keeps its bits, and before `start` the leaf is computed exactly as if never frozen (a
    `jnp.where` after the update changes XLA's fusion of it, hence its round-off)."""
    if start is None:
        return update()

    def held():
        return (jnp.zeros_like(jax.eval_shape(update)[0]), *statistics)

    return jax.lax.cond(count >= start, held, update)


def _checked_steps(frozen_from: Mapping[str, int] | None) -> dict[str, int]:
    """frozen_from as a dict, every step an int >= 0, or a ValueError naming the leaf."""
    for name, start in (frozen_from or {}).items():
        if not (isinstance(start, int) and not isinstance(start, bool) and start >= 0):
            raise ValueError(f"frozen_from[{name!r}]={start!r}: must be an int >= 0 (a step)")
    return dict(frozen_from or {})


def _plan_leaves(params, min_dim_size_to_factor: int, logical_axes: Mapping[str, tuple[str, ...]] | None,
                 factor_rules: Mapping[str, str], frozen_from: Mapping[str, int]):
    """Every leaf's LeafPlan (optax mode without `logical_axes`, T5X mode with), the leaves, the
    tree structure to rebuild trees shaped like `params`, and the leaves' names."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [leaf_name(path) for path, _ in flat]
    if unknown := sorted(set(frozen_from) - set(names)):
        raise ValueError(f"frozen_from names {unknown[:5]}, which are not leaves of the params; "
                         f"leaf names look like {names[:3]} (08's leaf_name)")
    if logical_axes is None:
        plan_list = [optax_plan(p.shape, p.dtype, min_dim_size_to_factor) for _, p in flat]
    else:
        unknown = [name for name in names if name not in logical_axes]
        if unknown:
            raise ValueError(f"T5X mode: no logical axes for parameters {unknown[:5]}; pass "
                             "logical_axes_by_name(state) of the same parameter tree")
        plan_list = [t5x_plan(name, p.shape, logical_axes[name], factor_rules,
                              min_dim_size_to_factor) for name, (_, p) in zip(names, flat)]
    return plan_list, [p for _, p in flat], treedef, names


def adafactor(learning_rate: float | Callable | None = None,
              cfg: AdafactorConfig = AdafactorConfig(),
              logical_axes: Mapping[str, tuple[str, ...]] | None = None,
              factor_rules: Mapping[str, str] = OPENMOE_FACTOR_RULES,
              frozen_from: Mapping[str, int] | None = None) -> optax.GradientTransformation:
    """Adafactor as an optax GradientTransformation; use with `optax.apply_updates`.

    learning_rate: a float, a schedule step → lr (e.g. `openmoe_schedule()`), or None (lr 1,
    as `optax.adafactor`'s default). Without `logical_axes` this is optax mode; with
    `logical_axes` ({leaf name: axis names}, see `logical_axes_by_name`) it is T5X mode.
    Params may be plain pytrees or an nnx State of Params; grads must share their structure.
    frozen_from: {leaf name: optimizer step}; from that step on the leaf's update is zero and
    its v_row, v_col, v and m keep their values (before it, it trains as if not listed).
    """
    for axis, role in factor_rules.items():
        if role not in FACTOR_ROLES:
            raise ValueError(f"factor_rules[{axis!r}]={role!r}: must be one of {FACTOR_ROLES}")
    frozen_from = _checked_steps(frozen_from)

    def plans(params):
        return _plan_leaves(params, cfg.min_dim_size_to_factor, logical_axes, factor_rules, frozen_from)

    def init(params):
        plan_list, leaves, treedef, _ = plans(params)
        v_row, v_col, v = [], [], []
        for plan, p in zip(plan_list, leaves):
            # Tiny [1] placeholders keep the three trees shaped like the params (as optax does).
            placeholder = jnp.zeros((1,), plan.stats_dtype)
            if plan.factored:
                rows, cols = plan.factored
                v_row.append(_zeros_without(p, cols, plan.stats_dtype))
                v_col.append(_zeros_without(p, rows, plan.stats_dtype))
                v.append(placeholder)
            else:
                v_row.append(placeholder)
                v_col.append(placeholder)
                v.append(jnp.zeros_like(p, dtype=plan.stats_dtype))
        m = None if cfg.beta1 is None else [jnp.zeros_like(p, dtype=jnp.float32) for p in leaves]
        return AdafactorState(jnp.zeros([], jnp.int32), *(
            None if tree is None else treedef.unflatten(tree) for tree in (v_row, v_col, v, m)))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("Adafactor needs the params in update(grads, state, params): the "
                             "step size is relative to each parameter's RMS")
        plan_list, leaves, treedef, names = plans(params)
        # β₂ₜ = 1 − t^−c with t = count + 1, so the first step keeps no history (β₂ = 0).
        beta2 = 1.0 - jnp.asarray(state.count + 1, jnp.float32) ** -cfg.decay_rate
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        columns = [treedef.flatten_up_to(tree)
                   for tree in (grads, state.v_row, state.v_col, state.v)]
        m_leaves = [None] * len(leaves) if state.m is None else treedef.flatten_up_to(state.m)
        out = [_frozen(state.count, frozen_from.get(name), functools.partial(
                   _update_leaf, cfg, plan, g, vr, vc, v, m, p, beta2, lr), (vr, vc, v, m))
               for plan, name, g, vr, vc, v, m, p in zip(plan_list, names, *columns, m_leaves, leaves)]
        updates, v_row, v_col, v, m = (treedef.unflatten(column) for column in zip(*out))
        return updates, AdafactorState(state.count + 1, v_row, v_col, v,
                                       None if state.m is None else m)

    return optax.GradientTransformation(init, update)


def openmoe_adafactor(params_state, schedule: ScheduleConfig = ScheduleConfig(),
                      cfg: AdafactorConfig = AdafactorConfig(),
                      frozen_from: Mapping[str, int] | None = None) -> optax.GradientTransformation:
    """OpenMoE's optimizer: T5X-mode Adafactor with the rsqrt schedule (`frozen_from`: as in
    `adafactor`). For 09_train.py:

        graph, params, rest = nnx.split(model, nnx.Param, ...)
        tx = openmoe_adafactor(params)               # reads each Param's logical_axes
        opt_state = jax.jit(tx.init)(params)         # under jax.set_mesh: follows params' shardings
        updates, opt_state = tx.update(grads, opt_state, params)   # inside the jitted step
        params = optax.apply_updates(params, updates)
    """
    return adafactor(openmoe_schedule(schedule), cfg, logical_axes=logical_axes_by_name(params_state),
                     frozen_from=frozen_from)


# --- Leaves that a rule moves instead of Adafactor: §5's router variants (used by 09) -------------
def leaf_kinds(params) -> dict[str, type]:
    """{08's leaf name: its nnx.Variable class} (nnx.Param, 04's RoutingBias, ...)."""
    return {leaf_name(path): type(v) for path, v in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}


def routing_frozen_from(params, freeze_router_after: int = 0) -> dict[str, int]:
    """`frozen_from` for OpenMoE's routers: every RoutingBias from step 0 (the balance rule moves
    it, not gradients), and with freeze_router_after=N > 0 every router kernel from step N on
    (§5: remove the trainable router after warm-up, since routing settles early, §4.2)."""
    frozen = {}
    for name, kind in leaf_kinds(params).items():
        if issubclass(kind, router_lib.RoutingBias):
            frozen[name] = 0
        elif freeze_router_after and name.endswith("router/kernel"):
            frozen[name] = freeze_router_after
    return frozen


def with_balanced_biases(params, expert_load_ME, rate: float):
    """Aux-loss-free balancing after the optimizer step (Wang et al. 2024, arXiv 2408.15664;
    DeepSeek-V3 §2.1.2): each MoE layer's RoutingBias moves by 04's update_balance_bias toward
    its own row of 06's expert_load [M MoE layers, E] (layer order, averaged over microbatches).
    Row m is the m-th MoE block: names are ordered by their block numbers as numbers (10 after 9)."""
    biases = sorted((name for name, kind in leaf_kinds(params).items()
                     if issubclass(kind, router_lib.RoutingBias)),
                    key=lambda name: [int(key) for key in name.split("/") if key.isdigit()])
    if len(biases) != expert_load_ME.shape[0]:
        raise ValueError(f"{len(biases)} routing biases but {expert_load_ME.shape[0]} MoE layers' loads")

    def balanced(path, x):  # a bias takes its own layer's loads; every other leaf stays as it is
        name = leaf_name(path)
        return (router_lib.update_balance_bias(x, expert_load_ME[biases.index(name)], rate)
                if name in biases else x)

    return jax.tree_util.tree_map_with_path(balanced, params)


def tree_bytes(tree) -> int:
    """Bytes of all arrays (or ShapeDtypeStructs) in a tree."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_params(cfg) -> Any:
    """A preset's parameters as ShapeDtypeStructs (with logical axes), without allocating them."""
    return nnx.state(nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def state_sizes(params_state) -> dict[str, int]:
    """Optimizer-state bytes of the same parameters under each optimizer, from shapes alone."""
    return {
        "params": tree_bytes(params_state),
        "ours_t5x": tree_bytes(jax.eval_shape(openmoe_adafactor(params_state).init, params_state)),
        "optax_adafactor": tree_bytes(jax.eval_shape(optax.adafactor().init, params_state)),
        "adamw": tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, params_state)),
    }


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=(
        "Self-test of Adafactor: optimize a small problem with this Adafactor and optax's side by "
        "side and print their largest difference; show T5X mode's per-expert step sizes; print "
        "OpenMoE's learning-rate schedule and the optimizer-state size of every preset."))
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of the comparison")
    parser.add_argument("--min-dim", type=int, default=16,
                        help="min_dim_size_to_factor for the toy shapes (OpenMoE: 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        toy_cfg = AdafactorConfig(min_dim_size_to_factor=args.min_dim)
    except ValueError as error:
        parser.error(str(error))

    # 1. A small problem: fit each parameter to a target, with a curvature that varies by row
    #    and column (what factored second moments model). Both optimizers see identical grads.
    rng = np.random.default_rng(args.seed)
    shapes = {"embedding": (96, 32), "scale": (32,), "experts": (4, 32, 48), "router": (32, 4)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    targets = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    curvature = {k: jnp.asarray(np.exp(rng.normal(size=s)), jnp.float32) for k, s in shapes.items()}

    def loss(p):
        return sum(jnp.mean(curvature[k] * (p[k] - targets[k]) ** 2) for k in p)

    def run(tx):
        @jax.jit
        def step(p, state):
            value, grads = jax.value_and_grad(loss)(p)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state, value

        p, state, losses = params, tx.init(params), []
        for _ in range(args.steps):
            p, state, value = step(p, state)
            losses.append(float(value))
        return p, losses

    schedule = ScheduleConfig(peak=0.1, warmup_steps=10)
    ours, ours_losses = run(adafactor(openmoe_schedule(schedule), toy_cfg))
    ref, ref_losses = run(optax.adafactor(openmoe_schedule(schedule),
                                          min_dim_size_to_factor=args.min_dim))
    print(f"{args.steps} steps, lr = {schedule.peak}·√({schedule.warmup_steps}/max(step, "
          f"{schedule.warmup_steps})), min_dim_size_to_factor={args.min_dim}:")
    print(f"{'step':>6}{'loss (ours)':>14}{'loss (optax)':>14}")
    for i in sorted({0, 1, 5, args.steps // 2, args.steps - 1}):
        print(f"{i:>6}{ours_losses[i]:>14.6f}{ref_losses[i]:>14.6f}")
    diff = max(float(jnp.max(jnp.abs(ours[k] - ref[k]))) for k in ours)
    print(f"max |param(ours) − param(optax)| after {args.steps} steps: {diff:.2e}")
    if diff >= 1e-5:
        sys.exit("self-test FAILED: optax mode must equal optax.adafactor to float32 round-off")
    if ours_losses[-1] >= 0.5 * ours_losses[0]:
        sys.exit("self-test FAILED: Adafactor should at least halve the toy problem's loss")

    # 2. Freezing a leaf, as 09 freezes routers after warm-up: "router" trains for 3 updates,
    #    then it and its statistics stay bit for bit; "experts" trains on.
    tx = adafactor(openmoe_schedule(schedule), toy_cfg, frozen_from={"router": 3})
    p, state, seen = params, tx.init(params), []
    for _ in range(6):
        updates, state = jax.jit(tx.update)(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
        seen.append((p["router"], state.v["router"], p["experts"]))
    held = all(np.array_equal(a, b) for s in seen[3:] for a, b in zip(s[:2], seen[2][:2]))
    print(f"router frozen from step 3: unchanged after it {held}, moved before it "
          f"{not np.array_equal(seen[1][0], seen[2][0])}, experts still moving "
          f"{not np.array_equal(seen[2][2], seen[5][2])}")
    if not (held and not np.array_equal(seen[1][0], seen[2][0])
            and not np.array_equal(seen[2][2], seen[5][2])):
        sys.exit("self-test FAILED: a frozen leaf must train until its step, then keep its bits")

    # 3. T5X mode, per expert: two experts 100× apart in scale, the same gradient. optax sizes
    #    both steps by the RMS of the whole tensor; T5X by each expert's own RMS.
    experts = {"wi": jnp.stack([jnp.ones((32, 48)), 0.01 * jnp.ones((32, 48))])}
    grads = {"wi": jnp.asarray(rng.normal(size=(2, 32, 48)), jnp.float32)}
    grads["wi"] = grads["wi"].at[1].set(grads["wi"][0])
    print("\nTwo experts with RMS 1 and 0.01, same gradient, lr 0.01: RMS(step) / RMS(expert)")
    relative = {}
    for mode, tx in [("optax", adafactor(0.01, toy_cfg)),
                     ("T5X", adafactor(0.01, toy_cfg, {"wi": ("expert", "embed", "mlp")}))]:
        step_wi = tx.update(grads, tx.init(experts), experts)[0]["wi"]
        relative[mode] = [float(jnp.sqrt(jnp.mean(step_wi[e] ** 2) / jnp.mean(expert ** 2)))
                          for e, expert in enumerate(experts["wi"])]
        print(f"  {mode:6} mode: expert 0 {relative[mode][0]:.4f}, "
              f"expert 1 {relative[mode][1]:.4f}")
    if not (math.isclose(*relative["T5X"], rel_tol=1e-5) and relative["T5X"][0] <= 0.01 + 1e-6):
        sys.exit("self-test FAILED: T5X mode must step each expert by the same fraction (≤ lr) "
                 "of its own RMS")
    if relative["optax"][1] <= 50 * relative["optax"][0]:
        sys.exit("self-test FAILED: optax mode should size both experts' steps by one shared RMS")

    # 4. OpenMoE's schedule: flat 0.01 for 10K steps, then 1/√step.
    lr = openmoe_schedule()
    print("\nOpenMoE learning rate:", ", ".join(
        f"step {s:,} → {float(lr(s)):.5f}" for s in (0, 9_999, 40_000, 500_000, 1_000_000)))
    for s, want in [(0, 0.01), (9_999, 0.01), (40_000, 0.005), (1_000_000, 0.001)]:
        if not math.isclose(float(lr(s)), want, rel_tol=1e-6):
            sys.exit(f"self-test FAILED: the learning rate at step {s:,} is {float(lr(s))}, "
                     f"OpenMoE's schedule gives {want}")

    # 5. Optimizer-state memory of every preset, from shapes alone (nothing is allocated).
    print(f"\n{'preset':20}{'params':>8}{'f32 GiB':>9}{'Adafactor (T5X) MiB':>22}"
          f"{'optax.adafactor MiB':>22}{'AdamW GiB':>16}")
    for name, cfg in model_lib.PRESETS.items():
        sizes = state_sizes(abstract_params(cfg))
        share = {k: sizes[k] / sizes["params"] for k in sizes}
        print(f"{name:20}{sizes['params'] / 4e9:>7.2f}B{sizes['params'] / 2**30:>9.2f}"
              + "".join(f"{sizes[k] / 2**20:>13.1f} ({share[k]:6.3%})"
                        for k in ("ours_t5x", "optax_adafactor"))
              + f"{sizes['adamw'] / 2**30:>9.2f} ({share['adamw']:.2f}×)")
        # Matrices narrower than min_dim_size_to_factor keep whole statistics (the tiny preset).
        factored = cfg.d_model >= AdafactorConfig().min_dim_size_to_factor
        if (sizes["ours_t5x"] > sizes["optax_adafactor"]
                or (factored and sizes["optax_adafactor"] >= 0.01 * sizes["params"])
                or not math.isclose(share["adamw"], 2.0, rel_tol=1e-6)):
            sys.exit(f"self-test FAILED: {name}: T5X-mode state must be at most optax's, optax's "
                     "under 1% of the parameters (when factored), and AdamW's twice them")
    print("  (state bytes and their share of the f32 parameters; AdamW keeps m and v, 2× params)")
    print("\nOK: equal to optax, per-expert scaling in T5X mode, schedule and state sizes hold.")
