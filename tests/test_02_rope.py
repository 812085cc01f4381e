"""02_rope.py against an independent per-pair rotation written in NumPy float64, plus invariants."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load

rope = load("02_rope")


def rotate_pairs_reference(x, positions, base=10_000.0):
    """Turn pair (x[i], x[i + K/2]) by positions·base^(−2i/K) with a 2×2 matrix, in float64."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = np.asarray(positions, np.float64)[..., None] * base ** (-2.0 * i / x.shape[-1])
        cos, sin = np.cos(angle), np.sin(angle)
        out[..., i] = cos * x[..., i] - sin * x[..., i + half]
        out[..., i + half] = sin * x[..., i] + cos * x[..., i + half]
    return out


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("head_dim", [2, 8, 64, 128])
@pytest.mark.parametrize("offset", [0, 5, 1000])
def test_matches_independent_formula(head_dim, offset):
    x_BLHK = _normal((2, 5, 3, head_dim))
    # Each sequence at its own offset, as in KV-cache decoding.
    positions_BL = offset + jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    got = rope.apply_rope(x_BLHK, positions_BL)
    assert got.shape == x_BLHK.shape and got.dtype == x_BLHK.dtype
    np.testing.assert_allclose(np.asarray(got), rotate_pairs_reference(x_BLHK, positions_BL),
                               atol=2e-4)


def test_other_base_and_broadcast_positions():
    x_BLHK = _normal((3, 4, 2, 16))
    got = rope.apply_rope(x_BLHK, jnp.arange(4)[None, :], max_timescale=500.0)
    want = rotate_pairs_reference(x_BLHK, np.broadcast_to(np.arange(4), (3, 4)), base=500.0)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_frequencies():
    theta = rope.rope_frequencies(8)
    np.testing.assert_allclose(theta, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    theta = rope.rope_frequencies(128)
    assert theta.shape == (64,) and theta[0] == 1.0
    np.testing.assert_allclose(theta[-1], 10_000.0 ** (-126 / 128), rtol=1e-6)


def test_position_zero_is_identity():
    x_BLHK = _normal((1, 3, 2, 8))
    np.testing.assert_array_equal(rope.apply_rope(x_BLHK, jnp.zeros((1, 3), jnp.int32)), x_BLHK)


@pytest.mark.parametrize("shift", [1, 37, 2000])
def test_relativity(shift):
    q_11HK, k_11HK = _normal((1, 1, 4, 64), 1), _normal((1, 1, 4, 64), 2)

    def score_H(m, n):
        q = rope.apply_rope(q_11HK, jnp.full((1, 1), m))
        k = rope.apply_rope(k_11HK, jnp.full((1, 1), n))
        return np.asarray(jnp.einsum("blhk,blhk->h", q, k))

    np.testing.assert_allclose(score_H(10 + shift, 3 + shift), score_H(10, 3), rtol=1e-3,
                               atol=1e-3)
    # And it does depend on the distance: a different m − n gives different scores.
    assert not np.allclose(score_H(10, 3), score_H(11, 3), atol=1e-2)


def test_norms_preserved():
    x_BLHK = _normal((2, 6, 3, 32))
    positions_BL = jnp.array([[0, 1, 2, 500, 1000, 2047], [3, 3, 3, 9, 9, 9]])
    out = rope.apply_rope(x_BLHK, positions_BL)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x_BLHK, axis=-1),
                               rtol=1e-5)


def test_complex_formulation():
    x_BLHK = _normal((2, 4, 2, 16))
    positions_BL = jnp.array([[0, 1, 2, 3], [100, 101, 102, 103]])
    z = np.asarray(x_BLHK[..., :8], np.float64) + 1j * np.asarray(x_BLHK[..., 8:], np.float64)
    angle = np.asarray(positions_BL)[..., None, None] * 10_000.0 ** (-np.arange(8) / 8)
    z = z * np.exp(1j * angle)
    np.testing.assert_allclose(np.asarray(rope.apply_rope(x_BLHK, positions_BL)),
                               np.concatenate([z.real, z.imag], axis=-1), atol=1e-4)


def test_decoding_one_step_equals_full_sequence():
    # KV-cache decoding rotates one new token at its position; it must match the full pass.
    x_BLHK = _normal((2, 6, 2, 8))
    full = rope.apply_rope(x_BLHK, jnp.broadcast_to(jnp.arange(6), (2, 6)))
    step = rope.apply_rope(x_BLHK[:, 4:5], jnp.full((2, 1), 4))
    np.testing.assert_allclose(step, full[:, 4:5], atol=1e-6)


def test_bfloat16_keeps_dtype_and_is_close_to_float32():
    x_BLHK = _normal((2, 8, 2, 64))
    positions_BL = jnp.broadcast_to(jnp.arange(2040, 2048), (2, 8))
    out_bf16 = rope.apply_rope(x_BLHK.astype(jnp.bfloat16), positions_BL)
    assert out_bf16.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out_bf16, np.float32)).all()
    # Angles are f32 even for bf16 inputs, so only bf16 rounding of x, sin/cos and the sum remains.
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32),
                               rope.apply_rope(x_BLHK, positions_BL), atol=5e-2)


@pytest.mark.parametrize("kwargs, field", [({"head_dim": 7}, "head_dim"),
                                           ({"head_dim": 0}, "head_dim"),
                                           ({"max_timescale": 1.0}, "max_timescale")])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        rope.RopeConfig(**kwargs)
    assert rope.RopeConfig().head_dim == 128 and rope.RopeConfig().max_timescale == 10_000.0


def test_odd_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim=5"):
        rope.apply_rope(jnp.zeros((1, 1, 1, 5)), jnp.zeros((1, 1)))
