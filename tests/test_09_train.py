"""Tests for 09_train.py: packing, UL2 denoisers, schedule wiring, exact resume, NaN handling,
bad inputs, a sharded run on 8 simulated devices, and the dry run.

Training runs use a tiny model (2 layers, D 64), so each run compiles in seconds; runs share
module-scoped fixtures.
"""

import dataclasses
import importlib.util
import itertools
import json
import math
import shutil

import jax
import numpy as np
import pytest

from support import checkpoints, health, runs

from conftest import load

tok = load("01_tokenizer")
router_lib = load("04_router")
model_lib = load("06_model")
shard = load("07_sharding")
ada = load("08_adafactor")
train_lib = load("09_train")

TINY_MODEL = dataclasses.replace(model_lib.PRESETS["small"], num_layers=2, d_model=64, num_heads=4,
                                 head_dim=16, d_ff=128, num_experts=8, moe_interval=2)


def tiny(tmp_path, **overrides) -> "train_lib.TrainConfig":
    base = dataclasses.replace(
        train_lib.QUICK, model=TINY_MODEL, run_dir=str(tmp_path / "run"),
        objective="lm", ul2_until_step=0, seq_len=32, batch_size=8, microbatches=1, steps=6,
        warmup_steps=2, eval_every=0, eval_batches=0, checkpoint_every=2, keep_last=5,
        keep_period=100, sample_tokens=0, mesh="data=8")
    return dataclasses.replace(base, **overrides)


def claim(cfg, overwrite: bool) -> None:
    """What 09's train() does to the run directory before it trains, and nothing else."""
    with runs.claim(cfg.run_dir, cfg, resumable=train_lib.RESUMABLE_FIELDS,
                       overwrite=overwrite):
        pass


def reconstruct(inputs: np.ndarray, targets: np.ndarray, prefix_len: int, tokenizer) -> list[int]:
    """The inverse of span corruption (and of PrefixLM): the original tokens, as an oracle."""
    inputs, targets = list(inputs[prefix_len:]), list(targets[:-1])  # drop prefix and eos
    sentinel_ids = {tokenizer.sentinel_id(i) for i in range(tokenizer.num_extra_ids)}
    spans, current = {}, []
    for token in targets:
        if token in sentinel_ids:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    if not spans:  # PrefixLM: the targets simply continue the inputs
        return inputs + current
    return [t for token in inputs for t in (spans[token] if token in sentinel_ids else [token])]


@pytest.fixture(scope="module")
def tokenizer():
    return tok.embedded_tokenizer()


# ---------------------------------------------------------------------------------------------
# Data: packing and UL2
# ---------------------------------------------------------------------------------------------

def test_lm_packing_concatenates_documents_with_eos_and_shifts_by_one(tokenizer):
    texts = ["first document", "second one", "and a third document here"] * 5
    stream = list(tok.token_stream(iter(texts), tokenizer))
    assert stream.count(tokenizer.eos_id) == len(texts)  # one eos closes every document
    rows = list(tok.pack_lm_rows(iter(stream), seq_len=8))
    assert len(rows) == len(stream) // 9
    for index, row in enumerate(rows):
        chunk = stream[index * 9:(index + 1) * 9]
        assert list(row["inputs"]) == chunk[:-1] and list(row["targets"]) == chunk[1:]
        assert row["loss_mask"].sum() == 8


def test_noise_mask_has_the_requested_density_and_spans():
    rng = np.random.default_rng(0)
    for density, mean_span in [(0.15, 3), (0.5, 8), (0.5, 64)]:
        mask = train_lib.noise_mask(200, density, mean_span, rng)
        assert len(mask) == 200 and mask.sum() == round(200 * density) and not mask[0]
        starts = np.sum(mask[1:] & ~mask[:-1])
        assert starts == max(1, round(round(200 * density) / mean_span))


@pytest.mark.parametrize("denoiser", train_lib.UL2_DENOISERS, ids=lambda d: f"{d.prefix}{d.mean_span}")
def test_ul2_targets_and_sentinels_reconstruct_the_text(tokenizer, denoiser):
    text = "def mean(values):\n    return sum(values) / len(values)  # the arithmetic mean\n" * 3
    tokens = np.array(tokenizer.encode(text), np.int32)
    prefix_ids = tokenizer.encode(denoiser.prefix)
    inputs, targets = train_lib.ul2_example(tokens, denoiser, prefix_ids, tokenizer,
                                            np.random.default_rng(1))
    assert list(inputs[:len(prefix_ids)]) == prefix_ids and targets[-1] == tokenizer.eos_id
    restored = reconstruct(inputs, targets, len(prefix_ids), tokenizer)
    assert restored == list(tokens) and tokenizer.decode(restored) == text
    if denoiser.mean_span:
        sentinels = [t for t in inputs if t >= tokenizer.piece_count]
        assert sentinels == [t for t in targets if t >= tokenizer.piece_count]
        assert sentinels[0] == tokenizer.sentinel_id(0)


def test_ul2_rows_put_the_loss_on_targets_only(tokenizer):
    inputs, targets = np.array([5, 6, 7], np.int32), np.array([8, 9, 1], np.int32)
    row = tok.decoder_row([(inputs, targets), (inputs[:1], targets[1:])], seq_len=10)
    assert list(row["targets"]) == [5, 6, 7, 8, 9, 1, 5, 9, 1, 0]
    assert list(row["inputs"]) == [0, 5, 6, 7, 8, 9, 0, 5, 9, 0]  # start token 0 per segment
    assert list(row["loss_mask"]) == [0, 0, 0, 1, 1, 1, 0, 1, 1, 0]
    assert list(row["segment_ids"]) == [1] * 6 + [2] * 3 + [0]
    assert list(row["positions"]) == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    # Real packed rows: every row fits, and each segment's loss covers exactly its targets.
    stream = tok.token_stream(iter(tokenizer.decode(range(300, 900)).split(" ") * 50), tokenizer)
    rows = list(itertools.islice(train_lib.pack_ul2_rows(stream, 128, tokenizer,
                                                         np.random.default_rng(0)), 20))
    for row in rows:
        assert row["loss_mask"].sum() > 0 and np.all(row["loss_mask"][row["segment_ids"] == 0] == 0)


# ---------------------------------------------------------------------------------------------
# Training: schedule wiring, exact resume, NaN, bad inputs, sharding, dry run
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("straight"))
    return cfg, train_lib.train(cfg, progress=False)


def test_schedule_is_openmoes_scaled_to_the_run(uninterrupted):
    cfg, summary = uninterrupted
    records = [json.loads(l) for l in open(f"{cfg.run_dir}/metrics.jsonl")]
    expected = [cfg.peak_lr * math.sqrt(cfg.warmup_steps / max(s, cfg.warmup_steps))
                for s in range(cfg.steps)]
    assert np.allclose([r["lr"] for r in records], expected, rtol=1e-6)
    assert {"cross_entropy", "z_loss", "load_balance_loss", "router_z_loss", "tokens_per_s",
            "drop_rate_by_layer", "mfu"} <= set(records[0])
    assert len(records[0]["drop_rate_by_layer"]) == 1
    # The optimizer the step uses is built from the same schedule.
    assert cfg.schedule() == load("08_adafactor").ScheduleConfig(
        peak=cfg.peak_lr, warmup_steps=cfg.warmup_steps)


def test_exact_resume_after_interruption(uninterrupted):
    cfg, straight = uninterrupted
    resumed_cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir + "-resumed")
    first = train_lib.train(resumed_cfg, stop_after=3, progress=False)  # "killed" after step 3
    assert list(first["losses"]) == [1, 2, 3]
    second = train_lib.train(resumed_cfg, progress=False)               # resumes from step 2
    assert min(second["losses"]) == 3
    steps = [json.loads(line)["step"] for line in open(f"{resumed_cfg.run_dir}/metrics.jsonl")]
    assert steps == list(range(1, cfg.steps + 1))  # step 3's first line was cut, then redone
    for step, loss in second["losses"].items():
        assert loss == straight["losses"][step], f"step {step}: {loss} != {straight['losses'][step]}"
    assert straight["losses"][6] < straight["losses"][1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, steps=4)
    real_batches = train_lib.train_batches

    def poisoned_batches(*args, **kwargs):
        for index, batch in enumerate(real_batches(*args, **kwargs)):
            if index == 2:  # the third step's batch carries a NaN: its loss is NaN
                batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
            yield batch

    monkeypatch.setattr(train_lib, "train_batches", poisoned_batches)
    with pytest.raises(health.TrainingDiverged, match="step 3: loss nan.*newest checkpoint, step 2"):
        train_lib.train(cfg, progress=False)
    assert checkpoints.saved_steps(cfg.run_dir) == (2,)


def test_a_stalled_run_is_reported(tmp_path, monkeypatch, capsys):
    # With every loss weight 0 and no target counted, the gradient is exactly zero: nothing moves.
    silent = dataclasses.replace(TINY_MODEL, aux_loss_weight=0.0, z_loss_weight=0.0,
                                 router_z_loss_weight=0.0)
    cfg = tiny(tmp_path, steps=health.STALL_STEPS + 1, checkpoint_every=100, model=silent)
    real_batches = train_lib.train_batches

    def unlearnable_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            yield dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))

    monkeypatch.setattr(train_lib, "train_batches", unlearnable_batches)
    summary = train_lib.train(cfg, progress=False)
    assert summary["stalled_since"] == 1
    assert "gradient has been exactly zero since step 1" in capsys.readouterr().out
    assert "warning: the gradient has been exactly zero since step 1" in "\n".join(
        runs.summary_lines(summary))


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        tiny(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="mesh"):
        tiny(tmp_path, mesh="data=2,experts=4")
    with pytest.raises(ValueError, match="objective"):
        tiny(tmp_path, objective="mlm")
    with pytest.raises(ValueError, match="devices"):
        train_lib.train(tiny(tmp_path, mesh="data=3"), progress=False)
    with pytest.raises(ValueError, match="divisible"):
        train_lib.train(tiny(tmp_path, batch_size=4), progress=False)
    with pytest.raises(ValueError, match="hub dataset|could not be loaded"):
        train_lib.train(tiny(tmp_path, mixture="openmoe_v1"), progress=False)
    with pytest.raises(SystemExit):
        train_lib.parse_args(["--steps", "many"])
    assert not (tmp_path / "run").exists()


def test_a_run_is_its_config_not_the_spelling_of_its_path(uninterrupted, tmp_path, monkeypatch):
    cfg, _ = uninterrupted
    with pytest.raises(ValueError, match="holds a different run.*seq_len"):
        claim(dataclasses.replace(cfg, seq_len=64), overwrite=False)
    # The same run opened by a relative path, or moved: accepted, the new path recorded.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(f"{cfg.run_dir}/config.json", moved / "config.json")
    monkeypatch.chdir(tmp_path)
    claim(dataclasses.replace(cfg, run_dir="moved"), overwrite=False)
    # Resumable fields (length, schedule) may change; each change is appended to the history.
    claim(dataclasses.replace(cfg, run_dir="moved", steps=10, peak_lr=0.01), overwrite=False)
    history = [json.loads(line) for line in (moved / "config_history.jsonl").read_text().splitlines()]
    assert [h["changed"] for h in history] == [
        {"run_dir": [cfg.run_dir, "moved"]},
        {"steps": [cfg.steps, 10], "peak_lr": [cfg.peak_lr, 0.01]}]
    assert json.loads((moved / "config.json").read_text())["peak_lr"] == 0.01


def test_config_json_round_trips_and_a_foreign_config_is_refused(tmp_path):
    cfg = tiny(tmp_path, model=dataclasses.replace(model_lib.PRESETS["tiny"], remat=True))
    record = runs.flat_record(cfg)
    assert runs.from_flat_record(train_lib.TrainConfig, json.loads(json.dumps(record))) == cfg
    # A config.json this program did not write (here: an early version's, which named a preset)
    # is refused in one line, and left as it is.
    old = {k: v for k, v in record.items() if not k.startswith("model.")} | {"preset": "tiny"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="config.json cannot be read as this program's run config"):
        claim(cfg, overwrite=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == old


def test_the_command_line_sets_run_and_model_fields(tmp_path):
    cfg, _ = train_lib.parse_args(["--preset", "tiny", "--seq-len", "64", "--dtype", "bfloat16",
                                   "--train-capacity-factor", "1.5", "--steps", "7"])
    laptop = train_lib.CONFIGS["laptop"]
    assert cfg == dataclasses.replace(laptop, seq_len=64, steps=7, model=dataclasses.replace(
        model_lib.PRESETS["tiny"], dtype=jax.numpy.bfloat16, train_capacity_factor=1.5))
    assert train_lib.model_config(cfg).max_seq_len == 64
    quick, args = train_lib.parse_args(["--quick"])
    assert quick == train_lib.QUICK and args.quick


def test_a_finished_run_says_so_without_training(uninterrupted, capsys):
    cfg, _ = uninterrupted
    summary = train_lib.train(cfg, progress=False)
    assert summary["complete"] and summary["losses"] == {} and summary["steps"] == cfg.steps
    assert "is complete: 6 steps" in runs.summary_lines(summary)[0]


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
    # Lines past the restored step, repeated steps (the newest kept), a line cut short by a kill.
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 3, 4, 5, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "lo')
    runs.cut_metrics(path, last_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_sharded_run_on_8_devices_matches_data_parallel(tmp_path, uninterrupted):
    assert jax.device_count() == 8
    cfg, straight = uninterrupted
    sharded = train_lib.train(tiny(tmp_path, mesh="data=2,expert=4,model=1", steps=3,
                                   microbatches=1), progress=False)
    for step in (1, 2, 3):
        assert sharded["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-4)


def test_dry_run_reports_memory_and_flops(tmp_path):
    report = train_lib.dry_run(tiny(tmp_path, mesh="data=2,expert=4,model=1", batch_size=16,
                                     microbatches=2))
    assert report["devices"] == 8 and report["argument_gib"] > 0 and report["temp_gib"] >= 0
    assert report["compiler_flops_per_device"] > 0 and report["model_flops_per_device"] > 0
    assert not (tmp_path / "run").exists()
    # The compiler counts the microbatch loop's body once; the report scales it back, so the
    # same step in one slice or two costs about the same FLOPs (unscaled it would be half; the
    # two slices add a parameter-sized gradient sum, which is ~10% of this tiny model's work).
    whole = train_lib.dry_run(tiny(tmp_path, mesh="data=2,expert=4,model=1", batch_size=16,
                                   microbatches=1))
    assert report["compiler_flops_per_device"] == pytest.approx(
        whole["compiler_flops_per_device"], rel=0.2)


def test_every_recipe_keeps_attention_heads_whole_on_its_mesh():
    # A model axis that does not divide the heads makes every attention layer gather q, k and v
    # (07 warns): OpenMoE-34B's 24 heads therefore run on model=8, not OpenMoE's model=16.
    for name, cfg in train_lib.CONFIGS.items():
        assert cfg.model.num_heads % shard.parse_mesh(cfg.mesh).get("model", 1) == 0, name


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_dry_run_compiles_for_a_tpu_v3_topology(tmp_path):
    cfg = dataclasses.replace(train_lib.CONFIGS["openmoe-base"], run_dir=str(tmp_path / "run"),
                              mesh="data=4,expert=4,model=2", batch_size=32, microbatches=1,
                              seq_len=512)
    report = train_lib.dry_run(cfg, "v3:4x4")
    assert report["devices"] == 32 and 0 < report["estimated_mfu"] <= 1


# ---------------------------------------------------------------------------------------------
# §5's variants: routers frozen after warm-up, aux-loss-free biases, instruction data in warm-up
# ---------------------------------------------------------------------------------------------

BIASED_MODEL = dataclasses.replace(TINY_MODEL, balance_bias_rate=0.001)  # Wang et al.'s rate


def variants(tmp_path, **overrides) -> "train_lib.TrainConfig":
    """A tiny run with all three options on: checkpoints at steps 2, 4 and 6."""
    return tiny(tmp_path, model=BIASED_MODEL, freeze_router_after=2, warmup_steps=3,
                warmup_mixture="embedded-instructions", **overrides)


def saved_params(cfg, step: int) -> dict:
    """{leaf name: array} of the params saved at `step`, read the way chapter 10 reads them."""
    like = train_lib.build_trainer(cfg, train_lib.build_mesh(cfg), abstract=True).params
    params = checkpoints.restore_params(cfg.run_dir, step, like)
    return {ada.leaf_name(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    cfg = variants(tmp_path_factory.mktemp("variants"))
    straight = train_lib.train(cfg, progress=False)
    resumed_cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir + "-resumed")
    train_lib.train(resumed_cfg, stop_after=3, progress=False)  # "killed" after step 3
    resumed = train_lib.train(resumed_cfg, progress=False)       # resumes from step 2
    return cfg, straight, resumed_cfg, resumed


def test_with_a_warmup_mixture_warmup_steps_is_the_runs_identity(variant_runs, uninterrupted):
    # It says when the data switches streams: a resume with another value would train on other
    # data than the run it continues. Without a warm-up mixture it only shapes the schedule.
    _, _, resumed_cfg, _ = variant_runs
    with pytest.raises(ValueError, match="holds a different run.*warmup_steps"):
        train_lib.train(dataclasses.replace(resumed_cfg, warmup_steps=4, steps=8), progress=False)
    plain, _ = uninterrupted  # finished, so reported at once: accepted as the same run
    assert plain.warmup_mixture == ""
    changed = train_lib.train(dataclasses.replace(plain, warmup_steps=plain.warmup_steps + 1), progress=False)
    assert changed["steps"] == plain.steps and changed.get("complete")


def test_variants_resume_exactly_biases_included(variant_runs):
    cfg, straight, resumed_cfg, resumed = variant_runs
    assert min(resumed["losses"]) == 3
    for step, loss in resumed["losses"].items():
        assert loss == straight["losses"][step], f"step {step}: {loss} != {straight['losses'][step]}"
    # The final parameters, routing biases included, are the straight run's bit for bit.
    final, again = saved_params(cfg, 6), saved_params(resumed_cfg, 6)
    assert any(name.endswith("router/bias") for name in final) and final.keys() == again.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], again[name], err_msg=name)


def test_routers_freeze_after_their_step_while_the_rest_trains(variant_runs):
    cfg, _, _, _ = variant_runs
    start = saved_params(cfg, 2)
    later = [saved_params(cfg, step) for step in (4, 6)]
    initial = {ada.leaf_name(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(
        train_lib.build_trainer(cfg, train_lib.build_mesh(cfg)).params)[0]}
    kernel = "layers/1/mlp/router/kernel"
    assert not np.array_equal(initial[kernel], start[kernel])  # it trained for steps 1 and 2 ...
    for params in later:                                       # ... and not after
        np.testing.assert_array_equal(params[kernel], start[kernel])
    # Everything else still moves: the experts and embeddings by Adafactor, ...
    for name in ("layers/1/mlp/wi_0", "token_embedder"):
        assert not np.array_equal(later[0][name], start[name]) and not np.array_equal(later[1][name], later[0][name])
    # ... the biases by the balance rule, in steps of the rate (Adafactor leaves them alone).
    bias = [params["layers/1/mlp/router/bias"] for params in (start, *later)]
    assert not (np.array_equal(bias[0], bias[1]) and np.array_equal(bias[1], bias[2]))
    assert np.allclose(bias[2] / 0.001, np.round(bias[2] / 0.001), atol=1e-3) and np.any(bias[2])


def test_the_bias_undoes_a_skewed_router(tmp_path, tokenizer):
    # A bias of +1 on expert 0 puts it in every token's top 2: a load of 1/2, MaxVio 3. Each
    # step lowers its bias by the rate and raises the others', until the load evens out.
    cfg = tiny(tmp_path, model=dataclasses.replace(TINY_MODEL, balance_bias_rate=0.05), steps=12)
    mesh = train_lib.build_mesh(cfg)
    trainer = train_lib.build_trainer(cfg, mesh)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0].set(1.0) if ada.leaf_name(path).endswith("router/bias") else x, trainer.params)
    state, loads, biases = trainer.opt_state, [], []
    batches = train_lib.train_batches(cfg, tokenizer, {"embedded": tok.mixture_sources("embedded")})
    with jax.set_mesh(mesh):
        for _ in range(cfg.steps):
            before = np.asarray(params["layers"][1]["mlp"]["router"]["bias"][...])
            params, state, metrics = trainer.train_step(params, state, shard.global_batch(next(batches), mesh))
            load = np.asarray(metrics["expert_load"][0])
            bias = np.asarray(params["layers"][1]["mlp"]["router"]["bias"][...])
            # The rule, exactly: every bias moves by the rate against its expert's load error.
            np.testing.assert_allclose(bias - before, 0.05 * np.sign(load.mean() - load), atol=1e-6)
            loads.append(load)
    max_violation = [float(router_lib.max_violation(load)) for load in loads]
    assert max_violation[0] > 2.5 and max_violation[-1] < 1.0, max_violation


def test_warmup_batches_come_from_the_warmup_mixture_then_the_runs(tmp_path, tokenizer):
    cfg = tiny(tmp_path, seq_len=128, warmup_steps=3, warmup_mixture="embedded-instructions")
    sources = {name: tok.mixture_sources(name) for name in ("embedded", "embedded-instructions")}
    batches = list(itertools.islice(train_lib.train_batches(cfg, tokenizer, sources), 5))

    def stream_rows(mixture, count):  # the first rows of one mixture's own stream
        texts = tok.document_texts(sources[mixture], tok.mixture_probabilities(mixture), cfg.seed)
        return list(itertools.islice(tok.pack_lm_rows(tok.token_stream(texts, tokenizer), 128), count))

    warm, run = stream_rows("embedded-instructions", 3 * 8), stream_rows("embedded", 2 * 8)
    for step, batch in enumerate(batches):
        rows = warm[step * 8:(step + 1) * 8] if step < 3 else run[(step - 3) * 8:(step - 2) * 8]
        np.testing.assert_array_equal(batch["inputs"], np.stack([r["inputs"] for r in rows]))
    text = [tokenizer.decode(batch["targets"].reshape(-1)) for batch in batches]
    assert all("### User:" not in t for t in text[3:]) and "### User:" in "".join(text[:3])
    # A resumed run replays the same stream: from step 2 on, across the switch, the same batches.
    for batch, again in zip(batches[2:], train_lib.train_batches(cfg, tokenizer, sources, start_step=2)):
        np.testing.assert_array_equal(batch["targets"], again["targets"])
    # Off (the default), there is one stream: the run's mixture from step 0.
    plain = train_lib.train_batches(dataclasses.replace(cfg, warmup_mixture=""), tokenizer, sources)
    np.testing.assert_array_equal(next(plain)["inputs"], np.stack([r["inputs"] for r in run[:8]]))


def test_variant_fields_are_checked_locked_and_flags(tmp_path, uninterrupted):
    with pytest.raises(ValueError, match="TrainConfig.warmup_mixture='chat': must be '' or one of"):
        tiny(tmp_path, warmup_mixture="chat")
    with pytest.raises(ValueError, match="TrainConfig.freeze_router_after=-1: must be an int >= 0"):
        tiny(tmp_path, freeze_router_after=-1)
    cfg, _ = uninterrupted
    for change in ({"freeze_router_after": 3}, {"warmup_mixture": "embedded-code30"}):
        with pytest.raises(ValueError, match=f"holds a different run.*{next(iter(change))}"):
            claim(dataclasses.replace(cfg, **change), overwrite=False)
    # A run saved before these fields existed is the same run with them off: it resumes.
    old = tmp_path / "old"
    old.mkdir()
    record = {k: v for k, v in runs.flat_record(cfg).items()
              if k not in ("freeze_router_after", "warmup_mixture", "model.balance_bias_rate")}
    (old / "config.json").write_text(json.dumps(record))
    claim(dataclasses.replace(cfg, run_dir=str(old)), overwrite=False)
    flags, _ = train_lib.parse_args(["--freeze-router-after", "100", "--warmup-mixture",
                                     "embedded-instructions", "--balance-bias-rate", "0.001"])
    assert (flags.freeze_router_after, flags.warmup_mixture, flags.model.balance_bias_rate) == (
        100, "embedded-instructions", 0.001)
    with pytest.raises(SystemExit):
        train_lib.parse_args(["--warmup-mixture", "chat"])
