"""Chapter 6: the OpenMoE decoder: blocks, presets, losses, parameter counts and generation.

OpenMoE is a decoder-only transformer (arXiv 2402.01739 §2.2, Table 11) built like ST-MoE:
pre-norm blocks of RMSNorm → attention with RoPE → feed-forward, where every `moe_interval`-th
block swaps its FFN for a top-2 mixture of experts followed by one extra dense FFN
("residual MoE"). As the released T5X/flaxformer code computes it (the fork's
`architectures/moe/moe_architecture.py`, `t5x/configs/moe/architectures/moe_decoder_only.gin`):
RMSNorm eps 1e-6 in f32; attention without biases or a runtime 1/√head_dim (it is folded into
the query kernel's init); an MoE block is attention → MoE → extra FFN in sequence, each with its
own norm and residual (the paper's Eq. 4 parallel form is an option); untied embeddings (input
N(0, 1), output projection in f32); init scale 0.1 everywhere. The loss is cross-entropy over
real target tokens + output z-loss + load-balance and router z-losses averaged over MoE layers
(§2.3 Eq. 8; weights 0.001, 0.01, 0.0001 from Table 12). `t5x_padding` adds T5X's padding
masks for the released weights (chapter 10). Shape letters (x_BLD) follow 02_rope.py's legend.

Left out: dropout (0 in pretraining), multi-query attention (OpenMoE reverted to MHA), and any mesh
(parameters carry logical axis names for 07_sharding.py, which also plugs in expert parallelism).
Self-test: `python 06_model.py` (preset table, a few training steps, KV-cache decoding).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from support import cli

tok = importlib.import_module("01_tokenizer")
rope = importlib.import_module("02_rope")
ffn = importlib.import_module("03_swiglu")
moe = importlib.import_module("05_moe_layer")


# --- Configuration, presets and their sizes -------------------------------------------------------
# What a rematerialized block saves for the backward pass: "dots" keeps the outputs of matmuls
# without batch axes (projections, dense FFNs: 03 flattens tokens to [N, D]) so they never run
# twice, and recomputes the rest (MaxText's usual choice); "full" keeps only the block's input.
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One OpenMoE model. Defaults are OpenMoE-8B/32E as released (T5X gins)."""

    vocab_size: int = 256_384            # embedding rows: umT5's 256,000 + 300 sentinels, padded
    num_layers: int = 24                 # decoder blocks
    d_model: int = 2048                  # D
    num_heads: int = 24                  # H
    head_dim: int = 128                  # K (H·K = 3072 > D in the 8B; the paper suggests 64)
    d_ff: int = 8192                     # F, of every dense FFN and every expert
    ffn_variant: str = "double_gated"    # released code; "swiglu" is the form the paper counts
    num_experts: int = 32                # E
    top_k: int = 2                       # experts per token
    moe_interval: int = 6                # MoE where layer % interval == interval-1; 0 = all dense
    moe_wiring: str = "sequential"       # released: MoE then extra FFN; "parallel": paper Eq. 4
    max_group_size: int = 4096           # routing group (34B: 8192)
    group_multiple: int = 1              # routing groups per step are a multiple of this (07 sets it)
    group_rule: str = "divisor"          # 04's group count; "flaxformer": ≥ E groups, as OpenMoE ran
    expert_replicas: int = 1             # copies of each expert over the mesh (07 sets it)
    train_capacity_factor: float = 1.25  # expert capacity factor while training
    eval_capacity_factor: float = 2.0    # ... while evaluating and generating
    min_capacity: int = 4                # capacity floor per expert and group
    capacity_rule: str = "t5x"           # "colossalai" multiplies capacity by top_k (paper §4 analysis)
    renormalize: bool = False            # combine weights: raw softmax probs (OpenMoE); True: sum to 1
    init_std: float = 0.02               # router kernel ~ N(0, init_std²) (flaxformer RouterWeights)
    moe_dispatch: str = "gather"         # 05's path: "gather", "einsum" (T5X), "ragged" or "loop"
    dropless: bool = False               # experts serve every assignment (not OpenMoE: it dropped)
    routing: str = "tokens_choose"       # 04's router; "experts_choose": Zhou et al. 2022 (not causal)
    batch_prioritized: bool = False      # BPR: confident tokens queue first (V-MoE; OpenMoE: off)
    balance_bias_rate: float = 0.0       # aux-loss-free balancing's u (Wang et al. 2024: 0.001); 0 off
    max_seq_len: int = 2048              # longest sequence the model accepts
    rope_max_timescale: float = 10_000.0  # RoPE base θ
    init_scale: float = 0.1              # variance-scaling scale of every kernel (OpenMoE SCALE)
    dtype: Any = jnp.float32             # activations (bf16 on TPU); params, router, logits f32
    remat: bool = False                  # recompute each block in the backward pass (saves memory)
    remat_policy: str = "dots"           # what a rematerialized block keeps (REMAT_POLICIES)
    t5x_padding: bool = False            # T5X's pad-token masks (flaxformer), for released weights
    z_loss_weight: float = 0.001         # output-logit z-loss (paper Table 12; released gin 1e-4)
    aux_loss_weight: float = 0.01        # load-balance loss
    router_z_loss_weight: float = 0.0001  # router z-loss (34B's final gin: 1e-3)

    def __post_init__(self):
        def require(name: str, holds: bool, rule: str) -> None:
            if not holds:
                value = getattr(self, name)
                shown = repr(value) if isinstance(value, (str, float)) else value
                raise ValueError(f"ModelConfig.{name}={shown}{rule}")

        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff",
                     "num_experts", "max_group_size", "max_seq_len", "min_capacity"):
            require(name, getattr(self, name) >= 1, " must be >= 1")
        # Capacity factors, loss weights, RoPE base, init scale: a NaN or inf would only surface
        # later, as NaN losses (and NaN fails every comparison, so 0 <= x < inf excludes it).
        for name in [field.name for field in dataclasses.fields(self) if field.type == "float"]:
            require(name, 0 <= getattr(self, name) < math.inf, ": must be a finite number >= 0")
        require("head_dim", self.head_dim % 2 == 0, " must be even: RoPE rotates pairs of "
                "features, so num_heads × head_dim must split into pairs")
        require("top_k", 1 <= self.top_k <= self.num_experts,
                f" must be in [1, num_experts={self.num_experts}]")
        interval = self.moe_interval
        require("moe_interval", interval == 0 or (interval > 0 and self.num_layers % interval == 0),
                f" must be 0 (dense) or divide num_layers={self.num_layers} (evenly spaced MoE blocks)")
        require("moe_wiring", self.moe_wiring in ("sequential", "parallel"),
                "; use 'sequential' (released code) or 'parallel' (paper Eq. 4)")
        require("remat_policy", self.remat_policy in REMAT_POLICIES, f"; use one of {sorted(REMAT_POLICIES)}")
        require("dtype", jnp.issubdtype(self.dtype, jnp.floating), " must be a float dtype")
        self.ffn_config(), self.moe_config()  # 03 and 05 check the remaining fields

    def is_moe_layer(self, layer: int) -> bool:
        """T5X's MIXED layout: layers 5, 11, 17, 23 of the 8B (interval 6)."""
        return bool(self.moe_interval) and layer % self.moe_interval == self.moe_interval - 1

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.is_moe_layer(layer)]

    def ffn_config(self) -> Any:
        return ffn.FFNConfig(self.d_model, self.d_ff, self.ffn_variant, self.init_scale, self.dtype)

    def moe_config(self) -> Any:
        """05's MoEConfig from the same-named fields here (its `dispatch` is `moe_dispatch`), all
        but jitter_noise: it needs a key per step, which OpenMoE (routed without jitter) lacks."""
        shared = {field.name: getattr(self, field.name) for field in dataclasses.fields(moe.MoEConfig)
                  if field.name not in ("dispatch", "jitter_noise")}
        return moe.MoEConfig(**shared, dispatch=self.moe_dispatch)


PRESETS: dict[str, ModelConfig] = {
    # Learns visibly in minutes on a 2-core CPU: the embedded tokenizer's 8,320 rows
    # (8,000 pieces + 300 sentinels, padded to 128), MoE in every second block.
    "small": ModelConfig(vocab_size=8_320, num_layers=4, d_model=256, num_heads=4, head_dim=64,
                         d_ff=512, num_experts=8, moe_interval=2, max_seq_len=512),
    # Trains in seconds: for self-tests that need a trained model (11_routing_analysis --quick).
    "tiny": ModelConfig(vocab_size=8_320, num_layers=4, d_model=64, num_heads=2, head_dim=32,
                        d_ff=128, num_experts=8, moe_interval=2, max_seq_len=512),
    "openmoe-base": ModelConfig(num_layers=12, d_model=768, num_heads=12, head_dim=64,
                                d_ff=2048, num_experts=16, moe_interval=4),
    "openmoe-8b": ModelConfig(),
    "openmoe-34b": ModelConfig(num_layers=32, d_model=3072, num_heads=24, head_dim=128,
                               d_ff=12_288, num_experts=32, moe_interval=4, max_group_size=8192),
}
# Each preset's dense counterpart: the paper's "w/o MoE" ablation (Table 3).
PRESETS |= {f"{name}-dense": dataclasses.replace(cfg, moe_interval=0) for name, cfg in PRESETS.items()}
# The paper's totals and active parameters per token (Table 11), for comparison.
PAPER_PARAMETERS = {"openmoe-base": (650e6, 142e6), "openmoe-8b": (8.7e9, 2.1e9), "openmoe-34b": (34e9, 6.0e9)}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameters from the config alone (works for 34B on a laptop).
    "active" is what one token touches: attention, norms, every dense FFN, and in each MoE block
    the router, top_k experts and the extra FFN; embeddings apart (the paper's 142M is too)."""
    d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
    one_ffn = ffn.ffn_param_count(d, cfg.d_ff, cfg.ffn_variant)
    attention_and_norms = 4 * d * hk + 2 * d
    num_moe = len(cfg.moe_layers)
    dense_layers = (cfg.num_layers - num_moe) * (attention_and_norms + one_ffn)
    router = (d + (cfg.balance_bias_rate > 0)) * cfg.num_experts  # kernel [D, E], any bias [E]
    moe_shared = num_moe * (attention_and_norms + router + one_ffn
                            + (d if cfg.moe_wiring == "sequential" else 0))
    embedding = 2 * cfg.vocab_size * d + d  # input table, output projection, final norm
    total = embedding + dense_layers + moe_shared + num_moe * cfg.num_experts * one_ffn
    active = dense_layers + moe_shared + num_moe * cfg.top_k * one_ffn
    return {"total": total, "embedding": embedding, "active_non_embedding": active, "active": active + embedding}


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6 × active matmul weights + attention scores (PaLM's formula,
    12 · layers · H·K · L). Experts count top_k per token, as if capacity were never short."""
    counts = parameter_counts(cfg)
    matmul_weights = counts["active_non_embedding"] + cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (seq_len or cfg.max_seq_len)
    return 6 * matmul_weights + attention


# --- Building blocks: RMSNorm, attention with RoPE and a KV cache ---------------------------------
class RMSNorm(nnx.Module):
    """x / rms(x) · scale, computed in f32 (T5's LayerNorm: no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))

    def __call__(self, x_BLD):
        x32_BLD = x_BLD.astype(jnp.float32)
        inverse_rms_BL1 = jax.lax.rsqrt(jnp.mean(x32_BLD**2, axis=-1, keepdims=True) + self.eps)
        return (x32_BLD * inverse_rms_BL1 * self.scale[...]).astype(x_BLD.dtype)


class LayerCache(NamedTuple):
    """Keys and values of one attention layer for every cache slot written so far."""
    key_BSHK: jax.Array
    value_BSHK: jax.Array


class Attention(nnx.Module):
    """Causal multi-head self-attention with RoPE; kernels stored 2-D as flaxformer stores them.
    `rotation` is 02's (cos, sin) of every token, computed once per forward pass by the model.
    No 1/√K at run time: OpenMoE draws the query kernel with an extra factor 1/√K, so q·k has the
    right scale from initialization on (and weights converted from OpenMoE are not rescaled)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
        init = jax.nn.initializers.variance_scaling(cfg.init_scale, "fan_in", "normal")

        def kernel(shape, axes, factor=1.0):
            return nnx.Param(init(rngs.params(), shape, jnp.float32) * factor, logical_axes=axes)

        # "joined_kv": the H·K axis of all heads side by side (flaxformer's name).
        self.query = kernel((d, hk), ("embed", "joined_kv"), factor=cfg.head_dim**-0.5)
        self.key = kernel((d, hk), ("embed", "joined_kv"))
        self.value = kernel((d, hk), ("embed", "joined_kv"))
        self.out = kernel((hk, d), ("joined_kv", "embed"))

    def __call__(self, x_BLD, rotation, mask_BLS, cache: LayerCache | None = None,
                 cache_index=None):
        cfg = self.cfg
        b, l, _ = x_BLD.shape

        # Project and split into heads; RoPE turns each query and key by its token's position.
        def heads(kernel):
            return (x_BLD @ kernel[...].astype(cfg.dtype)).reshape(b, l, cfg.num_heads, cfg.head_dim)

        q_BLHK, k_BLHK = rope.rotate(heads(self.query), *rotation), rope.rotate(heads(self.key), *rotation)
        v_BLHK = heads(self.value)

        # While decoding, this step's keys and values join the cache at `cache_index`.
        k_BSHK, v_BSHK = k_BLHK, v_BLHK
        if cache is not None:
            k_BSHK = jax.lax.dynamic_update_slice(cache.key_BSHK, k_BLHK, (0, cache_index, 0, 0))
            v_BSHK = jax.lax.dynamic_update_slice(cache.value_BSHK, v_BLHK, (0, cache_index, 0, 0))
            cache = LayerCache(k_BSHK, v_BSHK)

        # Scores and softmax in f32, heads leading ([B, H, L, K]: plain batched matmuls on a CPU).
        # A masked score becomes -1e10, not -inf, so a fully masked row (a padding query) stays
        # finite; T5X adds a -1e10 bias, which in f32 gives the same -1e10 for any |score| < 512.
        q_BHLK, k_BHSK, v_BHSK = (a.transpose(0, 2, 1, 3) for a in (q_BLHK, k_BSHK, v_BSHK))
        scores_BHLS = jnp.einsum("BHLK,BHSK->BHLS", q_BHLK, k_BHSK).astype(jnp.float32)
        scores_BHLS = jnp.where(mask_BLS[:, None], scores_BHLS, -1e10)
        probs_BHLS = jax.nn.softmax(scores_BHLS, axis=-1).astype(cfg.dtype)
        out_BLHK = jnp.einsum("BHLS,BHSK->BLHK", probs_BHLS, v_BHSK)
        return out_BLHK.reshape(b, l, -1) @ self.out[...].astype(cfg.dtype), cache


class Block(nnx.Module):
    """One decoder block. Dense: x + Attn(N(x)), then + FFN(N(.)).
    MoE (sequential, as released): x + Attn(N(x)), then + MoE(N(.)), then + ExtraFFN(N(.)).
    MoE (parallel, paper Eq. 4):   x + Attn(N(x)), then h = N(.); + MoE(h) + ExtraFFN(h)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, run_groups=None):
        self.cfg, self.is_moe = cfg, cfg.is_moe_layer(layer)
        self.pre_self_attention_norm = RMSNorm(cfg.d_model)
        self.self_attention = Attention(cfg, rngs=rngs)
        self.pre_mlp_norm = RMSNorm(cfg.d_model)
        if self.is_moe:
            self.mlp = moe.MoELayer(cfg.moe_config(), rngs=rngs, run_groups=run_groups or moe.run_groups_here)
            self.extra_mlp = ffn.FeedForward(cfg.ffn_config(), rngs=rngs)
            if cfg.moe_wiring == "sequential":
                self.pre_extra_mlp_norm = RMSNorm(cfg.d_model)
        else:
            self.mlp = ffn.FeedForward(cfg.ffn_config(), rngs=rngs)

    def __call__(self, x_BLD, rotation, mask_BLS, *, train: bool,
                 cache: LayerCache | None = None, cache_index=None, logit_mask_BL1=None):
        # T5X zeroes padding tokens' normalized activations before every sublayer.
        def norm(layer_norm, x_BLD):
            h_BLD = layer_norm(x_BLD)
            return h_BLD if logit_mask_BL1 is None else h_BLD * logit_mask_BL1

        attention_BLD, cache = self.self_attention(
            norm(self.pre_self_attention_norm, x_BLD), rotation, mask_BLS, cache, cache_index)
        x_BLD = x_BLD + attention_BLD
        if not self.is_moe:
            return x_BLD + self.mlp(norm(self.pre_mlp_norm, x_BLD)), cache, None
        h_BLD = norm(self.pre_mlp_norm, x_BLD)
        experts_BLD, moe_stats = self.mlp(h_BLD, train=train)
        if self.cfg.moe_wiring == "parallel":
            return x_BLD + experts_BLD + self.extra_mlp(h_BLD), cache, moe_stats
        x_BLD = x_BLD + experts_BLD
        return x_BLD + self.extra_mlp(norm(self.pre_extra_mlp_norm, x_BLD)), cache, moe_stats


# --- The model and its loss -----------------------------------------------------------------------
def check_tokens(tokens_BL, cfg: ModelConfig) -> None:
    """Clear errors for ids outside the vocabulary or sequences that are too long. The ids are
    read only where they can be: not traced, nor spread over hosts (09_train.py checks those)."""
    if tokens_BL.ndim != 2:
        raise ValueError(f"tokens must be [batch, length]; got shape {tokens_BL.shape}")
    if tokens_BL.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens_BL.shape[1]} exceeds max_seq_len="
                         f"{cfg.max_seq_len}; shorten the input or raise ModelConfig.max_seq_len")
    if not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids; got dtype {tokens_BL.dtype}")
    if (isinstance(tokens_BL, jax.core.Tracer) or not tokens_BL.size
            or not getattr(tokens_BL, "is_fully_addressable", True)):
        return
    values = np.asarray(tokens_BL)  # on the host: inside a trace, jnp's min would be traced
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}); got "
                         f"min {low}, max {high} (does the tokenizer match the model?)")


def t5x_padding_masks(tokens_BL, targets_BL=None):
    """T5X's two padding masks for a decoder whose inputs are targets shifted right by id 0.

    Id 0 is both padding and the start token, so flaxformer (`get_decoder_logit_mask`) keeps a
    token that is not 0, or precedes one that is not 0 (a start token), or begins its row:
        tokens [0, 3, 9, 0, 4, 8, 0, 0]  →  logit mask [1, 1, 1, 1, 1, 1, 0, 0]
    That mask [B, L, 1] multiplies the normalized activations before every sublayer and the
    output projection. Attention (`make_decoder_mask`) lets a query and a key meet only where
    both *targets* are real (> 0); without targets the logit mask stands in for them (the last
    real position's target is the token being predicted). Returns (logit mask, valid_BL)."""
    next_BL = jnp.pad(tokens_BL[:, 1:], ((0, 0), (0, 1)))
    first_BL = jnp.arange(tokens_BL.shape[1])[None, :] == 0
    keep_BL = (tokens_BL > 0) | (next_BL > 0) | first_BL
    valid_BL = keep_BL if targets_BL is None else targets_BL > 0
    return keep_BL[..., None], valid_BL


class OpenMoE(nnx.Module):
    """Token ids [B, L] → next-token logits [B, L, V] (f32), plus each MoE layer's stats.
    `run_groups`: where every MoE layer routes its groups and runs its experts (05's
    `run_groups_here` if None; 07's `sharded_model` passes `expert_parallel_runner(mesh)`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, run_groups=None):
        self.cfg = cfg
        embed_init = jax.nn.initializers.normal(1.0)
        self.token_embedder = nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, cfg.d_model)),
                                        logical_axes=("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, layer, rngs=rngs, run_groups=run_groups)
                                for layer in range(cfg.num_layers)])
        self.decoder_norm = RMSNorm(cfg.d_model)
        logits_init = jax.nn.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
        self.logits_dense = nnx.Param(logits_init(rngs.params(), (cfg.d_model, cfg.vocab_size)),
                                      logical_axes=("embed", "vocab"))

    def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None, targets_BL=None,
                 train: bool = True, cache: "DecodeCache | None" = None):
        """Logits for every position, each MoE layer's stats (05), and the updated cache.
        Packed rows pass `segment_ids_BL` so tokens attend only within their own document. With
        a `cache`, the tokens are written at `cache.index` and attend to every valid slot up to
        their own (see `generate`). `targets_BL` matters only with `cfg.t5x_padding`."""
        cfg = self.cfg
        check_tokens(tokens_BL, cfg)
        b, l = tokens_BL.shape
        positions_BL = jnp.broadcast_to(jnp.arange(l), (b, l)) if positions_BL is None else positions_BL
        segment_ids_BL = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL
        logit_mask_BL1 = valid_BL = None
        if cfg.t5x_padding:
            logit_mask_BL1, valid_BL = t5x_padding_masks(tokens_BL, targets_BL)
            logit_mask_BL1 = logit_mask_BL1.astype(cfg.dtype)

        # Who may attend to whom: earlier-or-same slots of the same document (or valid cache).
        if cache is None:
            causal_LS = jnp.tril(jnp.ones((l, l), bool))
            mask_BLS = causal_LS & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
            if valid_BL is not None:
                mask_BLS = mask_BLS & valid_BL[:, :, None] & valid_BL[:, None, :]
        else:
            valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, segment_ids_BL > 0, (0, cache.index))
            slot_S, query_slot_L = jnp.arange(valid_BS.shape[1]), cache.index + jnp.arange(l)
            mask_BLS = (slot_S[None, None, :] <= query_slot_L[None, :, None]) & valid_BS[:, None, :]

        # RoPE's angles depend on positions only: computed once, every layer's attention uses them.
        rotation = rope.rotation(positions_BL, cfg.head_dim, cfg.rope_max_timescale)
        x_BLD = jnp.take(self.token_embedder[...], tokens_BL, axis=0).astype(cfg.dtype)
        moe_stats, layer_caches = [], []
        for index, block in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[index]

            def run(block, x_BLD):
                return block(x_BLD, rotation, mask_BLS, train=train, cache=layer_cache,
                             cache_index=None if cache is None else cache.index,
                             logit_mask_BL1=logit_mask_BL1)

            # Rematerialization keeps, of each block, only what the policy saves for the backward.
            if cfg.remat:
                run = jax.checkpoint(run, policy=REMAT_POLICIES[cfg.remat_policy])
            x_BLD, layer_cache, stats = run(block, x_BLD)
            layer_caches.append(layer_cache)
            moe_stats += [] if stats is None else [stats]

        x_BLD = self.decoder_norm(x_BLD)
        if logit_mask_BL1 is not None:
            x_BLD = x_BLD * logit_mask_BL1
        # One 2-D matmul over all B·L rows: its weight gradient is then one too (2× faster on CPU).
        logits_BLV = (x_BLD.reshape(b * l, -1).astype(jnp.float32) @ self.logits_dense[...]).reshape(b, l, -1)
        if cache is not None:
            cache = DecodeCache(tuple(layer_caches), valid_BS, cache.index + l)
        return logits_BLV, moe_stats, cache


def loss_fn(model: OpenMoE, batch: dict, *, train: bool = True):
    """OpenMoE's training objective and everything worth logging about it: (total, metrics).
    `batch` holds `inputs` and `targets` [B, L] (targets are inputs shifted left by one), a
    `loss_mask` [B, L], 0 on padding and on the inputs of 09's UL2 examples, and optionally
    `positions` and `segment_ids` for packed rows. Cross-entropy and the output z-loss (log Z)²
    are averaged over the real target tokens (T5X's NUM_REAL_TARGET_TOKENS)."""
    cfg = model.cfg
    logits_BLV, moe_stats, _ = model(batch["inputs"], positions_BL=batch.get("positions"), train=train,
                                     segment_ids_BL=batch.get("segment_ids"), targets_BL=batch["targets"])
    mask_BL = batch["loss_mask"].astype(jnp.float32)
    num_tokens = jnp.maximum(mask_BL.sum(), 1.0)

    # Cross-entropy via log Z - logit of the target; log Z also feeds the z-loss.
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, batch["targets"][..., None], axis=-1)[..., 0]
    cross_entropy = jnp.sum((log_z_BL - target_logit_BL) * mask_BL) / num_tokens
    z_loss = jnp.sum(log_z_BL**2 * mask_BL) / num_tokens
    # Right where the target's logit is the largest (a tie counts): one max, cheaper than argmax's
    # index search (4% of the CPU step), which also all-gathers over vocab shards.
    accuracy = jnp.sum((target_logit_BL >= logits_BLV.max(-1)) * mask_BL) / num_tokens

    # The router losses and metrics, averaged over MoE layers (zero for a dense model).
    def layer_mean(name):
        return jnp.mean(jnp.stack([stats[name] for stats in moe_stats])) if moe_stats else jnp.float32(0)

    load_balance, router_z = layer_mean("load_balance_loss"), layer_mean("router_z_loss")
    total = (cross_entropy + cfg.z_loss_weight * z_loss + cfg.aux_loss_weight * load_balance
             + cfg.router_z_loss_weight * router_z)
    metrics = {"loss": total, "cross_entropy": cross_entropy, "z_loss": z_loss,
               "load_balance_loss": load_balance, "router_z_loss": router_z, "accuracy": accuracy,
               "num_tokens": num_tokens, "fraction_dropped": layer_mean("fraction_dropped")}
    # Per MoE layer in layer order: [layers, L] by position, and [layers, E] loads for 09's biases.
    for name in ("drop_rate_by_position", "tokens_left_behind_by_position", "expert_load"):
        if moe_stats:
            metrics[name] = jnp.stack([stats[name] for stats in moe_stats])
    return total, metrics


# --- Generation with a KV cache -------------------------------------------------------------------
class DecodeCache(NamedTuple):
    """Every layer's keys and values, which slots hold real tokens, and the next slot to fill."""
    layers: tuple[LayerCache, ...]
    valid_BS: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> DecodeCache:
    shape = (batch, length, cfg.num_heads, cfg.head_dim)
    empty = LayerCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
    return DecodeCache((empty,) * cfg.num_layers, jnp.zeros((batch, length), bool), jnp.int32(0))


@jax.jit
def _decode_step(model, tokens_BL, positions_BL, valid_BL, cache):
    """New tokens against the cache → the last position's logits, and the cache."""
    logits_BLV, _, cache = model(tokens_BL, positions_BL=positions_BL, train=False,
                                 segment_ids_BL=valid_BL.astype(jnp.int32), cache=cache)
    return logits_BLV[:, -1], cache


class Routing(NamedTuple):
    """A text's tokens [1, L] and, per MoE layer, each token's experts, best first, [1, L, A] (A = k;
    E under expert choice), and whether each expert served it (False: dropped, or not taken)."""
    tokens_BL: np.ndarray
    expert_BLA: list[np.ndarray]
    kept_BLA: list[np.ndarray]


def routed_text(model, ids: list[int]) -> Routing:
    """Each MoE layer's routing of every token of `ids` in ONE forward pass (train=False), as
    training and the paper's drop analysis (§4.4) route: the text is one group, so late tokens
    may find their experts full (Drop-towards-the-End). `generate` routes the prompt so too, but
    then each new token alone, a group of one with min_capacity >= 1 slots: those never drop."""
    tokens_BL = jnp.asarray([ids], jnp.int32)
    _, moe_stats, _ = jax.jit(lambda model, t_BL: model(t_BL, train=False))(model, tokens_BL)
    return Routing(np.asarray(tokens_BL), *([np.asarray(s[name]) for s in moe_stats]
                                            for name in ("expert_BLA", "kept_BLA")))


def sample_token(logits_BV, key, *, temperature: float = 0.0, top_p: float = 1.0):
    """Greedy when temperature is 0; otherwise sample from the smallest set of tokens whose
    probability reaches top_p (nucleus sampling), after dividing the logits by temperature."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # The cut-off logit: the last sorted logit whose preceding mass is still below top_p.
    keep_count_B = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p, axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, keep_count_B[:, None] - 1, axis=-1)
    return jax.random.categorical(key, jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf))


def generate(model: OpenMoE, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int = 1, pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt token by token, reusing every earlier key and value (a KV cache).
    Prompts are left-padded to one length, so all rows write the same cache slot each step; each
    row's positions start at 0 at its first real token. Routing uses the evaluation capacity
    factor; each continuation ends before eos."""
    cfg = model.cfg
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs a token "
                         "(start with the pad id 0, the decoder's start token, for none)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not 0.0 < top_p <= 1.0 or temperature < 0.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] and temperature={temperature} >= 0")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={cfg.max_seq_len}")
    tokens_BL = jnp.array([[pad_id] * (longest - len(p)) + list(p) for p in prompts], jnp.int32)
    valid_BL = jnp.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], jnp.int32)
    check_tokens(tokens_BL, cfg)

    # Prefill: the whole prompt at once; then one token per step at the next position.
    cache = init_cache(cfg, len(prompts), longest + max_new_tokens)
    positions_BL = jnp.maximum(jnp.cumsum(valid_BL, axis=1) - 1, 0)
    key, outputs, finished = jax.random.key(seed), [[] for _ in prompts], np.zeros(len(prompts), bool)
    for _ in range(max_new_tokens):
        logits_BV, cache = _decode_step(model, tokens_BL, positions_BL, valid_BL, cache)
        key, step_key = jax.random.split(key)
        token_B = sample_token(logits_BV, step_key, temperature=temperature, top_p=top_p)
        for row, token in enumerate(np.asarray(token_B)):
            finished[row] |= token == eos_id
            if not finished[row]:
                outputs[row].append(int(token))
        if finished.all():
            break
        tokens_BL = token_B[:, None].astype(jnp.int32)
        positions_BL, valid_BL = positions_BL[:, -1:] + 1, jnp.ones_like(tokens_BL)
    return outputs


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=(
        "Print OpenMoE's presets with their parameter counts beside the paper's; train a small "
        "model a few steps on one batch of the embedded corpus; check KV-cache decoding equals "
        "full recomputation; print a sample."))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps on one batch")
    args = parser.parse_args()

    # 1. The presets, counted from their configs alone, beside the paper's Table 11.
    def human(count: float) -> str:
        return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"

    print(f"{'preset':20}{'total':>9}{'active':>9}{'paper total / active':>23}{'train GFLOP/token':>19}")
    for name, cfg in PRESETS.items():
        counts, paper = parameter_counts(cfg), PAPER_PARAMETERS.get(name)
        paper_text = f"{human(paper[0])} / {human(paper[1])}" if paper else ""
        print(f"{name:20}{human(counts['total']):>9}{human(counts['active_non_embedding']):>9}"
              f"{paper_text:>23}{train_flops_per_token(cfg) / 1e9:>19.2f}")
    print("  active = non-embedding parameters one token uses. Totals exceed the paper's because the\n"
          "  released FFN is double-gated (4·D·F, not 3·D·F) and embeddings are untied (2·V·D).")
    base_active = parameter_counts(PRESETS["openmoe-base"])["active_non_embedding"]
    if round(base_active / 1e6) != 142:
        sys.exit(f"self-test FAILED: OpenMoE-Base has {base_active:,} active non-embedding "
                 "parameters; the paper (Table 11) says 142M")

    # 2. A small model on one batch of real text: initial loss ≈ ln V, then it falls.
    tokenizer = tok.embedded_tokenizer()
    # An evaluation capacity factor of E lets every expert hold every token, so nothing is
    # dropped while decoding; with drops, routing depends on the group, and a cache cannot match.
    cfg = dataclasses.replace(PRESETS["small"], vocab_size=tokenizer.vocab_size, num_layers=2,
                              max_seq_len=128, eval_capacity_factor=float(PRESETS["small"].num_experts))
    ids = tokenizer.encode("".join(tok.embedded_corpus("train")["text"]["text"][:8]))[: 4 * 65]
    tokens_BL = jnp.array(ids, jnp.int32).reshape(4, 65)
    batch = {"inputs": tokens_BL[:, :-1], "targets": tokens_BL[:, 1:], "loss_mask": jnp.ones((4, 64))}
    optimizer = optax.adam(3e-3)
    graph, params, rest = nnx.split(OpenMoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        grads, metrics = jax.grad(lambda p: loss_fn(nnx.merge(graph, p, rest), batch), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    losses = []
    for step in range(args.steps):
        params, opt_state, metrics = train_step(params, opt_state)
        losses.append(float(metrics["cross_entropy"]))
    print(f"\nsmall model, {args.steps} Adam steps on one batch: cross-entropy {losses[0]:.3f} "
          f"(ln V = {math.log(cfg.vocab_size):.3f}) -> {losses[-1]:.3f}; "
          f"drops {float(metrics['fraction_dropped']):.1%}")
    if not (abs(losses[0] - math.log(cfg.vocab_size)) < 1.0 and losses[-1] < losses[0] - 2.0):
        sys.exit("self-test FAILED: the initial cross-entropy should be within 1 of ln V and fall "
                 "by more than 2 on one repeated batch")

    # 3. KV-cache decoding must equal recomputing the whole sequence when nothing is dropped.
    model, prompt = nnx.merge(graph, params, rest), ids[:16]
    continuation = generate(model, [prompt], max_new_tokens=24)[0]
    greedy = jnp.argmax(model(jnp.array([prompt + continuation]), train=False)[0][0, len(prompt) - 1:-1], -1)
    print(f"\nprompt:       {tokenizer.decode(prompt)!r}\ncontinuation: {tokenizer.decode(continuation)!r}")
    if list(np.asarray(greedy)) != continuation:
        sys.exit("self-test FAILED: KV-cache decoding differs from recomputing the whole sequence")
    print("\nOK: counts match the paper's 142M, the loss falls from ln V, KV-cache decoding is exact.")
