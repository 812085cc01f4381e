"""Chapter 12: the routing lab. What would fix OpenMoE's routing, each fix one switch, measured.

Chapter 11 measured what the paper found (arXiv 2402.01739 §4): routing follows the token id, is
learned early, and drops pile up at the end of a sequence. §5 ("Rethinking OpenMoE") then says
what the authors would change, and later work tried other routers. This chapter trains each
variant with the default run's recipe (same data order, seed, steps, capacity) and judges all of
them on the same measures:
  openmoe        top-2 token choice, T5X capacity 1.25, queue by position: the default run (§2.2)
  bpr            batch-prioritized routing: the queue by router confidence (flaxformer routing.py,
                 `batch_prioritized_routing`; V-MoE, Riquelme et al. 2021)
  expert-choice  each expert takes its top-C tokens of the group (flaxformer
                 ExpertsChooseMaskedRouter; Zhou et al. 2022, arXiv 2202.09368)
  dropless       no capacity, no drops (05's `dropless`; MegaBlocks, Gale et al. 2022)
  frozen-router  the router stops training after warm-up (§5: "remove the trainable router after
                 the warm-up stage"; 08 freezes the kernel and its Adafactor statistics)
  instructions   chat-formatted instruction pairs in the warm-up data (§5's data proposal; 01)
  less-code      30% code instead of 50% (§5: "more than 50% code looks too aggressive")
  aux-loss-free  a per-expert bias steers selection, no balance loss (Wang et al. 2024, arXiv
                 2408.15664; DeepSeek-V3 §2.1.2, arXiv 2412.19437)
  dense          the dense model with the same active parameters: the paper's cost claim (§3)
The measures: validation loss and accuracy per domain; drops by quarter of the sequence and the
share of tokens no expert served, on text, code and chat; the specialization score and early
routing (11's analysis of each run); load balance (MaxVio, Wang et al.: max load ÷ mean − 1);
step time; and a causal-leak probe. With capacity, whether a token is served depends on the
other tokens of its group, later ones included, which a decoder must not see: the probe changes
the last token of each group and counts earlier outputs that change, and compares the loss with
teacher forcing (groups as in training) against the same text scored one prefix at a time (groups
of one token, exactly how `generate` routes a new token).
Run: `python 12_routing_lab.py` (every variant, one default run each, ~2 hours; resumable).
Self-test: `python 12_routing_lab.py --quick` (two tiny runs, about a minute). Left out: sigmoid
router scores, shared experts, and the paper's parallel-layer and communication-overlap proposals.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from support import checkpoints, cli, files, report

tok = importlib.import_module("01_tokenizer")
router_lib = importlib.import_module("04_router")
model_lib = importlib.import_module("06_model")
train_lib = importlib.import_module("09_train")
released = importlib.import_module("10_released_models")
analysis = importlib.import_module("11_routing_analysis")

SOURCES = ("text", "code", "chat")  # what the routing measures route: validation text, code, chats


# --- Part 1: the variants: one switch each on the default run's recipe ----------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the lab: a name, the idea in a line, and the switch that turns it on."""

    name: str
    idea: str
    change: Callable  # TrainConfig → TrainConfig


def model_switch(**fields) -> Callable:
    """A change of 06's ModelConfig fields (04's router fields among them), run config kept."""
    return lambda cfg: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


def run_switch(**fields) -> Callable:
    """A change of 09's TrainConfig fields; a field given as a callable is computed from cfg."""
    return lambda cfg: dataclasses.replace(
        cfg, **{k: v(cfg) if callable(v) else v for k, v in fields.items()})


def active_matched_dense(model_cfg):
    """`model_cfg` with every block dense and d_ff widened so that a token touches as many FFN
    weights: an MoE block activates top_k experts and its extra dense FFN (k + 1 FFNs), a dense
    block one, so "small" (2 MoE + 2 dense blocks, top-2) is matched by d_ff 512 × 8/4 = 1024."""
    moe_blocks = len(model_cfg.moe_layers)
    ffns_per_token = (model_cfg.num_layers - moe_blocks) + moe_blocks * (model_cfg.top_k + 1)
    return dataclasses.replace(model_cfg, moe_interval=0,
                               d_ff=round(model_cfg.d_ff * ffns_per_token / model_cfg.num_layers))


VARIANTS = (
    Variant("openmoe", "top-2 token choice, capacity 1.25, queue by position", lambda cfg: cfg),
    Variant("bpr", "the queue ordered by router confidence", model_switch(batch_prioritized=True)),
    Variant("expert-choice", "each expert takes its top-C tokens; no balance loss",
            model_switch(routing="experts_choose", aux_loss_weight=0.0)),
    Variant("dropless", "no capacity: every choice served", model_switch(dropless=True)),
    Variant("frozen-router", "router kernel frozen after the warm-up steps",
            run_switch(freeze_router_after=lambda cfg: cfg.warmup_steps)),
    Variant("instructions", "chat instruction pairs mixed into the warm-up data",
            run_switch(warmup_mixture="embedded-instructions")),
    Variant("less-code", "30% code, 70% text instead of 50/50", run_switch(mixture="embedded-code30")),
    Variant("aux-loss-free", "bias nudged toward balance (rate 0.001); no balance loss",
            model_switch(balance_bias_rate=0.001, aux_loss_weight=0.0)),
    Variant("dense", "no MoE: dense FFNs with the same active parameters",
            lambda cfg: dataclasses.replace(cfg, model=active_matched_dense(cfg.model))),
)
BY_NAME = {variant.name: variant for variant in VARIANTS}


def variant_config(base, variant: Variant, root: str | pathlib.Path):
    """The variant's TrainConfig: the base recipe with its switch, in root/<name>."""
    return dataclasses.replace(variant.change(base), run_dir=str(pathlib.Path(root) / variant.name))


# --- Part 2: the causal-leak probe ----------------------------------------------------------------
def leak_in_miniature(capacity: int = 2) -> dict[str, list[str]]:
    """04's worked example (8 tokens, 4 experts, capacity 2) routed twice, the second time with
    the *last* token's first choice moved from e3 to e2; per router, what that did to the
    earlier tokens' served experts, e.g. "token 1: e0 e2 -> e0"."""
    logits_TE, _ = router_lib.worked_example(capacity)
    changed_TE = logits_TE.copy()
    changed_TE[-1, [2, 3]] = logits_TE[-1, [3, 2]]
    routers = {
        "by position (OpenMoE)": functools.partial(router_lib.route, top_k=2, capacity=capacity),
        "by confidence (BPR)": functools.partial(router_lib.route, top_k=2, capacity=capacity,
                                                 batch_prioritized=True),
        "expert choice": functools.partial(router_lib.route_experts_choose, capacity=capacity),
        "dropless": functools.partial(router_lib.route, top_k=2, capacity=len(logits_TE))}

    def served(route, l_TE) -> list[str]:  # each earlier token's served experts, as text
        routing = route(jnp.asarray(l_TE)[None])
        return [" ".join(f"e{e}" for e, kept in zip(experts, keeps) if kept) or "nothing"
                for experts, keeps in zip(np.asarray(routing.expert_GTA[0, :-1]),
                                          np.asarray(routing.kept_GTA[0, :-1]))]

    return {name: [f"token {t}: {a} -> {b}" for t, (a, b) in enumerate(
                zip(served(route, logits_TE), served(route, changed_TE))) if a != b]
            for name, route in routers.items()}


@functools.cache
def forward_step(model_cfg):
    """A compiled forward pass at the *training* capacity (train=True; OpenMoE has no jitter or
    dropout, so it is deterministic): logits [B, L, V] and each MoE layer's kept_BLA and
    expert_BLA."""
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)

    @jax.jit
    def forward(params, inputs_BL, positions_BL, segment_ids_BL):
        model = nnx.merge(graphdef, params, rest)
        logits_BLV, stats, _ = model(inputs_BL, positions_BL=positions_BL,
                                     segment_ids_BL=segment_ids_BL, train=True)
        return logits_BLV, [s["kept_BLA"] for s in stats], [s["expert_BLA"] for s in stats]

    return forward


def forward(params, model_cfg, batch: dict):
    return forward_step(model_cfg)(params, *(batch[f] for f in ("inputs", "positions", "segment_ids")))


def one_prefix_at_a_time(model_cfg):
    """The model routing every token alone, a group of one token, as `generate` routes each new
    token: its routing then depends on its own prefix only (attention is causal), so one forward
    pass scores every prefix exactly as decoding them one by one would."""
    return dataclasses.replace(model_cfg, max_group_size=1, group_rule="divisor", group_multiple=1)


def token_losses(logits_BLV, batch: dict) -> np.ndarray:
    """Next-token cross-entropy of every real target token (06's loss, per token)."""
    log_p_BLV = jax.nn.log_softmax(jnp.asarray(logits_BLV), axis=-1)
    target_BL = jnp.take_along_axis(log_p_BLV, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    return -np.asarray(target_BL)[np.asarray(batch["loss_mask"]) > 0]


def changed_earlier_tokens(params, model_cfg, batch: dict, rng: np.random.Generator,
                           tolerance: float = 1e-5) -> tuple[int, int]:
    """Change the last token of every routing group to another id and count the earlier tokens
    of the group whose logits move: (changed, earlier tokens). Attention cannot carry the
    change backwards, so every one that moves was moved by routing: by a later token."""
    rows, length = batch["inputs"].shape
    groups, tokens = model_cfg.moe_config().group_shape(rows * length)
    before_BLV = np.asarray(forward(params, model_cfg, batch)[0])
    inputs_N = batch["inputs"].reshape(-1).copy()
    last_G = np.arange(1, groups + 1) * tokens - 1
    inputs_N[last_G] = (inputs_N[last_G] + rng.integers(1, model_cfg.vocab_size - 1, groups)) % (
        model_cfg.vocab_size - 1) + 1  # another id, never 0 (padding)
    changed = {**batch, "inputs": inputs_N.reshape(rows, length)}
    after_BLV = np.asarray(forward(params, model_cfg, changed)[0])
    moved_N = (np.abs(after_BLV - before_BLV).max(-1) > tolerance).reshape(-1)
    moved_N[last_G] = False
    return int(moved_N.sum()), groups * (tokens - 1)


def leak_probe(params, model_cfg, batches: list[dict], seed: int = 0) -> dict:
    """The two leak measures over `batches` (rows laid out as in training, so groups are too):
    the share of earlier tokens a group's last token moves, and the loss gap of scoring the
    same text one prefix at a time (generation) against teacher forcing (training)."""
    rng = np.random.default_rng(seed)
    counts = [changed_earlier_tokens(params, model_cfg, batch, rng) for batch in batches]
    forced = np.concatenate([token_losses(forward(params, model_cfg, b)[0], b) for b in batches])
    alone_cfg = one_prefix_at_a_time(model_cfg)
    alone = np.concatenate([token_losses(forward(params, alone_cfg, b)[0], b) for b in batches])
    return {"moved_share": sum(c for c, _ in counts) / sum(n for _, n in counts),
            "teacher_forced_loss": float(forced.mean()), "one_prefix_loss": float(alone.mean()),
            "loss_gap": float(alone.mean() - forced.mean())}


# --- Part 3: routing measures on validation text, code and chats ----------------------------------
def routed_rows(params, model_cfg, rows: dict, batch_rows: int = 16):
    """Every MoE layer's kept and expert choices on `rows`, as [layers, rows, L, A] arrays."""
    chunks = [forward(params, model_cfg, {f: rows[f][start:start + batch_rows] for f in rows})[1:]
              for start in range(0, len(rows["inputs"]), batch_rows)]
    return tuple(np.concatenate([np.stack([np.asarray(a) for a in chunk[i]]) for chunk in chunks], 1)
                 for i in (0, 1))


def routing_measures(params, model_cfg, rows_by_source: dict[str, dict]) -> dict:
    """Per source, every MoE layer routing rows of one group each (11's analysis layout) at the
    training capacity: the share of the tokens' top-k choices dropped and of tokens no expert
    served, by position, and the MaxVio of the top-k choices before capacity. (Expert choice
    lists all E experts per token, best first: its "top-k choices" are the token's k favourites.)"""
    top_k, results = model_cfg.top_k, {}
    for source, rows in rows_by_source.items():
        kept_XBLA, expert_XBLA = routed_rows(params, model_cfg, rows)  # X: the MoE layers
        dropped_L = 1.0 - kept_XBLA[..., :top_k].mean(axis=(0, 1, 3))
        behind_L = 1.0 - kept_XBLA.any(-1).mean(axis=(0, 1))
        load_E = np.bincount(expert_XBLA[..., :top_k].ravel(), minlength=model_cfg.num_experts)
        results[source] = {"dropped_by_quarter": analysis.quarter_means(dropped_L),
                           "dropped_by_position": dropped_L.tolist(),
                           "left_behind_by_quarter": analysis.quarter_means(behind_L),
                           "max_violation": float(router_lib.max_violation(load_E))}
    return results


# --- Part 4: one variant, trained (or found finished) and measured --------------------------------
def run_curves(run_dir: str | pathlib.Path) -> dict:
    """From metrics.jsonl: the training loss at every step, and the last evaluation."""
    records = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").open()]
    evaluated = [r for r in records if "eval/text/loss" in r]
    return {"steps": [r["step"] for r in records], "loss": [r["loss"] for r in records],
            "eval": {k: v for k, v in evaluated[-1].items() if k.startswith("eval/")}}


def measure(cfg, *, rows: int, min_count: int, probe_batches: int) -> dict:
    """A finished run's measures: 11's analysis (report.txt in the run), the routing measures
    on its own rows and the leak probe on validation batches laid out as in training."""
    run = released.open_run(cfg.run_dir)
    result = run_curves(cfg.run_dir)
    model_cfg = dataclasses.replace(train_lib.model_config(cfg), remat=False)
    if not model_cfg.moe_layers:
        return result
    params, tokenizer = released.load_params(run, run.steps[-1]), train_lib.load_tokenizer(cfg)
    texts = analysis.analysis_texts()
    rows_by_source = {s: analysis.pack_rows(texts[s], tokenizer, cfg.seq_len, rows) for s in SOURCES}
    per_row_cfg = dataclasses.replace(model_cfg, max_group_size=cfg.seq_len, group_rule="divisor")
    probe_rows = tok.validation_batches(tokenizer, cfg.seq_len, cfg.batch_size, probe_batches)
    found = analysis.analyse(analysis.run_subject(run), max_rows=rows, min_count=min_count,
                             sweep=(cfg.model.train_capacity_factor, cfg.model.eval_capacity_factor))
    spec, early = found["specialization"], found["early_routing"]
    return {**result, "routing": routing_measures(params, per_row_cfg, rows_by_source),
            "leak": leak_probe(params, model_cfg, [b for bs in probe_rows.values() for b in bs]),
            "specialization": spec["by_layer"][spec["layer"]]["token_id"]["score"],
            "early_agreement": {"step": early["steps"][1], "agreement": float(np.mean(
                [curve[1] for curve in early["agreement"].values()]))} if early else None}


def step_times(configs: dict, rounds: int = 5, steps: int = 2) -> dict[str, float]:
    """Each config's train-step time in seconds, measured side by side: every config's step is
    built (from its initialization, on one batch of its own data) and compiled first, then the
    configs take turns, `steps` steps each per round; the fastest round counts, since a shared
    machine only ever adds time. Training runs one after another, so their logged step times
    saw different loads and are not compared."""
    trainers, batches = {}, {}
    for name, cfg in configs.items():
        mesh = train_lib.build_mesh(cfg)
        trainers[name] = train_lib.build_trainer(cfg, mesh)
        sources = {m: tok.mixture_sources(m) for m in {cfg.mixture, cfg.warmup_mixture} - {""}}
        batch = next(train_lib.train_batches(cfg, train_lib.load_tokenizer(cfg), sources))
        batches[name] = train_lib.shard.global_batch(batch, mesh)
    best = {name: float("inf") for name in configs}
    for _ in range(rounds + 1):  # the first round compiles
        for name, trainer in trainers.items():
            started = time.perf_counter()
            for _ in range(steps):
                trainer.params, trainer.opt_state, metrics = trainer.train_step(
                    trainer.params, trainer.opt_state, batches[name])
            jax.block_until_ready(metrics)
            best[name] = min(best[name], (time.perf_counter() - started) / steps)
    return best


def run_variant(cfg, *, rows: int, min_count: int, probe_batches: int, progress: bool) -> dict:
    """Train the variant's run (resumed if cut short, skipped if finished), then measure it. The
    measures are kept in RUN/lab_measures.json with the checkpoint and settings they describe, so
    adding a variant measures only that one (delete the file to measure again)."""
    cli.progress(f"{cfg.run_dir}: training ({cfg.steps} steps; a finished run is only read)")
    train_lib.train(cfg, progress=progress)
    path = pathlib.Path(cfg.run_dir) / "lab_measures.json"
    key = {"checkpoint": max(checkpoints.saved_steps(cfg.run_dir)), "rows": rows,
           "probe_batches": probe_batches}
    if path.is_file() and (saved := json.loads(path.read_text()))["key"] == key:
        return saved["measures"]
    cli.progress(f"{cfg.run_dir}: measuring routing, analysis and leak")
    measures = measure(cfg, rows=rows, min_count=min_count, probe_batches=probe_batches)
    files.replace_file(path, json.dumps({"key": key, "measures": measures}))
    return measures


# --- Part 5: the comparison ------------------------------------------------------------------------
def percent(value: float) -> str:
    return f"{value:6.1%}"


def quality_lines(results: dict[str, dict]) -> list[str]:
    """Validation loss and accuracy per domain (evaluation capacity) and relative step time."""
    base = results.get("openmoe", next(iter(results.values())))["step_s"]
    lines = [f"{'variant':15} {'loss text':>9} {'code':>6} {'acc text':>8} {'code':>6} {'step':>6}"]
    for name, r in results.items():
        e = r["eval"]
        lines.append(f"{name:15} {e['eval/text/loss']:9.3f} {e['eval/code/loss']:6.3f} "
                     f"{percent(e['eval/text/accuracy']):>8} {percent(e['eval/code/accuracy'])} "
                     f"{r['step_s'] / base:5.2f}x")
    return lines


def routing_lines(results: dict[str, dict]) -> list[str]:
    """Per routed variant: drops by quarter (text), chat's last quarter, tokens no expert served,
    MaxVio, specialization, early routing and the two leak measures."""
    lines = [f"{'variant':15} {'text dropped by quarter':>29} {'chat Q4':>7} {'alone Q4':>8} "
             f"{'MaxVio':>6} {'spec':>5} {'early':>6} {'leak':>6} {'gap':>7}"]
    for name, r in results.items():
        if "routing" not in r:
            continue
        text, chat = r["routing"]["text"], r["routing"]["chat"]
        early = r["early_agreement"]
        lines.append(f"{name:15} {' '.join(percent(q) for q in text['dropped_by_quarter']):>29} "
                     f"{percent(chat['dropped_by_quarter'][-1]):>7} "
                     f"{percent(text['left_behind_by_quarter'][-1]):>8} "
                     f"{text['max_violation']:6.2f} {r['specialization']:5.2f} "
                     f"{percent(early['agreement']) if early else '   n/a'} "
                     f"{percent(r['leak']['moved_share'])} {r['leak']['loss_gap']:+7.3f}")
    return lines


def report_lines(results: dict[str, dict], base) -> list[str]:
    """The lab's report: what was trained, then the two tables and what each column means."""
    return [f"Routing lab: {len(results)} variants of the {base.model.num_layers}-layer "
            f"recipe, {base.steps} steps of {base.batch_size} x {base.seq_len} tokens each", "",
            "Quality (validation, evaluation capacity) and step time relative to openmoe (timed "
            "side by side):",
            *quality_lines(results), "",
            "Routing on validation rows, one group per row, training capacity (MoE layers averaged):",
            *routing_lines(results), "",
            "dropped: share of the tokens' top-k choices not served, by quarter of the sequence; "
            "alone: share of tokens no expert served (last quarter); MaxVio: busiest expert's "
            "load / mean - 1; spec: 11's specialization score by token id (1 = always the same "
            "experts); early: share of frequent tokens whose favourite expert at the first kept "
            "checkpoint is already the final one; leak: share of earlier tokens whose output "
            "changes when the last token of their group changes; gap: loss scored one prefix at "
            "a time minus teacher-forced loss (training capacity).", ""]


# --- Part 6: the command line and the self-test ---------------------------------------------------
def quick_base():
    """The self-test's recipe: 06's tiny preset, 20 short steps, checkpoints at 10 and 20."""
    return dataclasses.replace(
        train_lib.QUICK, model=model_lib.PRESETS["tiny"], objective="lm", ul2_until_step=0,
        seq_len=64, batch_size=16, microbatches=1, steps=20, warmup_steps=2, eval_every=0,
        eval_batches=1, checkpoint_every=10, keep_last=2, keep_period=10, sample_tokens=0)


QUICK_VARIANTS = ("expert-choice", "dropless")  # the leak's two sure cases: always, never


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=(
        "The routing lab: train every routing variant (OpenMoE's default run with one switch "
        "each) into its own run directory, measure each (validation loss, drops by position, "
        "balance, specialization, causal leak, step time) and write one comparison."))
    cli.add_flags(parser, [
        ("--variants", str, None, f"which variants (default: all; --quick: {' '.join(QUICK_VARIANTS)})",
         {"nargs": "+", "choices": list(BY_NAME), "metavar": "NAME"}),
        ("--root", str, None, "where the runs and lab.json go (default: runs/lab; --quick: a "
         "temporary directory)"),
        ("--rows", cli.at_least_one, None, "validation rows per source to route (default: 64; "
         "--quick: 16)"),
        ("--probe-batches", cli.at_least_one, 2, "validation batches per domain for the leak probe"),
        ("--quick", bool, False, "self-test: tiny runs of two variants, checked for the leak")])
    return parser.parse_args(argv)


def run_lab(base, names: list[str], root: pathlib.Path, *, rows: int, probe_batches: int,
            rounds: int, progress: bool) -> dict:
    """Every named variant, trained and measured in turn; the comparison written to root."""
    configs = {name: variant_config(base, BY_NAME[name], root) for name in names}
    results = {name: run_variant(cfg, rows=rows, min_count=rows, probe_batches=probe_batches,
                                 progress=progress) for name, cfg in configs.items()}
    cli.progress("timing every variant's train step, side by side")
    for name, seconds in step_times(configs, rounds=rounds).items():
        results[name]["step_s"] = seconds
    lines = report_lines(results, base)
    report.write(root, lines, {"variants": {n: BY_NAME[n].idea for n in names},
                               "results": results})
    return {"lines": lines, "results": results}


def self_test_failures(results: dict[str, dict]) -> list[str]:
    """What must hold on any trained model: expert choice leaks, dropless never does."""
    failures = []
    if "dropless" in results and (results["dropless"]["leak"]["moved_share"] != 0
                                  or abs(results["dropless"]["leak"]["loss_gap"]) > 1e-4):
        failures.append(f"dropless must not leak: {results['dropless']['leak']}")
    if "expert-choice" in results and not results["expert-choice"]["leak"]["moved_share"] > 0:
        failures.append("expert choice must let a later token change an earlier one's output")
    return failures


def main(argv=None) -> None:
    args = parse_args(argv)
    leaks = leak_in_miniature()
    print("The leak in miniature: 04's 8 tokens, capacity 2, and the same tokens with the last "
          "one's first choice moved from e3 to e2. What that changes for the tokens before it:")
    for name, changes in leaks.items():
        print(f"  {name:22} {'; '.join(changes) or 'nothing'}")
    print()
    names = args.variants or list(QUICK_VARIANTS if args.quick else BY_NAME)
    scratch = (tempfile.TemporaryDirectory(prefix="openmoe-lab-quick-") if args.quick and not args.root
               else None)
    with cli.user_errors("interrupted; the same command resumes each run where it stopped"):
        root = pathlib.Path(scratch.name if scratch else args.root or "runs/lab")
        base = quick_base() if args.quick else train_lib.CONFIGS["laptop"]
        lab = run_lab(base, names, root, rows=args.rows or (16 if args.quick else 64),
                      probe_batches=1 if args.quick else args.probe_batches,
                      rounds=1 if args.quick else 5, progress=not args.quick)
    print("\n".join(lab["lines"]))
    print(f"written to {root}: report.txt, analysis.json (docs/make_figures.py draws the figure)"
          if not scratch else "the quick runs are removed with their temporary directory")
    if scratch:
        scratch.cleanup()
    failures = self_test_failures(lab["results"]) + (
        ["the worked example: the queue by position must leak, dropless must not"]
        if not leaks["by position (OpenMoE)"] or leaks["dropless"] else [])
    if failures:
        sys.exit("self-test FAILED: " + "; ".join(failures))
    print("OK: every variant trained and measured; the leak probe behaves as it must.")


if __name__ == "__main__":
    main()
