"""Tests for 06_model.py: presets, counts, block wiring, losses, KV-cache decoding, bad inputs."""

import dataclasses
import functools
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load

model_lib = load("06_model")
rope = load("02_rope")

# A tiny MoE model: 2 blocks (the second is MoE), 4 experts. Used by most tests.
TINY = dataclasses.replace(model_lib.PRESETS["small"], vocab_size=97, num_layers=2, d_model=32,
                           num_heads=2, head_dim=16, d_ff=48, num_experts=4, moe_interval=2,
                           max_seq_len=32)
# Capacity for every token at evaluation: no assignment can be dropped, so decoding is exact.
NO_DROPS = dataclasses.replace(TINY, eval_capacity_factor=float(TINY.num_experts))


def _tokens(shape, seed=0, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(2, vocab, size=shape), jnp.int32)


@functools.partial(jax.jit, static_argnames="train")
def forward(model, tokens_BL, positions_BL=None, segment_ids_BL=None, train=False, cache=None):
    """The model's forward pass, compiled once per shape: eager op-by-op dispatch is slow."""
    return model(tokens_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL, train=train,
                 cache=cache)


loss = jax.jit(model_lib.loss_fn, static_argnames="train")


@pytest.fixture(scope="module")
def tiny_model():
    return model_lib.OpenMoE(NO_DROPS, rngs=nnx.Rngs(0))


# --- Presets and counting --------------------------------------------------------------------

@pytest.mark.parametrize("name, layers, moe_layers, experts", [
    ("openmoe-base", 12, [3, 7, 11], 16),
    ("openmoe-8b", 24, [5, 11, 17, 23], 32),
    ("openmoe-34b", 32, list(range(3, 32, 4)), 32),
])
def test_presets_match_the_released_configs(name, layers, moe_layers, experts):
    cfg = model_lib.PRESETS[name]
    assert (cfg.num_layers, cfg.moe_layers, cfg.num_experts, cfg.top_k) == (layers, moe_layers, experts, 2)
    assert cfg.vocab_size == 256_384 and cfg.max_seq_len == 2048
    assert model_lib.PRESETS[f"{name}-dense"].moe_layers == []


def _abstract_params(cfg):
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_flat_state(nnx.state(abstract, nnx.Param))


@pytest.mark.parametrize("name", sorted(model_lib.PRESETS))
def test_parameter_counts_equal_an_independent_count_from_shapes(name):
    # Build every preset abstractly (no memory) and count its real parameter shapes.
    cfg = model_lib.PRESETS[name]
    flat = _abstract_params(cfg)
    total = sum(math.prod(v.shape) for _, v in flat)
    experts = sum(math.prod(v.shape) for path, v in flat if "expert" in v.logical_axes
                  and v.logical_axes[0] == "expert")
    embedding = sum(math.prod(v.shape) for path, v in flat if "vocab" in v.logical_axes) + cfg.d_model
    counts = model_lib.parameter_counts(cfg)
    assert counts["total"] == total
    assert counts["embedding"] == embedding
    # Active: a token uses top_k of the E experts in each MoE block.
    inactive = experts * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    assert counts["active_non_embedding"] == total - embedding - inactive


def test_base_active_parameters_are_the_papers_142m():
    counts = model_lib.parameter_counts(model_lib.PRESETS["openmoe-base"])
    assert round(counts["active_non_embedding"] / 1e6) == 142
    # The real 8B shapes: 11.86B total, 2.75B active non-embedding (counted from the released weights' shapes).
    counts_8b = model_lib.parameter_counts(model_lib.PRESETS["openmoe-8b"])
    assert round(counts_8b["total"] / 1e7) == 1186 and round(counts_8b["active_non_embedding"] / 1e7) == 275


def test_every_parameter_has_logical_axes_matching_its_rank():
    for path, variable in _abstract_params(TINY):
        axes = variable.logical_axes
        assert len(axes) == len(variable.shape), f"{path}: {axes} vs {variable.shape}"
        assert variable.dtype == jnp.float32


# --- The forward pass and the losses ---------------------------------------------------------

def _batch(tokens_BL, mask_BL=None):
    mask_BL = jnp.ones(tokens_BL[:, 1:].shape) if mask_BL is None else mask_BL
    return {"inputs": tokens_BL[:, :-1], "targets": tokens_BL[:, 1:], "loss_mask": mask_BL}


def test_initial_loss_is_about_log_vocab(tiny_model):
    _, metrics = loss(tiny_model, _batch(_tokens((4, 17))))
    assert abs(float(metrics["cross_entropy"]) - math.log(TINY.vocab_size)) < 0.5
    assert metrics["drop_rate_by_position"].shape == (1, 16)


def test_loss_is_normalized_by_real_target_tokens(tiny_model):
    tokens_BL = _tokens((2, 17))
    mask_BL = jnp.ones((2, 16)).at[1, 5:].set(0.0)
    _, metrics = loss(tiny_model, _batch(tokens_BL, mask_BL), train=False)
    logits_BLV, _, _ = forward(tiny_model, tokens_BL[:, :-1])
    nll_BL = -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), tokens_BL[:, 1:, None], -1)[..., 0]
    expected = float(jnp.sum(nll_BL * mask_BL) / jnp.sum(mask_BL))
    assert float(metrics["num_tokens"]) == 21.0
    assert np.isclose(float(metrics["cross_entropy"]), expected, rtol=1e-5)
    log_z_BL = jax.nn.logsumexp(logits_BLV, -1)
    assert np.isclose(float(metrics["z_loss"]), float(jnp.sum(log_z_BL**2 * mask_BL) / 21), rtol=1e-5)


def test_total_loss_combines_components_with_the_configured_weights(tiny_model):
    total, metrics = loss(tiny_model, _batch(_tokens((2, 17))))
    expected = (metrics["cross_entropy"] + TINY.z_loss_weight * metrics["z_loss"]
                + TINY.aux_loss_weight * metrics["load_balance_loss"]
                + TINY.router_z_loss_weight * metrics["router_z_loss"])
    assert np.isclose(float(total), float(expected), rtol=1e-6)
    assert float(metrics["load_balance_loss"]) > 0 and float(metrics["router_z_loss"]) > 0


def test_packed_documents_do_not_see_each_other(tiny_model):
    # Changing document 1 must not change document 2's logits when segment ids separate them.
    tokens_BL = _tokens((1, 12))
    segments_BL = jnp.array([[1] * 6 + [2] * 6])
    positions_BL = jnp.array([list(range(6)) * 2])
    other_BL = tokens_BL.at[0, :6].set(_tokens((1, 6), seed=5)[0])

    def second_document(tokens):
        return forward(tiny_model, tokens, positions_BL, segments_BL)[0][0, 6:]

    alone = forward(tiny_model, tokens_BL[:, 6:])[0][0]
    np.testing.assert_allclose(second_document(tokens_BL), second_document(other_BL), atol=1e-5)
    np.testing.assert_allclose(second_document(tokens_BL), alone, atol=1e-5)


def test_moe_block_passes_fully_dropped_tokens_through_attention_and_extra_ffn():
    # Capacity 1 per expert: most tokens lose both choices. For them the MoE sublayer must add
    # exactly nothing, so the block is attention + residual, then the extra FFN + residual.
    cfg = dataclasses.replace(TINY, min_capacity=1, train_capacity_factor=1e-6)
    block = model_lib.Block(cfg, layer=1, rngs=nnx.Rngs(1))
    assert block.is_moe
    x_BLD = jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model))
    rotation = rope.rotation(jnp.broadcast_to(jnp.arange(8), (2, 8)), cfg.head_dim)
    mask_BLS = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))

    @jax.jit
    def block_and_expected(block, x_BLD):
        y_BLD, _, stats = block(x_BLD, rotation, mask_BLS, train=True)
        h_BLD = x_BLD + block.self_attention(block.pre_self_attention_norm(x_BLD), rotation,
                                             mask_BLS)[0]
        return y_BLD, h_BLD + block.extra_mlp(block.pre_extra_mlp_norm(h_BLD)), stats

    y_BLD, expected_BLD, stats = block_and_expected(block, x_BLD)
    dropped_BL = ~np.asarray(stats["kept_BLA"]).any(axis=-1)
    assert dropped_BL.sum() >= 8  # 16 tokens, at most 4 assignments kept
    np.testing.assert_allclose(np.asarray(y_BLD)[dropped_BL], np.asarray(expected_BLD)[dropped_BL],
                               atol=1e-6)
    assert not np.allclose(np.asarray(y_BLD)[~dropped_BL], np.asarray(expected_BLD)[~dropped_BL])


# --- T5X's padding semantics (released models) ---------------------------------------------

def test_t5x_logit_mask_keeps_start_tokens_and_drops_padding():
    # flaxformer's own example: id 0 is padding and the start token of each packed sequence.
    logit_mask_BL1, valid_BL = model_lib.t5x_padding_masks(jnp.array([[0, 3, 9, 0, 4, 8, 0, 0]]))
    np.testing.assert_array_equal(logit_mask_BL1[0, :, 0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(valid_BL, logit_mask_BL1[..., 0])
    targets_BL = jnp.array([[3, 9, 1, 4, 8, 1, 0, 0]])
    np.testing.assert_array_equal(model_lib.t5x_padding_masks(targets_BL * 0, targets_BL)[1][0],
                                  [1, 1, 1, 1, 1, 1, 0, 0])


def test_fully_masked_query_attends_uniformly_like_t5x():
    # With T5X's additive -1e10, a query that may see no key gets equal scores everywhere, so
    # its output is the mean of all values (future ones included), not NaN and not zero.
    attention = model_lib.Attention(TINY, rngs=nnx.Rngs(0))
    x_BLD = jax.random.normal(jax.random.key(1), (1, 4, TINY.d_model))
    rotation = rope.rotation(jnp.arange(4)[None], TINY.head_dim)
    mask_BLS = jnp.tril(jnp.ones((1, 4, 4), bool)).at[0, 1].set(False)  # query 1 sees nothing
    out_BLD, _ = attention(x_BLD, rotation, mask_BLS)
    values_LD = (x_BLD[0] @ attention.value[...]).reshape(4, -1)
    np.testing.assert_allclose(out_BLD[0, 1], values_LD.mean(0) @ attention.out[...], rtol=1e-5,
                               atol=1e-6)


def test_t5x_padding_leaves_real_positions_unchanged_and_zeroes_padded_logits():
    # A right-padded row, under T5X semantics: real positions see exactly what the unpadded row
    # sees (capacity for every token, so the zero tokens cannot crowd anyone out), and the
    # logit mask zeroes the padded positions' final activations, hence their logits.
    cfg = dataclasses.replace(NO_DROPS, t5x_padding=True)
    model = model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))
    real_BL = jnp.concatenate([jnp.zeros((1, 1), jnp.int32), _tokens((1, 9))], axis=1)
    padded_BL = jnp.pad(real_BL, ((0, 0), (0, 6)))
    logits_real_BLV = forward(model, real_BL)[0]
    logits_padded_BLV = forward(model, padded_BL)[0]
    np.testing.assert_allclose(logits_padded_BLV[:, :10], logits_real_BLV, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits_padded_BLV[:, 10:], 0.0)


def test_parallel_wiring_shares_one_norm_and_differs_from_sequential():
    sequential = model_lib.Block(TINY, layer=1, rngs=nnx.Rngs(2))
    parallel = model_lib.Block(dataclasses.replace(TINY, moe_wiring="parallel"), layer=1,
                               rngs=nnx.Rngs(2))
    assert not hasattr(parallel, "pre_extra_mlp_norm")
    x_BLD = jax.random.normal(jax.random.key(1), (1, 8, TINY.d_model))
    rotation = rope.rotation(jnp.arange(8)[None], TINY.head_dim)
    mask_BLS = jnp.tril(jnp.ones((8, 8), bool))[None]

    @jax.jit
    def outputs(sequential, parallel, x_BLD):
        y_seq, _, _ = sequential(x_BLD, rotation, mask_BLS, train=False)
        y_par, _, _ = parallel(x_BLD, rotation, mask_BLS, train=False)
        h_BLD = x_BLD + parallel.self_attention(parallel.pre_self_attention_norm(x_BLD),
                                                rotation, mask_BLS)[0]
        normed_BLD = parallel.pre_mlp_norm(h_BLD)
        expected_BLD = h_BLD + parallel.mlp(normed_BLD, train=False)[0] + parallel.extra_mlp(normed_BLD)
        return y_seq, y_par, expected_BLD

    y_seq, y_par, expected_BLD = outputs(sequential, parallel, x_BLD)
    np.testing.assert_allclose(y_par, expected_BLD, atol=1e-6)
    assert not np.allclose(y_seq, y_par)


def _remat_equations(jaxpr):
    """Every rematerialization (jax.checkpoint) in a traced program, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2"):
            yield eqn
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _remat_equations(sub)


def test_rematerialization_gives_the_same_gradients():
    batch = _batch(_tokens((2, 9)))
    grads = []
    for remat, policy in ((False, "dots"), (True, "full"), (True, "dots")):
        cfg = dataclasses.replace(TINY, remat=remat, remat_policy=policy)
        model = model_lib.OpenMoE(cfg, rngs=nnx.Rngs(3))
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        grad_fn = jax.grad(lambda p: model_lib.loss_fn(nnx.merge(graph, p, rest), batch)[0])
        # Equal gradients alone would also hold with remat switched off: the traced program
        # must hold one rematerialized region per block, with the configured policy.
        remats = list(_remat_equations(jax.make_jaxpr(grad_fn)(params).jaxpr))
        assert len(remats) == (cfg.num_layers if remat else 0)
        assert all(eqn.params["policy"] is model_lib.REMAT_POLICIES[policy] for eqn in remats)
        grads.append(jax.tree.leaves(jax.jit(grad_fn)(params)))
    for a, b, c in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)


def test_bf16_activations_keep_f32_logits_and_stay_close():
    model32 = model_lib.OpenMoE(NO_DROPS, rngs=nnx.Rngs(4))
    model16 = model_lib.OpenMoE(dataclasses.replace(NO_DROPS, dtype=jnp.bfloat16), rngs=nnx.Rngs(4))
    tokens_BL = _tokens((2, 8))
    logits32, logits16 = forward(model32, tokens_BL)[0], forward(model16, tokens_BL)[0]
    assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
    gap = float(jnp.max(jnp.abs(logits32 - logits16)))
    assert 0 < gap < 0.1 * float(jnp.max(jnp.abs(logits32)))  # 0 would mean bf16 was never used


# --- Generation ------------------------------------------------------------------------------

def test_kv_cache_decoding_equals_full_recomputation(tiny_model):
    # Two prompts of different lengths (left padding), greedy decoding.
    prompts = [list(np.asarray(_tokens((5,), seed=1))), list(np.asarray(_tokens((9,), seed=2)))]
    outputs = model_lib.generate(tiny_model, prompts, max_new_tokens=8, eos_id=-1)
    for prompt, continuation in zip(prompts, outputs):
        assert len(continuation) == 8
        full_BL = jnp.array([prompt + continuation], jnp.int32)
        logits_LV = forward(tiny_model, full_BL)[0][0]
        greedy = np.asarray(jnp.argmax(logits_LV[len(prompt) - 1:-1], axis=-1))
        assert list(greedy) == continuation


def test_cached_logits_equal_full_logits(tiny_model):
    tokens_BL = _tokens((2, 10), seed=3)
    full_BLV = forward(tiny_model, tokens_BL)[0]
    cache = model_lib.init_cache(NO_DROPS, 2, 10)
    step_logits = []
    for start, stop in [(0, 4), (4, 5), (5, 10)]:  # a prefill, one step, then a chunk
        chunk = tokens_BL[:, start:stop]
        positions = jnp.broadcast_to(jnp.arange(start, stop), chunk.shape)
        logits, _, cache = forward(tiny_model, chunk, positions, cache=cache)
        step_logits.append(logits)
    np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), full_BLV, atol=1e-4)


def test_sampling_respects_top_p():
    logits_BV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(model_lib.sample_token(logits_BV, jax.random.key(i), temperature=1.0,
                                        top_p=0.7)[0])
             for i in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3: exactly the two most likely tokens
    assert int(model_lib.sample_token(logits_BV, jax.random.key(0))[0]) == 0


def test_every_moe_setting_of_the_model_reaches_its_moe_layers():
    # 05's MoEConfig is built from the model's fields by name: each one set on the model arrives.
    changed = dict(renormalize=True, init_std=0.5, min_capacity=7, capacity_rule="colossalai",
                   dropless=True, group_rule="flaxformer", moe_dispatch="einsum")
    cfg = dataclasses.replace(TINY, **changed)
    moe_cfg = cfg.moe_config()
    for name, value in changed.items():
        assert getattr(moe_cfg, "dispatch" if name == "moe_dispatch" else name) == value, name
    assert model_lib.Block(cfg, layer=1, rngs=nnx.Rngs(0)).mlp.cfg == moe_cfg  # and is used
    # The only MoEConfig fields the model does not carry: the renamed dispatch, and jitter.
    model_fields = {field.name for field in dataclasses.fields(model_lib.ModelConfig)}
    assert {field.name for field in dataclasses.fields(moe_cfg)} - model_fields == {
        "dispatch", "jitter_noise"}



def test_routing_fields_reach_the_router_and_loss_reports_per_layer_loads():
    # The three routing fields flow from the model to 04's router by name; the loss's metrics
    # hold each MoE layer's expert loads [layers, E] (09's balancing reads them) and its share
    # of tokens no expert served, by position [layers, L].
    cfg = dataclasses.replace(TINY, num_layers=4, balance_bias_rate=0.001, batch_prioritized=True)
    assert cfg.moe_config().balance_bias_rate == 0.001 and cfg.moe_config().batch_prioritized
    assert dataclasses.replace(TINY, routing="experts_choose").moe_config().routing == "experts_choose"
    model = model_lib.OpenMoE(dataclasses.replace(cfg, batch_prioritized=False), rngs=nnx.Rngs(0))
    biases = [layer.mlp.router.bias for layer in model.layers if layer.is_moe]
    assert len(biases) == 2 and all(np.all(b[...] == 0) for b in biases)
    counts = model_lib.parameter_counts(model.cfg)
    assert counts["total"] == sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    _, metrics = loss(model, _batch(_tokens((2, 17))))
    assert metrics["expert_load"].shape == (2, 4)
    np.testing.assert_allclose(metrics["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert metrics["tokens_left_behind_by_position"].shape == (2, 16)
    with pytest.raises(ValueError, match="balance_bias_rate=-1.0"):
        dataclasses.replace(TINY, balance_bias_rate=-1.0)

# --- Bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"top_k": 5}, "top_k=5"),
    ({"top_k": 0}, "top_k=0"),
    ({"moe_interval": 3}, "moe_interval=3"),
    ({"remat_policy": "some"}, "remat_policy='some'"),
    ({"head_dim": 15}, "head_dim=15"),
    ({"moe_wiring": "interleaved"}, "moe_wiring"),
    ({"dtype": jnp.int32}, "dtype"),
    ({"train_capacity_factor": float("inf")}, "train_capacity_factor=inf: must be a finite"),
    ({"z_loss_weight": float("nan")}, "z_loss_weight=nan: must be a finite number >= 0"),
    ({"aux_loss_weight": -0.01}, "aux_loss_weight=-0.01"),
])
def test_bad_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_bad_tokens_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=97\)"):
        tiny_model(jnp.array([[1, 97]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        tiny_model(jnp.ones((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="integer ids"):
        tiny_model(jnp.ones((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model_lib.generate(tiny_model, [[1] * 30], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens=-3 must be >= 0"):
        model_lib.generate(tiny_model, [[1, 2]], max_new_tokens=-3)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=97\)"):
        model_lib.generate(tiny_model, [[1, 97]], max_new_tokens=2)
