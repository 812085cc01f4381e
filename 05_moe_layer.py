"""Chapter 5: the mixture-of-experts layer: route each token to k experts, run them, mix outputs.

E copies of 03's FFN ("experts") are stacked into single [E, ...] parameters. 04's router gives
every (token, choice) assignment an expert, a slot in that expert's fixed-size buffer of C slots,
and a combine weight; the layer *dispatches* tokens into buffers [G, E, C, D], runs each expert
on its buffer, and *combines*: y_t = Σ_a weight_ta · expert_out[e_ta, slot_ta]. A dropped
assignment contributes 0, so a token dropped by all its experts gets exactly 0 and only the
residual (06's skip connection, x + layer(x)) carries it (paper arXiv 2402.01739 §2.2; GShard
§2.2; flaxformer `moe_layers.py`).
OpenMoE (flaxformer `MoeLayer`, `_call_experts`): 32 experts of the double-gated SwiGLU, each
initialized independently (variance scaling 0.1, fan-in, *normal*), bf16 expert math with an f32
router, and dense one-hot einsums `gtec` for dispatch and combine, whose [G, E, C, D] shardings
let GSPMD (XLA's automatic partitioner, 07) insert the all-to-all.
Four dispatch paths compute the same function:
  loop   - every expert on every token, masked: the readable oracle (maxtext's MoeLoopBlock idea);
  einsum - one-hot dispatch/combine tensors [G, T, E, C], the T5X/flaxformer form;
  gather - index maps between assignments and slots, no one-hot: O(T·k·D) memory (default);
  ragged - rows sorted by expert and grouped matmuls, no buffers (MaxText): for accelerators.
`dropless` (not OpenMoE) serves every assignment, the cure for Drop-towards-the-End.
Decoding routes a token or a few: then no expert can overflow, and every path but the loop
reads only the chosen experts' kernels (`dispatch_chosen`) instead of running all E on empty slots.
Where the groups run is the layer's one seam: `MoELayer(cfg, rngs=..., run_groups=...)` takes a
runner, by default `run_groups_here` (every group on the devices that hold it); 07_sharding.py
passes one that moves tokens to their experts' devices by all-to-all. Shapes: 02_rope.py's legend.
Left out: the mesh and all-to-all (07), shared experts (ones every token uses besides its k),
and the extra dense FFN (06).
Self-test: `python 05_moe_layer.py` dispatches 04's 8-token example into its [E, C] buffers and
combines two tokens by hand, then runs the four paths and checks outputs and gradients agree.
"""

import functools
import importlib
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from support import cli

ffn = importlib.import_module("03_swiglu")
router_lib = importlib.import_module("04_router")

DISPATCHES = ("gather", "einsum", "ragged", "loop")


@dataclass(frozen=True)
class MoEConfig(router_lib.RouterConfig):
    """The router's fields (d_model, num_experts, top_k, groups, capacity ...) plus the experts'."""
    d_ff: int = 8192  # F of each expert (OpenMoE-8B; Base 2048, 34B 12288)
    ffn_variant: str = "double_gated"  # the released experts; "swiglu" is the paper's 3·D·F form
    init_scale: float = 0.1  # expert kernels: variance scaling 0.1, fan-in, normal (flaxformer gin)
    dispatch: str = "gather"  # "gather" (fast), "einsum" (T5X/flaxformer one-hot), "ragged"
    #                           (sorted rows, grouped matmuls: for accelerators), "loop" (oracle)
    dropless: bool = False  # serve every assignment: capacity = the group's tokens, so no drops
    #                         (not OpenMoE: its experts dropped; best with "ragged", no buffers)
    dtype: Any = jnp.float32  # activation dtype of the expert math (bf16 on TPU); router stays f32

    def __post_init__(self):
        super().__post_init__()
        ffn.FFNConfig(self.d_model, self.d_ff, self.ffn_variant, self.init_scale, self.dtype)
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoEConfig.dispatch={self.dispatch!r}: must be one of {DISPATCHES}")


def apply_experts(buffers_GECD, experts, variant: str, dtype):
    """Expert e runs 03's FFN on its slots from every group, [G, C, D] as G·C rows; vmapped over E.

    [E, G·C, D] is the layout flaxformer reaches after its all-to-all. Batched matmuls keep E an
    array axis that 07 can shard, and run faster than a `lax.map` over experts. The gate pair
    runs as one matmul per expert (03's `one_gate_matmul`), which never copies the
    [E, D, 2, F] kernel: the kernels here are whole or, in 07, local to `shard_map`.
    """
    run = functools.partial(ffn.swiglu, variant=variant, dtype=dtype, one_gate_matmul=True)
    out_EGCD = jax.vmap(run)(jnp.swapaxes(buffers_GECD, 0, 1), *experts)
    return jnp.swapaxes(out_EGCD, 0, 1)


def dispatch_loop(x_GTD, routing, experts, num_experts: int, capacity: int, variant: str, dtype,
                  run_experts=apply_experts):
    """The oracle: every expert sees every token; keep its output where the router kept it."""
    del num_experts, capacity  # no buffers: `kept` (inside the weights) is all the loop needs
    if run_experts is not apply_experts:
        raise ValueError("dispatch='loop' (the oracle) runs every expert on whole kernels and "
                         "cannot use 07's expert-parallel runner; use 'gather' or 'ragged'")
    y_GTD = jnp.zeros(x_GTD.shape, dtype)
    for expert, kernels in enumerate(zip(*experts)):
        weight_GT = jnp.sum(jnp.where(routing.expert_GTA == expert, routing.weight_GTA, 0.0), -1)
        y_GTD += weight_GT[..., None].astype(dtype) * ffn.swiglu(x_GTD, *kernels, variant, dtype)
    return y_GTD


def dispatch_einsum(x_GTD, routing, experts, num_experts: int, capacity: int, variant: str,
                    dtype, run_experts=apply_experts):
    """One-hot masks [G, T, E, C]: dispatch and combine are two einsums (flaxformer `gtec`)."""
    expert_GTAE = jax.nn.one_hot(routing.expert_GTA, num_experts, dtype=dtype)
    slot_GTAC = jax.nn.one_hot(routing.slot_GTA, capacity, dtype=dtype)  # all-zero past C
    dispatch_GTEC = jnp.einsum("GTAE,GTAC->GTEC", expert_GTAE, slot_GTAC)
    combine_GTEC = jnp.einsum("GTAE,GTAC,GTA->GTEC", expert_GTAE, slot_GTAC,
                              routing.weight_GTA.astype(dtype))
    buffers_GECD = jnp.einsum("GTD,GTEC->GECD", x_GTD.astype(dtype), dispatch_GTEC)
    out_GECD = run_experts(buffers_GECD, experts, variant, dtype)
    return jnp.einsum("GECD,GTEC->GTD", out_GECD, combine_GTEC)


@jax.custom_vjp
def take_rows(rows, index, inverse):
    """out[g, j] = rows[g, index[g, j]], and 0 where index[g, j] = n (nothing there).

    rows [G, n, D], index [G, m] and inverse [G, n], both with values in [0, n] and [0, m].
    Valid when no row is taken twice and `inverse` maps each taken row i back to its j (and the
    rest to m). Then the transpose is again a gather, `take_rows(d_out, inverse, index)`, instead
    of the scatter-add autodiff would emit, which is slow on CPU and serializes on accelerators.
    05 uses it both ways: assignments into slots (dispatch) and slots back to assignments.
    """
    return jnp.take_along_axis(rows, index[..., None], axis=1, mode="fill", fill_value=0)


def _take_rows_forward(rows, index, inverse):
    return take_rows(rows, index, inverse), (index, inverse)


def _take_rows_backward(residuals, d_out):
    index, inverse = residuals
    return take_rows(d_out, inverse, index), None, None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def slot_maps(routing, num_experts: int, capacity: int):
    """Two index maps, each the other's inverse, between assignments and buffer slots.

    target_GM: the flat slot e·C + c of assignment m = t·k + a (E·C where dropped);
    source_GEC: the assignment m that fills slot c of expert e (T·k where the slot is empty).
    Both are static-shaped int arrays, so the whole path is jit-friendly.
    """
    num_groups, tokens, top_k = routing.expert_GTA.shape
    slots = num_experts * capacity
    target_GM = jnp.where(routing.kept_GTA, routing.expert_GTA * capacity + routing.slot_GTA,
                          slots).reshape(num_groups, tokens * top_k)
    # Kept assignments have distinct slots, so this integer scatter has no collisions. It is
    # written per group and vmapped, so a compiler splitting groups over devices sees that each
    # group's scatter stays on its own device.
    assignment_M = jnp.arange(tokens * top_k, dtype=jnp.int32)

    def sources(target_M):
        empty = jnp.full((slots,), tokens * top_k, jnp.int32)  # the E·C slots, flat
        return empty.at[target_M].set(assignment_M, mode="drop")

    source_GEC = jax.vmap(sources)(target_GM).reshape(num_groups, num_experts, capacity)
    return target_GM, source_GEC


def dispatch_gather(x_GTD, routing, experts, num_experts: int, capacity: int, variant: str,
                    dtype, run_experts=apply_experts):
    """Index-based dispatch and combine: each a gather whose gradient is a gather too."""
    num_groups, tokens, dim = x_GTD.shape
    top_k = routing.expert_GTA.shape[-1]
    target_GM, source_GEC = slot_maps(routing, num_experts, capacity)
    source_flat = source_GEC.reshape(num_groups, num_experts * capacity)  # [G, E·C]: slots, flat

    # Dispatch: one row per assignment (token t repeated k times), gathered into the slots.
    rows_GMD = jnp.repeat(x_GTD.astype(dtype), top_k, axis=1)
    buffers_GECD = take_rows(rows_GMD, source_flat, target_GM).reshape(source_GEC.shape + (dim,))
    out_GECD = run_experts(buffers_GECD, experts, variant, dtype)

    # Combine: every assignment reads its slot back (0 if dropped), weighted, summed over k.
    out_GMD = take_rows(out_GECD.reshape(num_groups, -1, dim), target_GM, source_flat)
    out_GTAD = out_GMD.reshape(num_groups, tokens, top_k, dim)
    return jnp.einsum("GTAD,GTA->GTD", out_GTAD, routing.weight_GTA.astype(dtype))


def grouped_experts(rows, row_expert, experts, variant: str, dtype):
    """Each row (rows [n, D]) through its own expert `row_expert` [n] with grouped matmuls
    (`jax.lax.ragged_dot`): rows are sorted by expert, every expert runs on its contiguous run,
    and the results are unsorted. Rows whose expert is E (none) sort last, outside every
    expert's run, and come out as zeros."""
    num_experts = experts[0].shape[0]
    order = jnp.argsort(row_expert, stable=True)
    grouped = functools.partial(jax.lax.ragged_dot,
                                group_sizes=jnp.bincount(row_expert, length=num_experts))
    out = ffn.swiglu(rows[order], *experts, variant, dtype, one_gate_matmul=True, matmul=grouped)
    return out[jnp.argsort(order)]  # row i of the sorted output belongs to row order[i]


def apply_experts_grouped(buffers_GECD, experts, variant: str, dtype):
    """`apply_experts` that skips empty slots: only filled slots go through grouped matmuls.

    An empty slot holds zeros and the experts map zero to zero (no biases), so treating every
    all-zero row as empty changes no output; it only saves the work of the padding to C.
    """
    num_groups, num_experts, capacity, dim = buffers_GECD.shape
    expert_GEC = jnp.broadcast_to(jnp.arange(num_experts)[None, :, None],
                                  (num_groups, num_experts, capacity))
    # Every slot of every group is a row, [G·E·C, D]; an empty one goes to expert E (none).
    row_expert = jnp.where(jnp.any(buffers_GECD != 0, axis=-1), expert_GEC, num_experts)
    out = grouped_experts(buffers_GECD.reshape(-1, dim), row_expert.reshape(-1), experts,
                          variant, dtype)
    return out.reshape(buffers_GECD.shape)


def dispatch_ragged(x_GTD, routing, experts, num_experts: int, capacity: int, variant: str,
                    dtype, run_experts=apply_experts):
    """No buffers: sort the kept assignments by expert, run each expert on its run of rows with
    grouped matmuls (MaxText's default MoE), unsort, combine.

    Nothing is padded to C, so memory is O(T·k·D) however unbalanced the routing, which is
    what `dropless` needs. Under 07's expert parallelism, tokens must travel in fixed-size
    buffers (an all-to-all has static shapes), so dispatch and combine are `gather`'s, and each
    device runs its experts on the filled slots only (`apply_experts_grouped`); dropless then
    sends C = T slots per expert and group, E/k times the assignments: correct, not cheap.
    """
    if run_experts is not apply_experts:
        # 07's runner: its `compute` is what each device runs on the slots it receives.
        grouped_runner = functools.partial(run_experts, compute=apply_experts_grouped)
        return dispatch_gather(x_GTD, routing, experts, num_experts, capacity, variant, dtype,
                               grouped_runner)
    num_groups, tokens, dim = x_GTD.shape
    top_k = routing.expert_GTA.shape[-1]
    # One row per assignment m = (g, t, a); dropped ones get the expert E, which is no expert.
    expert_M = jnp.where(routing.kept_GTA, routing.expert_GTA, num_experts).reshape(-1)
    rows_MD = jnp.repeat(x_GTD.reshape(-1, dim).astype(dtype), top_k, axis=0)
    out_MD = grouped_experts(rows_MD, expert_M, experts, variant, dtype)
    out_GTAD = out_MD.reshape(num_groups, tokens, top_k, dim)
    return jnp.einsum("GTAD,GTA->GTD", out_GTAD, routing.weight_GTA.astype(dtype))


def reads_chosen_experts(num_tokens: int, tokens_per_group: int, capacity: int, top_k: int,
                         num_experts: int) -> bool:
    """Whether a call is small enough to read only its tokens' chosen experts (`dispatch_chosen`).

    Exact when no assignment can drop: a token's k choices are k different experts, so an
    expert gets at most T of a group's assignments, and T ≤ C keeps them all. Worth it when the
    N real tokens' N·k assignments name at most E kernels: a decode step (N = 1) reads k experts
    instead of running all E on buffers of C ≥ min_capacity slots that hold one token at most.
    """
    return tokens_per_group <= capacity and num_tokens * top_k <= num_experts


def chosen_experts(x_ND, expert_NA, weight_NA, experts, variant: str, dtype):
    """y_n = Σ_a weight_na · FFN_{e_na}(x_n) for a few tokens, reading only the chosen kernels.

    Each assignment gathers its expert's kernels and runs 03's FFN on its one row. The math is
    f32 whatever the kernels' dtype: one row is bound by reading the weights, so upcasting costs
    nothing, while XLA:CPU's bf16 matmuls are slow (benchmarks/README.md, `generate.py`).
    """
    num_tokens, top_k = expert_NA.shape
    kernels = [jnp.take(kernel, expert_NA.reshape(-1), axis=0) for kernel in experts]
    run = functools.partial(ffn.swiglu, variant=variant, dtype=jnp.float32, one_gate_matmul=True)
    out_MD = jax.vmap(run)(jnp.repeat(x_ND, top_k, axis=0), *kernels)
    out_NAD = out_MD.reshape(num_tokens, top_k, -1)
    return jnp.einsum("NAD,NA->ND", out_NAD, weight_NA.astype(jnp.float32)).astype(dtype)


def dispatch_chosen(x_GTD, routing, experts, real_N, variant: str, dtype):
    """`chosen_experts` on the real tokens (flat places `real_N` among the G·T) of groups where
    nothing drops. The zero tokens of flaxformer's padding get 0, as on every path (no biases)."""
    num_groups, tokens, dim = x_GTD.shape

    def real(a_GT):  # [G, T, ...] → the real tokens' rows [N, ...]
        return a_GT.reshape(num_groups * tokens, *a_GT.shape[2:])[real_N]

    y_ND = chosen_experts(real(x_GTD), real(routing.expert_GTA), real(routing.weight_GTA),
                          experts, variant, dtype)
    y_flat = jnp.zeros((num_groups * tokens, dim), dtype).at[real_N].set(y_ND)
    return y_flat.reshape(num_groups, tokens, dim)


DISPATCH = {"gather": dispatch_gather, "einsum": dispatch_einsum, "ragged": dispatch_ragged,
            "loop": dispatch_loop}


def run_groups_here(layer_fn, x_GTD, router, experts):
    """MoELayer's default runner: route and run every group on the devices that hold it,
    experts included (one device, or GSPMD's choice). `layer_fn(x_GTD, router, experts,
    run_experts)` is the layer's math (`router`: 04's `Router.params()`, the kernel and any
    balancing bias), and a runner decides where it runs and with which `run_experts`;
    07_sharding.py's runner calls it on each device's own groups in `shard_map`."""
    return layer_fn(x_GTD, router, experts, apply_experts)


class MoELayer(nnx.Module):
    """x [B, L, D] → (y [B, L, D], stats): router losses, routing metrics and decisions.

    `run_groups` is where the groups are routed and the experts run: `run_groups_here` on the
    devices that hold the tokens, or 07's `expert_parallel_runner(mesh)`, which routes each
    device's groups locally and moves tokens to their experts' devices by all-to-all.
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, run_groups: Callable = run_groups_here):
        self.cfg = cfg
        self.router = router_lib.Router(cfg, rngs=rngs)
        # One [E, ...] parameter per kernel, named ("expert", ...); fan-in excludes E, so each
        # expert is its own draw, from a normal distribution as OpenMoE's experts are.
        kernels = ffn.init_kernels(rngs, cfg.d_model, cfg.d_ff, cfg.ffn_variant,
                                   leading=(cfg.num_experts,), scale=cfg.init_scale,
                                   distribution="normal")
        self.wi_0, self.wi_1, self.wo = kernels["wi_0"], kernels["wi_1"], kernels["wo"]
        self.run_groups = run_groups

    def __call__(self, x_BLD, *, train: bool = True, capacity_factor: float | None = None,
                 key=None):
        """`train` picks the capacity factor (1.25 / 2.0) unless one is given; `key` jitters."""
        cfg = self.cfg
        router_lib.check_float(x_BLD, "MoE input x_BLD")
        if x_BLD.ndim != 3 or x_BLD.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE input must be [B, L, D={cfg.d_model}]; got {x_BLD.shape}")
        batch, length, dim = x_BLD.shape
        if capacity_factor is None:
            capacity_factor = cfg.train_capacity_factor if train else cfg.eval_capacity_factor

        # flaxformer's group rule may first append zero tokens (rows or positions) to the batch.
        extra_rows, extra_positions = cfg.padding(batch, length)
        x_BLD = jnp.pad(x_BLD, ((0, extra_rows), (0, extra_positions), (0, 0)))
        padded_batch, padded_length = batch + extra_rows, length + extra_positions

        # Routing and capacity are per group: G groups of T tokens, batch rows kept in order.
        num_groups, tokens = cfg.group_shape(padded_batch * padded_length)
        # Dropless: a token's k choices are k different experts, so T slots never overflow.
        capacity = tokens if cfg.dropless else cfg.capacity(tokens, capacity_factor)
        x_GTD = x_BLD.reshape(num_groups, tokens, dim)
        # Decode-sized calls read only their chosen experts (all but the oracle): nothing drops.
        chosen = cfg.dispatch != "loop" and reads_chosen_experts(
            batch * length, tokens, capacity, cfg.top_k, cfg.num_experts)
        real_N = np.arange(padded_batch * padded_length).reshape(
            padded_batch, padded_length)[:batch, :length].reshape(-1)

        # The layer's math on some groups: route them, dispatch, run the experts, combine.
        def layer_fn(x_GTD, router, experts, run_experts):
            routing, losses = router_lib.route_groups(
                x_GTD, router["kernel"], cfg, capacity=capacity, key=key if train else None,
                bias_E=router.get("bias"))
            if chosen and run_experts is apply_experts:  # 07's runner keeps its all-to-all
                y_GTD = dispatch_chosen(x_GTD, routing, experts, real_N, cfg.ffn_variant,
                                        cfg.dtype)
            else:
                y_GTD = DISPATCH[cfg.dispatch](x_GTD, routing, experts, cfg.num_experts,
                                               capacity, cfg.ffn_variant, cfg.dtype, run_experts)
            return y_GTD, routing, losses

        experts = (self.wi_0[...], self.wi_1[...], self.wo[...])
        y_GTD, routing, losses = self.run_groups(layer_fn, x_GTD, self.router.params(), experts)
        # Per-layer numbers for 06's logs, and each assignment's decision for 11's analysis.
        metrics = router_lib.routing_metrics(
            routing, num_experts=cfg.num_experts, capacity=capacity, seq_len=padded_length,
            experts_choose=cfg.routing == "experts_choose")
        for name in ("drop_rate_by_position", "tokens_left_behind_by_position"):
            metrics[name] = metrics[name][:length]
        def unpadded(x):  # [G, T, ...] back to [B, L, ...] without the zero tokens
            return x.reshape(padded_batch, padded_length, -1)[:batch, :length]

        stats = {**losses, **metrics, "expert_BLA": unpadded(routing.expert_GTA),
                 "kept_BLA": unpadded(routing.kept_GTA)}
        return unpadded(y_GTD), stats


def layers_per_dispatch(cfg: MoEConfig, seed: int = 0) -> dict:
    """One layer per dispatch path, all with the same parameters (same seed, same draws)."""
    return {name: MoELayer(replace(cfg, dispatch=name), rngs=nnx.Rngs(seed)) for name in DISPATCHES}


def outputs_and_grads(layer: MoELayer, x_BLD, capacity_factor: float):
    """y, stats, and the gradients of a fixed random probe of y w.r.t. x and every parameter."""
    probe_BLD = jax.random.normal(jax.random.key(123), x_BLD.shape)

    def loss(layer, x_BLD):
        y_BLD, stats = layer(x_BLD, capacity_factor=capacity_factor)
        return jnp.sum(y_BLD * probe_BLD) + stats["load_balance_loss"], (y_BLD, stats)

    (_, (y_BLD, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        layer, x_BLD)
    return y_BLD, stats, jax.tree.leaves(nnx.state(grads[0], nnx.Param)) + [grads[1]]


def relative_gap(a, b) -> float:
    """max |a - b| / max |b|: how far a path is from the oracle, independent of scale."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


if __name__ == "__main__":
    parser = cli.ArgumentParser(
        description="Self-test of the MoE layer: runs the loop (oracle), einsum, gather and "
                    "ragged dispatch paths on the same input, prints their largest differences and the "
                    "drop statistics, and checks equal outputs and gradients, with and without "
                    "drops, and zero output for tokens that every expert dropped.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and input")
    args = parser.parse_args()

    # 1. Dispatch and combine by hand: 04's 8-token example (4 experts, capacity 2). Each slot
    # of an expert's buffer is filled by one assignment m = token·k + choice, or stays empty.
    _, example = router_lib.worked_example(capacity=2)
    target_GM, source_GEC = slot_maps(example, num_experts=4, capacity=2)
    print("Dispatch of 04's worked example into buffers [E=4, C=2] (token in each slot, · empty):")
    for expert, slots in enumerate(np.asarray(source_GEC[0])):
        print(f"  e{expert}: " + " ".join(f"t{m // 2}" if m < 16 else " ·" for m in slots))
    # Combine: token t reads back the slot of each kept choice, weighted by its router prob.
    # Stand-in expert outputs make the mix visible: slot e[c] outputs the number 10·e + c.
    out_GECD = jnp.array([[10.0 * e + c for c in range(2)] for e in range(4)]).reshape(1, 4, 2, 1)
    mixed_GTAD = take_rows(out_GECD.reshape(1, 8, 1), target_GM,
                           source_GEC.reshape(1, 8)).reshape(1, 8, 2, 1)
    print("Combine, with stand-in outputs 10·e + c from slot e[c]:")
    for token in (1, 6):
        slots = [int(target_GM[0, 2 * token + a]) for a in range(2)]
        weights = [float(example.weight_GTA[0, token, a]) for a in range(2)]
        parts = [f"{w:.3f}·{10 * (s // 2) + s % 2} (e{s // 2}[{s % 2}])" if s < 8 else "0 (dropped)"
                 for w, s in zip(weights, slots)]
        total = float(jnp.einsum("AD,A->D", mixed_GTAD[0, token], example.weight_GTA[0, token])[0])
        print(f"  token {token}: {' + '.join(parts)} = {total:.3f}")
        by_hand = sum(w * (10 * (s // 2) + s % 2) for w, s in zip(weights, slots) if s < 8)
        if not np.isclose(total, by_hand):
            sys.exit(f"self-test FAILED: combine of token {token} gives {total}, by hand {by_hand}")
    print()

    # 2. Small enough to read, big enough to drop: 2 rows of 32 tokens in groups of 32, 4 experts.
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, max_group_size=32)
    layers = layers_per_dispatch(cfg, args.seed)
    x_BLD = jax.random.normal(jax.random.key(args.seed + 1), (2, 32, cfg.d_model))
    print(f"MoE layer: E={cfg.num_experts}, k={cfg.top_k}, D={cfg.d_model}, F={cfg.d_ff}, "
          f"input {x_BLD.shape} in groups of {cfg.group_shape(64)[1]} tokens")
    for name, param in nnx.state(layers["gather"], nnx.Param).flat_state():
        print(f"  {'/'.join(map(str, name)):14s} {param[...].shape} {param.logical_axes}")

    # 3. Train capacity (cf 1.25 → C = 10 for 64 assignments per group) drops; cf 4.0 none.
    for capacity_factor in (1.25, 4.0):
        results = {name: outputs_and_grads(layer, x_BLD, capacity_factor)
                   for name, layer in layers.items()}
        y_oracle, stats, grads_oracle = results["loop"]
        print(f"\ncapacity factor {capacity_factor}: C = {cfg.capacity(32, capacity_factor)}, "
              f"dropped {float(stats['fraction_dropped']):.1%} of assignments, "
              f"{float(stats['fraction_tokens_left_behind']):.1%} of tokens got no expert; "
              f"load-balance {float(stats['load_balance_loss']):.3f}, "
              f"z-loss {float(stats['router_z_loss']):.3f}")
        for name in ("einsum", "gather", "ragged"):
            y_BLD, _, grads = results[name]
            output_gap = relative_gap(y_BLD, y_oracle)
            grad_gap = max(relative_gap(a, b) for a, b in zip(grads, grads_oracle))
            print(f"  {name:6s} vs loop: largest difference relative to the oracle's largest value"
                  f": outputs {output_gap:.1e}, gradients {grad_gap:.1e}")
            if not (output_gap < 1e-5 and grad_gap < 1e-5):
                sys.exit(f"self-test FAILED: {name} differs from the loop oracle by more than 1e-5")
        # A token that every expert dropped gets exactly zero from the layer.
        left_behind_BL = ~stats["kept_BLA"].any(axis=-1)
        if not jnp.all(results["gather"][0][left_behind_BL] == 0):
            sys.exit("self-test FAILED: a token that every expert dropped got a nonzero output")
        if capacity_factor == 1.25:
            if not (left_behind_BL.any() and float(stats["fraction_dropped"]) > 0.3):
                sys.exit("self-test FAILED: capacity factor 1.25 should drop over 30% of the "
                         "assignments and leave some token with no expert")
            print("  drop rate by position (mean of each quarter of the 32 positions): "
                  + ", ".join(f"{q:.0%}" for q in
                              np.asarray(stats["drop_rate_by_position"]).reshape(4, -1).mean(1)))
        elif float(stats["fraction_dropped"]) != 0.0:
            sys.exit(f"self-test FAILED: capacity factor {capacity_factor} should drop nothing")
    print("\nOK: loop, einsum, gather and ragged agree on outputs and gradients; dropped tokens "
          "get 0.")
