"""Chapter 3: the feed-forward network (FFN) of every block and expert: the double-gated SwiGLU.

An FFN widens each token's vector from d_model (D) to d_ff (F), applies a gated nonlinearity, and
projects back. LLaMA's SwiGLU gates one "up" projection with a SiLU of another:
    y = wo( silu(x·W_gate) · x·W_up ),                 3·D·F parameters.
OpenMoE's released code (Fuzhao Xue's flaxformer fork, `components/dense.py`: `MlpBlock` with
`activations=('swiglu', 'linear')`, and its `SwiGLU`) makes wi_0 twice as wide,
splits its output into halves (a, b) and multiplies three projections together:
    y = wo( a · silu(b) · x·wi_1 ),  (a, b) = split(x·wi_0),   4·D·F parameters, no biases,
with wi_0: D→2F, wi_1: D→F, wo: F→D. wi_0 is stored [D, 2, F]: the pair (a, b) is an axis of
its own, so splitting F over devices keeps each a beside its b. Plainly: the paper's parameter
counts (OpenMoE-8B: 8.7B in all, 2.1B *active*, i.e. used by each token; Table 11) assume the
ordinary 3·D·F form, while the released weights use the double-gated one; both are here as
`FFNConfig.variant` so you can compare them. Kernels are f32 parameters named by logical axes
(a name per axis for what it holds, "embed" or "mlp", which 07 maps onto devices) and
initialized as OpenMoE does: variance scaling 0.1, fan-in (`SCALE = 0.1` in the fork's
`tokens_choose_decoder_only_*.gin`); the math runs in the activation dtype. `ffn_param_count`
and `ffn_flops_per_token` feed active-parameter counts and MFU (model FLOPs utilization: the
share of the hardware's peak FLOP/s that does the model's math). Shapes use 02's legend.
Left out: dropout (0 in pretraining), other activations, and anything MoE (05 vmaps `swiglu`).
Run the self-test: `python 03_swiglu.py` (`--help` for options).
"""

import math
import sys
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from support import cli

VARIANTS = ("double_gated", "swiglu")


def ffn_logical_axes(variant: str = "double_gated") -> dict[str, tuple[str, ...]]:
    """Logical axis names of each kernel; 07_sharding.py maps them onto the device mesh.

    "pair" is the (a, b) axis of the double-gated wi_0: never split over devices, and for
    Adafactor (08's optimizer, which keeps a matrix's gradient statistics as one value per row
    and one per column) part of the column side, exactly as T5X factored its [D, 2F] kernel.
    """
    _check_variant(variant)
    gate = ("embed", "pair", "mlp") if variant == "double_gated" else ("embed", "mlp")
    return {"wi_0": gate, "wi_1": ("embed", "mlp"), "wo": ("mlp", "embed")}


@dataclass(frozen=True)
class FFNConfig:
    d_model: int = 2048  # D; OpenMoE-8B: 2048 (Base 768, 34B 3072)
    d_ff: int = 8192  # F; OpenMoE-8B: 8192 (Base 2048 in the code, 3072 in the paper; 34B 12288)
    variant: str = "double_gated"  # released code; "swiglu" is LLaMA's form the paper counts
    init_scale: float = 0.1  # variance-scaling scale, OpenMoE's SCALE=0.1 "for stability"
    dtype: Any = jnp.float32  # activation dtype of the math (bf16 on TPU); params stay f32

    def __post_init__(self):
        for name in ("d_model", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FFNConfig.{name}={getattr(self, name)}: must be a positive int")
        if self.variant not in VARIANTS:
            raise ValueError(f"FFNConfig.variant={self.variant!r}: must be one of {VARIANTS}")
        if not self.init_scale > 0:
            raise ValueError(f"FFNConfig.init_scale={self.init_scale}: must be > 0 (OpenMoE: 0.1)")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"FFNConfig.dtype={self.dtype}: must be a float dtype, "
                             "e.g. jnp.float32 or jnp.bfloat16")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {VARIANTS}")


def ffn_kernel_shapes(d_model: int, d_ff: int, variant: str = "double_gated") -> dict:
    """Shape of each kernel, e.g. D=2, F=3 double-gated: wi_0 (2, 2, 3), wi_1 (2, 3), wo (3, 2)."""
    _check_variant(variant)
    gate_shape = (d_model, 2, d_ff) if variant == "double_gated" else (d_model, d_ff)
    return {"wi_0": gate_shape, "wi_1": (d_model, d_ff), "wo": (d_ff, d_model)}


def ffn_param_count(d_model: int, d_ff: int, variant: str = "double_gated") -> int:
    """Parameters of one FFN: 4·D·F double-gated, 3·D·F swiglu (no biases)."""
    return sum(math.prod(shape) for shape in ffn_kernel_shapes(d_model, d_ff, variant).values())


def ffn_flops_per_token(d_model: int, d_ff: int, variant: str = "double_gated") -> int:
    """Forward matmul FLOPs per token of one FFN, counting a multiply-add as 2 FLOPs.

    Every kernel weight takes part in exactly one multiply-add per token, so this is
    2 × ffn_param_count: 8·D·F double-gated, 6·D·F swiglu. The element-wise SiLU and
    products (a few·F) are left out, as MFU conventions do; the backward pass costs about 2×.
    """
    return 2 * ffn_param_count(d_model, d_ff, variant)


def ffn_init(key, shape, dtype=jnp.float32, *, scale: float = 0.1,
             distribution: str = "truncated_normal"):
    """Variance scaling with fan-in = shape[-2]: std ≈ sqrt(scale / fan_in) per input feature.

    Axes before the last two are independent copies: a stacked expert kernel [E, D, F] gets
    fan-in D (not E·D), each expert its own draw. OpenMoE uses "truncated_normal" for the dense
    MLP and "normal" for experts (the same gins); jax rescales the truncated normal to keep the std.
    """
    if len(shape) < 2:
        raise ValueError(f"ffn_init shape={shape}: needs at least 2 axes (..., fan_in, fan_out)")
    if distribution not in ("truncated_normal", "normal", "uniform"):
        raise ValueError(f"ffn_init distribution={distribution!r}: must be 'truncated_normal', "
                         "'normal' or 'uniform'")
    init = jax.nn.initializers.variance_scaling(
        scale, "fan_in", distribution, in_axis=-2, out_axis=-1,
        batch_axis=tuple(range(len(shape) - 2)))
    return init(key, shape, dtype)


def init_kernels(rngs: nnx.Rngs, d_model: int, d_ff: int, variant: str = "double_gated", *,
                 leading: tuple[int, ...] = (), scale: float = 0.1,
                 distribution: str = "truncated_normal") -> dict[str, nnx.Param]:
    """The three kernels as f32 Params with their logical axes; `leading=(E,)` stacks E experts.

    wi_0 is drawn as one [D, 2F] matrix (fan-in D), as OpenMoE's checkpoints hold it, and then
    viewed as [D, 2, F]: its first half is a, its second half b.
    """
    axes = ffn_logical_axes(variant)
    kernels = {}
    for name, shape in ffn_kernel_shapes(d_model, d_ff, variant).items():
        drawn_shape = (*shape[:-2], shape[-2] * shape[-1]) if len(shape) == 3 else shape
        value = ffn_init(rngs.params(), (*leading, *drawn_shape), scale=scale,
                         distribution=distribution).reshape(*leading, *shape)
        kernels[name] = nnx.Param(value, logical_axes=("expert",) * len(leading) + axes[name])
    return kernels


def swiglu(x_D, wi_0, wi_1_DF, wo_FD, variant: str = "double_gated", dtype=jnp.float32, *,
           one_gate_matmul: bool = False, matmul=jnp.matmul):
    """The FFN as a pure function: x [..., D] → y [..., D], all math in `dtype`.

    For "double_gated", wi_0 is [D, 2, F]: x·wi_0 gives the pair (a, b) for every hidden unit,
    and hidden = a · silu(b) · (x·wi_1). For "swiglu", wi_0 is [D, F] and
    hidden = silu(x·wi_0) · (x·wi_1). Then y = hidden·wo. Plain matmuls, so `jax.vmap` over a
    stacked expert axis turns them into batched matmuls.

    `one_gate_matmul` picks how the double-gated pair is computed; the numbers are the same.
    False (the dense FFN): two matmuls, on the halves wi_0[:, 0] and wi_0[:, 1]. True (05's
    experts): one matmul on wi_0 viewed as the [D, 2F] matrix it is in memory, then a and b are
    split off the output, so E experts' kernels are never copied in halves. Use True only where
    F is whole on the device: if F is split over devices, the [D, 2F] view interleaves its
    shards, and XLA moves the kernel to put them back in order.
    `matmul(x, kernel)` is every product; 05's ragged experts pass a grouped matmul, whose
    kernels carry a leading expert axis ([E, D, F]) and whose rows come in expert order.
    """
    _check_variant(variant)
    d_ff = wi_1_DF.shape[-1]
    expected = (2, d_ff) if variant == "double_gated" else (d_ff,)
    if wi_0.shape[-len(expected):] != expected:
        raise ValueError(f"swiglu: wi_0 has shape {wi_0.shape} but variant={variant!r} with "
                         f"d_ff={d_ff} needs [D, {', '.join(map(str, expected))}]")
    # All leading axes become one token axis N, so every product is a plain 2-D matmul, which
    # XLA:CPU runs faster than an einsum over [B, L, D] (figures: benchmarks/README.md).
    leading_shape = x_D.shape[:-1]
    # Parameters are stored in f32; the matmuls run in the activation dtype (bf16 on TPU).
    x_ND = x_D.reshape(-1, x_D.shape[-1]).astype(dtype)
    up_NF = matmul(x_ND, wi_1_DF.astype(dtype))
    if variant == "double_gated":
        # Released OpenMoE: a second gate; SiLU on b (the pair's second member), a stays linear.
        wi_0 = wi_0.astype(dtype)
        if one_gate_matmul:
            gate = matmul(x_ND, wi_0.reshape(*wi_0.shape[:-2], 2 * d_ff))  # [N, 2F]: a's, b's
            a_NF, b_NF = gate[:, :d_ff], gate[:, d_ff:]
        else:
            a_NF, b_NF = matmul(x_ND, wi_0[..., 0, :]), matmul(x_ND, wi_0[..., 1, :])
        hidden_NF = a_NF * jax.nn.silu(b_NF) * up_NF
    else:
        hidden_NF = jax.nn.silu(matmul(x_ND, wi_0.astype(dtype))) * up_NF
    y_ND = matmul(hidden_NF, wo_FD.astype(dtype))
    return y_ND.reshape(*leading_shape, y_ND.shape[-1])


class FeedForward(nnx.Module):
    """One dense FFN with f32 kernels wi_0, wi_1, wo, each tagged with its logical axes."""

    def __init__(self, cfg: FFNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # The dense MLP draws from a truncated normal (experts in 05 use a plain normal).
        kernels = init_kernels(rngs, cfg.d_model, cfg.d_ff, cfg.variant, scale=cfg.init_scale)
        self.wi_0, self.wi_1, self.wo = kernels["wi_0"], kernels["wi_1"], kernels["wo"]

    def __call__(self, x_D):
        return swiglu(x_D, self.wi_0[...], self.wi_1[...], self.wo[...],
                      self.cfg.variant, self.cfg.dtype)


if __name__ == "__main__":
    parser = cli.ArgumentParser(
        description="Self-test of the FFN: a worked double-gated SwiGLU example on a few tokens, "
                    "checked against NumPy, and the parameter/FLOP counts of OpenMoE-8B's FFN.")
    parser.add_argument("--variant", choices=VARIANTS, default="double_gated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example's weights")
    args = parser.parse_args()
    np.set_printoptions(precision=3, suppress=True)

    # A worked example small enough to read: 3 tokens, D=4, F=2; init scale 1 (OpenMoE: 0.1)
    # only so the printed numbers are not all zeros after three small factors are multiplied.
    cfg = FFNConfig(d_model=4, d_ff=2, variant=args.variant, init_scale=1.0)
    ffn = FeedForward(cfg, rngs=nnx.Rngs(args.seed))
    x_BLD = jnp.asarray(np.random.default_rng(args.seed).normal(size=(1, 3, 4)), jnp.float32)
    y_BLD = ffn(x_BLD)
    print(f"{cfg.variant} FFN, D={cfg.d_model}, F={cfg.d_ff}; kernel shapes and logical axes:")
    for name in ffn_logical_axes(cfg.variant):
        print(f"  {name}: {getattr(ffn, name)[...].shape} {getattr(ffn, name).logical_axes}")

    # The same computation step by step in NumPy, independent of the function above.
    x, wi_0, wi_1, wo = (np.asarray(v, np.float64) for v in (x_BLD[0], ffn.wi_0[...],
                                                             ffn.wi_1[...], ffn.wo[...]))
    wi_0 = wi_0.reshape(cfg.d_model, -1)  # [D, 2, F] → [D, 2F]: a's columns, then b's

    def silu(v):
        return v / (1 + np.exp(-v))

    gate, up = x @ wi_0, x @ wi_1
    if cfg.variant == "double_gated":
        a, b = gate[:, :cfg.d_ff], gate[:, cfg.d_ff:]
        print(f"\nx =\n{x}\na = first half of x·wi_0 =\n{a}\nb = second half =\n{b}")
        hidden = a * silu(b) * up
    else:
        print(f"\nx =\n{x}\ngate = x·wi_0 =\n{gate}")
        hidden = silu(gate) * up
    print(f"up = x·wi_1 =\n{up}\nhidden =\n{hidden}\ny = hidden·wo =\n{hidden @ wo}")
    if not np.allclose(np.asarray(y_BLD[0]), hidden @ wo, rtol=1e-4, atol=1e-6):
        sys.exit(f"self-test FAILED: FeedForward gave\n{np.asarray(y_BLD[0])}\n"
                 "but the NumPy computation above gives y")

    # The full-size numbers: OpenMoE-8B's FFN (one per block and one per expert).
    d_model, d_ff = 2048, 8192
    print(f"\nOpenMoE-8B FFN (D={d_model}, F={d_ff}):")
    for variant in VARIANTS:
        print(f"  {variant:12s}: {ffn_param_count(d_model, d_ff, variant):,} parameters, "
              f"{ffn_flops_per_token(d_model, d_ff, variant):,} forward FLOPs per token")
    counts = {variant: ffn_param_count(d_model, d_ff, variant) for variant in VARIANTS}
    if counts != {"double_gated": 4 * d_model * d_ff, "swiglu": 3 * d_model * d_ff}:
        sys.exit(f"self-test FAILED: parameter counts {counts}; expected 4·D·F double-gated "
                 "and 3·D·F swiglu")
    print("  (released weights: double-gated; the paper's parameter counts assume swiglu)")
    print("\nOK: the FFN matches NumPy and the parameter counts add up.")
