"""03_swiglu.py against a float64 NumPy forward and hand-derived backward pass, plus its helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load

ffn = load("03_swiglu")

D, F = 8, 6


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def forward_and_grads_reference(x, wi_0, wi_1, wo, dy, variant):
    """y and the gradients of sum(y · dy) w.r.t. (x, wi_0, wi_1, wo), by the chain rule in float64.

    silu(v) = v·σ(v), so silu'(v) = σ(v)·(1 + v·(1 − σ(v))).
    """
    x, wi_0, wi_1, wo, dy = (np.asarray(v, np.float64) for v in (x, wi_0, wi_1, wo, dy))
    gate_shape = wi_0.shape
    wi_0 = wi_0.reshape(wi_0.shape[0], -1)  # double-gated [D, 2, F] → [D, 2F] = [a's | b's]
    gate, up = x @ wi_0, x @ wi_1
    if variant == "double_gated":
        a, b = gate[..., :F], gate[..., F:]
        silu_b = b * sigmoid(b)
        hidden = a * silu_b * up
    else:
        silu_g = gate * sigmoid(gate)
        hidden = silu_g * up
    y = hidden @ wo
    d_hidden = dy @ wo.T
    if variant == "double_gated":
        d_silu_b = sigmoid(b) * (1 + b * (1 - sigmoid(b)))
        d_gate = np.concatenate([d_hidden * silu_b * up, d_hidden * a * up * d_silu_b], axis=-1)
        d_up = d_hidden * a * silu_b
    else:
        d_gate = d_hidden * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
        d_up = d_hidden * silu_g
    # Kernel gradients sum the outer products over every token (all leading axes).
    def outer(u, v):
        return u.reshape(-1, u.shape[-1]).T @ v.reshape(-1, v.shape[-1])

    grads = (d_gate @ wi_0.T + d_up @ wi_1.T,
             outer(x, d_gate).reshape(gate_shape), outer(x, d_up), outer(hidden, dy))
    return y, grads


def _random(shape, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _inputs(variant, seed=0):
    shapes = ffn.ffn_kernel_shapes(D, F, variant)
    x_BLD = _random((2, 3, D), seed)
    kernels = [_random(shapes[name], seed + i, 0.5) for i, name in enumerate(shapes, start=1)]
    return x_BLD, kernels


@pytest.mark.parametrize("variant, one_gate_matmul",
                         [("double_gated", False), ("double_gated", True), ("swiglu", False)])
def test_forward_matches_numpy(variant, one_gate_matmul):
    x_BLD, kernels = _inputs(variant)
    y_BLD = ffn.swiglu(x_BLD, *kernels, variant=variant, one_gate_matmul=one_gate_matmul)
    want, _ = forward_and_grads_reference(x_BLD, *kernels, np.zeros((2, 3, D)), variant)
    assert y_BLD.shape == (2, 3, D) and y_BLD.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y_BLD), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, one_gate_matmul",
                         [("double_gated", False), ("double_gated", True), ("swiglu", False)])
def test_gradients_match_hand_derived_backward(variant, one_gate_matmul):
    # Both ways of computing the double-gated pair (two sliced matmuls, or one on [D, 2F]).
    x_BLD, kernels = _inputs(variant, seed=10)
    dy_BLD = _random((2, 3, D), 20)

    def loss(x, wi_0, wi_1, wo):
        y = ffn.swiglu(x, wi_0, wi_1, wo, variant=variant, one_gate_matmul=one_gate_matmul)
        return jnp.sum(y * dy_BLD)

    got = jax.grad(loss, argnums=(0, 1, 2, 3))(x_BLD, *kernels)
    _, want = forward_and_grads_reference(x_BLD, *kernels, dy_BLD, variant)
    for name, g, w in zip(["x", "wi_0", "wi_1", "wo"], got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_vmap_over_stacked_experts_equals_loop():
    # 05 runs every expert at once with jax.vmap over a leading E axis of x and the kernels.
    E, C = 3, 4
    shapes = ffn.ffn_kernel_shapes(D, F, "double_gated")
    wi_0, wi_1, wo = (_random((E, *shape), seed, 0.5) for seed, shape in enumerate(shapes.values()))
    x_ECD = _random((E, C, D), 1)
    batched = jax.vmap(ffn.swiglu)(x_ECD, wi_0, wi_1, wo)
    for e in range(E):
        np.testing.assert_allclose(batched[e], ffn.swiglu(x_ECD[e], wi_0[e], wi_1[e], wo[e]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["double_gated", "swiglu"])
def test_bfloat16_is_finite_and_close_to_float32(variant):
    x_BLD, kernels = _inputs(variant, seed=3)
    y32 = ffn.swiglu(x_BLD, *kernels, variant=variant)
    y16 = ffn.swiglu(x_BLD.astype(jnp.bfloat16), *kernels, variant=variant, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    y16 = np.asarray(y16, np.float32)
    assert np.isfinite(y16).all()
    # bf16 keeps ~3 significant digits; errors of a few × 2^-8 relative to the output's scale.
    np.testing.assert_allclose(y16, y32, atol=0.03 * np.abs(y32).max())


def test_feed_forward_module():
    cfg = ffn.FFNConfig(d_model=D, d_ff=F)
    module = ffn.FeedForward(cfg, rngs=nnx.Rngs(0))
    for name, shape in ffn.ffn_kernel_shapes(D, F, "double_gated").items():
        param = getattr(module, name)
        assert param[...].shape == shape and param[...].dtype == jnp.float32
        assert param.logical_axes == ffn.ffn_logical_axes()[name]
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert n_params == ffn.ffn_param_count(D, F) == 4 * D * F
    x_BLD = _random((2, 3, D), 5)
    y_BLD = jax.jit(lambda m, x: m(x))(module, x_BLD)
    want = ffn.swiglu(x_BLD, module.wi_0[...], module.wi_1[...], module.wo[...])
    np.testing.assert_allclose(y_BLD, want, rtol=1e-5, atol=1e-7)
    # bf16 activations: the output is bf16 while the parameters stay f32.
    module16 = ffn.FeedForward(ffn.FFNConfig(D, F, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    assert module16(x_BLD).dtype == jnp.bfloat16 and module16.wo[...].dtype == jnp.float32


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal"])
def test_init_is_variance_scaling_fan_in_per_expert(distribution):
    E, fan_in, fan_out = 4, 256, 512
    w = ffn.ffn_init(jax.random.key(1), (E, fan_in, fan_out), scale=0.1, distribution=distribution)
    # std = sqrt(0.1 / fan_in) for each expert: the expert axis does not count towards fan-in.
    np.testing.assert_allclose(np.std(np.asarray(w), axis=(1, 2)), np.sqrt(0.1 / fan_in), rtol=0.02)
    assert not np.allclose(w[0], w[1])
    if distribution == "truncated_normal":
        assert np.abs(np.asarray(w)).max() <= 2 * np.sqrt(0.1 / fan_in) / 0.87962566 + 1e-6


def test_counts_for_openmoe_8b():
    assert ffn.ffn_kernel_shapes(2048, 8192) == {
        "wi_0": (2048, 2, 8192), "wi_1": (2048, 8192), "wo": (8192, 2048)}
    assert ffn.ffn_kernel_shapes(2048, 8192, "swiglu")["wi_0"] == (2048, 8192)
    assert ffn.ffn_param_count(2048, 8192) == 67_108_864
    assert ffn.ffn_param_count(2048, 8192, "swiglu") == 50_331_648
    assert ffn.ffn_flops_per_token(2048, 8192) == 8 * 2048 * 8192
    assert ffn.ffn_flops_per_token(2048, 8192, "swiglu") == 6 * 2048 * 8192


@pytest.mark.parametrize("kwargs, field", [({"d_model": 0}, "d_model"), ({"d_ff": -1}, "d_ff"),
                                           ({"variant": "geglu"}, "variant"),
                                           ({"init_scale": 0.0}, "init_scale"),
                                           ({"dtype": jnp.int32}, "dtype")])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ffn.FFNConfig(**kwargs)


def test_clear_errors_for_bad_function_arguments():
    x_BLD, (wi_0, wi_1, wo) = _inputs("swiglu")
    with pytest.raises(ValueError, match=r"wi_0 has shape \(8, 6\) but .* needs \[D, 2, 6\]"):
        ffn.swiglu(x_BLD, wi_0, wi_1, wo, "double_gated")
    with pytest.raises(ValueError, match="variant"):
        ffn.swiglu(x_BLD, wi_0, wi_1, wo, "relu")
    with pytest.raises(ValueError, match="distribution"):
        ffn.ffn_init(jax.random.key(0), (4, 4), distribution="orthogonal")
