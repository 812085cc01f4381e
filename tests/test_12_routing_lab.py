"""Tests for 12_routing_lab.py: the causal-leak probe and its premises, on 06's tiny preset.

The probe's second measure rests on one claim: routing every token as a group of one scores each
prefix exactly as token-by-token decoding with the KV cache does. That is checked against 06's
decoder for token choice and expert choice. The first measure is checked on the three cases the
chapter teaches: expert choice leaks, OpenMoE's capacity-limited queue can leak, dropless never
does. The lab end to end is its own self-test (`--quick`), which tests/test_layout.py runs.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load

lab = load("12_routing_lab")
model_lib = load("06_model")
train_lib = load("09_train")

TINY = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=512, max_seq_len=64)


def random_params(cfg, seed=0):
    return nnx.state(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


def lm_batch(rows=4, length=32, seed=1, vocab=512):
    inputs = np.random.default_rng(seed).integers(2, vocab, (rows, length + 1)).astype(np.int32)
    return {"inputs": inputs[:, :-1], "targets": inputs[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "segment_ids": np.ones((rows, length), np.int32),
            "loss_mask": np.ones((rows, length), np.float32)}


def decoded_logits(params, cfg, tokens_L):
    """Logits of every prefix of one row, fed one token at a time through 06's KV cache."""
    graphdef, _, rest = nnx.split(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest)
    cache, rows = model_lib.init_cache(cfg, 1, len(tokens_L)), []
    for position, token in enumerate(tokens_L):
        logits_BV, cache = model_lib._decode_step(model, jnp.array([[token]], jnp.int32),
                                                  jnp.array([[position]], jnp.int32),
                                                  jnp.ones((1, 1), jnp.int32), cache)
        rows.append(np.asarray(logits_BV[0]))
    return np.stack(rows)


@pytest.mark.parametrize("routing", ["tokens_choose", "experts_choose"])
def test_groups_of_one_token_score_prefixes_as_decoding_does(routing):
    # One forward pass with every token its own routing group equals decoding token by token.
    cfg = dataclasses.replace(TINY, routing=routing)
    params, batch = random_params(cfg), lm_batch(rows=2, length=24)
    alone_BLV = np.asarray(lab.forward(params, lab.one_prefix_at_a_time(cfg), batch)[0])
    np.testing.assert_allclose(alone_BLV[1], decoded_logits(params, cfg, batch["inputs"][1]),
                               atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def probes():
    """The leak probe on one random tiny model per router, groups of the whole batch."""
    batches = [lm_batch(rows=4, length=32, seed=s) for s in (1, 2)]
    settings = {"openmoe": {}, "expert-choice": {"routing": "experts_choose"},
                "dropless": {"dropless": True}}
    return {name: lab.leak_probe(random_params(dataclasses.replace(TINY, **fields)),
                                 dataclasses.replace(TINY, **fields), batches)
            for name, fields in settings.items()}


def test_expert_choice_and_the_capacity_queue_leak_dropless_never_does(probes):
    assert probes["expert-choice"]["moved_share"] > 0
    # OpenMoE's queue: the last token's first choice is queued before every earlier token's
    # second choice, so it can push one of them past the capacity.
    assert probes["openmoe"]["moved_share"] > 0
    assert probes["dropless"]["moved_share"] == 0
    assert abs(probes["dropless"]["loss_gap"]) < 1e-5
    for probe in probes.values():
        assert probe["loss_gap"] == pytest.approx(probe["one_prefix_loss"] - probe["teacher_forced_loss"])


def test_a_changed_last_token_moves_nothing_when_capacity_never_binds():
    # With a capacity factor of E every choice fits: the same queue, no leak.
    cfg = dataclasses.replace(TINY, train_capacity_factor=float(TINY.num_experts))
    moved, earlier = lab.changed_earlier_tokens(random_params(cfg), cfg, lm_batch(),
                                                np.random.default_rng(0))
    assert moved == 0 and earlier == 4 * 32 - 1


def test_every_variant_is_a_valid_run_with_its_one_switch():
    base = train_lib.CONFIGS["laptop"]
    for variant in lab.VARIANTS:
        cfg = lab.variant_config(base, variant, "/tmp/lab")
        assert cfg.run_dir == f"/tmp/lab/{variant.name}" and cfg.steps == base.steps
        assert cfg.seed == base.seed and cfg.batch_size == base.batch_size
    changed = {v.name: lab.variant_config(base, v, "r") for v in lab.VARIANTS}
    assert changed["bpr"].model == dataclasses.replace(base.model, batch_prioritized=True)
    assert changed["frozen-router"].freeze_router_after == base.warmup_steps
    assert changed["dense"].model.moe_layers == [] and changed["dense"].model.d_ff == 2 * base.model.d_ff
