"""04_router.py: OpenMoE's priority order, capacity arithmetic, losses, metrics and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load

router_lib = load("04_router")


def logits_from_choices(choices, experts):
    """[1, T, E] logits whose top-2 are the given (first, second) experts of each token."""
    logits_TE = np.zeros((len(choices), experts), np.float32)
    for token, (first, second) in enumerate(choices):
        logits_TE[token, first], logits_TE[token, second] = 2.0, 1.0
    return jnp.asarray(logits_TE)[None]


def test_later_first_choice_beats_earlier_second_choice():
    # Token 0 wants (e0, e1), token 1 wants (e1, e0); one slot each. Token 1's *first* choice
    # queues before token 0's *second* choice, so token 0 loses e1 although it came first.
    routing = router_lib.route(logits_from_choices([(0, 1), (1, 0)], 2), top_k=2, capacity=1)
    assert routing.kept_GTA[0].tolist() == [[True, False], [True, False]]
    assert routing.slot_GTA[0].tolist() == [[0, 1], [0, 1]]


def test_earlier_tokens_first_within_a_choice_level():
    logits_GTE = logits_from_choices([(0, 1), (0, 1), (0, 1)], 2)
    routing = router_lib.route(logits_GTE, top_k=2, capacity=2)
    assert routing.slot_GTA[0, :, 0].tolist() == [0, 1, 2]  # first choices of tokens 0, 1, 2
    assert routing.kept_GTA[0, :, 0].tolist() == [True, True, False]
    assert routing.slot_GTA[0, :, 1].tolist() == [0, 1, 2]  # e1 is nobody's first choice


def test_worked_example_table():
    logits, routing = router_lib.worked_example(capacity=2)
    kept_TA = np.asarray(routing.kept_GTA[0])
    assert kept_TA.sum() == 8 and not kept_TA[6].any()  # token 6 is left behind
    assert kept_TA[5, 0] and not kept_TA[0, 1]
    metrics = router_lib.routing_metrics(routing, num_experts=4, capacity=2, seq_len=8)
    assert np.isclose(metrics["fraction_dropped"], 0.5)
    assert np.isclose(metrics["fraction_tokens_left_behind"], 1 / 8)
    np.testing.assert_allclose(metrics["drop_rate_by_position"],
                               [0.5, 0, 0.5, 0.5, 0.5, 0.5, 1, 0.5])
    assert np.isclose(metrics["expert_usage"], 1.0)  # every one of the 4 × 2 slots is filled
    np.testing.assert_allclose(metrics["expert_load"], [5 / 16, 6 / 16, 3 / 16, 2 / 16])
    kept_weights = np.asarray(routing.weight_GTA[0])[kept_TA]
    assert np.isclose(metrics["router_confidence"], kept_weights.mean())


def queue_oracle(expert_GTA, capacity):
    """Slots by walking OpenMoE's queue in plain Python: every token's first choice (token 0, 1,
    ...), then every second choice; an expert's n-th arrival gets slot n."""
    slot_GTA = np.zeros(expert_GTA.shape, np.int64)
    for g in range(expert_GTA.shape[0]):
        arrivals = {}
        for a in range(expert_GTA.shape[2]):
            for t in range(expert_GTA.shape[1]):
                e = int(expert_GTA[g, t, a])
                slot_GTA[g, t, a] = arrivals.get(e, 0)
                arrivals[e] = slot_GTA[g, t, a] + 1
    return slot_GTA, slot_GTA < capacity


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_queue_invariants_on_random_logits(top_k):
    logits_GTE = jax.random.normal(jax.random.key(top_k), (3, 64, 8)) * 2
    routing = router_lib.route(logits_GTE, top_k=top_k, capacity=10)
    assert routing.expert_GTA.dtype == jnp.int32 and routing.weight_GTA.dtype == jnp.float32
    # The choices are the top k of the logits (softmax keeps their order), best first.
    logits = np.asarray(logits_GTE)
    np.testing.assert_array_equal(routing.expert_GTA, np.argsort(-logits, axis=-1)[..., :top_k])
    # Slots, drops and weights equal an independent walk of the queue.
    slot_GTA, kept_GTA = queue_oracle(np.asarray(routing.expert_GTA), capacity=10)
    np.testing.assert_array_equal(routing.slot_GTA, slot_GTA)
    np.testing.assert_array_equal(routing.kept_GTA, kept_GTA)
    assert 0 < kept_GTA.sum() < kept_GTA.size  # some assignments kept, some dropped
    probs_GTE = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen_GTA = np.take_along_axis(probs_GTE, np.asarray(routing.expert_GTA), axis=-1)
    np.testing.assert_allclose(routing.weight_GTA, chosen_GTA * kept_GTA, rtol=1e-5)
    assert not router_lib.queue_problems(routing, capacity=10)


def test_queue_problems_reports_each_broken_rule():
    # The self-test's checker must catch what it claims to. Start from a correct routing of
    # the worked example (capacity 2) and break one rule at a time.
    _, routing = router_lib.worked_example(capacity=2)
    assert not router_lib.queue_problems(routing, capacity=2)
    expert_TA = np.asarray(routing.expert_GTA[0])

    def broken(**arrays):
        return routing._replace(**{name: jnp.asarray(value) for name, value in arrays.items()})

    # e0's queue: first choices of t0, t1, t3, then second choices of t2, t5 (slots 0-4).
    # Token 1 given token 0's slot: a slot used twice.
    assert expert_TA[0, 0] == expert_TA[1, 0] == 0
    twice = np.asarray(routing.slot_GTA).copy()
    twice[0, 1, 0] = twice[0, 0, 0]
    # e1's queue: first choices of t2, t5, t6, then second choices of t0, t4, t7 (slots 0-5).
    # Token 5's first choice (slot 1) swapped with token 0's second (slot 3): a second choice
    # queued before a first choice.
    assert expert_TA[5, 0] == expert_TA[0, 1] == 1
    second_first = np.asarray(routing.slot_GTA).copy()
    second_first[0, 5, 0], second_first[0, 0, 1] = second_first[0, 0, 1], second_first[0, 5, 0]
    # Token 3's first choice is e0's third arrival (slot 2 ≥ C): keeping it puts e0 over capacity.
    assert not routing.kept_GTA[0, 3, 0]
    over = np.asarray(routing.kept_GTA).copy()
    over[0, 3, 0] = True
    # A dropped assignment that still carries its probability.
    weight = np.asarray(routing.weight_GTA).copy()
    weight[0, 3, 0] = 0.3
    cases = {"expert 0: slots [0, 0, 2, 3, 4] in queue order": broken(slot_GTA=twice),
             "expert 1: slots [0, 3, 2, 1, 4, 5] in queue order": broken(slot_GTA=second_first),
             "3 of 5 assignments kept at capacity 2": broken(kept_GTA=over),
             "nonzero combine weight": broken(weight_GTA=weight)}
    for message, routing_broken in cases.items():
        problems = router_lib.queue_problems(routing_broken, capacity=2)
        assert any(message in problem for problem in problems), (message, problems)


def test_combine_weights_are_raw_probabilities_or_renormalized():
    logits_GTE = jax.random.normal(jax.random.key(0), (1, 16, 8))
    probs_GTE = jax.nn.softmax(logits_GTE)
    raw = router_lib.route(logits_GTE, top_k=2, capacity=16)
    chosen = jnp.take_along_axis(probs_GTE, raw.expert_GTA, axis=-1)
    np.testing.assert_allclose(raw.weight_GTA, chosen, rtol=1e-6)
    assert np.all(raw.weight_GTA.sum(-1) < 1)
    mixtral = router_lib.route(logits_GTE, top_k=2, capacity=16, renormalize=True)
    np.testing.assert_allclose(mixtral.weight_GTA.sum(-1), 1.0, rtol=1e-6)


def test_capacity_arithmetic():
    cfg = router_lib.RouterConfig()  # E = 32, k = 2, groups of 4096
    assert cfg.capacity(4096, 1.25) == 160 and cfg.capacity(4096, 2.0) == 256
    assert cfg.capacity(16, 1.25) == 4  # round(0.625) = 1, raised to min_capacity 4
    assert router_lib.RouterConfig(min_capacity=1).capacity(16, 1.25) == 1
    # Python's round, as flaxformer: 1.25 · 16 / 8 = 2.5 → 2.
    assert router_lib.RouterConfig(num_experts=8, min_capacity=1).capacity(16, 1.25) == 2
    colossal = router_lib.RouterConfig(capacity_rule="colossalai")
    assert colossal.capacity(4096, 1.25) == 320  # floor(2 · 1.25 · 4096 / 32)
    colossal_8 = router_lib.RouterConfig(num_experts=8, capacity_rule="colossalai")
    assert colossal_8.capacity(100, 1.25) == 32


def test_group_shape():
    cfg = router_lib.RouterConfig(max_group_size=4096)
    assert cfg.group_shape(8 * 2048) == (4, 4096)
    assert cfg.group_shape(1000) == (1, 1000)
    assert router_lib.RouterConfig(max_group_size=64).group_shape(100) == (2, 50)
    # As flaxformer's _num_groups: the smallest group count that divides the tokens.
    assert router_lib.RouterConfig(max_group_size=64).group_shape(99) == (3, 33)
    # With a group multiple (07: one or more groups per batch shard), G is a multiple of it.
    assert router_lib.RouterConfig(group_multiple=8).group_shape(4096) == (8, 512)
    four_shards = router_lib.RouterConfig(group_multiple=4, max_group_size=64)
    assert four_shards.group_shape(16 * 32) == (8, 64)
    with pytest.raises(ValueError, match="group_multiple=8"):
        router_lib.RouterConfig(group_multiple=8).group_shape(12)


def test_flaxformer_group_rule_takes_at_least_e_times_replicas_groups():
    # flaxformer _num_groups: G >= max(tokens // max_group_size, E · replicas), G | tokens,
    # and G a multiple of E · replicas. One 2048-token row, E = 32: 32 groups of 64 tokens.
    cfg = router_lib.RouterConfig(num_experts=32, group_rule="flaxformer")
    assert cfg.group_shape(2048) == (32, 64)
    assert cfg.group_shape(1024 * 2048) == (512, 4096)  # the 8B's training batch
    # 33 · 32 tokens: the least count is max(1056 // 64, 32) = 32, and 32 divides them.
    assert router_lib.RouterConfig(num_experts=32, max_group_size=64,
                               group_rule="flaxformer").group_shape(33 * 32) == (32, 33)
    # Two replicas of each expert: G is a multiple of 64.
    replicated = router_lib.RouterConfig(num_experts=32, expert_replicas=2, group_rule="flaxformer")
    assert replicated.group_shape(4096) == (64, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        cfg.group_shape(100)  # the layer pads first (see `padding`); unpadded, a clear error


def test_flaxformer_padding_appends_the_cheaper_of_rows_or_positions():
    cfg = router_lib.RouterConfig(num_experts=8, group_rule="flaxformer")
    assert cfg.padding(2, 16) == (0, 0)  # 32 tokens: already a multiple of 8
    assert cfg.padding(1, 5) == (0, 3)  # 3 positions (3 tokens) beat 7 rows (35 tokens)
    assert cfg.padding(7, 2) == (1, 0)  # 1 row (2 tokens) beats 4 positions (28 tokens)
    assert cfg.padding(3, 6) == (0, 2)  # a tie (1 row or 2 positions, 6 tokens): positions
    assert router_lib.RouterConfig(num_experts=8).padding(1, 5) == (0, 0)  # "divisor" never pads


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_load_balance_loss_is_k_for_uniform_routing(top_k):
    logits_GTE = jnp.zeros((2, 32, 8))
    routing = router_lib.route(logits_GTE, top_k=top_k, capacity=4)
    assert np.isclose(router_lib.load_balance_loss(logits_GTE, routing.expert_GTA), top_k)


def test_load_balance_loss_by_hand():
    logits_GTE = jax.random.normal(jax.random.key(1), (2, 16, 4))
    routing = router_lib.route(logits_GTE, top_k=2, capacity=1)  # drops do not change f_e
    probs = np.asarray(jax.nn.softmax(logits_GTE))
    expected = []
    for g in range(2):
        f = np.zeros(4)
        for t in range(16):
            for e in np.asarray(routing.expert_GTA[g, t]):
                f[e] += 1 / 16
        expected.append(4 * np.sum(f * probs[g].mean(0)))
    loss = router_lib.load_balance_loss(logits_GTE, routing.expert_GTA)
    assert np.isclose(loss, np.mean(expected))


def test_z_loss_by_hand():
    logits = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 4))) * 3
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    assert np.isclose(router_lib.router_z_loss(jnp.asarray(logits)), np.mean(log_z**2), rtol=1e-5)


def test_router_module_f32_logical_axes_and_gradients():
    cfg = router_lib.RouterConfig(d_model=16, num_experts=4, max_group_size=32)
    layer = router_lib.Router(cfg, rngs=nnx.Rngs(0))
    assert layer.kernel.logical_axes == ("embed", "unmodeled")
    assert layer.kernel[...].dtype == jnp.float32
    assert 0.01 < float(jnp.std(layer.kernel[...])) < 0.03
    x_GTD = jax.random.normal(jax.random.key(3), (1, 32, 16)).astype(jnp.bfloat16)
    routing, losses = layer(x_GTD, capacity=8)
    assert routing.weight_GTA.dtype == jnp.float32 and losses["router_z_loss"].dtype == jnp.float32

    # Gradients reach the router kernel through the combine weights and the losses.
    def loss(layer):
        routing, losses = layer(x_GTD, capacity=8)
        return routing.weight_GTA.sum() + losses["load_balance_loss"]

    grad = jax.grad(loss)(layer)
    assert float(jnp.abs(grad.kernel[...]).max()) > 0


def test_jitter_only_with_a_key():
    kernel_DE = jax.random.normal(jax.random.key(0), (8, 4))
    x_GTD = jax.random.normal(jax.random.key(1), (1, 8, 8))
    plain = router_lib.router_logits(x_GTD, kernel_DE)
    assert np.array_equal(router_lib.router_logits(x_GTD, kernel_DE, jitter_noise=0.1), plain)
    jittered = router_lib.router_logits(x_GTD, kernel_DE, jitter_noise=0.1, key=jax.random.key(2))
    assert not np.allclose(jittered, plain)


@pytest.mark.parametrize("kwargs, field", [
    ({"top_k": 5, "num_experts": 4}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"train_capacity_factor": 0.0}, "train_capacity_factor"),
    ({"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
    ({"capacity_rule": "gshard"}, "capacity_rule"),
    ({"max_group_size": 0}, "max_group_size"),
])
def test_bad_config_is_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        router_lib.RouterConfig(**kwargs)


def test_bad_call_is_a_clear_error():
    cfg = router_lib.RouterConfig(d_model=8, num_experts=4)
    with pytest.raises(ValueError, match="capacity_factor"):
        cfg.capacity(64, 0.0)
    layer = router_lib.Router(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="float"):
        layer(jnp.ones((1, 4, 8), jnp.int32), capacity=4)
    with pytest.raises(ValueError, match="D=8"):
        layer(jnp.ones((1, 4, 6)), capacity=4)
    assert math.isclose(cfg.capacity(64, 2.0), 32)


# --- Aux-loss-free balancing: a bias that steers selection only ----------------------------

def test_bias_steers_selection_but_not_combine_weights():
    # 3 tokens, 3 experts, top-1. Scores with a bias of 0.35 on e2: token 0 (.5, .3, .55) now
    # picks e2; token 1 (.6, .3, .45) and token 2 (.2, .7, .45) keep e0 and e1.
    probs_GTE = jnp.array([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]])
    logits_GTE = jnp.log(probs_GTE)
    plain = router_lib.route(logits_GTE, top_k=1, capacity=3)
    biased = router_lib.route(logits_GTE, top_k=1, capacity=3, bias_E=jnp.array([0, 0, 0.35]))
    assert plain.expert_GTA[0, :, 0].tolist() == [0, 0, 1]
    assert biased.expert_GTA[0, :, 0].tolist() == [2, 0, 1]
    # The combine weight is the chosen expert's *unbiased* probability (Wang et al. 2024).
    np.testing.assert_allclose(biased.weight_GTA[0, :, 0], [0.2, 0.6, 0.7], rtol=1e-6)
    # A zero bias changes nothing at all.
    zero = router_lib.route(logits_GTE, top_k=1, capacity=3, bias_E=jnp.zeros(3))
    for a, b in zip(zero, plain):
        np.testing.assert_array_equal(a, b)


def test_routing_bias_is_a_param_of_zeros_that_no_gradient_reaches():
    cfg = router_lib.RouterConfig(d_model=8, num_experts=4, balance_bias_rate=0.001)
    layer = router_lib.Router(cfg, rngs=nnx.Rngs(0))
    assert isinstance(layer.bias, router_lib.RoutingBias) and isinstance(layer.bias, nnx.Param)
    assert layer.bias.logical_axes == ("unmodeled",)
    np.testing.assert_array_equal(layer.bias[...], np.zeros(4, np.float32))
    assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 2  # checkpoints carry it
    assert not hasattr(router_lib.Router(router_lib.RouterConfig(d_model=8, num_experts=4),
                                         rngs=nnx.Rngs(0)), "bias")  # default: OpenMoE's params
    layer.bias[...] = jnp.array([0.3, -0.2, 0.1, 0.0])
    x_GTD = jax.random.normal(jax.random.key(3), (2, 16, 8))

    def loss(layer):
        routing, losses = layer(x_GTD, capacity=6)
        return routing.weight_GTA.sum() + losses["load_balance_loss"] + losses["router_z_loss"]

    grad = jax.grad(loss)(layer)
    assert float(jnp.abs(grad.kernel[...]).max()) > 0
    np.testing.assert_array_equal(grad.bias[...], np.zeros(4, np.float32))


def test_update_balance_bias_by_hand_and_per_layer_rows():
    load_E = jnp.array([0.4, 0.3, 0.2, 0.1])  # mean 0.25: two over, two under
    bias_E = router_lib.update_balance_bias(jnp.zeros(4), load_E, 0.001)
    np.testing.assert_allclose(bias_E, [-0.001, -0.001, 0.001, 0.001])
    assert np.isclose(router_lib.max_violation(load_E), 0.4 / 0.25 - 1)
    # [layers, E]: each row is balanced against its own mean; a balanced row stays put.
    load_LE = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    bias_LE = router_lib.update_balance_bias(jnp.zeros((2, 4)), load_LE, 0.01)
    np.testing.assert_allclose(bias_LE, [[-0.01, -0.01, 0.01, 0.01], [0, 0, 0, 0]])
    np.testing.assert_allclose(router_lib.max_violation(load_LE), [0.6, 0.0], rtol=1e-6)


def test_repeated_bias_updates_balance_a_skewed_router():
    # Fixed logits that favour low-numbered experts; only the bias moves (no training).
    logits_GTE = (jax.random.normal(jax.random.key(4), (2, 64, 8))
                  - 0.3 * jnp.arange(8, dtype=jnp.float32))
    bias_E, violations = jnp.zeros(8), []
    for _ in range(60):
        routing = router_lib.route(logits_GTE, top_k=2, capacity=128, bias_E=bias_E)
        load_E = router_lib.routing_metrics(routing, num_experts=8, capacity=128,
                                            seq_len=64)["expert_load"]
        violations.append(float(router_lib.max_violation(load_E)))
        bias_E = router_lib.update_balance_bias(bias_E, load_E, 0.01)
    assert violations[0] > 0.5 and max(violations[-10:]) < violations[0] / 3, violations


@pytest.mark.parametrize("kwargs, message", [
    ({"routing": "expert_choice"}, "routing='expert_choice'"),
    ({"routing": "experts_choose", "batch_prioritized": True}, "batch_prioritized=True"),
    ({"routing": "experts_choose", "balance_bias_rate": 0.001}, "balance_bias_rate=0.001"),
    ({"balance_bias_rate": -0.001}, "balance_bias_rate=-0.001: must be a finite number >= 0"),
    ({"balance_bias_rate": float("nan")}, "balance_bias_rate=nan"),
    ({"balance_bias_rate": float("inf")}, "balance_bias_rate=inf"),
])
def test_bad_routing_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        router_lib.RouterConfig(**kwargs)
