"""Tests for 13_chat.py: chat rows whose only targets are the assistant's, the fine-tune run (its
identity, exact resume, frozen routers, 8 devices equal to one) from a tiny base in the released
layout, the errors a user meets before anything compiles, and the KV-cached chat."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load
from test_support_tensor_files import FIXTURES

chat = load("13_chat")
released = load("10_released_models")
model_lib = load("06_model")
tok = load("01_tokenizer")
ada = load("08_adafactor")

TURNS = [{"role": "user", "content": "What does `os.sep` do?"}, {"role": "assistant", "content": "It separates."},
         {"role": "user", "content": "And `os.walk`?"}, {"role": "assistant", "content": "Walks a tree."}]


@pytest.fixture(scope="module")
def tokenizer():
    return tok.embedded_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """06's tiny preset, random, exported as a released checkpoint (config.json, safetensors, spiece)."""
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size, max_seq_len=128)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    released.export_hf(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)), directory, tokenizer=tokenizer)
    return directory


def recipe(base_dir, run_dir, **changes):
    return dataclasses.replace(chat.QUICK, base=str(base_dir), run_dir=str(run_dir), steps=4, peak_lr=1e-2,
                               eval_every=0, checkpoint_every=2, **changes)


# --- Chat rows ----------------------------------------------------------------------------------

def test_only_the_assistants_tokens_and_eos_are_targets(tokenizer):
    row = next(chat.pack_chat_rows([TURNS], tokenizer, 128, {}))
    prompt1 = [0] + tokenizer.encode(released.CHAT_TEMPLATE.format(query=TURNS[0]["content"]))
    reply1 = tokenizer.encode(" It separates.") + [1]
    prompt2 = tokenizer.encode(chat.NEXT_TURN.format(query=TURNS[2]["content"]))
    reply2 = tokenizer.encode(" Walks a tree.") + [1]
    sequence = prompt1 + reply1 + prompt2 + reply2
    n = len(sequence) - 1
    # Inputs are the sequence from id 0, targets one ahead; each target is weighted by whether
    # it is the assistant's (prompt and template tokens are inputs only).
    np.testing.assert_array_equal(row["inputs"][:n], sequence[:-1])
    np.testing.assert_array_equal(row["targets"][:n], sequence[1:])
    weights = [0.0] * (len(prompt1) - 1) + [1.0] * len(reply1) + [0.0] * len(prompt2) + [1.0] * len(reply2)
    np.testing.assert_array_equal(row["loss_mask"][:n], weights)
    assert row["loss_mask"][n:].sum() == 0 and set(row["segment_ids"][:n]) == {1}
    np.testing.assert_array_equal(row["positions"][:n], np.arange(n))


def test_per_token_loss_is_the_t5x_loss_over_assistant_tokens():
    # A tiny vocabulary, so the loss can be computed by hand from the logits.
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=16, max_seq_len=8, num_layers=2,
                              z_loss_weight=0.0, aux_loss_weight=0.0, router_z_loss_weight=0.0)
    model = model_lib.OpenMoE(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 16, (2, 8)).astype(np.int32),
             "targets": rng.integers(0, 16, (2, 8)).astype(np.int32),
             "loss_mask": (rng.random((2, 8)) < 0.5).astype(np.float32)}
    batch["loss_mask"][0, 0] = 1.0
    metrics, logits = jax.jit(lambda model, batch: (  # one compile, not one per eager op
        model_lib.loss_fn(model, batch, train=False)[1], model(batch["inputs"], train=False)[0]))(model, batch)
    logits = np.asarray(logits, np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_token = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
    by_hand = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["cross_entropy"]), by_hand, rtol=1e-5)
    # Not the port's "label smoothing", which sums -log p over the whole vocabulary.
    port = (-log_p.sum(-1) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert by_hand < port / 4


def test_conversations_share_a_row_but_never_attend_to_each_other(tokenizer):
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    row = next(chat.pack_chat_rows([TURNS[:2], other], tokenizer, 128, {}))
    first = row["segment_ids"] == 1
    second = row["segment_ids"] == 2
    assert first.any() and second.any() and row["positions"][second][0] == 0
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size, max_seq_len=128,
                              eval_capacity_factor=8.0)  # nothing dropped: routing groups cannot differ
    forward = jax.jit(lambda model, row: model(row["inputs"][None], positions_BL=row["positions"][None],
                                               segment_ids_BL=row["segment_ids"][None], train=False)[0][0])
    model = model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))
    alone_row = next(chat.pack_chat_rows([other], tokenizer, 128, {}))  # the same shapes: one compile
    together, alone = (np.asarray(forward(model, r)) for r in (row, alone_row))
    np.testing.assert_allclose(together[second], alone[alone_row["segment_ids"] == 1], atol=1e-5)


def test_a_long_conversation_is_cut_at_a_turn_boundary_and_counted(tokenizer):
    length = len(chat.encode_turns(chat.conversation_turns(TURNS[:2]), tokenizer)[0][0]) + 8
    stats = {}
    rows = list(chat.pack_chat_rows([TURNS], tokenizer, length, stats))
    assert stats == {"conversations": 1, "truncated": 1, "skipped": 0}
    assert rows[0]["loss_mask"].sum() == len(tokenizer.encode(" It separates.")) + 1
    stats = {}
    assert list(chat.pack_chat_rows([TURNS], tokenizer, 20, stats)) == [] and stats["skipped"] == 1


@pytest.mark.parametrize("conversation", [[{"role": "user", "content": "Hi"}], [],
                                          [{"role": "assistant", "content": "Hi"}]])
def test_a_conversation_without_an_assistant_turn_is_named(tokenizer, conversation):
    with pytest.raises(ValueError, match="conversation 1 has roles"):
        list(chat.pack_chat_rows([TURNS, conversation], tokenizer, 128, {}))


# --- Errors before anything compiles ------------------------------------------------------------

def test_a_template_longer_than_the_sequence_is_refused(base_dir, tmp_path):
    with pytest.raises(ValueError, match="chat template alone takes"):
        chat.prepare(recipe(base_dir, tmp_path / "run", seq_len=24))
    assert not (tmp_path / "run").exists()


def test_a_base_whose_tokenizer_does_not_match_is_refused(tmp_path, tokenizer):
    # 10's fixture (256 ids) with the embedded tokenizer's 8,320 beside it.
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "hf_safetensors", base)
    shutil.copy(FIXTURES / "config.json", base / "config.json")
    shutil.copy(tokenizer.path, base / "spiece.model")
    with pytest.raises(ValueError, match="does not belong|does not match"):
        chat.prepare(recipe(base, tmp_path / "run"))


def test_bad_recipe_fields_are_named():
    with pytest.raises(ValueError, match="optimizer"):
        dataclasses.replace(chat.QUICK, optimizer="sgd")
    with pytest.raises(ValueError, match="chat_data"):
        dataclasses.replace(chat.QUICK, chat_data="nope")


# --- The fine-tune run: one recipe (routers frozen, experts and model sharded), run three ways ------
FROZEN_SHARDED = {"train_routers": False, "mesh": "data=2,expert=2,model=2"}


@pytest.fixture(scope="module")
def straight(base_dir, tmp_path_factory):
    """The recipe's 4 steps in one go: the run the other runs are compared with."""
    run_dir = tmp_path_factory.mktemp("straight")
    return chat.finetune(recipe(base_dir, run_dir, **FROZEN_SHARDED), progress=False), run_dir


def params_of(cfg, run_dir=None):
    """A fine-tune's newest parameters, {name: array}."""
    model = chat.run_model(dataclasses.replace(cfg, run_dir=str(run_dir or cfg.run_dir)))[1]
    return {ada.leaf_name(path): np.asarray(x) for path, x in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def test_the_run_records_its_base_and_the_loss_falls(straight, base_dir):
    summary, run_dir = straight
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["base"] == str(base_dir) and len(saved["base_fingerprint"]) == 16
    assert saved["model.vocab_size"] == 8320 and saved["model.t5x_padding"] is True
    losses = list(summary["losses"].values())
    assert losses[-1] < losses[0]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and lines[-1]["data/conversations"] > 0
    assert "eval/chat/loss" in lines[-1]


def test_frozen_routers_keep_the_bases_routers(straight):
    summary, _ = straight
    base = {ada.leaf_name(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(
        nnx.state(chat.base_model(summary["cfg"]), nnx.Param))[0]}
    tuned = params_of(summary["cfg"])
    assert base.keys() == tuned.keys() and any("router" in name for name in base)
    for name in base:
        assert np.array_equal(base[name], tuned[name]) == ("router" in name), name


@pytest.mark.parametrize("optimizer", chat.OPTIMIZERS)
def test_each_optimizer_moves_everything_but_what_is_frozen(optimizer):
    # Routing biases (aux-loss-free balancing: 08's rule moves them) never take an optimizer
    # update; router kernels only while train_routers is true.
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=64, num_layers=2, balance_bias_rate=0.001)
    params = nnx.state(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    for train_routers in (True, False):
        tx = dataclasses.replace(chat.QUICK, optimizer=optimizer, train_routers=train_routers).make_optimizer(params)
        updates = jax.jit(lambda grads, params: tx.update(grads, tx.init(params), params)[0])(grads, params)
        updates = jax.tree_util.tree_flatten_with_path(updates)[0]
        frozen = {ada.leaf_name(path): not np.any(np.asarray(u)) for path, u in updates}
        assert any(name.endswith("router/bias") for name in frozen)
        assert frozen == {name: name.endswith("router/bias") or (not train_routers and name.endswith(
            "router/kernel")) for name in frozen}


def test_a_killed_fine_tune_resumes_bit_exactly(straight, base_dir, tmp_path):
    summary, run_dir = straight
    cfg = recipe(base_dir, tmp_path, **FROZEN_SHARDED)
    chat.finetune(cfg, stop_after=2, progress=False)
    resumed = chat.finetune(cfg, progress=False)
    assert list(resumed["losses"]) == [3, 4]
    assert [resumed["losses"][s] for s in (3, 4)] == [summary["losses"][s] for s in (3, 4)]
    ours, theirs = params_of(resumed["cfg"]), params_of(summary["cfg"], run_dir)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_one_device_equals_eight(straight, base_dir, tmp_path):
    summary, _ = straight
    assert len(jax.devices()) == 8
    one = chat.finetune(recipe(base_dir, tmp_path, **FROZEN_SHARDED), stop_after=2, progress=False,
                        mesh=load("07_sharding").mesh_from_text("", jax.devices()[:1]))
    np.testing.assert_allclose([one["losses"][s] for s in (1, 2)], [summary["losses"][s] for s in (1, 2)],
                               rtol=2e-5)
    assert one["cfg"].base_fingerprint == summary["cfg"].base_fingerprint


def test_a_run_directory_of_another_base_is_refused(straight, base_dir, tmp_path, tokenizer):
    _, run_dir = straight
    other = tmp_path / "other"
    shutil.copytree(base_dir, other)
    with pytest.raises(ValueError, match="different run.*'base'"):
        chat.finetune(recipe(other, run_dir, **FROZEN_SHARDED), progress=False)
    # The same path holding other weights: the fingerprint tells them apart.
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size, max_seq_len=128)
    released.export_hf(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(5)), other, tokenizer=tokenizer, overwrite=True)
    moved = tmp_path / "moved-run"
    shutil.copytree(run_dir, moved)
    saved = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**saved, "base": str(other)}))
    with pytest.raises(ValueError, match="base_fingerprint"):
        chat.finetune(recipe(other, moved, **FROZEN_SHARDED), progress=False)


def test_the_chat_session_reuses_its_cache_exactly(base_dir, tokenizer):
    cfg = dataclasses.replace(released.load_config(base_dir)[1], eval_capacity_factor=8.0)
    model = released.model_from_tensors(released.read_tensors(base_dir), cfg)
    session = chat.ChatSession(model, tokenizer, max_new_tokens=4)
    first, second = session.reply("Hi"), session.reply("And?")
    history = (chat.encode_turns([("Hi", "")], tokenizer)[0][0] + first + [1]
               + tokenizer.encode(chat.NEXT_TURN.format(query="And?")))
    assert model_lib.generate(model, [history], max_new_tokens=4)[0] == second


def test_held_out_batches_count_every_held_out_token_once(tokenizer):
    rows = list(chat.pack_chat_rows(chat.embedded_conversations("validation"), tokenizer, 128, {}))
    batches = chat.heldout_batches(tokenizer, 128, 16, 100)["chat"]
    assert len(batches) == -(-len(rows) // 16) and all(b["inputs"].shape == (16, 128) for b in batches)
    assert sum(b["loss_mask"].sum() for b in batches) == sum(r["loss_mask"].sum() for r in rows)
    assert len(chat.heldout_batches(tokenizer, 128, 16, 1)["chat"]) == 1


def test_the_judge_scores_what_the_loop_evaluated(straight, tokenizer):
    # The loop's last held-out loss (on the mesh) and the judge's (one device, unsharded model).
    summary, _ = straight
    judged = chat.heldout_loss(chat.run_model(summary["cfg"])[1], chat.eval_sets(summary["cfg"], tokenizer)["chat"])
    assert judged["loss"] == pytest.approx(summary["eval"]["eval/chat/loss"], rel=1e-5)
    assert judged["accuracy"] == pytest.approx(summary["eval"]["eval/chat/accuracy"], abs=1e-6)


def test_a_hub_chat_set_streams_the_chosen_models_conversations(tmp_path, tokenizer, monkeypatch):
    # WildChat's layout (a `conversation` of {"role", "content"} messages, a `model` column) in a
    # local JSON-lines file, streamed by 01's loader through `datasets` as a hub set would be.
    other = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello from 3.5."}]
    table = [(TURNS, "gpt-4-0314"), (other, "gpt-3.5-turbo"), (TURNS[:2], "gpt-4")]
    path = tmp_path / "wildchat.jsonl"
    path.write_text("".join(json.dumps({"conversation": c, "model": m, "turn": 1}) + "\n" for c, m in table))
    hub = tok.HubSource("json", column="conversation", data_files=str(path))
    assert list(chat.hub_conversations(hub, "gpt-4")) == [TURNS, TURNS[:2]]
    monkeypatch.setitem(chat.CHAT_SOURCES, "wildchat-gpt4", (hub, "gpt-4"))
    counts = {}
    cfg = dataclasses.replace(chat.QUICK, chat_data="wildchat-gpt4", seq_len=128, batch_size=1)
    rows = list(chat.chat_batches(cfg, tokenizer, counts=counts))
    replies = [len(tokenizer.encode(" " + m["content"])) + 1 for m in TURNS + TURNS[:2] if m["role"] == "assistant"]
    assert sum(row["loss_mask"].sum() for row in rows) == sum(replies) and counts["conversations"] == 2
