"""Tests for 11_routing_analysis.py: the routing statistics on constructed decisions with known
answers, the text helpers, and loading, recording and analysing one tiny 09 run.

The statistics are pure numpy functions, so they are checked on hand-built router decisions
whose answers are known. Everything that needs a trained model shares one module-scoped run of
06's "tiny" preset (4 blocks, MoE in blocks 1 and 3; 10 steps, checkpoints at 5 and 10, rows
of 32 tokens), trained once by 09's own `train`. Released models are stood in for by tiny
checkpoints that 10's `export_hf` writes in the released HF layout (06's tiny preset, random
weights from two seeds), analysed through `--model` and `--series` without any network.
"""

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import checkpoints

from conftest import REPO_ROOT, load

analysis = load("11_routing_analysis")
released = load("10_released_models")
train_lib = load("09_train")
model_lib = load("06_model")
tok = load("01_tokenizer")


# ---------------------------------------------------------------------------------------------
# A. Statistics on constructed decisions
# ---------------------------------------------------------------------------------------------

def test_routing_distribution_counts_every_choice_and_filters_rare_values():
    # The docstring's example: per value, the share of its assignments that went to each expert.
    values, counts, dist = analysis.routing_distribution(np.array([7, 7, 9]), np.array([[0], [1], [1]]), 2)
    assert values.tolist() == [7, 9] and counts.tolist() == [2, 1]
    np.testing.assert_allclose(dist, [[0.5, 0.5], [0.0, 1.0]])
    # min_count drops values seen fewer times (9 is seen once).
    values, counts, dist = analysis.routing_distribution(np.array([7, 7, 9]), np.array([[0], [1], [1]]), 2,
                                                 min_count=2)
    assert values.tolist() == [7] and counts.tolist() == [2]
    np.testing.assert_allclose(dist, [[0.5, 0.5]])
    # k=2: both choices count, so value 3's four assignments are e0 twice, e1 once, e2 once.
    values, counts, dist = analysis.routing_distribution(np.array([3, 3]), np.array([[0, 1], [0, 2]]), 4)
    assert values.tolist() == [3] and counts.tolist() == [2]
    np.testing.assert_allclose(dist, [[0.5, 0.25, 0.25, 0.0]])


@pytest.mark.parametrize("experts,top_k", [(8, 1), (8, 2), (32, 2), (16, 3), (4, 4)])
def test_max_spread_is_the_std_of_a_value_that_always_picks_the_same_experts(experts, top_k):
    # The normaliser of the specialization score: k entries at 1/k, the rest zero.
    always_same = np.array([1.0 / top_k] * top_k + [0.0] * (experts - top_k))
    assert analysis.max_spread(experts, top_k) == pytest.approx(np.std(always_same), abs=1e-12)


def _pair_table():
    """All 56 ordered pairs of distinct experts out of 8: a balanced top-2 lookup table (every
    expert is the first choice of 7 entries and the second of 7), so mixing the table's rows
    uniformly gives exactly uniform routing."""
    return np.array([(a, b) for a in range(8) for b in range(8) if a != b])


def test_specialization_score_separates_token_id_routing_from_position_routing():
    # Finding 1's measure: a router that reads only the token id scores 1 by token id and ~0 by
    # position; one that reads only the position the reverse; a random router ~0 for both.
    rng = np.random.default_rng(0)
    table = _pair_table()
    n = 56 * 400
    token_N = rng.integers(0, 56, n)
    position_N = rng.integers(0, 56, n)
    by_token = table[token_N]
    by_position = table[position_N]
    random_choice = np.argsort(rng.random((n, 8)), axis=1)[:, :2]  # 2 distinct random experts

    def scores(expert_NA):
        return (analysis.specialization_score(token_N, expert_NA, 8, min_count=100)["score"],
                analysis.specialization_score(position_N, expert_NA, 8, min_count=100)["score"])

    token_score, position_score = scores(by_token)
    assert token_score == pytest.approx(1.0, abs=1e-9) and position_score < 0.2
    token_score, position_score = scores(by_position)
    assert position_score == pytest.approx(1.0, abs=1e-9) and token_score < 0.2
    token_score, position_score = scores(random_choice)
    assert token_score < 0.2 and position_score < 0.2
    # Values below min_count are left out, and with none left the score is NaN, not an error.
    result = analysis.specialization_score(token_N, by_token, 8, min_count=n + 1)
    assert result["distinct_values"] == 0 and np.isnan(result["score"])
    assert analysis.specialization_score(token_N, by_token, 8, min_count=1)["distinct_values"] == 56


def test_top_tokens_orders_each_experts_tokens_by_count_with_their_share():
    # The paper's Table 9: per expert, the ids it receives most, and how reliably it gets them.
    token_N = np.array([5, 5, 5, 5, 6, 6, 6, 6, 7])
    expert_NA = np.array([[2, 0]] * 4 + [[2, 1], [2, 1], [3, 1], [3, 1]] + [[2, 3]])
    table = analysis.top_tokens(token_N, expert_NA, num_experts=5)
    assert table[0] == [(5, 4, 1.0)]
    assert table[1] == [(6, 4, 1.0)]
    assert table[2] == [(5, 4, 1.0), (6, 2, 0.5), (7, 1, 1.0)]  # token 5 always, 6 half the time
    assert table[3] == [(6, 2, 0.5), (7, 1, 1.0)]
    assert table[4] == []  # an unused expert has no top tokens
    assert analysis.top_tokens(token_N, expert_NA, num_experts=5, count=2)[2] == [(5, 4, 1.0), (6, 2, 0.5)]


def test_top1_experts_and_agreement():
    # Finding 2 compares favourite experts between checkpoints: identical routing agrees fully,
    # relabelled experts (a permutation with no fixed point) not at all, and only ids present in
    # both are compared.
    rng = np.random.default_rng(1)
    token_N = rng.integers(0, 10, 4000)
    first_N = np.where(rng.random(4000) < 0.7, token_N % 4, rng.integers(0, 4, 4000))
    expert_NA = np.stack([first_N, (first_N + 1) % 4], axis=1)
    ids, top1 = analysis.top1_experts(token_N, expert_NA, 4, min_count=1)
    assert ids.tolist() == list(range(10)) and top1.tolist() == [t % 4 for t in range(10)]
    # The favourite is the most common *first* choice: second choices do not count.
    _, top1_second = analysis.top1_experts(token_N, expert_NA[:, ::-1], 4, min_count=1)
    assert top1_second.tolist() == [(t + 1) % 4 for t in range(10)]
    assert analysis.agreement(ids, top1, ids, top1) == 1.0
    relabelled = (expert_NA + 1) % 4  # e -> e+1: no expert keeps its label
    assert analysis.agreement(ids, top1, *analysis.top1_experts(token_N, relabelled, 4, min_count=1)) == 0.0
    # Only common ids: 2 agrees, 3 does not, 1 and 4 are in one side only.
    assert analysis.agreement(np.array([1, 2, 3]), np.array([0, 1, 2]),
                        np.array([2, 3, 4]), np.array([1, 0, 5])) == 0.5
    assert np.isnan(analysis.agreement(np.array([1]), np.array([0]), np.array([2]), np.array([0])))
    # min_count removes rare ids from the comparison.
    rare = np.concatenate([token_N, [99]])
    rare_experts = np.concatenate([expert_NA, [[0, 1]]])
    assert 99 in analysis.top1_experts(rare, rare_experts, 4, min_count=1)[0]
    assert 99 not in analysis.top1_experts(rare, rare_experts, 4, min_count=2)[0]


def test_drop_rate_by_position_and_quarter_means():
    # Finding 3's curve: dropped share of the k assignments at each position; NaN where no token.
    position_N = np.array([0, 0, 1, 3])
    kept_NA = np.array([[True, True], [True, False], [False, False], [True, False]])
    rate_L = analysis.drop_rate_by_position(position_N, kept_NA, seq_len=4)
    np.testing.assert_allclose(rate_L[[0, 1, 3]], [0.25, 1.0, 0.5])
    assert np.isnan(rate_L[2])
    assert analysis.quarter_means(np.arange(8.0)) == [0.5, 2.5, 4.5, 6.5]
    assert analysis.quarter_means(np.array([np.nan, 1, 2, 3, 4, 5, 6, 7])) == [1.0, 2.5, 4.5, 6.5]


def test_decisions_only_selects_one_sources_rows_in_every_field():
    # Every per-source statistic goes through only(): all row-indexed fields must stay aligned.
    decisions = analysis.Decisions(
        sources=("a", "b"), source_N=np.array([0, 1, 0, 1, 1]), token_N=np.array([10, 11, 12, 13, 14]),
        position_N=np.array([0, 1, 2, 3, 4]),
        expert_NA={1: np.arange(10).reshape(5, 2), 3: np.arange(10, 20).reshape(5, 2)},
        kept_NA={1: np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], bool),
                 3: np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0, 1]], bool)},
        num_experts=20, seq_len=5)
    b = decisions.only("b")
    rows = [1, 3, 4]
    assert b.source_N.tolist() == [1, 1, 1] and b.token_N.tolist() == [11, 13, 14]
    assert b.position_N.tolist() == [1, 3, 4]
    for layer in (1, 3):
        assert b.expert_NA[layer].tolist() == decisions.expert_NA[layer][rows].tolist()
        assert b.kept_NA[layer].tolist() == decisions.kept_NA[layer][rows].tolist()
    assert (b.sources, b.num_experts, b.seq_len) == (("a", "b"), 20, 5)
    assert decisions.only("a").token_N.tolist() == [10, 12]


# ---------------------------------------------------------------------------------------------
# B. Text helpers
# ---------------------------------------------------------------------------------------------

def test_chat_formatted_alternates_user_and_assistant_over_paragraphs():
    # OOD text for finding 3: same words, chat shape. Paragraphs alternate roles, in order.
    paragraphs = ["First paragraph here.", "Second one.", "And the third."]
    (chat,) = tok.chat_formatted(["\n\n".join(paragraphs[:2]) + "\n\n\n" + paragraphs[2] + "\n"])
    markers = re.findall(r"### (User|Assistant):", chat)
    assert markers[:3] == ["User", "Assistant", "User"]
    assert all(a != b for a, b in zip(markers, markers[1:]))  # strictly alternating
    places = [chat.index(f"### {role}:\n{p}") for role, p in zip(markers, paragraphs)]
    assert places == sorted(places)
    assert len(tok.chat_formatted(["a", "b\n\nc"])) == 2  # one chat per document


def test_other_language_texts_has_one_document_per_header_and_no_comments(tmp_path):
    text = tok.OTHER_LANGUAGES.read_text(encoding="utf-8")
    headers = [line for line in text.splitlines() if re.fullmatch(r"== .+ ==", line)]
    documents = tok.other_language_texts()
    assert len(headers) > 0 and len(documents) == len(headers)
    for document in documents:
        assert document.strip()
        assert not any(line.startswith("#") or line.startswith("== ") for line in document.splitlines())
    # A small file with a comment before and inside a document.
    path = tmp_path / "langs.txt"
    path.write_text("# about this file\n== A ==\nhello\n# a note\nworld\n== B ==\nbye\n", encoding="utf-8")
    assert tok.other_language_texts(path) == ["hello\nworld", "bye"]


# ---------------------------------------------------------------------------------------------
# C. One tiny trained run: loading, recording, analysing
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run (10 steps, checkpoints at 5 and 10), plus 09's own trainer and its initial
    parameters, captured as 09 builds them (copied before the first step donates them)."""
    cfg = dataclasses.replace(
        analysis.quick_run_config(), run_dir=str(tmp_path_factory.mktemp("routing") / "run"), steps=10,
        checkpoint_every=5, keep_period=5, seq_len=32, batch_size=8, warmup_steps=2)
    captured = {}
    build_trainer = train_lib.build_trainer

    def recording_build_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        captured["trainer"] = trainer
        captured["initial"] = jax.tree.map(np.array, trainer.params)
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lib, "build_trainer", recording_build_trainer)
        train_lib.train(cfg, overwrite=True, progress=False)
    return types.SimpleNamespace(cfg=cfg, run=released.open_run(cfg.run_dir), **captured)


@pytest.fixture(scope="module")
def initial_params(trained):
    """10's step 0, built once: it runs 06's initialization eagerly, seconds on a CPU."""
    return released.load_params(trained.run, 0)


@pytest.fixture(scope="module")
def rows_by_source(trained):
    """Packed rows of two sources: 17 text rows take two batches of 16, the second padded."""
    tokenizer = train_lib.load_tokenizer(trained.cfg)
    texts = analysis.analysis_texts()
    return {"text": analysis.pack_rows(texts["text"], tokenizer, trained.cfg.seq_len, 17),
            "other languages": analysis.pack_rows(texts["other languages"], tokenizer, trained.cfg.seq_len, 3)}


def test_open_run_reads_the_config_and_every_kept_checkpoint(trained):
    # The analysis must see the run's own config and every checkpoint 09 kept.
    run = trained.run
    assert run.cfg == trained.cfg  # config.json round-trips to the same TrainConfig
    # keep_period=5 keeps every multiple of 5, so both checkpoints of the 10 steps remain.
    assert run.steps == (5, 10)


def test_open_run_rejects_directories_that_are_not_runs(tmp_path, trained):
    # A wrong --run-dir must fail with a message naming the directory, not an orbax traceback.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}.*no config.json"):
        released.open_run(empty)
    # A config but no checkpoints/ yet, then an empty checkpoints/.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(trained.run.path / "config.json", fresh / "config.json")
    with pytest.raises(ValueError, match=f"{re.escape(str(fresh))}.*no checkpoints"):
        released.open_run(fresh)
    (fresh / "checkpoints").mkdir()
    with pytest.raises(ValueError, match=f"{re.escape(str(fresh))}.*no checkpoints"):
        released.open_run(fresh)


def _paths_and_leaves(state):
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [jax.tree_util.keystr(path) for path, _ in flat], [np.asarray(x) for _, x in flat]


def test_a_run_exports_to_the_released_layout_and_loads_back(trained, tmp_path, capsys):
    # Chapter 10's `export`: a 09 run written as a released model (config.json, safetensors,
    # spiece.model) loads back with the run's exact parameters. (Here, where the run is.)
    out = tmp_path / "hf"
    released.main(["export", "--run-dir", str(trained.run.path), "--out", str(out), "--step", "5"])
    assert "step 5" in capsys.readouterr().out
    model, tokenizer = released.load_model(out)
    assert tokenizer.vocab_size == model.cfg.vocab_size
    loaded = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(loaded, jax.tree.leaves(released.load_params(trained.run, 5))))
    with pytest.raises(ValueError, match="already holds"):
        released.export_hf(model, out)


def test_load_params_matches_09s_initialization_and_restore(trained, initial_params):
    # 10 reads checkpoints its own way (params only, onto one device); it must get exactly what
    # 09's own restore gets, and step 0 must be 09's initialization (same seed).
    run, trainer = trained.run, trained.trainer
    cfg = trained.cfg
    manager = checkpoints.manager(cfg.run_dir, keep_last=cfg.keep_last, keep_period=cfg.keep_period)
    step = run.steps[-1]
    params, _ = checkpoints.restore(manager, step, trainer.params, trainer.opt_state)  # 09's restore
    manager.close()
    final_paths, final_leaves = _paths_and_leaves(params)
    # 09 saved what it trained: the restore equals the trainer's final in-memory parameters.
    for ours, theirs in zip(final_leaves, _paths_and_leaves(trainer.params)[1]):
        assert np.array_equal(ours, theirs)

    paths, leaves = _paths_and_leaves(released.load_params(run, step))
    assert paths == final_paths
    for path, ours, theirs in zip(paths, leaves, final_leaves):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), path

    init_paths, init_leaves = _paths_and_leaves(trained.initial)
    paths, leaves = _paths_and_leaves(initial_params)
    assert paths == init_paths
    for path, ours, theirs in zip(paths, leaves, init_leaves):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=path)  # jit vs eager
    # Training moved the parameters, so the two comparisons above are not the same one.
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(init_leaves, final_leaves))

    with pytest.raises(ValueError, match="step=12345"):
        released.load_params(run, 12345)


def test_record_decisions_equals_the_models_own_routing(trained, rows_by_source):
    # The recorded decisions must be the model's: same experts and kept flags, each at the token
    # and position it belongs to, whatever the batching (17 rows: a full batch, then a padded
    # one). Groups are single rows, so running every row in one batch routes them identically.
    run = trained.run
    model_cfg = analysis.analysis_config(analysis.run_subject(run))
    params = released.load_params(run, run.steps[-1])
    decisions = analysis.record_decisions(params, model_cfg, rows_by_source)  # batch_rows=16
    assert decisions.sources == tuple(rows_by_source)
    assert (decisions.num_experts, decisions.seq_len) == (model_cfg.num_experts, run.cfg.seq_len)

    model = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, params)
    routings_of = nnx.jit(lambda m, inputs, positions, segment_ids: m(
        inputs, positions_BL=positions, segment_ids_BL=segment_ids, train=False)[1])
    every = {k: np.concatenate([rows[k] for rows in rows_by_source.values()]) for k in
             ("inputs", "positions", "segment_ids")}
    routings = routings_of(model, every["inputs"], every["positions"], every["segment_ids"])
    assert len(routings) == len(model_cfg.moe_layers)

    start = 0
    for index, (source, rows) in enumerate(rows_by_source.items()):
        part = decisions.only(source)
        count = len(rows["inputs"])
        assert part.source_N.tolist() == [index] * rows["inputs"].size
        np.testing.assert_array_equal(part.token_N, rows["inputs"].ravel())
        np.testing.assert_array_equal(part.position_N, rows["positions"].ravel())
        for layer, routing in zip(model_cfg.moe_layers, routings):
            for ours, name in ((part.expert_NA, "expert_BLA"), (part.kept_NA, "kept_BLA")):
                theirs = np.asarray(routing[name])[start:start + count].reshape(-1, model_cfg.top_k)
                np.testing.assert_array_equal(ours[layer], theirs, err_msg=f"{source} {name} {layer}")
        start += count


def queue_kept(expert_BLA, capacity: int, num_experts: int):
    """Oracle for one-row routing groups: an expert's queue holds all first choices in position
    order, then all second choices; the first `capacity` of its queue are kept."""
    rows, length, top_k = expert_BLA.shape
    kept = np.zeros(expert_BLA.shape, bool)
    for r in range(rows):
        used = np.zeros(num_experts, int)
        for a in range(top_k):
            for t in range(length):
                e = expert_BLA[r, t, a]
                kept[r, t, a] = used[e] < capacity
                used[e] += 1
    return kept


def test_capacity_rules_and_factors_on_real_decisions(trained, rows_by_source):
    # Finding 3 compares capacity settings: each must be the capacity it claims, and more room
    # may only keep more, never drop what a smaller capacity kept.
    run = trained.run
    subject = analysis.run_subject(run)
    params = released.load_params(run, run.steps[-1])
    seq_len, experts, top_k = run.cfg.seq_len, 8, 2  # the tiny preset: 8 experts, top-2
    settings = {  # name: (capacity factor, rule, C by hand for groups of one 32-token row)
        "t5x 1.25": (1.25, "t5x", max(4, round(1.25 * seq_len / experts))),                     # 5
        "colossalai 1.25": (1.25, "colossalai", max(4, int(top_k * 1.25 * seq_len / experts))),  # 10
        "t5x 2.0": (2.0, "t5x", max(4, round(2.0 * seq_len / experts))),                        # 8
    }
    recorded = {}
    for name, (capacity_factor, rule, capacity) in settings.items():
        model_cfg = analysis.analysis_config(subject, capacity_factor=capacity_factor,
                                       capacity_rule=rule)
        assert model_cfg.num_experts == experts and model_cfg.top_k == top_k
        recorded[name] = decisions = analysis.record_decisions(params, model_cfg, rows_by_source)
        # In every layer the kept flags follow the priority queue of each row (the analysis'
        # routing groups) with the hand-computed capacity: flags line up with their tokens.
        for source in decisions.sources:
            part = decisions.only(source)
            for layer in model_cfg.moe_layers:
                expert_BLA = part.expert_NA[layer].reshape(-1, seq_len, top_k)
                np.testing.assert_array_equal(part.kept_NA[layer].reshape(expert_BLA.shape),
                                              queue_kept(expert_BLA, capacity, experts),
                                              err_msg=f"{name}, {source}, layer {layer}")

    # Monotonicity. Only the first MoE layer sees identical inputs under every setting: drops
    # there change its output, so later MoE layers route different hidden states. In the first
    # MoE layer the choices are the same and only the room differs, so more room keeps a
    # superset (an assignment's queue place does not depend on the capacity).
    first = min(recorded["t5x 1.25"].expert_NA)
    t5x, colossal, eval_cf = (recorded[n] for n in ("t5x 1.25", "colossalai 1.25", "t5x 2.0"))
    np.testing.assert_array_equal(t5x.expert_NA[first], colossal.expert_NA[first])
    np.testing.assert_array_equal(t5x.expert_NA[first], eval_cf.expert_NA[first])
    assert np.all(colossal.kept_NA[first] >= t5x.kept_NA[first])  # ColossalAI (k in C) ⊇ T5X
    assert np.all(eval_cf.kept_NA[first] >= t5x.kept_NA[first])   # cf 2.0 ⊇ cf 1.25
    assert colossal.kept_NA[first].sum() >= t5x.kept_NA[first].sum()
    assert not t5x.kept_NA[first].all()  # C = 5 < 64 assignments per row: something is dropped


def test_analyse_writes_report_and_json_and_rejects_bad_arguments(trained, initial_params, tmp_path,
                                                                   monkeypatch, capsys):
    # The end-to-end analysis on a real run. To keep it fast: two sweep values instead of six
    # (each capacity is one more compiled forward pass; both are settings the curves also use),
    # and step 0 comes from the fixture (load_params(run, 0) is tested above); every other
    # load goes to the real load_params, and the calls are logged.
    run = trained.run
    sweep = (run.cfg.model.train_capacity_factor, run.cfg.model.eval_capacity_factor)
    load_params, loaded = released.load_params, []

    def logged_load_params(run_, step):
        loaded.append(step)
        return initial_params if step == 0 else load_params(run_, step)

    monkeypatch.setattr(released, "load_params", logged_load_params)
    record_decisions, routed = analysis.record_decisions, []

    def logged_record_decisions(params, model_cfg, rows_by_source):
        routed.append((model_cfg.eval_capacity_factor,
                       "dropless" if model_cfg.dropless else model_cfg.capacity_rule))
        return record_decisions(params, model_cfg, rows_by_source)

    monkeypatch.setattr(analysis, "record_decisions", logged_record_decisions)
    subject = analysis.run_subject(run)
    out_dir = tmp_path / "analysis"
    results = analysis.analyse(subject, max_rows=4, min_count=2, sweep=sweep, out_dir=out_dir)
    # Every checkpoint read exactly once: the last (analysed in full, then released), then the
    # initialization and every earlier kept checkpoint, in order.
    assert loaded == [run.steps[-1], 0, *run.steps[:-1]]
    # Each capacity routed once on the last checkpoint (evaluation cf for specialization, which
    # the drop study's settings and sweep reuse), then each earlier checkpoint at the eval cf.
    assert routed == [(2.0, "t5x"), (1.25, "t5x"), (1.25, "colossalai"), (1.25, "dropless"),
                      (2.0, "t5x"), (2.0, "t5x")]
    # It says what it is doing as it goes: one line per routing pass.
    said = capsys.readouterr().err
    assert "routing every row at capacity factor 2.0 (t5x rule)" in said
    assert f"early routing: step 0 (1 of {len(run.steps)})" in said
    assert (out_dir / "report.txt").read_text().strip()
    saved = json.loads((out_dir / "analysis.json").read_text())
    assert {"specialization", "early_routing", "drops"} <= set(saved)

    # Early routing: one point per checkpoint plus initialization; the final one vs itself is 1.
    early = results["early_routing"]
    assert early["steps"] == [0, *run.steps] and saved["early_routing"]["steps"] == [0, *run.steps]
    assert set(early["agreement"]) == set(subject.model_cfg.moe_layers)
    for curve in early["agreement"].values():
        assert len(curve) == len(run.steps) + 1 and curve[-1] == 1.0
        assert all(0.0 <= value <= 1.0 for value in curve)

    # Rows routed per source are capped at max_rows; each source's expert shares sum to 1.
    assert set(results["rows_per_source"]) == set(analysis.analysis_texts())
    assert all(1 <= n <= 4 for n in results["rows_per_source"].values())
    for shares in results["specialization"]["by_source"].values():
        assert sum(shares) == pytest.approx(1.0)
    # Drop curves: one share in [0, 1] per position, for every setting and source; the sweep's
    # last-quarter numbers are those of the T5X curves at the same capacity factor.
    curves = results["drops"]["curves"]
    for by_source in curves.values():
        assert set(by_source) == set(results["rows_per_source"])
        for curve_L in by_source.values():
            assert len(curve_L) == run.cfg.seq_len and np.all((curve_L >= 0) & (curve_L <= 1))
    # Dropless experts serve every assignment: the cure leaves nothing to drop anywhere.
    assert all(np.all(curve_L == 0) for curve_L in curves["dropless"].values())
    last_quarter = results["drops"]["sweep"]
    assert list(last_quarter) == list(sweep)
    for name, (capacity_factor, rule) in analysis.capacity_settings(subject.model_cfg).items():
        if rule == "t5x":
            for source, curve_L in curves[name].items():
                assert last_quarter[capacity_factor][source] == pytest.approx(
                    analysis.quarter_means(curve_L)[-1])

    # Bad arguments fail before anything is written.
    bad_dir = tmp_path / "bad"
    model_cfg = subject.model_cfg
    dense_layer = next(l for l in range(model_cfg.num_layers) if l not in model_cfg.moe_layers)
    with pytest.raises(ValueError, match=f"layer={dense_layer}"):
        analysis.analyse(subject, layer=dense_layer, out_dir=bad_dir)
    with pytest.raises(ValueError, match="max_rows=0"):
        analysis.analyse(subject, max_rows=0, out_dir=bad_dir)
    with pytest.raises(ValueError, match="min_count=0"):
        analysis.analyse(subject, min_count=0, out_dir=bad_dir)
    with pytest.raises(ValueError, match=re.escape("sweep=(2.0, 2.0)")):
        analysis.analyse(subject, sweep=(2.0, 2.0), out_dir=bad_dir)
    # A min_count that no position can reach (each occurs once per row: 4 text + 4 code rows)
    # is refused before any checkpoint is read.
    loads = len(loaded)
    with pytest.raises(ValueError, match=r"min_count=9: too little text.*4 text \+ 4 code rows.*"
                                         r"--min-count 8 or less"):
        analysis.analyse(subject, max_rows=4, min_count=9, out_dir=bad_dir)
    assert len(loaded) == loads and not bad_dir.exists()


# ---------------------------------------------------------------------------------------------
# D. Released models: --model and --series, on tiny checkpoints in the released HF layout
# ---------------------------------------------------------------------------------------------

RELEASED_ROWS = dict(seq_len=32)  # short rows: every source yields some, and compiles are small


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three tiny "released" models written by 10's export_hf (06's tiny preset, whose vocabulary
    is the embedded tokenizer's): seed 0, the same weights again elsewhere, and seed 1."""
    tokenizer = tok.embedded_tokenizer()
    root = tmp_path_factory.mktemp("released")
    paths = {}
    for name, seed in (("seed0", 0), ("seed0-again", 0), ("seed1", 1)):
        model = model_lib.OpenMoE(model_lib.PRESETS["tiny"], rngs=nnx.Rngs(seed))
        paths[name] = str(released.export_hf(model, root / name, tokenizer=tokenizer))
    return paths


def logging_loads(patch, loaded: list):
    """Log, by directory name and in order, every checkpoint 11 reads through 10's series_params."""
    series_params = released.series_params

    def logged(series, index):
        loaded.append(series.directories[index].name)
        return series_params(series, index)

    patch.setattr(released, "series_params", logged)
    return loaded


@pytest.fixture
def logged_loads(monkeypatch):
    return logging_loads(monkeypatch, [])


def test_released_subject_reads_configs_now_and_weights_on_demand(exported, logged_loads):
    # A series is described from config.json and spiece.model alone; weights are read only when
    # a checkpoint is loaded, in the dtype asked for, with T5X's evaluation semantics.
    subject = analysis.released_subject([exported["seed1"], exported["seed0"]], **RELEASED_ROWS)
    assert logged_loads == []
    assert subject.labels == (exported["seed1"], exported["seed0"])
    assert subject.steps == (1, 2) and subject.total_steps == 2
    assert (subject.step_name, subject.seq_len) == ("checkpoint", 32)
    assert subject.name == exported["seed0"]  # the last checkpoint is the one analysed in full
    cfg = subject.model_cfg
    assert cfg.t5x_padding and cfg.group_rule == "flaxformer" and cfg.moe_layers == [1, 3]
    assert subject.tokenizer.vocab_size == cfg.vocab_size
    # The analysis keeps T5X's padding masks but routes each row as one group, as the paper did.
    analysed = analysis.analysis_config(subject, capacity_factor=2.0, capacity_rule="colossalai")
    assert analysed.t5x_padding and analysed.group_rule == "divisor"
    assert (analysed.max_group_size, analysed.eval_capacity_factor) == (32, 2.0)

    params = subject.load(-1)
    assert logged_loads == ["seed0"]
    expected = nnx.state(model_lib.OpenMoE(model_lib.PRESETS["tiny"], rngs=nnx.Rngs(0)), nnx.Param)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert ours.dtype == np.float32 and np.array_equal(ours, theirs)

    # bfloat16 halves the memory: parameters and activations both (the output projection and
    # the routers, which compute in f32, stay f32).
    half = analysis.released_subject([exported["seed0"]], dtype=jnp.bfloat16, **RELEASED_ROWS)
    assert half.model_cfg.dtype == jnp.bfloat16 and "bfloat16" in half.about
    flat = jax.tree_util.tree_flatten_with_path(half.load(0))[0]
    for path, leaf in flat:
        kept_f32 = "logits_dense" in jax.tree_util.keystr(path) or "router" in jax.tree_util.keystr(path)
        assert leaf.dtype == (jnp.float32 if kept_f32 else jnp.bfloat16), path
    leaves = [leaf for _, leaf in flat]
    np.testing.assert_array_equal(np.asarray(leaves[0], np.float32),
                                  np.asarray(jax.tree.leaves(expected)[0]).astype(jnp.bfloat16)
                                  .astype(np.float32))


def test_pack_rows_with_decoder_start_shifts_the_row_behind_id_0():
    # Released weights read [0, t1 … t_{L-1}], as T5X fed them; positions and segments unchanged.
    tokenizer = tok.embedded_tokenizer()
    texts = analysis.analysis_texts()["text"]
    plain = analysis.pack_rows(texts, tokenizer, 16, 3)
    started = analysis.pack_rows(texts, tokenizer, 16, 3, decoder_start=True)
    assert started["inputs"].shape == plain["inputs"].shape == (3, 16)
    assert (started["inputs"][:, 0] == 0).all() and (plain["inputs"] > 0).all()
    np.testing.assert_array_equal(started["inputs"][:, 1:], plain["inputs"][:, :-1])
    for key in ("positions", "segment_ids"):
        np.testing.assert_array_equal(started[key], plain[key])


def _refusal(capsys, *argv) -> str:
    """Run the command line in-process on a mistake: its exit message (11's one line, or argparse's)."""
    with pytest.raises(SystemExit) as exit_:
        analysis.main(list(argv))
    code = exit_.value.code
    if isinstance(code, str):
        assert "\n" not in code  # one line
        return code
    return f"status {code}: {capsys.readouterr().err}"


def test_the_command_line_refuses_what_it_cannot_analyse(exported, tmp_path, capsys):
    # Each mistake is a clear error naming what was given, before anything is trained or loaded.
    seed0, seed1 = exported["seed0"], exported["seed1"]
    # Flags that name two things to analyse, or a choice that does not exist: argparse refuses.
    for argv, said in [(("--run-dir", "runs/laptop", "--model", seed0), "not allowed with"),
                       (("--model", seed0, "--series", seed0, seed1), "not allowed with"),
                       (("--quick", "--run-dir", "runs/laptop"), "not allowed with"),
                       (("--model", seed0, "--dtype", "float16"), "invalid choice: 'float16'"),
                       (("--rows", "0"), "'0' must be an int >= 1"),
                       (("--min", "2"), "unrecognized arguments: --min")]:  # no prefix matching
        message = _refusal(capsys, *argv)
        assert message.startswith("status 2") and said in message, (argv, message)
    # The rest: one line, `error: ...`.
    assert _refusal(capsys, "--series", seed0).startswith(f"error: --series {seed0}: a series "
                                                          "needs two or more checkpoints")
    for argv in (("--run-dir", "runs/laptop", "--seq-len", "64"), ("--quick", "--seq-len", "64")):
        assert _refusal(capsys, *argv).startswith("error: --seq-len 64 is for released models")
    assert _refusal(capsys, "--model", seed0, "--seq-len", "513").startswith(
        f"error: seq_len=513 must be in [1, max_seq_len=512] of {seed0}")
    # A series must be checkpoints of one model: here another capacity factor in config.json.
    other = tmp_path / "other"
    shutil.copytree(seed0, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "router_capacity_factor_eval": 3.0}))
    assert "differ in ['eval_capacity_factor']" in _refusal(capsys, "--series", str(other), seed0)
    assert "has no config.json" in _refusal(capsys, "--model", str(tmp_path))
    assert "has no config.json" in _refusal(capsys, "--run-dir", str(tmp_path))
    (other / "spiece.model").unlink()
    assert "has no spiece.model" in _refusal(capsys, "--model", str(other))
    assert "Traceback" not in capsys.readouterr().err


SERIES_FLAGS = dict(max_rows=3, min_count=2, sweep=(1.25, 2.0))  # two sweep values: fast


@pytest.fixture(scope="module")
def series_analysis(exported, tmp_path_factory):
    """The in-process analysis of the series seed1 → seed0, and the checkpoints it read, in
    order: shared by the tests of `analyse` and of the command line that must agree with it."""
    out_dir, loaded = tmp_path_factory.mktemp("series"), []
    with pytest.MonkeyPatch.context() as patch:
        logging_loads(patch, loaded)
        subject = analysis.released_subject([exported["seed1"], exported["seed0"]], **RELEASED_ROWS)
        results = analysis.analyse(subject, **SERIES_FLAGS, out_dir=out_dir)
    return types.SimpleNamespace(results=results, loaded=loaded, out_dir=out_dir)


def test_analyse_a_released_model_and_series(exported, series_analysis, tmp_path):
    # --model: findings 1 and 3 on one model, finding 2 marked as not measured.
    subject = analysis.released_subject([exported["seed0"]], **RELEASED_ROWS)
    model = analysis.analyse(subject, **SERIES_FLAGS, out_dir=tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "analysis.json").read_text())
    assert model["early_routing"] is None and saved["early_routing"] is None
    report = (tmp_path / "model" / "report.txt").read_text()
    assert report.startswith(f"Routing analysis of {exported['seed0']} (4 layers, MoE in [1, 3]")
    assert "one model was given, so it is not measured" in report
    assert set(saved["specialization"]["by_layer"]) == {"1", "3"}
    assert set(model["rows_per_source"]) == set(analysis.analysis_texts())
    assert max(model["rows_per_source"].values()) <= 3
    # The three capacity settings of 09 runs (T5X train cf, ColossalAI's rule, eval cf).
    assert list(model["drops"]["curves"]) == list(analysis.capacity_settings(subject.model_cfg))
    for curves in model["drops"]["curves"].values():
        assert all(len(curve_L) == 32 for curve_L in curves.values())  # rows of seq_len tokens
    assert list(model["drops"]["sweep"]) == list(SERIES_FLAGS["sweep"])

    # --series of the same weights twice: every favourite expert agrees with the last one's.
    same = analysis.analyse(analysis.released_subject([exported["seed0-again"], exported["seed0"]],
                                                      **RELEASED_ROWS),
                            **SERIES_FLAGS, out_dir=tmp_path / "same")
    assert same["early_routing"]["agreement"] == {1: [1.0, 1.0], 3: [1.0, 1.0]}
    # --series of two different seeds: the earlier one agrees less (about chance, 1/8).
    assert series_analysis.loaded == ["seed0", "seed1"]  # each once: the last in full, then the earlier
    early = series_analysis.results["early_routing"]
    assert early["steps"] == [1, 2] and early["labels"] == [exported["seed1"], exported["seed0"]]
    for curve in early["agreement"].values():
        assert curve[0] < 1.0 and curve[1] == 1.0
    saved = json.loads((series_analysis.out_dir / "analysis.json").read_text())
    assert saved["early_routing"]["labels"] == early["labels"]
    assert "half of the series" in (series_analysis.out_dir / "report.txt").read_text()
    # The heat maps' rows are routing distributions: the most frequent token ids, position bins.
    (token_labels, by_token), (bin_labels, by_bin) = saved["specialization"]["heat_maps"].values()
    assert len(token_labels) == len(by_token) <= 24 and len(bin_labels) == len(by_bin) == 16
    np.testing.assert_allclose(np.sum(by_token + by_bin, axis=1), 1.0)


def test_make_figures_draws_every_figure_on_one_colour_scale(series_analysis, tmp_path):
    # docs/make_figures.py draws every figure from analysis.json alone; the two heat maps of
    # finding 1 share one colour scale (else a flat panel looks as strong as a one-hot one).
    spec = importlib.util.spec_from_file_location("make_figures", REPO_ROOT / "docs" / "make_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    figures.main([str(series_analysis.out_dir), "--out", str(tmp_path / "png")])
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "drop_towards_the_end.png", "early_routing.png", "specialization.png"]
    import matplotlib.pyplot as plt
    saved = json.loads((series_analysis.out_dir / "analysis.json").read_text())
    figure = figures.specialization_figure(plt, saved["specialization"])
    images = [image for axis in figure.axes for image in axis.get_images()]
    assert len(images) == 2 and images[0].get_clim() == images[1].get_clim()
    top = max(np.max(shares) for _, shares in saved["specialization"]["heat_maps"].values())
    assert images[0].get_clim() == (0.0, top)
    assert len(figure.axes) == 3  # two panels and ONE colour bar
    assert all(axis.get_xlabel() and axis.get_ylabel() for axis in figure.axes[:2])
    plt.close(figure)


def test_command_line_analyses_a_series(exported, series_analysis, tmp_path):
    # The CLI end to end, as a user runs it, in a fresh process: it must write exactly what the
    # in-process analysis of the same series wrote (same numbers, same report).
    out = tmp_path / "cli"
    script = str(REPO_ROOT / "11_routing_analysis.py")
    result = subprocess.run(
        [sys.executable, script, "--series", exported["seed1"], exported["seed0"], "--seq-len",
         "32", "--rows", "3", "--min-count", "2", "--sweep", "1.25", "2.0", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = series_analysis.out_dir
    assert json.loads((out / "analysis.json").read_text()) == json.loads(
        (expected / "analysis.json").read_text())
    report = (expected / "report.txt").read_text()
    assert (out / "report.txt").read_text() == report
    assert result.stdout == f"{report}written to {out}: report.txt, analysis.json\n" + (
        "OK: decisions recorded at every checkpoint; the three findings measured and reported.\n")
    # It says what it does on stderr, and nothing else (no absl or orbax notes).
    assert result.stderr.splitlines()[0].startswith(f"{exported['seed0']}: ")
    assert all(line.startswith(("routing every row", "early routing")) for line in
               result.stderr.splitlines()[1:]), result.stderr
