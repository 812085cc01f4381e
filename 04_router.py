"""Chapter 4: top-k token-choice routing: each token picks k experts; each expert serves C of them.

A router is a learned D → E projection; a softmax over its logits says how much each token wants
each expert, and the token goes to its top k. Experts run on fixed-size buffers (static shapes for
the compiler), so each holds at most C tokens per group and the rest are *dropped*. OpenMoE
(arXiv 2402.01739 §2.2 Eq. 5–7, after ST-MoE and GShard) uses flaxformer's
TokensChooseMaskedRouter (flaxformer `architectures/moe/routing.py`; capacity and groups in
`moe_layers.py`): router in f32, k = 2, combine weights
= the raw softmax probabilities (not renormalized), groups of T ≤ 4096 tokens, capacity
C = max(4, round(cf·T/E)) with capacity factor cf 1.25 in training and 2.0 in evaluation
(8B: C = 160), and a queue in which every token's first choice comes before any second choice,
earlier tokens first. Late tokens therefore lose the race for busy experts: the paper's
"Drop-towards-the-End" (§4.4).
Losses: load balance E·Σ_e f_e·P_e (balanced value k) and router z-loss mean(logsumexp²).
Shapes use 02's legend: G groups of T tokens, E experts, and A a token's k choices
("assignments"), best first.
Variants, each off by default: batch-prioritized routing (BPR: V-MoE, Riquelme et al. 2021;
flaxformer's batch_prioritized_routing, off in OpenMoE's decoder) queues the most confident
tokens first; expert choice (Zhou et al. 2022) lets each expert take its top-C tokens, so a token
gets 0 to E experts; aux-loss-free balancing (Wang et al. 2024, DeepSeek-V3) biases the top-k per
expert, the bias moved toward balance after each step. Causality: with capacity, whether token t
is served depends on its group. Even OpenMoE's queue lets a later token's first choice take the
slot an earlier token's second choice wanted; BPR (order by confidence) and expert choice (any
token can outrank any) widen that leak of the future; dropless (05) removes it.
Left out: the all-to-all that carries tokens to the devices holding their experts (05/07).
Self-test: `python 04_router.py` prints a worked 8-token example, then the variants side by side.
"""

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from support import cli

CAPACITY_RULES = ("t5x", "colossalai")
GROUP_RULES = ("divisor", "flaxformer")
ROUTINGS = ("tokens_choose", "experts_choose")


@dataclass(frozen=True)
class RouterConfig:
    d_model: int = 2048  # D, the router's input width (OpenMoE-8B; Base 768, 34B 3072)
    num_experts: int = 32  # E (OpenMoE-8B and 34B; Base 16)
    top_k: int = 2  # k experts per token (flaxformer NUM_SELECTED_EXPERTS = 2)
    max_group_size: int = 4096  # routing and capacity are per group of ≤ this many tokens (34B: 8192)
    group_multiple: int = 1  # G is a multiple of this: 07 sets the number of batch shards, so each
    #                          device routes whole groups of its own (T5X: num_groups % shards == 0)
    group_rule: str = "divisor"  # how G is chosen: "divisor" (fewest groups that fit) or
    #                              "flaxformer" (at least E · expert_replicas groups, as OpenMoE ran)
    expert_replicas: int = 1  # copies of each expert over the mesh (flaxformer: devices ÷ (expert ×
    #                           model partitions); 07 sets it): "flaxformer" groups multiply by it
    train_capacity_factor: float = 1.25  # cf while training (T5X gins)
    eval_capacity_factor: float = 2.0  # cf while evaluating (EVAL_EXPERT_CAPACITY_FACTOR)
    min_capacity: int = 4  # floor on C per expert and group (flaxformer min_expert_capacity)
    capacity_rule: str = "t5x"  # round(cf·T/E); "colossalai": floor(k·cf·T/E) rounded up to even,
    #                             the PyTorch port the paper's drop analysis (§4.4) ran on
    renormalize: bool = False  # False: raw softmax probs (OpenMoE); True: sum to 1 over k (Mixtral)
    jitter_noise: float = 0.0  # ε: inputs × uniform(1-ε, 1+ε) while training; OpenMoE 0 (off)
    init_std: float = 0.02  # router kernel ~ N(0, init_std²), no bias (flaxformer RouterWeights)
    routing: str = "tokens_choose"  # OpenMoE; "experts_choose": each expert takes its top-C tokens
    #                                 (Zhou et al. 2022; flaxformer ExpertsChooseMaskedRouter)
    batch_prioritized: bool = False  # BPR: queue the most confident tokens first (V-MoE, Riquelme
    #                                  et al. 2021; flaxformer batch_prioritized_routing); OpenMoE off
    balance_bias_rate: float = 0.0  # u of aux-loss-free balancing (Wang et al. 2024: 0.001); 0 off

    def __post_init__(self):
        for name in ("d_model", "num_experts", "max_group_size", "group_multiple", "expert_replicas",
                     "min_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)}: must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{type(self).__name__}.top_k={self.top_k}: must be in "
                             f"[1, num_experts={self.num_experts}] (OpenMoE: 2)")
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            check_capacity_factor(getattr(self, name), f"{type(self).__name__}.{name}")
        if self.capacity_rule not in CAPACITY_RULES:
            raise ValueError(f"{type(self).__name__}.capacity_rule={self.capacity_rule!r}: "
                             f"must be one of {CAPACITY_RULES}")
        if self.group_rule not in GROUP_RULES:
            raise ValueError(f"{type(self).__name__}.group_rule={self.group_rule!r}: "
                             f"must be one of {GROUP_RULES}")
        if not 0 <= self.jitter_noise < 1 or not self.init_std > 0:
            raise ValueError(f"{type(self).__name__}: jitter_noise={self.jitter_noise} must be in "
                             f"[0, 1) and init_std={self.init_std} must be > 0")
        self.check_routing()

    def check_routing(self):
        """The routing variant and its two options, which only token choice has."""
        name = type(self).__name__
        if self.routing not in ROUTINGS:
            raise ValueError(f"{name}.routing={self.routing!r}: must be one of {ROUTINGS}")
        if not 0 <= self.balance_bias_rate < math.inf:
            raise ValueError(f"{name}.balance_bias_rate={self.balance_bias_rate}: must be a finite "
                             "number >= 0 (0 = off; Wang et al. 2024 use 0.001)")
        for option, on in (("batch_prioritized", self.batch_prioritized), ("renormalize",
                           self.renormalize), ("balance_bias_rate", self.balance_bias_rate > 0)):
            if on and self.routing != "tokens_choose":
                raise ValueError(f"{name}.{option}={getattr(self, option)}: only with routing="
                                 f"'tokens_choose' (got routing={self.routing!r}): expert "
                                 "choice has no queue to reorder, no top-k to bias, and weighs "
                                 "by the raw probabilities")

    def group_shape(self, num_tokens: int) -> tuple[int, int]:
        """(G, T): split the batch's tokens into G equal groups of T tokens.

        "divisor": the smallest G that keeps groups within max_group_size, is a multiple of
        group_multiple and divides the tokens. E.g. 4 sequences of 2048 with groups of 4096 →
        (2, 4096). Unequal groups would change capacities, and padding tokens would take queue
        places, so this rule refuses rather than pads.
        "flaxformer" (`_num_groups` in flaxformer's moe_layers.py): the smallest G ≥
        max(tokens // max_group_size, E · expert_replicas) that divides the tokens and is a
        multiple of E · expert_replicas. E.g. one 2048-token sequence with E=32 → (32, 64).
        The tokens must be a multiple of E · expert_replicas (see `padding`).
        """
        if self.group_rule == "flaxformer":
            multiple = self.num_experts * self.expert_replicas
            least = max(num_tokens // self.max_group_size, multiple)
        else:
            multiple = self.group_multiple
            least = max(1, -(-num_tokens // self.max_group_size))
        least = -(-least // multiple) * multiple
        num_groups = next((g for g in range(least, num_tokens + 1, multiple)
                           if num_tokens % g == 0), None)
        if num_groups is None or (self.group_rule == "divisor"
                                  and num_tokens / num_groups > self.max_group_size):
            raise ValueError(
                f"cannot split {num_tokens} tokens into equal groups of at most max_group_size="
                f"{self.max_group_size} with a group count that is a multiple of {multiple} "
                f"(group_rule={self.group_rule!r}, group_multiple={self.group_multiple}): use "
                f"batch × length divisible by {least}")
        return num_groups, num_tokens // num_groups

    def padding(self, batch: int, length: int) -> tuple[int, int]:
        """(extra rows, extra positions) of zero tokens that make the tokens groupable.

        Only the "flaxformer" rule pads, as Fuzhao Xue's flaxformer fork (`_maybe_pad`, the
        code OpenMoE ran) does: when batch × length is not a multiple of E · expert_replicas, it
        appends whichever of whole rows or whole positions costs fewer zero tokens (positions on
        a tie). Zero tokens are routed like any other and take queue places after the real ones.
        """
        multiple = self.num_experts * self.expert_replicas
        if self.group_rule != "flaxformer" or (batch * length) % multiple == 0:
            return 0, 0
        extra_rows = next(r for r in range(1, multiple + 1) if (batch + r) * length % multiple == 0)
        extra_positions = next(p for p in range(1, multiple + 1)
                               if batch * (length + p) % multiple == 0)
        if extra_positions * batch > extra_rows * length:
            return extra_rows, 0
        return 0, extra_positions

    def capacity(self, tokens_per_group: int, capacity_factor: float) -> int:
        """C, how many of a group's assignments each expert can take.

        t5x (OpenMoE training): max(4, round(1.25 · 4096 / 32)) = 160 for the 8B.
        colossalai: floor(2 · 1.25 · 4096 / 32) = 320, made even, at least 4.
        """
        check_capacity_factor(capacity_factor, "capacity_factor")
        experts = self.num_experts
        if self.capacity_rule == "t5x":
            slots = round(capacity_factor * tokens_per_group / experts)  # Python round, as flaxformer
        else:
            slots = math.floor(self.top_k * capacity_factor * tokens_per_group / experts)
            slots += slots % 2
        return max(self.min_capacity, int(slots))


def check_capacity_factor(capacity_factor: float, name: str) -> None:
    if not capacity_factor > 0:
        raise ValueError(f"{name}={capacity_factor}: must be > 0 (OpenMoE: 1.25 train, 2.0 eval)")


def check_float(x, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array (activations); got dtype {x.dtype}")


class Routing(NamedTuple):
    """The router's decision for every (group, token, choice) assignment."""
    expert_GTA: jax.Array  # int32: the expert of each choice, best first
    slot_GTA: jax.Array  # int32: its place in that expert's queue (≥ C means dropped)
    kept_GTA: jax.Array  # bool: slot < C
    weight_GTA: jax.Array  # f32 combine weight; 0 where dropped


def router_logits(x_GTD, kernel_DE, *, jitter_noise: float = 0.0, key=None):
    """Logits [G, T, E] in f32 whatever the activation dtype ("selective precision").

    Jitter (Switch Transformer) multiplies the *inputs*, not the logits, by uniform(1-ε, 1+ε);
    it needs a key, so evaluation simply passes none.
    """
    x_GTD = x_GTD.astype(jnp.float32)
    if jitter_noise > 0 and key is not None:
        x_GTD = x_GTD * jax.random.uniform(key, x_GTD.shape, jnp.float32,
                                           1.0 - jitter_noise, 1.0 + jitter_noise)
    return jnp.einsum("GTD,DE->GTE", x_GTD, kernel_DE.astype(jnp.float32))


def route(logits_GTE, *, top_k: int, capacity: int, renormalize: bool = False,
          batch_prioritized: bool = False, bias_E=None) -> Routing:
    """Top-k choices, queue slots in OpenMoE's priority order, drops beyond `capacity`.

    `batch_prioritized` (BPR; V-MoE, Riquelme et al. 2021; flaxformer TokensChooseMaskedRouter
    batch_prioritized_routing): the queue visits a group's tokens by their top-1 probability,
    most confident first (ties: earlier token first), instead of by position. Only the queue
    order changes: capacity, combine weights and the load-balance loss stay as they are.
    `bias_E` (aux-loss-free balancing, Wang et al. 2024): the top-k is taken of probs + bias,
    while the combine weight stays the unbiased probability, so the bias steers *which* experts
    a token gets and nothing else; no gradient reaches it.
    """
    num_groups, tokens, experts = logits_GTE.shape
    probs_GTE = jax.nn.softmax(logits_GTE.astype(jnp.float32), axis=-1)

    # The choice is discrete; gradients reach the router only through the combine weights. A
    # balancing bias shifts the scores the choice is made from, never the weights.
    scores_GTE = jax.lax.stop_gradient(probs_GTE)
    if bias_E is not None:
        scores_GTE = scores_GTE + jax.lax.stop_gradient(bias_E).astype(jnp.float32)
    _, expert_GTA = jax.lax.top_k(scores_GTE, top_k)
    choice_GTAE = jax.nn.one_hot(expert_GTA, experts, dtype=jnp.int32)
    # Pick each choice's probability with a one-hot product: its gradient is dense, not a scatter.
    gate_GTA = jnp.einsum("GTE,GTAE->GTA", probs_GTE, choice_GTAE.astype(jnp.float32))
    # BPR: so that a confident token is not dropped for its late position, the queue visits
    # tokens by top-1 probability. Queue place q holds token order_GT[q]: one sort per group.
    queued_GTAE = choice_GTAE
    if batch_prioritized:
        order_GT = jnp.argsort(-jax.lax.stop_gradient(gate_GTA[..., 0]), axis=1, stable=True)
        queued_GTA = jnp.take_along_axis(expert_GTA, order_GT[..., None], axis=1)
        queued_GTAE = jax.nn.one_hot(queued_GTA, experts, dtype=jnp.int32)
    if renormalize:
        gate_GTA = gate_GTA / jnp.sum(gate_GTA, axis=-1, keepdims=True)

    # The queue: all first choices (token 0, 1, ...; BPR: most sure first), then all second
    # choices. A running count per expert along that order is each assignment's slot
    # (flaxformer routing.py, top-k leading).
    queue_GME = jnp.swapaxes(queued_GTAE, 1, 2).reshape(num_groups, top_k * tokens, experts)
    place_GME = jnp.cumsum(queue_GME, axis=1) - 1
    slot_GM = jnp.sum(place_GME * queue_GME, axis=-1)
    slot_GTA = jnp.swapaxes(slot_GM.reshape(num_groups, top_k, tokens), 1, 2)
    if batch_prioritized:  # back to token order: token t sat at queue place rank_GT[t]
        rank_GT = jnp.argsort(order_GT, axis=1)
        slot_GTA = jnp.take_along_axis(slot_GTA, rank_GT[..., None], axis=1)

    kept_GTA = slot_GTA < capacity
    return Routing(expert_GTA, slot_GTA, kept_GTA, gate_GTA * kept_GTA)


def route_experts_choose(logits_GTE, *, capacity: int) -> Routing:
    """Expert choice (Zhou et al. 2022, arXiv 2202.09368; flaxformer ExpertsChooseMaskedRouter):
    each expert takes the `capacity` tokens of the group that want it most, so a token may get
    0 to E experts and every expert is exactly full; no queue, no load-balance loss.

    Written as the same Routing with A = E, so 05's dispatch paths serve it unchanged: each
    token lists every expert, best first; its slot there is its rank in that expert's column
    of the group (0 = the expert's most probable token; ties: earlier token first); kept = slot
    < capacity. An expert cannot take more tokens than the group has: C > T keeps them all.
    """
    num_groups, tokens, experts = logits_GTE.shape
    probs_GTE = jax.nn.softmax(logits_GTE.astype(jnp.float32), axis=-1)
    scores_GTE = jax.lax.stop_gradient(probs_GTE)
    _, expert_GTA = jax.lax.top_k(scores_GTE, experts)  # A = E: every expert, best first

    # Each expert sorts the group's tokens (stable: ties keep the earlier token first); the
    # inverse permutation is each token's rank in that expert's column, its slot.
    order_GET = jnp.argsort(-jnp.swapaxes(scores_GTE, 1, 2), axis=-1, stable=True)
    rank_GTE = jnp.swapaxes(jnp.argsort(order_GET, axis=-1), 1, 2).astype(jnp.int32)
    slot_GTA = jnp.take_along_axis(rank_GTE, expert_GTA, axis=-1)

    # The combine weight is the token's probability for that expert, as in token choice.
    choice_GTAE = jax.nn.one_hot(expert_GTA, experts, dtype=jnp.float32)
    gate_GTA = jnp.einsum("GTE,GTAE->GTA", probs_GTE, choice_GTAE)
    kept_GTA = slot_GTA < capacity
    return Routing(expert_GTA, slot_GTA, kept_GTA, gate_GTA * kept_GTA)


def update_balance_bias(bias_E, expert_load_E, rate: float):
    """One step of aux-loss-free balancing: b_e ← b_e + u · sign(mean load − load_e).

    Wang et al. 2024 (arXiv 2408.15664) run it after every training step with u = 0.001, as
    DeepSeek-V3 (arXiv 2412.19437 §2.1.2, bias update speed γ = 0.001) does: an overloaded
    expert's bias falls by u, an underloaded one's rises by u, so its score needs to beat the
    others by less to be chosen. Pure, and it works on [..., E] (e.g. one row per MoE layer).
    """
    mean_load = jnp.mean(expert_load_E, axis=-1, keepdims=True)
    return bias_E + rate * jnp.sign(mean_load - expert_load_E)


def max_violation(expert_load_E):
    """MaxVio = max_e load_e / mean load − 1 (Wang et al. 2024's balance measure) over [..., E]:
    0 when balanced; 1 when the busiest expert carries twice its fair share."""
    return jnp.max(expert_load_E, axis=-1) / jnp.mean(expert_load_E, axis=-1) - 1.0


def load_balance_loss(logits_GTE, expert_GTA):
    """E · Σ_e f_e · P_e per group, averaged over groups (Eq. 5–6; flaxformer, ST-MoE).

    f_e: fraction of the group's tokens with e among their top-k, counted *before* capacity, so
    Σ_e f_e = k; P_e: mean router probability of e. Uniform routing gives E · E · (k/E)(1/E) = k.
    """
    experts = logits_GTE.shape[-1]
    probs_GTE = jax.nn.softmax(logits_GTE.astype(jnp.float32), axis=-1)
    chosen_GE = jnp.mean(jax.nn.one_hot(expert_GTA, experts).sum(axis=2), axis=1)
    return jnp.mean(experts * jnp.sum(chosen_GE * jnp.mean(probs_GTE, axis=1), axis=-1))


def router_z_loss(logits_GTE):
    """mean over tokens of logsumexp(logits)², which keeps router logits small (ST-MoE, Eq. 7)."""
    return jnp.mean(jax.nn.logsumexp(logits_GTE.astype(jnp.float32), axis=-1) ** 2)


def routing_metrics(routing: Routing, *, num_experts: int, capacity: int, seq_len: int,
                    experts_choose: bool = False) -> dict:
    """What flaxformer records (sows) per layer, plus each expert's load and drop rates by position.

    Groups hold whole batch rows in order, so flat token n sits at sequence position n mod L.
    """
    assignments = routing.expert_GTA.shape[-1]
    kept_NA = routing.kept_GTA.reshape(-1, assignments).astype(jnp.float32)
    served_N = kept_NA.max(axis=-1)  # 1 where at least one expert serves the token
    num_groups = routing.expert_GTA.shape[0]
    chosen_NAE = jax.nn.one_hot(routing.expert_GTA.reshape(-1, assignments), num_experts)
    if experts_choose:  # every expert is listed for every token: count what each one took
        chosen_NAE = chosen_NAE * kept_NA[..., None]
    chosen_E = jnp.sum(chosen_NAE, axis=(0, 1))
    return {
        "fraction_dropped": 1.0 - kept_NA.mean(),
        "fraction_tokens_left_behind": 1.0 - served_N.mean(),
        "drop_rate_by_position": 1.0 - kept_NA.reshape(-1, seq_len, assignments).mean(axis=(0, 2)),
        "tokens_left_behind_by_position": 1.0 - served_N.reshape(-1, seq_len).mean(axis=0),
        # Share of the assignments each expert received, 1/E when balanced: before capacity for
        # token choice (what the bias balances), the kept ones for expert choice (uniform).
        "expert_load": chosen_E / jnp.maximum(jnp.sum(chosen_E), 1.0),
        # Filled share of all expert buffers, and mean combine weight of what was kept.
        "expert_usage": kept_NA.sum() / (num_groups * num_experts * capacity),
        "router_confidence": routing.weight_GTA.sum() / jnp.maximum(kept_NA.sum(), 1.0),
    }


class RoutingBias(nnx.Param):
    """The per-expert bias b [E] of aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3).

    It shifts the scores the top-k is taken of, never the combine weights. No gradient reaches
    it (`route` stops it) and no optimizer may update it: 09's Adafactor freezes it and sets it
    after each step with `update_balance_bias`. It is a Param all the same, so checkpoints,
    10's loading and 07's sharding rules (its one axis is "unmodeled": whole on every device)
    carry it with no extra plumbing.
    """


class Router(nnx.Module):
    """The learned D → E projection, plus routing and its two losses."""

    def __init__(self, cfg: RouterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        value_DE = cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, cfg.num_experts))
        # The expert axis of the router is "unmodeled" (flaxformer RouterWeights): 07 never
        # splits it over devices, so every device keeps the whole small kernel and each token's
        # softmax over all E experts is local; and 08's Adafactor finds no column axis in it, so
        # (for E < 128) it keeps the kernel's gradient statistics whole, not as row and column
        # averages.
        self.kernel = nnx.Param(value_DE, logical_axes=("embed", "unmodeled"))
        if cfg.balance_bias_rate > 0:  # only then: a default model has exactly OpenMoE's params
            self.bias = RoutingBias(jnp.zeros((cfg.num_experts,), jnp.float32),
                                    logical_axes=("unmodeled",))

    def params(self) -> dict:
        """The router's arrays as a pytree, {"kernel": [D, E]} and "bias": [E] when balancing:
        what 05 hands its runner (07 replicates it on every device with one spec, P())."""
        bias = {"bias": self.bias[...]} if hasattr(self, "bias") else {}
        return {"kernel": self.kernel[...], **bias}

    def __call__(self, x_GTD, *, capacity: int, key=None) -> tuple[Routing, dict]:
        check_float(x_GTD, "router input x_GTD")
        if x_GTD.ndim != 3 or x_GTD.shape[-1] != self.cfg.d_model:
            raise ValueError(f"router input must be [G, T, D={self.cfg.d_model}]; "
                             f"got shape {x_GTD.shape}")
        params = self.params()
        return route_groups(x_GTD, params["kernel"], self.cfg, capacity=capacity, key=key,
                            bias_E=params.get("bias"))


def route_groups(x_GTD, kernel_DE, cfg: RouterConfig, *, capacity: int, key=None,
                 bias_E=None) -> tuple[Routing, dict]:
    """The router as a pure function of its arrays: each group's routing (cfg.routing, with
    its options) and the two losses, averaged over the groups given. Pure, so 07 can run it on
    each device's own groups."""
    logits_GTE = router_logits(x_GTD, kernel_DE, jitter_noise=cfg.jitter_noise, key=key)
    if cfg.routing == "experts_choose":
        # Every expert is full by construction, so there is nothing to balance (flaxformer: 0).
        routing = route_experts_choose(logits_GTE, capacity=capacity)
        balance = jnp.zeros((), jnp.float32)
    else:
        routing = route(logits_GTE, top_k=cfg.top_k, capacity=capacity,
                        renormalize=cfg.renormalize, batch_prioritized=cfg.batch_prioritized,
                        bias_E=bias_E)
        balance = load_balance_loss(logits_GTE, routing.expert_GTA)
    return routing, {"load_balance_loss": balance, "router_z_loss": router_z_loss(logits_GTE)}


def worked_example(capacity: int = 2, first_logits=(2.0,) * 8) -> tuple[np.ndarray, Routing]:
    """8 tokens, 4 experts, each token's (first, second) choice; logits 2 and 1, 0 elsewhere."""
    choices = [(0, 1), (0, 2), (1, 0), (0, 3), (2, 1), (1, 0), (1, 2), (3, 1)]
    logits_TE = np.zeros((len(choices), 4), np.float32)
    for token, (first, second) in enumerate(choices):
        logits_TE[token, first], logits_TE[token, second] = first_logits[token], 1.0
    return logits_TE, route(jnp.asarray(logits_TE)[None], top_k=2, capacity=capacity)


def route_demo(capacity: int = 2) -> tuple[np.ndarray, Routing, Routing]:
    """The worked example's choices with unequal confidence (first-choice logits 1.7 ... 4.0),
    routed by position (OpenMoE) and by confidence (BPR)."""
    logits_TE, by_position = worked_example(capacity, (1.7, 2.0, 2.5, 3.0, 2.2, 1.8, 4.0, 3.5))
    by_confidence = route(jnp.asarray(logits_TE)[None], top_k=2, capacity=capacity,
                          batch_prioritized=True)
    return logits_TE, by_position, by_confidence


def print_variants(logits_TE: np.ndarray, routings: dict, capacity: int) -> None:
    """Each token's served experts under each router in `routings` ({name: Routing}), side by side."""
    probs_TE = np.asarray(jax.nn.softmax(jnp.asarray(logits_TE)))
    print(f"The same choices with unequal confidence (top-1 probability), capacity {capacity}: "
          "the experts that serve each token.")
    print("token | choices | top-1 p | " + " | ".join(f"{name:>15s}" for name in routings))
    served = {name: [[f"e{e}" for e, k in zip(np.asarray(r.expert_GTA[0, t]),
                                            np.asarray(r.kept_GTA[0, t])) if k] or ["nothing"]
                     for t in range(len(logits_TE))] for name, r in routings.items()}
    for t in range(len(logits_TE)):
        first, second = np.argsort(-probs_TE[t], kind="stable")[:2]
        cells = " | ".join(f"{' '.join(served[name][t]):>15s}" for name in routings)
        print(f"  {t}   |  e{first} e{second}  |  {probs_TE[t].max():.3f}  | {cells}")
    print("By position, token 6 comes late and finds e1 and e2 full. BPR queues token 6 (the most\n"
          "confident) first and leaves the two least sure, 0 and 5, with nothing. Under expert\n"
          "choice each expert takes its 2 most probable tokens: 0 and 5 are nobody's top two,\n"
          "while token 1 gets two experts. Under both, whether token 0 is served depends on\n"
          "tokens after it: the future leaks into the past, more than in OpenMoE's queue.\n")


def print_example(logits_TE: np.ndarray, routing: Routing, capacity: int) -> None:
    expert_TA, slot_TA, kept_TA, weight_TA = (np.asarray(a[0]) for a in routing)
    print(f"Worked example: {len(logits_TE)} tokens, {logits_TE.shape[1]} experts, top-2, "
          f"capacity {capacity}.\nQueue order: every first choice (tokens 0..7), then every "
          "second choice; slot = place in that expert's queue.\n")
    print("token |   1st: expert slot weight    |   2nd: expert slot weight    | routed to")
    for token in range(len(logits_TE)):
        cells = [f"e{expert_TA[token, a]}    {slot_TA[token, a]}    "
                 + (f"{weight_TA[token, a]:.3f} kept   " if kept_TA[token, a] else "0     DROPPED")
                 for a in range(2)]
        routed = [f"e{e}" for e, k in zip(expert_TA[token], kept_TA[token]) if k] or ["nothing"]
        print(f"  {token}   |   {cells[0]}   |   {cells[1]}   | {', '.join(routed)}")
    print("\nWhy: each expert's queue (| marks its capacity):")
    for expert in range(logits_TE.shape[1]):
        entries = sorted((slot_TA[t, a], f"t{t}({a + 1})") for t in range(len(logits_TE))
                         for a in range(2) if expert_TA[t, a] == expert)
        names = [name for _, name in entries]
        print(f"  e{expert}: {' '.join(names[:capacity])} | {' '.join(names[capacity:])}")
    print("Token 5's first choice (e1) beats token 0's second choice (e1): first choices queue "
          "first.\nToken 6 comes late: both its experts are full, so the MoE layer gives it "
          "nothing\nand only the residual carries it (Drop-towards-the-End in miniature).\n")


def queue_problems(routing: Routing, capacity: int) -> list[str]:
    """Where `routing` breaks the queue rules, one sentence each; empty when it keeps them all.

    The rules: each expert's assignments hold slots 0, 1, 2, … in (choice, token) order, the
    first min(n, C) of its n assignments are kept, and a dropped assignment has weight 0.
    """
    expert_GTA, slot_GTA, kept_GTA, weight_GTA = (np.asarray(a) for a in routing)
    problems = []
    for g in range(expert_GTA.shape[0]):
        for e in np.unique(expert_GTA[g]):
            token_M, choice_M = np.nonzero(expert_GTA[g] == e)
            order_M = np.lexsort((token_M, choice_M))  # choice first, then token
            slots = slot_GTA[g][token_M, choice_M][order_M].tolist()
            if slots != list(range(len(token_M))):
                problems.append(f"group {g}, expert {e}: slots {slots} in queue order")
            kept = int(kept_GTA[g][token_M, choice_M].sum())
            if kept != min(len(token_M), capacity):
                problems.append(f"group {g}, expert {e}: {kept} of {len(token_M)} assignments "
                                f"kept at capacity {capacity}")
    if not np.all(kept_GTA == (slot_GTA < capacity)):
        problems.append(f"kept differs from slot < capacity={capacity}")
    if np.any(weight_GTA[~kept_GTA] != 0):
        problems.append("a dropped assignment has a nonzero combine weight")
    return problems


if __name__ == "__main__":
    parser = cli.ArgumentParser(
        description="Self-test of OpenMoE's router: prints a worked 8-token routing table "
                    "(choices, queue slots, drops and why), the capacity arithmetic, and a "
                    "drop-by-position demo, then checks the routing invariants and losses.")
    parser.parse_args()

    # 1. The worked example, small enough to check by hand.
    logits_TE, routing = worked_example(capacity=2)
    print_example(logits_TE, routing, capacity=2)
    problems = queue_problems(routing, capacity=2)
    kept_TA = np.asarray(routing.kept_GTA[0])
    if not kept_TA[5, 0] or kept_TA[0, 1]:
        problems.append("token 5's first choice must beat token 0's earlier second choice (e1)")
    if kept_TA[6].any() or kept_TA[3, 0] or not kept_TA[3, 1]:
        problems.append("token 6 must lose both choices, token 3 its first (e0) only")
    # Combine weights are the raw softmax probabilities of the chosen experts (no renormalizing).
    if not np.allclose(routing.weight_GTA[0, 1], jax.nn.softmax(logits_TE[1])[np.array([0, 2])]):
        problems.append("token 1's combine weights must be its raw softmax probabilities")
    if problems:
        sys.exit("self-test FAILED, worked example: " + "; ".join(problems))

    # 1b. The variants side by side on 8 tokens whose confidence differs.
    logits_TE, by_position, by_confidence = route_demo(capacity=2)
    expert_choice = route_experts_choose(jnp.asarray(logits_TE)[None], capacity=2)
    routings = {"by position": by_position, "BPR": by_confidence, "expert choice": expert_choice}
    print_variants(logits_TE, routings, capacity=2)
    served = {name: np.asarray(r.kept_GTA[0]).any(-1).tolist() for name, r in routings.items()}
    least_sure_lose = [False, True, True, True, True, False, True, True]
    if (served["by position"] != [True] * 6 + [False, True] or served["BPR"] != least_sure_lose
            or served["expert choice"] != least_sure_lose
            or np.asarray(expert_choice.kept_GTA).sum() != 4 * 2 or queue_problems(by_position, 2)):
        sys.exit(f"self-test FAILED, variants: tokens served {served} (expected token 6 left "
                 "behind by position, tokens 0 and 5 by BPR and by expert choice, every expert "
                 "full under expert choice)")

    # 2. Capacity arithmetic for OpenMoE-8B's groups, and the floor of 4 on small groups.
    cfg = RouterConfig()
    table = {"t5x train": cfg.capacity(4096, 1.25), "t5x eval": cfg.capacity(4096, 2.0),
             "colossalai train": RouterConfig(capacity_rule="colossalai").capacity(4096, 1.25),
             "t5x, 64-token group": cfg.capacity(64, 1.25)}
    print("Capacity per expert, E=32, 4096-token groups:",
          ", ".join(f"{name} {c}" for name, c in table.items()))
    if list(table.values()) != [160, 256, 320, 4] or cfg.group_shape(4 * 2048) != (2, 4096):
        sys.exit(f"self-test FAILED: capacities {list(table.values())} (expected 160, 256, 320, "
                 f"4) and groups {cfg.group_shape(4 * 2048)} for 4 × 2048 tokens (expected 2 "
                 "of 4096)")

    # 3. Losses: uniform routing balances at exactly k; z-loss of zero logits is log(E)².
    zeros_GTE = jnp.zeros((2, 64, 32))
    uniform = route(zeros_GTE, top_k=2, capacity=8)
    balance, z = load_balance_loss(zeros_GTE, uniform.expert_GTA), router_z_loss(zeros_GTE)
    print(f"Uniform router: load-balance loss {float(balance):.4f} (= k = 2), "
          f"z-loss {float(z):.4f} (= log(32)² = {math.log(32) ** 2:.4f})")
    if not (np.isclose(balance, 2.0) and np.isclose(z, math.log(32) ** 2, rtol=1e-5)):
        sys.exit("self-test FAILED: a uniform router's losses must be exactly k and log(E)²")

    # 4. Drop-towards-the-End: a router that favours a few experts, one 512-token sequence.
    router = Router(RouterConfig(d_model=32, num_experts=8, max_group_size=512), rngs=nnx.Rngs(0))
    x_GTD = jax.random.normal(jax.random.key(1), (1, 512, 32)) + 1.0  # shared offset → skew
    capacity = router.cfg.capacity(512, 1.25)
    routing, losses = router(x_GTD, capacity=capacity)
    metrics = routing_metrics(routing, num_experts=8, capacity=capacity, seq_len=512)
    quarters = np.asarray(metrics["drop_rate_by_position"]).reshape(4, -1).mean(axis=1)
    print(f"Skewed router, C={capacity}: dropped {float(metrics['fraction_dropped']):.1%} of "
          f"assignments; by position quarter: {', '.join(f'{q:.1%}' for q in quarters)}; "
          f"load-balance loss {float(losses['load_balance_loss']):.3f}")
    problems = queue_problems(routing, capacity)
    if not quarters[0] <= quarters[-1] or not quarters[-1] > 0:
        problems.append("the last quarter of positions must lose the most assignments")
    if problems:
        sys.exit("self-test FAILED, skewed router: " + "; ".join(problems))
    print("router self-test passed")
