"""Chapter 2: rotary position embeddings (RoPE): attention learns *relative* positions by rotation.

RoPE (Su et al. 2021) tells attention where each token is without adding anything to the
embeddings: before the dot product, each query and key vector is split into K/2 pairs, and
pair i is rotated by the angle position · θ_i. Rotations compose, so q·k ends up depending only
on how far apart the two tokens are (derivation in `apply_rope`). The OpenMoE paper inherits
this from its ST-MoE/LLaMA-style decoder (paper §2.2). OpenMoE was trained with T5X (Google's
JAX training framework, configured by `.gin` files) on layers from flaxformer (T5X's library of
transformer layers); the released code is flaxformer's `components/embedding.py`
(`generate_fixed_pos_embedding`, `apply_rotary_embedding`).
OpenMoE's variant (Fuzhao Xue's flaxformer fork, `use_rotary_embedding=True` in
`t5x/configs/moe/architectures/moe_decoder_only.gin`): it rotates the *full* head_dim,
θ_i = 10000^(−2i/K), in the rotate-half (GPT-NeoX) layout where pair i is (x[i], x[i + K/2]);
sin/cos are computed in float32 and cast to the activation dtype (bf16 on TPU).
Positions are an explicit argument, so one function serves training (0…L−1), packed rows
(several documents in one row, each numbered from 0) and KV-cache decoding (06's generation: one
new token at a time against the stored keys and values of the earlier ones, each sequence at its
own offset).
Left out on purpose: partial rotation, interleaved pairs, and context-extension tricks (NTK,
YaRN, position interpolation), none of which OpenMoE uses.
Run the self-test: `python 02_rope.py` (`--help` for options).

Shape legend, used by every chapter: an array's name ends in its axes, one letter each, in
order (x_BLHK is [B, L, H, K]); a digit is an axis of that size (cos_BL1K: 1, broadcast over H).
  B batch rows                            E experts
  L sequence positions (queries)          A a token's assignments (its top-k choices)
  S key positions (keys, KV-cache slots)  G routing groups
  N a flat set of tokens (B·L or G·T)     T tokens per group
  M a flat set of assignments (N·A)       C capacity slots of one expert (per group)
  D d_model (a token's width)   F d_ff (the hidden width of 03's feed-forward network, FFN)
  H attention heads   K head_dim   V vocabulary
The right-hand letters belong to the mixture-of-experts layer (04, 05): a router sends each token
to k of E expert FFNs; it routes tokens in groups, and each expert takes at most C of a group's
assignments.
An argument that takes any leading axes names only its last ones: 03's `swiglu(x_D, …)` is
given [B, L, D], [G, T, D] or [N, D] alike.
"""

import sys
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from support import cli


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int = 128  # K, the size of each attention head; OpenMoE-8B/34B: 128, Base: 64
    max_timescale: float = 10_000.0  # the base: pair i turns max_timescale^(−2i/K) rad per token

    def __post_init__(self):
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"RopeConfig.head_dim={self.head_dim}: must be a positive even "
                             "number, because RoPE rotates the head's features in pairs")
        if not self.max_timescale > 1:
            raise ValueError(f"RopeConfig.max_timescale={self.max_timescale}: must be > 1 so "
                             "the pairs turn at different speeds (OpenMoE uses 10000)")


def rope_frequencies(head_dim: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """Angular speed θ_i = max_timescale^(−2i/K) of pair i, in radians per position, shape [K/2].

    Pair 0 turns one radian per token; the last pair barely moves, so together the pairs
    read position at every scale, like the hands of a clock. E.g. K=4: [1.0, 0.01].
    """
    RopeConfig(head_dim, max_timescale)  # same validation, same error messages
    exponents = 2 * np.arange(head_dim // 2, dtype=np.float32) / head_dim
    return (1.0 / max_timescale**exponents).astype(np.float32)


def rotation(positions_BL, head_dim: int, max_timescale: float = 10_000.0):
    """cos(pθ) and sin(pθ) for every position and feature, f32 [B, L, 1, K] each (see apply_rope).

    They depend on positions only, so a model computes them once and every layer's queries and
    keys reuse them. The [f, f] tiling makes feature i and feature i + K/2 share one angle: they
    are one pair. The trailing 1 is the head axis: every head turns the same way.
    """
    theta = jnp.asarray(rope_frequencies(head_dim, max_timescale))
    # Angles in float32: position · θ reaches thousands of radians, far beyond bf16's precision.
    angle_BLK = positions_BL.astype(jnp.float32)[..., None] * jnp.concatenate([theta, theta])
    return jnp.cos(angle_BLK)[..., None, :], jnp.sin(angle_BLK)[..., None, :]


def rotate(x_BLHK, cos_BL1K, sin_BL1K):
    """x · cos + rotate_half(x) · sin, in x's dtype, with the angles of `rotation`."""
    first_BLHK, second_BLHK = jnp.split(x_BLHK, 2, axis=-1)
    rotated_half_BLHK = jnp.concatenate([-second_BLHK, first_BLHK], axis=-1)
    return x_BLHK * cos_BL1K.astype(x_BLHK.dtype) + rotated_half_BLHK * sin_BL1K.astype(x_BLHK.dtype)


def apply_rope(x_BLHK, positions_BL, max_timescale: float = 10_000.0):
    """Rotate each head vector of x by its token's position; returns x's shape and dtype.

    Layout (rotate-half): the pair with frequency θ_i is (x[i], x[i + K/2]), and
        out = x · cos(pθ) + rotate_half(x) · sin(pθ),
        rotate_half(x) = concat(−x[K/2:], x[:K/2]),
    with cos/sin tiled as [f, f] over the two halves. `positions_BL` may broadcast ([1, L]).

    Why q·k depends only on m − n: read pair i of a vector as the complex number
    z_i = x[i] + j·x[i + K/2]. The formula above is z_i ↦ z_i · e^{j·p·θ_i} (check: the real
    part is x[i]cos − x[i+K/2]sin, the imaginary part x[i]sin + x[i+K/2]cos). For real vectors,
    q·k = Re Σ_i q_i · conj(k_i). Rotating q at position m and k at position n gives
        Re Σ_i q_i e^{jmθ_i} · conj(k_i e^{jnθ_i}) = Re Σ_i q_i conj(k_i) · e^{j(m−n)θ_i},
    which contains m and n only through m − n. And |e^{jφ}| = 1, so norms are unchanged.
    """
    return rotate(x_BLHK, *rotation(positions_BL, x_BLHK.shape[-1], max_timescale))


if __name__ == "__main__":
    parser = cli.ArgumentParser(
        description="Self-test of rotary position embeddings: prints the per-pair frequencies and "
                    "a tiny rotation, then checks relativity, norm preservation and the "
                    "complex-number formulation.")
    parser.add_argument("--head-dim", type=int, default=128, help="K, the head size (even)")
    parser.add_argument("--max-timescale", type=float, default=10_000.0, help="the RoPE base θ")
    args = parser.parse_args()
    try:
        cfg = RopeConfig(args.head_dim, args.max_timescale)
    except ValueError as error:
        parser.error(str(error))
    np.set_printoptions(precision=4, suppress=True)

    # Each pair turns at its own speed; the wavelength is how many tokens one full turn takes.
    theta = rope_frequencies(cfg.head_dim, cfg.max_timescale)
    print(f"RoPE over K={cfg.head_dim}: {len(theta)} pairs, base {cfg.max_timescale:g}")
    for i in sorted({0, 1, 2, len(theta) // 2, len(theta) - 1}):
        print(f"  pair {i:3d}: θ = {theta[i]:.6g} rad/token, one turn every "
              f"{2 * np.pi / theta[i]:,.1f} tokens")

    # A tiny example to follow by hand: K=4, so pair (x0, x2) turns 1 rad/token, (x1, x3) slowly.
    x_1L14 = jnp.tile(jnp.array([1.0, 1.0, 0.0, 0.0]), (1, 3, 1, 1))
    rotated_1L14 = apply_rope(x_1L14, jnp.arange(3)[None, :])
    print("\nK=4, the same vector [1, 1, 0, 0] at positions 0, 1, 2 becomes:")
    for position in range(3):
        print(f"  position {position}: {np.asarray(rotated_1L14[0, position, 0])}")
    print("  (features 0 and 2 trace cos p, sin p; features 1 and 3 barely move: θ_1 = 0.01)")

    # (a) Relativity: shifting both positions by the same amount leaves every q·k unchanged.
    rng = np.random.default_rng(0)
    q_11HK, k_11HK = (jnp.asarray(rng.normal(size=(1, 1, 4, cfg.head_dim)), jnp.float32)
                      for _ in range(2))

    def score_H(m, n):
        q = apply_rope(q_11HK, jnp.full((1, 1), m), cfg.max_timescale)
        k = apply_rope(k_11HK, jnp.full((1, 1), n), cfg.max_timescale)
        return np.asarray(jnp.einsum("blhk,blhk->h", q, k))

    base, shifted = score_H(7, 3), score_H(7 + 1000, 3 + 1000)
    print(f"\nq·k at (m, n) = (7, 3): {base}\nq·k at (1007, 1003):    {shifted}")
    if not np.allclose(base, shifted, rtol=1e-3, atol=1e-3):
        sys.exit("self-test FAILED: q·k changed when both positions moved by 1000; it must "
                 "depend only on m − n")

    # (b) Rotations preserve length.
    positions_1L = jnp.arange(0, 4096, 97)[None, :]
    x_1LHK = jnp.asarray(rng.normal(size=(1, positions_1L.shape[1], 4, cfg.head_dim)), jnp.float32)
    out_1LHK = apply_rope(x_1LHK, positions_1L, cfg.max_timescale)
    if not np.allclose(jnp.linalg.norm(out_1LHK, axis=-1), jnp.linalg.norm(x_1LHK, axis=-1),
                       rtol=1e-5):
        sys.exit("self-test FAILED: RoPE changed the length of a head vector")

    # (c) As complex numbers: pair i is x[i] + j·x[i+K/2], multiplied by e^{j·p·θ_i}.
    half = cfg.head_dim // 2
    x_np = np.asarray(x_1LHK, np.float64)
    z = (x_np[..., :half] + 1j * x_np[..., half:]) * np.exp(
        1j * np.asarray(positions_1L)[..., None, None] * theta.astype(np.float64))
    if not np.allclose(np.asarray(out_1LHK), np.concatenate([z.real, z.imag], -1), atol=1e-3):
        sys.exit("self-test FAILED: RoPE differs from multiplying x[i] + j·x[i+K/2] by e^{j·p·θ_i}")
    print("\nOK: relativity, norm preservation and the complex formulation all hold.")
