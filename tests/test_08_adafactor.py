"""08_adafactor.py against optax.adafactor (the oracle), T5X mode per expert, the schedule, and
optimizer state on an 8-device ('data', 'expert', 'model') mesh."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import load

router_lib = load("04_router")
ada = load("08_adafactor")

# 1-D, 2-D (both orientations), a stacked-expert 3-D tensor and a router with a small side.
SHAPES = {"scale": (24,), "embedding": (40, 24), "out": (24, 40), "experts": (3, 24, 32),
          "router": (24, 3)}
AXES = {"scale": ("embed",), "embedding": ("vocab", "embed"), "out": ("embed", "vocab"),
        "experts": ("expert", "embed", "mlp"), "router": ("embed", "unmodeled")}


def _tree(shapes, seed, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.normal(size=s), dtype) for k, s in shapes.items()}


def _run(tx, params, steps, seed=1):
    """`steps` updates with fresh random gradients (the same for every optimizer); final params."""
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    for i in range(steps):
        grads = _tree({k: v.shape for k, v in params.items()}, seed + i, params["scale"].dtype,
                      scale=10.0 ** (i % 3 - 1))
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(a[k].astype(jnp.float32) - b[k].astype(jnp.float32))))
               for k in a)


schedule = ada.openmoe_schedule(ada.ScheduleConfig(peak=0.05, warmup_steps=10))


@pytest.mark.parametrize("case", [
    # Toy shapes factored (min dim 8), the default lr=None.
    dict(min_dim=8, lr=None),
    # Default min dim 128: nothing here is factored; a constant lr.
    dict(min_dim=128, lr=0.01),
    # OpenMoE's schedule shape, factored, bf16 parameters (statistics in bf16, as optax keeps them).
    dict(min_dim=8, lr=schedule, dtype=jnp.bfloat16),
    # The optional parts: momentum and decoupled weight decay.
    dict(min_dim=8, lr=schedule, beta1=0.9, weight_decay=1e-3),
])
def test_matches_optax_adafactor(case):
    dtype = case.get("dtype", jnp.float32)
    params = _tree(SHAPES, 0, dtype)
    ours = ada.adafactor(case["lr"], ada.AdafactorConfig(
        min_dim_size_to_factor=case["min_dim"], beta1=case.get("beta1"),
        weight_decay=case.get("weight_decay")))
    ref = optax.adafactor(case["lr"], min_dim_size_to_factor=case["min_dim"],
                          momentum=case.get("beta1"), weight_decay_rate=case.get("weight_decay"))
    # The state trees hold the same shapes and dtypes (v_row/v_col or v per leaf).
    ours_state, ref_state = ours.init(params), ref.init(params)[0]
    for name in ("v_row", "v_col", "v"):
        assert (jax.tree.map(lambda x: (x.shape, x.dtype), getattr(ours_state, name))
                == jax.tree.map(lambda x: (x.shape, x.dtype), getattr(ref_state, name)))
    got, want = _run(ours, params, 50), _run(ref, params, 50)
    assert all(got[k].dtype == dtype for k in got)
    # float32 round-off (the implementations agree bit for bit here); one bf16 ulp for bf16.
    assert _max_diff(got, want) <= (1e-6 if dtype == jnp.float32 else 1e-2)


def test_t5x_mode_without_batch_axes_is_optax():
    # Rank ≤ 2 and no expert axis: T5X falls back to optax's size heuristic and RMS over the
    # whole tensor, so in f32 the two modes agree.
    shapes = {k: s for k, s in SHAPES.items() if k != "experts"}
    params = _tree(shapes, 0)
    cfg = ada.AdafactorConfig(min_dim_size_to_factor=8)
    got = _run(ada.adafactor(0.01, cfg, logical_axes=AXES), params, 20)
    want = _run(optax.adafactor(0.01, min_dim_size_to_factor=8), params, 20)
    assert _max_diff(got, want) <= 1e-6


def test_t5x_plans_for_openmoe_parameters():
    def plan(axes, shape, min_dim=128):
        return ada.t5x_plan("p", shape, axes, ada.OPENMOE_FACTOR_RULES, min_dim)

    # Stacked experts: expert = batch, so RMS over the other axes; factored whatever the sizes.
    wi = plan(("expert", "embed", "mlp"), (4, 16, 32))
    assert wi.factored == ((1,), (2,)) and wi.rms_axes == (1, 2) and wi.stats_dtype == jnp.float32
    wo = plan(("expert", "mlp", "embed"), (4, 32, 16))
    assert wo.factored == ((2,), (1,)) and wo.rms_axes == (1, 2)
    # Two-axis kernels use optax's heuristic: second-largest axis is the row.
    assert plan(("vocab", "embed"), (1000, 256)).factored == ((1,), (0,))
    assert plan(("vocab", "embed"), (1000, 64)).factored is None
    # The router has no column axis ("unmodeled" → none): never factored; norms never.
    assert plan(("embed", "unmodeled"), (2048, 32)).factored is None
    assert plan(("embed",), (2048,)) == ada.LeafPlan(None, (0,), jnp.float32)
    # The optax heuristic on the same expert tensor averages over all axes.
    assert ada.optax_plan((4, 16, 32), jnp.float32, 8) == ada.LeafPlan(((1,), (2,)), (0, 1, 2),
                                                                       jnp.float32)
    with pytest.raises(ValueError, match="no Adafactor factor rule"):
        plan(("expert", "embed", "heads_and_more"), (4, 16, 32))
    with pytest.raises(ValueError, match="unfactored"):
        plan(("embed", "mlp", "unmodeled"), (16, 32, 4))
    with pytest.raises(ValueError, match="do not match shape"):
        plan(("embed", "mlp"), (16, 32, 4))


def test_t5x_mode_is_optax_on_each_expert_separately():
    # Two experts 100× apart in scale, gradients whose size jumps between steps so that update
    # clipping fires for one expert and not the other. T5X mode must equal optax.adafactor run on
    # each expert's [D, F] slice alone: its own factorization, clipping and parameter scale.
    rng = np.random.default_rng(0)
    experts = jnp.asarray(rng.normal(size=(2, 16, 24)) * np.array([1.0, 0.01])[:, None, None],
                          jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(2, 16, 24)) * np.array([1.0, 10.0 ** k])[:, None, None],
                         jnp.float32) for k in range(4)]
    cfg = ada.AdafactorConfig(min_dim_size_to_factor=8)
    t5x = ada.adafactor(0.01, cfg, logical_axes={"wi": ("expert", "embed", "mlp")})
    per_slice = optax.adafactor(0.01, min_dim_size_to_factor=8)
    optax_mode = ada.adafactor(0.01, cfg)

    def run(tx, p, expert=slice(None)):
        p = {"wi": p[expert]}
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update({"wi": g[expert]}, state, p)
            p = optax.apply_updates(p, updates)
        return p["wi"]

    got = run(t5x, experts)
    want = jnp.stack([run(per_slice, experts, e) for e in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # Relative change of each expert: equal in T5X mode; in optax mode the small expert moves
    # about 100× more, because its step is sized by the whole tensor's RMS.
    def relative(new):
        return [float(jnp.sqrt(jnp.mean((new[e] - experts[e]) ** 2) / jnp.mean(experts[e] ** 2)))
                for e in range(2)]
    t5x_rel, optax_rel = relative(got), relative(run(optax_mode, experts))
    assert math.isclose(t5x_rel[0], t5x_rel[1], rel_tol=0.2)
    assert optax_rel[1] > 30 * optax_rel[0]


def test_t5x_mode_statistics_are_f32_for_bf16_params():
    params = _tree(SHAPES, 0, jnp.bfloat16)
    tx = ada.adafactor(0.01, ada.AdafactorConfig(min_dim_size_to_factor=8), logical_axes=AXES)
    state = tx.init(params)
    statistics = jax.tree.leaves((state.v_row, state.v_col, state.v))
    assert {x.dtype for x in statistics} == {np.dtype("float32")}
    updates, state = tx.update(_tree(SHAPES, 1, jnp.bfloat16), state, params)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {np.dtype("float32")}
    assert all(optax.apply_updates(params, updates)[k].dtype == jnp.bfloat16 for k in params)


def _trajectory(tx, params, steps):
    """(params, state) after every one of `steps` jitted updates with _run's gradients."""
    step, state, seen = jax.jit(tx.update), tx.init(params), []
    for i in range(steps):
        grads = _tree(SHAPES, 1 + i, scale=10.0 ** (i % 3 - 1))
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        seen.append((params, state))
    return seen


@pytest.mark.parametrize("logical_axes", [None, AXES], ids=["optax", "t5x"])
def test_frozen_leaves_stop_exactly_from_their_step(logical_axes):
    # "embedding" is factored (v_row, v_col), "router" is not (v); momentum adds m to both.
    cfg = ada.AdafactorConfig(min_dim_size_to_factor=8, beta1=0.9)
    params, frozen = _tree(SHAPES, 0), {"embedding": 3, "router": 3}
    plain = _trajectory(ada.adafactor(schedule, cfg, logical_axes), params, 6)
    held = _trajectory(ada.adafactor(schedule, cfg, logical_axes, frozen_from=frozen), params, 6)
    fields = ("v_row", "v_col", "v", "m")
    for step, ((p_plain, s_plain), (p_held, s_held)) in enumerate(zip(plain, held)):
        for name in SHAPES:
            stats_plain = [getattr(s_plain, f)[name] for f in fields]
            stats_held = [getattr(s_held, f)[name] for f in fields]
            if name in frozen and step >= 3:
                # Updates 0..2 moved it; from step 3 on the leaf and its statistics keep their bits.
                np.testing.assert_array_equal(p_held[name], held[2][0][name])
                for got, kept in zip(stats_held, (getattr(held[2][1], f)[name] for f in fields)):
                    np.testing.assert_array_equal(got, kept)
                assert not np.array_equal(p_plain[name], p_held[name])  # it would have moved
            else:  # before its step, and every other leaf: exactly the unfrozen optimizer
                np.testing.assert_array_equal(p_held[name], p_plain[name])
                for got, want in zip(stats_held, stats_plain):
                    np.testing.assert_array_equal(got, want)
    # A step past the run, or no leaf at all: bit for bit today's optimizer.
    for unused in ({"router": 100}, {}):
        late = _trajectory(ada.adafactor(schedule, cfg, logical_axes, frozen_from=unused), params, 4)
        for name in SHAPES:
            np.testing.assert_array_equal(late[-1][0][name], plain[3][0][name])


def test_frozen_from_names_leaves_and_steps():
    with pytest.raises(ValueError, match=r"frozen_from\['router'\]=-1: must be an int >= 0"):
        ada.adafactor(frozen_from={"router": -1})
    with pytest.raises(ValueError, match=r"frozen_from\['router'\]=1.5"):
        ada.adafactor(frozen_from={"router": 1.5})
    with pytest.raises(ValueError, match=r"frozen_from names \['routr'\].*look like"):
        ada.adafactor(frozen_from={"routr": 0}).init(_tree(SHAPES, 0))

def test_biases_follow_the_balance_rule_by_block_number_not_by_spelling():
    # Blocks 2 and 10: sorted as text, "10" would come first and take layer 0's loads.
    params = {"layers": {block: {"mlp": {"router": {"bias": router_lib.RoutingBias(
        jnp.zeros(4), logical_axes=("unmodeled",))}}} for block in (10, 2)}}
    load_ME = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    new = ada.with_balanced_biases(params, load_ME, 0.5)
    bias = {block: np.asarray(new["layers"][block]["mlp"]["router"]["bias"][...]) for block in (2, 10)}
    assert list(bias[2]) == [-0.5, 0.5, 0.5, 0.5] and list(bias[10]) == [0.5, 0.5, 0.5, -0.5]
    with pytest.raises(ValueError, match="2 routing biases but 3 MoE layers"):
        ada.with_balanced_biases(params, jnp.ones((3, 4)), 0.5)
    # The optimizer leaves biases alone from step 0; router kernels only with a freeze step.
    assert ada.routing_frozen_from(params) == {"layers/2/mlp/router/bias": 0, "layers/10/mlp/router/bias": 0}
    kernel = {"router": {"kernel": nnx.Param(jnp.zeros((3, 4)), logical_axes=("embed", "unmodeled"))}}
    assert ada.routing_frozen_from(kernel) == {} and ada.routing_frozen_from(kernel, 7) == {"router/kernel": 7}


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        init = jax.nn.initializers.normal(1.0)
        self.layers = nnx.List([nnx.Param(init(rngs.params(), (4, 16, 24)),
                                          logical_axes=("expert", "embed", "mlp"))])
        self.norm = nnx.Param(jnp.ones((16,)), logical_axes=("embed",))


def test_openmoe_adafactor_on_nnx_state_and_pure_dict():
    state = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    assert ada.logical_axes_by_name(state) == {"layers/0": ("expert", "embed", "mlp"),
                                               "norm": ("embed",)}
    tx = ada.openmoe_adafactor(state)
    pure = nnx.to_pure_dict(state)
    # The same step from the State of nnx.Param (as nnx.split gives it) and from its pure dict.
    from_state = tx.update(jax.tree.map(lambda x: jnp.full_like(x, 0.5), state),
                           tx.init(state), state)[0]
    from_pure = tx.update(jax.tree.map(lambda x: jnp.full_like(x, 0.5), pure),
                          tx.init(pure), pure)[0]
    np.testing.assert_array_equal(nnx.to_pure_dict(from_state)["layers"][0],
                                  from_pure["layers"][0])
    # The first step is at the plateau: lr 0.01 times each expert's own RMS (clipped RMS 1).
    for e in range(4):
        rms = float(jnp.sqrt(jnp.mean(pure["layers"][0][e] ** 2)))
        assert math.isclose(float(jnp.sqrt(jnp.mean(from_pure["layers"][0][e] ** 2))),
                            0.01 * rms, rel_tol=1e-3)
    with pytest.raises(ValueError, match="logical_axes"):
        ada.logical_axes_by_name({"w": nnx.Param(jnp.ones((2, 2)))})
    with pytest.raises(ValueError, match="no logical axes"):
        tx.init({"other": jnp.ones((3,))})


@pytest.mark.parametrize("mode", ["optax", "t5x"])
def test_state_follows_parameter_shardings(mode):
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"))
    specs = {"scale": jax.P(), "embedding": jax.P("model", None), "out": jax.P(None, "model"),
             "experts": jax.P("expert", None, "model"), "router": jax.P(None, "expert")}
    shapes = dict(SHAPES, experts=(4, 24, 32), router=(24, 4))
    params = {k: jax.device_put(v, jax.NamedSharding(mesh, specs[k]))
              for k, v in _tree(shapes, 0).items()}
    grads = {k: jax.device_put(v, params[k].sharding) for k, v in _tree(shapes, 1).items()}
    cfg = ada.AdafactorConfig(min_dim_size_to_factor=8, beta1=0.9)
    # The router is frozen from the second update on: a held leaf keeps its shardings too.
    tx = ada.adafactor(0.01, cfg, logical_axes=AXES if mode == "t5x" else None,
                       frozen_from={"router": 1})
    with jax.set_mesh(mesh):
        initial, jitted = tx.init(params), jax.jit(tx.init)(params)
        updates, state = jax.jit(tx.update)(grads, initial, params)
        updates, state = jax.jit(tx.update)(grads, state, params)

    def spec(x):  # P() and P(None,) mean the same: pad to one entry per axis
        return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))

    factored = 0
    for name, p in params.items():
        plan = (ada.optax_plan(p.shape, p.dtype, 8) if mode == "optax" else
                ada.t5x_plan(name, p.shape, AXES[name], ada.OPENMOE_FACTOR_RULES, 8))
        assert spec(updates[name]) == spec(p)
        factored += bool(plan.factored)
        for s in (initial, jitted, state):
            assert spec(s.m[name]) == spec(p)
            if plan.factored:
                # v_row loses the column axes, v_col the row axes: sharded on all the others.
                rows, cols = plan.factored
                for leaf, dropped in ((s.v_row[name], cols), (s.v_col[name], rows)):
                    assert spec(leaf) == tuple(a for i, a in enumerate(spec(p)) if i not in dropped)
            else:
                assert spec(s.v[name]) == spec(p)
    assert factored >= 3


@pytest.mark.parametrize("step, want", [(0, 0.01), (9_999, 0.01), (10_000, 0.01),
                                        (40_000, 0.005), (1_000_000, 0.001)])
def test_openmoe_schedule(step, want):
    lr = ada.openmoe_schedule()
    assert math.isclose(float(lr(step)), want, rel_tol=1e-6)
    # T5X's own formula, 1/√max(step, 10⁴), and the same value under jit with an int32 step.
    assert math.isclose(float(lr(step)), 1 / math.sqrt(max(step, 10_000)), rel_tol=1e-6)
    assert math.isclose(float(jax.jit(lr)(jnp.int32(step))), want, rel_tol=1e-6)


def test_schedule_options():
    lr = ada.openmoe_schedule(ada.ScheduleConfig(peak=1e-3, warmup_steps=100))
    assert [round(float(lr(s)), 8) for s in (0, 99, 400)] == [1e-3, 1e-3, 5e-4]
    ramp = ada.openmoe_schedule(ada.ScheduleConfig(warmup_shape="linear"))
    assert [round(float(ramp(s)), 8) for s in (0, 5_000, 10_000, 40_000)] == [0, 0.005, 0.01, 0.005]


@pytest.mark.parametrize("field, value", [
    ("decay_rate", 0.0), ("min_dim_size_to_factor", 0), ("clipping_threshold", -1.0),
    ("eps1", -1e-30), ("eps2", -1.0), ("beta1", 1.0), ("weight_decay", 1.5)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"AdafactorConfig.{field}"):
        ada.AdafactorConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("peak", 0.0), ("warmup_steps", 0),
                                          ("warmup_shape", "cosine")])
def test_schedule_validation(field, value):
    with pytest.raises(ValueError, match=f"ScheduleConfig.{field}"):
        ada.ScheduleConfig(**{field: value})


def test_bad_calls():
    with pytest.raises(ValueError, match="factor_rules"):
        ada.adafactor(factor_rules={"embed": "diagonal"})
    tx = ada.adafactor()
    params = {"w": jnp.ones((3, 4))}
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, tx.init(params))


def _openmoe_8b_by_hand():
    """OpenMoE-8B's parameter shapes and logical axes, built without 06 (L=24, D=2048, F=8192,
    H·K=3072, E=32, MoE in layers 5, 11, 17, 23, V=256384, double-gated FFNs)."""
    d, f, hk, e, v = 2048, 8192, 3072, 32, 256_384
    dense = {"wi_0": ((d, 2 * f), ("embed", "mlp")), "wi_1": ((d, f), ("embed", "mlp")),
             "wo": ((f, d), ("mlp", "embed"))}
    tree = {"token_embedder": ((v, d), ("vocab", "embed")), "decoder_norm": ((d,), ("embed",)),
            "logits_dense": ((d, v), ("embed", "vocab"))}
    for layer in range(24):
        block = {"attention": {n: ((d, hk), ("embed", "joined_kv")) for n in ("q", "k", "v")},
                 "out": ((hk, d), ("joined_kv", "embed")), "norms": ((2, d), ("stack", "embed"))}
        block["mlp"] = dense
        if layer % 6 == 5:
            block["moe"] = {"router": ((d, e), ("embed", "unmodeled")),
                            "extra_norm": ((d,), ("embed",)),
                            "wi_0": ((e, d, 2 * f), ("expert", "embed", "mlp")),
                            "wi_1": ((e, d, f), ("expert", "embed", "mlp")),
                            "wo": ((e, f, d), ("expert", "mlp", "embed"))}
        tree[f"layer_{layer}"] = block
    def is_spec(x):
        return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)

    return jax.tree.map(lambda s: nnx.Param(jax.ShapeDtypeStruct(s[0], jnp.float32),
                                            logical_axes=s[1]), tree, is_leaf=is_spec)


def test_state_sizes_by_hand():
    params = _openmoe_8b_by_hand()
    sizes = ada.state_sizes(params)
    n = sizes["params"] // 4
    assert n == 11_855_046_656  # 11.86B, counted from the released shapes
    assert sizes["adamw"] == 8 * n + 4  # m and v in f32, plus the step count
    # Factored matrices keep a row and a column vector (per expert for [E, ·, ·]) plus a [1]
    # placeholder for v; the rest keep a full v plus two [1] placeholders. All f32, + count.
    d, f, hk, e, v = 2048, 8192, 3072, 32, 256_384
    per_layer = 4 * (d + hk + 1) + (2 * d + 2) + (d + 2 * f + 1) + 2 * (d + f + 1)
    per_moe = (d + 2) + (d * e + 2) + (e * (d + 2 * f) + 1) + 2 * (e * (d + f) + 1)
    want = 4 * (2 * (v + d + 1) + (d + 2) + 24 * per_layer + 4 * per_moe) + 4
    assert sizes["ours_t5x"] == sizes["optax_adafactor"] == want
    assert want < 0.001 * sizes["params"]
