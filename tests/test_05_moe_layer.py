"""05_moe_layer.py: the three dispatch paths are one function; drops give zero; bad input fails."""

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load

moe = load("05_moe_layer")

CFG = moe.MoEConfig(d_model=8, d_ff=16, num_experts=4, max_group_size=16)
X_BLD = jax.random.normal(jax.random.key(1), (2, 16, 8))


@pytest.fixture(scope="module")
def layers():
    return moe.layers_per_dispatch(CFG)


@pytest.fixture(scope="module", params=[0.5, 1.25, 4.0], ids=["many-drops", "train-cf", "no-drops"])
def results(request, layers):
    return request.param, {name: moe.outputs_and_grads(layer, X_BLD, request.param)
                           for name, layer in layers.items()}


def test_layers_share_parameters(layers):
    states = [jax.tree.leaves(nnx.state(layer, nnx.Param)) for layer in layers.values()]
    for leaves in states[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(leaves, states[0]))


def test_paths_agree_on_outputs_and_gradients(results):
    capacity_factor, by_path = results
    y_oracle, stats, grads_oracle = by_path["loop"]
    # The three settings cover many drops, OpenMoE's training capacity, and none at all.
    dropped = float(stats["fraction_dropped"])
    assert (dropped == 0.0) == (capacity_factor == 4.0) and dropped < 0.9
    for name in ("einsum", "gather", "ragged"):
        y_BLD, _, grads = by_path[name]
        np.testing.assert_allclose(y_BLD, y_oracle, rtol=1e-5, atol=1e-7)
        assert len(grads) == len(grads_oracle) == 5  # router, wi_0, wi_1, wo, and x
        for grad, grad_oracle in zip(grads, grads_oracle):
            scale = float(jnp.max(jnp.abs(grad_oracle)))
            np.testing.assert_allclose(grad, grad_oracle, rtol=1e-4, atol=1e-5 * scale)


def test_tokens_dropped_by_every_expert_get_exactly_zero(results):
    capacity_factor, by_path = results
    _, stats, _ = by_path["loop"]
    left_behind_BL = ~np.asarray(stats["kept_BLA"]).any(-1)
    if capacity_factor == 0.5:
        assert left_behind_BL.any()
    for y_BLD, _, _ in by_path.values():
        assert np.all(np.asarray(y_BLD)[left_behind_BL] == 0)
        assert np.all(np.abs(np.asarray(y_BLD)[~left_behind_BL]).max(-1) > 0)


def test_dispatch_paths_match_a_hand_built_mixture():
    # y_t = Σ over kept choices of weight · FFN_e(x_t), written out with 03's swiglu.
    layer = moe.MoELayer(CFG, rngs=nnx.Rngs(0))
    y_BLD, stats = layer(X_BLD, capacity_factor=1.0)
    expert_BLA, kept_BLA = np.asarray(stats["expert_BLA"]), np.asarray(stats["kept_BLA"])
    probs_BLE = jax.nn.softmax(X_BLD @ layer.router.kernel[...])
    expected = np.zeros(X_BLD.shape, np.float32)
    for b, t, a in zip(*np.nonzero(kept_BLA)):
        e = expert_BLA[b, t, a]
        out = moe.ffn.swiglu(X_BLD[b, t], layer.wi_0[...][e], layer.wi_1[...][e], layer.wo[...][e])
        expected[b, t] += float(probs_BLE[b, t, e]) * np.asarray(out)
    np.testing.assert_allclose(y_BLD, expected, rtol=1e-5, atol=1e-7)


def test_stacked_experts_are_independent_draws_with_logical_axes(layers):
    layer = layers["gather"]
    assert layer.wi_0.logical_axes == ("expert", "embed", "pair", "mlp")
    assert layer.wo.logical_axes == ("expert", "mlp", "embed")
    wi_0 = np.asarray(layer.wi_0[...])
    assert wi_0.shape == (4, 8, 2, 16) and layer.wi_1[...].shape == (4, 8, 16)
    assert not np.allclose(wi_0[0], wi_0[1])
    # Fan-in is D (not E·D, and not the pair axis): experts show the std sqrt(0.1 / D) each.
    big = moe.MoELayer(dataclasses.replace(CFG, d_model=256, d_ff=256), rngs=nnx.Rngs(0))
    for kernel in (big.wi_0, big.wi_1):
        std_E = np.asarray(kernel[...]).reshape(CFG.num_experts, -1).std(axis=1)
        np.testing.assert_allclose(std_E, np.sqrt(0.1 / 256), rtol=0.05)


def test_stats_train_and_eval_capacity(layers):
    layer = layers["gather"]
    _, train_stats = layer(X_BLD, train=True)
    _, eval_stats = layer(X_BLD, train=False)
    assert train_stats["drop_rate_by_position"].shape == (16,)
    assert train_stats["expert_BLA"].shape == (2, 16, 2) and train_stats["kept_BLA"].dtype == bool
    assert float(eval_stats["fraction_dropped"]) <= float(train_stats["fraction_dropped"])

    # The capacity each mode uses, seen from outside: a router that sends every token first to
    # expert 0 and second to expert 1 fills both to capacity, and each keeps exactly C tokens
    # per group: the earliest. 2 rows of 16 tokens are 2 groups of T = 16, E = 4, so by hand
    # train C = max(4, round(1.25 · 16 / 4)) = 5 and eval C = max(4, round(2.0 · 16 / 4)) = 8.
    assert (CFG.train_capacity_factor, CFG.eval_capacity_factor, CFG.min_capacity) == (1.25, 2.0, 4)
    skewed = moe.MoELayer(CFG, rngs=nnx.Rngs(0))
    skewed.router.kernel[...] = jnp.zeros((CFG.d_model, 4)).at[:, 0].set(1.0).at[:, 1].set(0.5)
    x_BLD = jnp.abs(X_BLD) + 0.1  # positive inputs: logits e0 > e1 > e2 = e3 = 0
    for train, capacity_factor in ((True, 1.25), (False, 2.0)):
        capacity = max(4, round(capacity_factor * 16 / 4))
        _, stats = skewed(x_BLD, train=train)
        np.testing.assert_array_equal(np.asarray(stats["expert_BLA"]).reshape(-1, 2), [[0, 1]] * 32)
        kept_GTA = np.asarray(stats["kept_BLA"]).reshape(2, 16, 2)
        for choice in range(2):
            np.testing.assert_array_equal(kept_GTA[:, :, choice], [np.arange(16) < capacity] * 2)
        # The metric that divides by C: 2 groups · 2 full experts · C kept of 2 · 4 · C slots.
        assert float(stats["expert_usage"]) == pytest.approx(0.5)
        assert float(stats["fraction_dropped"]) == pytest.approx(1 - capacity / 16)


def test_bfloat16_activations_keep_an_f32_router(layers):
    cfg = dataclasses.replace(CFG, dtype=jnp.bfloat16)
    y = {name: moe.MoELayer(dataclasses.replace(cfg, dispatch=name), rngs=nnx.Rngs(0))(
        X_BLD.astype(jnp.bfloat16))[0] for name in moe.DISPATCHES}
    assert all(v.dtype == jnp.bfloat16 for v in y.values())
    np.testing.assert_allclose(np.asarray(y["gather"], np.float32),
                               np.asarray(y["loop"], np.float32), rtol=0.05, atol=1e-3)
    _, stats = layers["gather"](X_BLD.astype(jnp.bfloat16))
    assert stats["router_z_loss"].dtype == jnp.float32


def test_gather_path_has_no_one_hot_and_no_scatter_add():
    # Sizes where a [G, T, E, C] tensor would dwarf every legitimate intermediate.
    cfg = moe.MoEConfig(d_model=8, d_ff=8, num_experts=16, max_group_size=256)
    layer = moe.MoELayer(cfg, rngs=nnx.Rngs(0))
    x_BLD = jnp.ones((1, 256, 8))
    tokens, capacity = 256, cfg.capacity(256, 1.25)

    def loss(layer, x_BLD):
        return jnp.sum(layer(x_BLD)[0])

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(layer, x_BLD)
    text = str(jaxpr)
    assert "scatter-add" not in text and "scatter_add" not in text

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) < tokens * cfg.num_experts * capacity // 4


@pytest.mark.parametrize("kwargs, field", [
    ({"dispatch": "sparse"}, "dispatch"),
    ({"top_k": 5}, "top_k"),
    ({"ffn_variant": "geglu"}, "variant"),
    ({"train_capacity_factor": 0}, "train_capacity_factor"),
])
def test_bad_config_is_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(CFG, **kwargs)


def test_bad_input_is_a_clear_error(layers):
    layer = layers["gather"]
    with pytest.raises(ValueError, match="float"):
        layer(jnp.ones((2, 16, 8), jnp.int32))
    with pytest.raises(ValueError, match="D=8"):
        layer(jnp.ones((2, 16, 6)))
    # 17 tokens cannot form an even number of equal groups (e.g. two batch shards' worth).
    uneven = moe.MoELayer(dataclasses.replace(CFG, group_multiple=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group_multiple=2"):
        uneven(jnp.ones((1, 17, 8)))
    with pytest.raises(ValueError, match="capacity_factor"):
        layer(X_BLD, capacity_factor=0.0)


def test_flaxformer_padding_routes_zero_tokens_after_the_real_ones():
    # 1 row of 6 tokens, E = 4: flaxformer's rule appends 2 zero positions (8 tokens, 4 groups
    # of 2). The layer must equal routing the explicitly zero-padded input and cutting it back.
    cfg = dataclasses.replace(CFG, num_experts=4, group_rule="flaxformer")
    layer = moe.MoELayer(cfg, rngs=nnx.Rngs(0))
    x_BLD = jax.random.normal(jax.random.key(5), (1, 6, cfg.d_model))
    y_BLD, stats = layer(x_BLD, train=False)
    padded_BLD = jnp.pad(x_BLD, ((0, 0), (0, 2), (0, 0)))
    y_padded_BLD, padded_stats = layer(padded_BLD, train=False)
    assert y_BLD.shape == x_BLD.shape and stats["expert_BLA"].shape == (1, 6, 2)
    np.testing.assert_allclose(y_BLD, y_padded_BLD[:, :6], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stats["kept_BLA"], padded_stats["kept_BLA"][:, :6])
    # Zero tokens have all-zero router logits: a uniform softmax, so experts 0 and 1.
    np.testing.assert_array_equal(padded_stats["expert_BLA"][0, 6:], [[0, 1], [0, 1]])


@pytest.mark.parametrize("dispatch", ["ragged", "gather"])
def test_dropless_serves_every_assignment_and_equals_the_oracle(dispatch):
    # Dropless at OpenMoE's training capacity factor: nothing is dropped, and the result equals
    # the loop oracle with a capacity so large that nothing could drop.
    dropless = moe.MoELayer(dataclasses.replace(CFG, dispatch=dispatch, dropless=True),
                            rngs=nnx.Rngs(0))
    oracle = moe.MoELayer(dataclasses.replace(CFG, dispatch="loop"), rngs=nnx.Rngs(0))
    y_BLD, stats, grads = moe.outputs_and_grads(dropless, X_BLD, 1.25)
    y_oracle, _, grads_oracle = moe.outputs_and_grads(oracle, X_BLD, float(CFG.num_experts))
    assert float(stats["fraction_dropped"]) == 0.0
    np.testing.assert_allclose(y_BLD, y_oracle, rtol=1e-5, atol=1e-7)
    for grad, grad_oracle in zip(grads, grads_oracle):
        scale = float(jnp.max(jnp.abs(grad_oracle)))
        np.testing.assert_allclose(grad, grad_oracle, rtol=1e-4, atol=1e-5 * scale)


def test_ragged_through_a_buffer_runner_equals_the_oracle():
    # Under 07's expert parallelism, "ragged" exchanges gather's fixed-size buffers and runs the
    # experts with `compute=apply_experts_grouped`; a stand-in runner that computes in place
    # must give the oracle's outputs. The oracle itself refuses such a runner.
    def runner(buffers_GECD, experts, variant, dtype, compute=moe.apply_experts):
        return compute(buffers_GECD, experts, variant, dtype)

    def run_groups(layer_fn, *arrays):
        return layer_fn(*arrays, runner)

    for name, dropless in (("ragged", False), ("ragged", True), ("loop", False)):
        layer = moe.MoELayer(dataclasses.replace(CFG, dispatch=name, dropless=dropless),
                             rngs=nnx.Rngs(0), run_groups=run_groups)
        if name == "loop":
            with pytest.raises(ValueError, match="loop"):
                layer(X_BLD)
            continue
        oracle = moe.MoELayer(dataclasses.replace(CFG, dispatch="loop", dropless=dropless),
                              rngs=nnx.Rngs(0))
        np.testing.assert_allclose(layer(X_BLD)[0], oracle(X_BLD)[0], rtol=1e-5, atol=1e-6)


def test_grouped_experts_skip_empty_slots_and_match_batched_experts():
    layer = moe.MoELayer(CFG, rngs=nnx.Rngs(0))
    experts = (layer.wi_0[...], layer.wi_1[...], layer.wo[...])
    buffers_GECD = jax.random.normal(jax.random.key(3), (2, CFG.num_experts, 5, CFG.d_model))
    buffers_GECD = buffers_GECD.at[:, :, 3:].set(0.0).at[0, 1].set(0.0)  # empty slots
    grouped = moe.apply_experts_grouped(buffers_GECD, experts, CFG.ffn_variant, jnp.float32)
    batched = moe.apply_experts(buffers_GECD, experts, CFG.ffn_variant, jnp.float32)
    np.testing.assert_allclose(grouped, batched, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grouped)[:, :, 3:] == 0)


def test_reads_chosen_experts_only_when_nothing_can_drop_and_it_reads_less():
    # A decode step of OpenMoE-Base (E = 16, k = 2): one token in a group of one, C = 4.
    assert moe.reads_chosen_experts(1, 1, 4, top_k=2, num_experts=16)
    assert moe.reads_chosen_experts(8, 1, 4, top_k=2, num_experts=16)  # 8 rows: 16 kernels
    assert not moe.reads_chosen_experts(9, 1, 4, top_k=2, num_experts=16)  # more than E
    assert not moe.reads_chosen_experts(2, 5, 4, top_k=2, num_experts=16)  # T > C could drop


@pytest.mark.parametrize("group_rule", ["divisor", "flaxformer"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_sized_calls_read_chosen_experts_and_equal_every_path(group_rule, batch,
                                                                     monkeypatch):
    # batch × 1 tokens, E = 4, k = 2: N·k ≤ E and T ≤ C, so every path but the oracle reads
    # only the chosen experts; flaxformer's rule first pads to 4 tokens (zero tokens).
    cfg = dataclasses.replace(CFG, group_rule=group_rule)
    x_BLD = X_BLD[:batch, :1]
    chosen_calls = []
    dispatch_chosen = moe.dispatch_chosen
    monkeypatch.setattr(moe, "dispatch_chosen",
                        lambda *args: chosen_calls.append(1) or dispatch_chosen(*args))

    def run(name):
        layer = moe.MoELayer(dataclasses.replace(cfg, dispatch=name), rngs=nnx.Rngs(0))
        return moe.outputs_and_grads(layer, x_BLD, cfg.eval_capacity_factor)

    by_path = {name: run(name) for name in moe.DISPATCHES}
    assert len(chosen_calls) == 3  # gather, einsum, ragged; not the loop
    # The buffer path itself, with the switch turned off, is the fifth reference.
    monkeypatch.setattr(moe, "reads_chosen_experts", lambda *args: False)
    by_path["buffers"] = run("gather")
    assert len(chosen_calls) == 3
    y_oracle, stats_oracle, grads_oracle = by_path["loop"]
    for name, (y_BLD, stats, grads) in by_path.items():
        np.testing.assert_allclose(y_BLD, y_oracle, rtol=1e-6, atol=1e-7)
        for grad, grad_oracle in zip(grads, grads_oracle, strict=True):
            scale = float(jnp.max(jnp.abs(grad_oracle)))
            np.testing.assert_allclose(grad, grad_oracle, rtol=1e-5, atol=1e-6 * scale)
        assert stats.keys() == stats_oracle.keys() and float(stats["fraction_dropped"]) == 0.0
        for key in stats:
            np.testing.assert_allclose(stats[key], stats_oracle[key], rtol=1e-6, err_msg=key)


def test_chosen_experts_multiply_bfloat16_kernels_in_float32():
    # bf16 kernels, read as bf16 and multiplied in f32: the f32 layer on the same bf16-rounded
    # kernels and input, cast to bf16 at the end.
    layer = moe.MoELayer(dataclasses.replace(CFG, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    experts = [kernel[...].astype(jnp.bfloat16) for kernel in (layer.wi_0, layer.wi_1, layer.wo)]
    x_ND = X_BLD[0, :2].astype(jnp.bfloat16)
    expert_NA, weight_NA = jnp.array([[0, 3], [2, 1]]), jnp.array([[0.6, 0.3], [0.5, 0.2]])
    y_ND = moe.chosen_experts(x_ND, expert_NA, weight_NA, experts, CFG.ffn_variant, jnp.bfloat16)
    exact_ND = moe.chosen_experts(x_ND.astype(jnp.float32), expert_NA, weight_NA,
                                  [k.astype(jnp.float32) for k in experts], CFG.ffn_variant,
                                  jnp.float32)
    assert y_ND.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y_ND, exact_ND.astype(jnp.bfloat16))


# --- Routing variants: every dispatch path serves BPR, expert choice and a biased router -------
BIAS_E = jnp.array([0.3, -0.2, 0.1, 0.0])
VARIANTS = {"bpr": dict(batch_prioritized=True), "experts_choose": dict(routing="experts_choose"),
            "bias": dict(balance_bias_rate=0.001)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_path_serves_each_routing_variant_as_the_oracle_does(variant):
    layers = moe.layers_per_dispatch(dataclasses.replace(CFG, **VARIANTS[variant]))
    for layer in layers.values():
        if variant == "bias":  # a RoutingBias of zeros, then set as 09's balancing would
            assert isinstance(layer.router.bias, moe.router_lib.RoutingBias)
            np.testing.assert_array_equal(layer.router.bias[...], np.zeros(4, np.float32))
            layer.router.bias[...] = BIAS_E
    by_path = {name: moe.outputs_and_grads(layer, X_BLD, 1.0) for name, layer in layers.items()}
    y_oracle, stats, grads_oracle = by_path["loop"]
    assert 0 < float(stats["fraction_tokens_left_behind"]) < 1  # some tokens served, some not
    for name in ("einsum", "gather", "ragged"):
        y_BLD, _, grads = by_path[name]
        np.testing.assert_allclose(y_BLD, y_oracle, rtol=1e-5, atol=1e-7, err_msg=name)
        assert len(grads) == len(grads_oracle) == 5 + (variant == "bias")
        for grad, grad_oracle in zip(grads, grads_oracle):
            scale = float(jnp.max(jnp.abs(grad_oracle)))
            np.testing.assert_allclose(grad, grad_oracle, rtol=1e-4, atol=1e-5 * scale)
    # The routing really is the variant's: it differs from OpenMoE's plain queue here.
    plain = moe.MoELayer(CFG, rngs=nnx.Rngs(0))
    _, plain_stats = plain(X_BLD, capacity_factor=1.0)
    if variant == "experts_choose":
        assert stats["expert_BLA"].shape == (2, 16, 4) and float(stats["load_balance_loss"]) == 0
    else:
        assert not np.array_equal(stats["kept_BLA"], plain_stats["kept_BLA"]) or not (
            np.array_equal(stats["expert_BLA"], plain_stats["expert_BLA"]))
    if variant == "bias":  # no gradient reaches the bias
        assert float(jnp.abs(grads_oracle[0]).max()) == 0 and grads_oracle[0].shape == (4,)


def test_expert_choice_excludes_dropless_and_decodes_through_the_chosen_path():
    with pytest.raises(ValueError, match="dropless=True"):
        dataclasses.replace(CFG, routing="experts_choose", dropless=True)
    # One token: every expert takes it (C ≥ 1 = T), so it gets all E experts' mixture.
    cfg = dataclasses.replace(CFG, routing="experts_choose")
    gather, loop = (moe.MoELayer(dataclasses.replace(cfg, dispatch=d), rngs=nnx.Rngs(0))
                    for d in ("gather", "loop"))
    y_BLD, stats = gather(X_BLD[:1, :1], train=False)
    assert np.asarray(stats["kept_BLA"]).all()
    np.testing.assert_allclose(y_BLD, loop(X_BLD[:1, :1], train=False)[0], rtol=1e-5, atol=1e-7)
