"""Chapter 11: what the routers learned. OpenMoE's three routing findings, on your run or theirs.

The paper's analysis (arXiv 2402.01739 §4, App. E; OpenMoE's `analysis/colossalai_replace/`)
asks which experts each token is sent to, and finds three things:
  1. Context-independent specialization: a token's *id* decides its experts far more than its
     context or position does. The routing distribution varies more across token ids than across
     position ids, and each expert's top tokens are low-level look-alikes ("," "and" "." Table 9).
  2. Early routing learning: the token → expert map is fixed early in pretraining and barely moves
     afterwards (8B checkpoints at 200B … 1T tokens overlap, Fig. 11).
  3. Drop-towards-the-end: an expert's buffer is filled in token order, so the late tokens of a
     sequence are dropped more, and far more on text the router was not balanced on (MT-Bench,
     other languages; Fig. 12, measured with ColossalAI's capacity, which includes k).
It analyses a `Subject`, one model's checkpoints in training order: a 09_train.py run (step 0,
the initialization, then every kept checkpoint) or released OpenMoE models loaded by chapter 10
(`--model`, or a `--series` such as the 8B at 200B … 1T tokens; f32 or bf16, one checkpoint in
memory at a time, T5X's evaluation semantics). The last checkpoint routes validation text and
code and out-of-distribution text (chat-formatted documents, the other languages of
data/other_languages.txt); every MoE layer's decisions (05's expert_BLA, kept_BLA) are recorded,
each finding and its mitigations (evaluation capacity, a capacity sweep) measured, and a report,
analysis.json and, with matplotlib, PNG figures written. Left out: the paper's radar plots over
RedPajama subsets and programming languages (our corpus has two domains), and its training-time
mitigation (instruction data during warmup).
Self-test: `python 11_routing_analysis.py --quick` trains a tiny run and analyses it (about
1.5 minutes); `python 11_routing_analysis.py` analyses the default run (`python 09_train.py`
first), `... --model OrionZheng/openmoe-base` a released model (downloaded once).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import logging
import os
import pathlib
import sys
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

tok = importlib.import_module("01_tokenizer")
model_lib = importlib.import_module("06_model")
train_lib = importlib.import_module("09_train")
released = importlib.import_module("10_released_models")
# A 09 run, its checkpoints and its tokens' pieces are read by chapter 10's loaders.
Run, open_run, load_params, piece = (released.Run, released.open_run, released.load_params,
                                     released.piece)

OTHER_LANGUAGES = pathlib.Path(__file__).resolve().parent / "data" / "other_languages.txt"
IN_DISTRIBUTION = ("text", "code")  # the embedded corpus' two domains, validation split


# ------------------------------------------------------------------------------------------------
# Part 1: what is analysed: a 09 run's checkpoints, or released models
# ------------------------------------------------------------------------------------------------

class Checkpoint(NamedTuple):
    """One point of a model's training: how to name it, where it sits, its parameters on demand."""

    label: str               # a 09 step ("240") or a released model ("OrionZheng/openmoe-8b-400B")
    step: int                # 09: the training step; released: its place in the series, 1, 2, …
    load: Callable[[], Any]  # reads its parameters (an nnx.State of nnx.Param) when called


@dataclasses.dataclass(frozen=True)
class Subject:
    """What the analysis reads: one model's config and tokenizer, and its parameters at a series
    of checkpoints in training order. The last checkpoint is analysed in full; the earlier ones
    only for finding 2. Each is loaded when it is needed and released after, so a series of 8B
    checkpoints (24 GB each in bf16) never sits in memory twice."""

    name: str                            # what the report calls it: a run directory, a model
    about: str                           # one line on it, for the report's header
    out_dir: pathlib.Path                # where report.txt, analysis.json and figures go
    model_cfg: Any                       # 06's ModelConfig, shared by every checkpoint
    tokenizer: Any                       # the tokenizer the model was trained with
    seq_len: int                         # tokens per routed row
    checkpoints: tuple[Checkpoint, ...]  # oldest first
    step_name: str                       # "step" (a 09 run: training steps) or "checkpoint"
    total_steps: int                     # 09: the run's length; released: the series' length


def run_subject(run: Run, *, dtype=jnp.float32) -> Subject:
    """A 09 run: every kept checkpoint after step 0, 09's initialization rebuilt from the seed."""
    cfg = run.cfg
    checkpoints = tuple(Checkpoint(str(step), step, functools.partial(load_params, run, step))
                        for step in (0, *run.steps))
    return Subject(str(run.path), f"preset {cfg.preset}, {cfg.steps} steps, checkpoints "
                                  f"{list(run.steps)}", run.path / "routing_analysis",
                   dataclasses.replace(train_lib.model_config(cfg), dtype=dtype),
                   train_lib.load_tokenizer(cfg), cfg.seq_len, checkpoints, "step", cfg.steps)


def released_subject(names: list[str], *, dtype=jnp.float32, seq_len: int = 512,
                     out_dir: str | os.PathLike | None = None) -> Subject:
    """Released models (hub names or directories): one model, or checkpoints of one model in
    training order (the 8B at 200B … 1T tokens), as chapter 10 loads them, with T5X's evaluation
    semantics. Hub names are downloaded now, so a missing one fails before hours of routing; the
    configs and tokenizers are read now, the weights (in `dtype`) only when a checkpoint is used.
    """
    directories, configs, tokenizers = zip(*(released.load_config(name, dtype=dtype)
                                             for name in names))
    for name, tokenizer in zip(names, tokenizers):
        if tokenizer is None:
            raise ValueError(f"{name} has no spiece.model beside its weights (or in its parent): "
                             "the hub models ship it; for a T5X checkpoint, copy it from the HF "
                             "model of the same size")
    for name, cfg in zip(names[:-1], configs):
        if cfg != configs[-1]:
            changed = [f.name for f in dataclasses.fields(cfg)
                       if getattr(cfg, f.name) != getattr(configs[-1], f.name)]
            raise ValueError(f"{name} and {names[-1]} differ in {changed}: a series must be "
                             "checkpoints of one model")
    model_cfg = configs[-1]
    if not 1 <= seq_len <= model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in [1, max_seq_len={model_cfg.max_seq_len}] "
                         f"of {names[-1]}")

    def loader(directory):
        return lambda: nnx.state(released.load_model(directory, param_dtype=dtype, dtype=dtype)[0],
                                 nnx.Param)

    checkpoints = tuple(Checkpoint(name, index, loader(directory))
                        for index, (name, directory) in enumerate(zip(names, directories), 1))
    about = (f"{model_cfg.num_layers} layers, MoE in {model_cfg.moe_layers}, "
             f"{model_cfg.num_experts} experts, top-{model_cfg.top_k}, "
             f"{jnp.dtype(dtype).name}, T5X evaluation semantics"
             + (f"; series {list(names)}" if len(names) > 1 else ""))
    out_dir = pathlib.Path(out_dir or pathlib.Path("runs", "routing_analysis",
                                                   pathlib.Path(names[-1]).name))
    return Subject(names[-1], about, out_dir, model_cfg, tokenizers[-1], seq_len, checkpoints,
                   "checkpoint", len(names))


def analysis_config(subject: Subject, *, capacity_factor: float | None = None,
                    capacity_rule: str = "t5x"):
    """The subject's model, with the capacity under study and each row its own routing group.

    `capacity_factor` is used with train=False (default: the training value); the rule
    "dropless" serves every assignment (05's `dropless`) whatever the factor. OpenMoE's
    analysis ran one sequence at a time through ColossalAI, so a group is one row: the queue
    order is then exactly the position in the sequence. (T5X evaluated released models with
    flaxformer's groups, at least E per batch, so there the drops depend on the batch.)
    """
    cfg = subject.model_cfg
    if capacity_factor is None:
        capacity_factor = cfg.train_capacity_factor
    dropless = capacity_rule == "dropless"
    return dataclasses.replace(
        cfg, remat=False, eval_capacity_factor=capacity_factor, dropless=dropless,
        capacity_rule="t5x" if dropless else capacity_rule, max_group_size=subject.seq_len,
        group_rule="divisor")


# ------------------------------------------------------------------------------------------------
# Part 2: the text we route: validation text and code, and two kinds the router never saw
# ------------------------------------------------------------------------------------------------

def chat_formatted(texts: list[str]) -> list[str]:
    """Each document as a conversation: its paragraphs alternate between user and assistant turns
    behind role markers, the shape of MT-Bench prompts fed to OpenMoE-8B-Chat. The words are
    in-distribution; the format (markers, short turns) is what the router never trained on."""
    chats = []
    for text in texts:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        turns = [f"### {'Assistant' if i % 2 else 'User'}:\n{p}" for i, p in enumerate(paragraphs)]
        chats.append("\n\n".join(turns) + "\n\n### Assistant:\n")
    return chats


def other_language_texts(path: pathlib.Path = OTHER_LANGUAGES) -> list[str]:
    """The documents of data/other_languages.txt (German … Japanese), one per `== name ==`."""
    documents, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            documents.append(current)
            current = []
        elif not line.startswith("#"):
            current.append(line)
    documents.append(current)
    return ["\n".join(lines).strip() for lines in documents if "".join(lines).strip()]


def analysis_texts() -> dict[str, list[str]]:
    """Source name → documents: in-distribution validation text and code, then the two OOD sets."""
    validation = train_lib.embedded_corpus("validation")
    texts = {name: list(validation[name]["text"]) for name in IN_DISTRIBUTION}
    return {**texts, "chat": chat_formatted(texts["text"]), "other languages": other_language_texts()}


def pack_rows(texts: list[str], tokenizer, seq_len: int, max_rows: int, *,
              decoder_start: bool = False) -> dict[str, np.ndarray]:
    """Documents → [R, L] rows packed exactly as 09 trains (eos between documents).

    With `decoder_start`, rows are what T5X fed the released models: the targets shifted right
    behind id 0, its start token, e.g. [a b eos c] → [0 a b eos].
    """
    rows = list(itertools.islice(train_lib.pack_lm_rows(
        train_lib.token_stream(iter(texts), tokenizer), seq_len), max_rows))
    if not rows:
        raise ValueError(f"the texts hold fewer than seq_len + 1 = {seq_len + 1} tokens: nothing "
                         "to route")
    packed = {key: np.stack([row[key] for row in rows])
              for key in ("inputs", "positions", "segment_ids")}
    if decoder_start:
        inputs_RL = packed["inputs"]
        packed["inputs"] = np.concatenate([np.zeros_like(inputs_RL[:, :1]), inputs_RL[:, :-1]], 1)
    return packed


# ------------------------------------------------------------------------------------------------
# Part 3: recording every routing decision
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decisions:
    """Every MoE layer's decisions on a set of rows, flat over the N routed tokens.

    `expert_NA[layer]` holds each token's k chosen experts (first choice first) and
    `kept_NA[layer]` whether that expert had room; `source_N` indexes `sources`.
    """

    sources: tuple[str, ...]
    source_N: np.ndarray
    token_N: np.ndarray
    position_N: np.ndarray
    expert_NA: dict[int, np.ndarray]
    kept_NA: dict[int, np.ndarray]
    num_experts: int
    seq_len: int

    def only(self, *sources: str) -> Decisions:
        """The decisions on the tokens of the given sources."""
        mask_N = np.isin(self.source_N, [self.sources.index(source) for source in sources])
        return dataclasses.replace(
            self, source_N=self.source_N[mask_N], token_N=self.token_N[mask_N],
            position_N=self.position_N[mask_N],
            expert_NA={layer: e[mask_N] for layer, e in self.expert_NA.items()},
            kept_NA={layer: k[mask_N] for layer, k in self.kept_NA.items()})


@functools.cache
def decision_step(model_cfg):
    """A compiled forward pass (train=False: no jitter, eval capacity) returning only routings."""
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)

    @jax.jit
    def decide(params, inputs_BL, positions_BL, segment_ids_BL):
        model = nnx.merge(graphdef, params, rest)
        _, routings, _ = model(inputs_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                               train=False)
        return [(r["expert_BLA"], r["kept_BLA"]) for r in routings]

    return decide


def record_decisions(params, model_cfg, rows_by_source: dict[str, dict],
                     batch_rows: int = 16) -> Decisions:
    """Run the model over every source's rows, batch by batch, and keep each MoE layer's decisions.

    A short last batch is padded with copies of its first row, whose decisions are discarded;
    every row is its own routing group (`analysis_config`), so a copy cannot take a queue place
    from a real token.
    """
    decide = decision_step(model_cfg)
    columns = {"source": [], "token": [], "position": []}
    experts = {layer: [] for layer in model_cfg.moe_layers}
    kept = {layer: [] for layer in model_cfg.moe_layers}
    for index, rows in enumerate(rows_by_source.values()):
        for start in range(0, len(rows["inputs"]), batch_rows):
            batch = {k: v[start:start + batch_rows] for k, v in rows.items()}
            real = len(batch["inputs"])
            padded = {k: np.concatenate([v, np.repeat(v[:1], batch_rows - real, axis=0)])
                      for k, v in batch.items()}
            routed = decide(params, padded["inputs"], padded["positions"], padded["segment_ids"])
            columns["source"].append(np.full(batch["inputs"].size, index))
            columns["token"].append(batch["inputs"].ravel())
            columns["position"].append(batch["positions"].ravel())
            for layer, (expert_BLA, kept_BLA) in zip(model_cfg.moe_layers, routed):
                experts[layer].append(np.asarray(expert_BLA[:real]).reshape(-1, model_cfg.top_k))
                kept[layer].append(np.asarray(kept_BLA[:real]).reshape(-1, model_cfg.top_k))
    flat = {name: np.concatenate(parts) for name, parts in columns.items()}
    return Decisions(tuple(rows_by_source), flat["source"], flat["token"], flat["position"],
                     {layer: np.concatenate(v) for layer, v in experts.items()},
                     {layer: np.concatenate(v) for layer, v in kept.items()},
                     model_cfg.num_experts, rows["inputs"].shape[1])  # every source's L


# ------------------------------------------------------------------------------------------------
# Part 4: the statistics, as small pure functions of decisions (tests feed them constructed ones)
# ------------------------------------------------------------------------------------------------

def routing_distribution(keys_N, expert_NA, num_experts: int, min_count: int = 1):
    """Per distinct key (a token id, a position, a source): the share of its assignments that
    went to each expert, counting all k choices, before capacity (what the router *wants*).

    Returns (keys [K], counts [K] (tokens per key), distribution [K, E]) for keys seen at least
    `min_count` times. E.g. keys [7, 7, 9], k=1, experts [[0], [1], [1]] → 7: [.5, .5], 9: [0, 1].
    """
    keys_K, inverse_N, counts_K = np.unique(keys_N, return_inverse=True, return_counts=True)
    top_k = expert_NA.shape[1]
    hits_KE = np.zeros((len(keys_K), num_experts))
    np.add.at(hits_KE, (np.repeat(inverse_N, top_k), expert_NA.ravel()), 1.0)
    distribution_KE = hits_KE / (counts_K[:, None] * top_k)
    frequent_K = counts_K >= min_count
    return keys_K[frequent_K], counts_K[frequent_K], distribution_KE[frequent_K]


def max_spread(num_experts: int, top_k: int) -> float:
    """The std over experts of a key that always picks the same k experts (k at 1/k, rest 0):
    the largest spread a routing distribution can have, √(1/(kE) - 1/E²). Uniform routing: 0."""
    return float(np.sqrt(1.0 / (top_k * num_experts) - 1.0 / num_experts**2))


def specialization_score(keys_N, expert_NA, num_experts: int, min_count: int) -> dict:
    """The paper's App. E measure: the std over experts of each key's routing distribution,
    averaged over keys seen at least `min_count` times, and divided by `max_spread`: 1 when every
    key always goes to the same experts, near 0 when the key says nothing about routing."""
    keys_K, _, distribution_KE = routing_distribution(keys_N, expert_NA, num_experts, min_count)
    spread_K = distribution_KE.std(axis=1)
    reference = max_spread(num_experts, expert_NA.shape[1])
    return {"keys": len(keys_K), "mean_std": float(spread_K.mean()) if len(keys_K) else float("nan"),
            "score": float(spread_K.mean() / reference) if len(keys_K) else float("nan"),
            "max_std": reference}


def top_tokens(token_N, expert_NA, num_experts: int, count: int = 8) -> list[list[tuple]]:
    """Per expert, the token ids that make up most of its assignments (the paper's Table 9), each
    as (token id, its tokens sent to this expert, the share of that id's tokens sent here: 1.0
    means every occurrence of the id chose this expert as one of its k)."""
    keys_K, counts_K, distribution_KE = routing_distribution(token_N, expert_NA, num_experts)
    share_KE = distribution_KE * expert_NA.shape[1]  # a token picks an expert at most once
    hits_KE = np.rint(share_KE * counts_K[:, None]).astype(int)
    table = []
    for expert in range(num_experts):
        order = np.argsort(-hits_KE[:, expert], kind="stable")[:count]
        table.append([(int(keys_K[i]), int(hits_KE[i, expert]), float(share_KE[i, expert]))
                      for i in order if hits_KE[i, expert] > 0])
    return table


def top1_experts(token_N, expert_NA, num_experts: int, min_count: int):
    """Each frequent token id's favourite expert: its most common *first* choice over contexts."""
    first_N1 = expert_NA[:, :1]
    keys_K, _, distribution_KE = routing_distribution(token_N, first_N1, num_experts, min_count)
    return keys_K, distribution_KE.argmax(axis=1)


def agreement(keys_a, top1_a, keys_b, top1_b) -> float:
    """Share of the token ids present in both whose favourite expert is the same in a and b."""
    common, index_a, index_b = np.intersect1d(keys_a, keys_b, return_indices=True)
    return float(np.mean(top1_a[index_a] == top1_b[index_b])) if len(common) else float("nan")


def drop_rate_by_position(position_N, kept_NA, seq_len: int) -> np.ndarray:
    """[L]: the share of assignments dropped at each position (NaN where no token sat)."""
    dropped_L = np.bincount(position_N, weights=(~kept_NA).sum(axis=1), minlength=seq_len)
    assignments_L = np.bincount(position_N, minlength=seq_len) * kept_NA.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return dropped_L / assignments_L


def quarter_means(values_L: np.ndarray) -> list[float]:
    """Means over the four quarters of the sequence: the start-to-end trend in four numbers."""
    return [float(np.nanmean(part)) for part in np.array_split(values_L, 4)]


# ------------------------------------------------------------------------------------------------
# Part 5: the three findings, measured on a run
# ------------------------------------------------------------------------------------------------

def specialization(decisions: Decisions, tokenizer, layer: int, min_count: int) -> dict:
    """Finding 1, on in-distribution tokens: token id vs position, top tokens, and by source."""
    experts = decisions.num_experts
    seen = decisions.only(*IN_DISTRIBUTION)
    by_layer = {moe_layer: {name: specialization_score(keys_N, expert_NA, experts, min_count)
                            for name, keys_N in (("token_id", seen.token_N),
                                                 ("position", seen.position_N))}
                for moe_layer, expert_NA in seen.expert_NA.items()}
    tops = top_tokens(seen.token_N, seen.expert_NA[layer], experts)
    _, _, by_source_SE = routing_distribution(decisions.source_N, decisions.expert_NA[layer], experts)
    text, code = (by_source_SE[decisions.sources.index(s)] for s in IN_DISTRIBUTION)
    return {
        "layer": layer, "min_count": min_count, "by_layer": by_layer,
        "top_tokens": [[(piece(tokenizer, t), n, share) for t, n, share in row] for row in tops],
        "by_source": {s: by_source_SE[i].tolist() for i, s in enumerate(decisions.sources)},
        "text_code_distance": float(0.5 * np.abs(text - code).sum()),
        "uniform_share": 1.0 / experts}


def favourite_experts(decisions: Decisions, min_count: int) -> dict[int, tuple]:
    """Per MoE layer, (frequent token ids, the favourite expert of each): finding 2's measure."""
    return {layer: top1_experts(decisions.token_N, expert_NA, decisions.num_experts, min_count)
            for layer, expert_NA in decisions.expert_NA.items()}


def early_routing(subject: Subject, rows_by_source: dict, final: dict, min_count: int) -> dict:
    """Finding 2: at every earlier checkpoint (a 09 run's start at initialization, step 0), each
    frequent token id's favourite expert, compared per MoE layer with `final`, the last
    checkpoint's `favourite_experts`. One checkpoint is in memory at a time."""
    model_cfg = analysis_config(subject, capacity_factor=subject.model_cfg.eval_capacity_factor)
    favourites = []
    for index, checkpoint in enumerate(subject.checkpoints[:-1], start=1):
        progress(f"early routing: {subject.step_name} {checkpoint.label} "
                 f"({index} of {len(subject.checkpoints) - 1})")
        decisions = record_decisions(checkpoint.load(), model_cfg, rows_by_source)
        favourites.append(favourite_experts(decisions, min_count))
    favourites.append(final)
    curve = {layer: [agreement(*favourite[layer], *final[layer]) for favourite in favourites]
             for layer in final}
    return {"steps": [checkpoint.step for checkpoint in subject.checkpoints],
            "labels": [checkpoint.label for checkpoint in subject.checkpoints],
            "step_name": subject.step_name, "total_steps": subject.total_steps,
            "agreement": curve, "chance": 1.0 / model_cfg.num_experts,
            "tokens": {layer: len(keys) for layer, (keys, _) in final.items()}}


def capacity_settings(cfg) -> dict[str, tuple[float, str]]:
    """The capacities the drop study compares: how OpenMoE trained, how the paper measured (its
    Fig. 12: ColossalAI's port, k in the capacity, one group per sequence), the evaluation
    capacity that OpenMoE uses as its mitigation, and 05's dropless experts, the cure (every
    assignment served, so the curve must be flat at zero). `cfg`: 06's ModelConfig."""
    train_cf, eval_cf = cfg.train_capacity_factor, cfg.eval_capacity_factor
    return {f"train cf {train_cf} (T5X)": (train_cf, "t5x"),
            f"train cf {train_cf} x k (ColossalAI)": (train_cf, "colossalai"),
            f"eval cf {eval_cf} (T5X)": (eval_cf, "t5x"),
            "dropless": (train_cf, "dropless")}


SWEEP = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # capacity factors of the sweep, by default


def drop_curves(decisions: Decisions, layer: int) -> dict[str, np.ndarray]:
    """Per source, the drop rate by position [L] in one MoE layer."""
    parts = {source: decisions.only(source) for source in decisions.sources}
    return {source: drop_rate_by_position(part.position_N, part.kept_NA[layer], part.seq_len)
            for source, part in parts.items()}


def drop_towards_the_end(subject: Subject, decisions_at: Callable[[float, str], Decisions],
                         layer: int, sweep: tuple[float, ...] = SWEEP) -> dict:
    """Finding 3: drop rate by position per source under each capacity setting, and the last
    quarter's drop rate over a sweep of capacity factors (T5X rule): how much capacity it takes.
    `decisions_at(capacity_factor, rule)` routes the rows at that capacity; each capacity is one
    more pass over them, so a shorter `sweep` saves time on large models."""
    curves = {name: drop_curves(decisions_at(*setting), layer)
              for name, setting in capacity_settings(subject.model_cfg).items()}
    last_quarter = {}
    for capacity_factor in sweep:
        by_source = drop_curves(decisions_at(capacity_factor, "t5x"), layer)
        last_quarter[capacity_factor] = {source: quarter_means(curve_L)[-1]
                                         for source, curve_L in by_source.items()}
    return {"layer": layer, "curves": curves, "sweep": last_quarter}


# ------------------------------------------------------------------------------------------------
# Part 6: the report, in words and numbers, and figures when matplotlib is installed
# ------------------------------------------------------------------------------------------------

def specialization_lines(spec: dict) -> list[str]:
    """Finding 1 in words: scores per layer, each expert's top tokens, shares by source."""
    layer, scores = spec["layer"], spec["by_layer"][spec["layer"]]
    lines = [f"1. Context-independent specialization (keys seen >= {spec['min_count']} times; "
             f"score = mean std over experts / {scores['token_id']['max_std']:.3f}, the std of a "
             "key that always picks the same experts)",
             f"   {'MoE layer':>10} {'token ids':>10} {'score':>7} {'positions':>10} {'score':>7}"]
    for moe_layer, by_key in spec["by_layer"].items():
        token, position = by_key["token_id"], by_key["position"]
        lines.append(f"   {moe_layer:>10} {token['keys']:>10} {token['score']:7.2f} "
                     f"{position['keys']:>10} {position['score']:7.2f}")
    lines.append(f"   Top tokens of each expert, layer {layer} (tokens sent there, and the share of "
                 "that token id's occurrences this is):")
    for expert, row in enumerate(spec["top_tokens"]):
        lines.append(f"   E{expert:<3}" + "  ".join(f"{p!r} {n} ({share:.0%})"
                                                  for p, n, share in row[:6]))
    lines.append(f"   Expert shares by source, layer {layer} (uniform: {spec['uniform_share']:.1%}); "
                 "top three experts:")
    for source, shares in spec["by_source"].items():
        best = np.argsort(shares)[::-1][:3]
        lines.append(f"   {source:16} " + ", ".join(f"E{e} {shares[e]:.1%}" for e in best))
    lines.append(f"   text vs code: total variation distance {spec['text_code_distance']:.3f} "
                 "(0 = same experts, 1 = disjoint)")
    token_score, position_score = scores["token_id"]["score"], scores["position"]["score"]
    verdict = ("a token's id predicts its experts far better than its position does"
               if token_score > 2 * position_score else
               "token id and position predict routing about equally (no context independence)")
    domains = ("text and code mostly share experts" if spec["text_code_distance"] < 0.5 else
               "text and code mostly go to different experts")
    return [*lines, f"   Conclusion: {verdict} (score {token_score:.2f} vs "
                    f"{position_score:.2f}); {domains}."]


def early_routing_lines(early: dict | None) -> list[str]:
    """Finding 2 in words: the agreement table over checkpoints, and where it stands halfway."""
    if early is None:
        return ["2. Early routing learning: needs checkpoints from along training (a 09 run, or "
                "--series A B ...); one model was given, so it is not measured."]
    curves, labels, step_name = early["agreement"], early["labels"], early["step_name"]
    width = max(6, *map(len, labels))
    lines = ["2. Early routing learning: share of frequent token ids whose favourite expert (most "
             f"common first choice) equals the final checkpoint's (chance {early['chance']:.0%})",
             f"   {step_name:>{width}} " + " ".join(f"{'layer ' + str(layer):>9}"
                                                  for layer in curves)]
    for i, label in enumerate(labels):
        lines.append(f"   {label:>{width}} "
                     + " ".join(f"{curve[i]:9.0%}" for curve in curves.values()))
    half = next(i for i, step in enumerate(early["steps"]) if step >= early["total_steps"] / 2)
    at_half = ", ".join(f"{curve[half]:.0%} in layer {layer}" for layer, curve in curves.items())
    at_start = ", ".join(f"{curve[0]:.0%}" for curve in curves.values())
    # A 09 run counts training steps from initialization; a released series, its checkpoints.
    from_init = step_name == "step"
    return [*lines, f"   Conclusion: by {step_name} {labels[half]} (half of "
                    f"{'training' if from_init else 'the series'}) {at_half} of frequent tokens "
                    "already have their final favourite expert (at "
                    f"{'initialization' if from_init else 'the first, ' + labels[0]}: "
                    f"{at_start})."]


def drop_lines(drops: dict, sources: list[str]) -> list[str]:
    """Finding 3 in words: drop rate by quarter of the sequence per setting, the capacity sweep."""
    lines = [f"3. Drop-towards-the-end, layer {drops['layer']}: share of assignments dropped in "
             "each quarter of the sequence (one row per routing group, as in the paper's "
             "analysis; its Fig. 12 used ColossalAI's rule, k in the capacity)"]
    end = {}  # setting -> source -> drop rate in the last quarter
    for setting, curves in drops["curves"].items():
        lines.append(f"   {setting}")
        for source, curve_L in curves.items():
            quarters = quarter_means(curve_L)
            end.setdefault(setting, {})[source] = quarters[-1]
            lines.append(f"     {source:16} " + "  ".join(f"{q:6.1%}" for q in quarters))
    lines += ["   Capacity sweep (T5X rule): dropped in the last quarter of the sequence",
              f"     {'cf':>5} " + " ".join(f"{s:>16}" for s in sources)]
    for capacity_factor, by_source in drops["sweep"].items():
        lines.append(f"     {capacity_factor:5.2f} "
                     + " ".join(f"{by_source[s]:16.1%}" for s in sources))
    train, colossal, evaluation, dropless = (end[name] for name in drops["curves"])
    worst = max(colossal, key=colossal.get)
    seen = np.mean([colossal[s] for s in IN_DISTRIBUTION])
    shrink = np.mean([evaluation[s] / train[s] for s in sources if train[s] > 0])
    return [*lines, "   Conclusion: with OpenMoE's T5X capacity (k not included) the second "
                    "choices fill the buffers in order, so late tokens lose by construction; with "
                    "ColossalAI's capacity drops come from imbalance alone, and the end of a "
                    f"sequence loses most on '{worst}' ({colossal[worst]:.1%} vs {seen:.1%} "
                    f"in-distribution). The evaluation capacity leaves {shrink:.0%} of the "
                    "training capacity's end-of-sequence drops; dropless experts leave "
                    f"{max(dropless.values()):.0%}."]


def report_lines(subject: Subject, results: dict, rows: dict[str, int]) -> list[str]:
    """The whole report: what was analysed, then the three findings with a conclusion each."""
    header = [f"Routing analysis of {subject.name} ({subject.about})",
              f"rows of {subject.seq_len} tokens per source: "
              + ", ".join(f"{source} {count}" for source, count in rows.items())]
    return [*header, "", *specialization_lines(results["specialization"]), "",
            *early_routing_lines(results["early_routing"]), "",
            *drop_lines(results["drops"], list(rows)), ""]


def heat_maps(decisions: Decisions, tokenizer, layer: int, tokens: int = 24,
              position_bins: int = 16) -> list[tuple]:
    """(title, row labels, [rows, E] shares): the most frequent token ids, and position bins."""
    seen = decisions.only(*IN_DISTRIBUTION)
    keys_K, counts_K, distribution_KE = routing_distribution(seen.token_N, seen.expert_NA[layer],
                                                             seen.num_experts)
    frequent = np.argsort(-counts_K, kind="stable")[:tokens]
    bins_N = seen.position_N * position_bins // seen.seq_len
    _, _, by_position_PE = routing_distribution(bins_N, seen.expert_NA[layer], seen.num_experts)
    width = decisions.seq_len // position_bins
    return [("by token id (most frequent)", [repr(piece(tokenizer, keys_K[i])) for i in frequent],
             distribution_KE[frequent]),
            ("by position", [f"{b * width}-{(b + 1) * width - 1}" for b in range(position_bins)],
             by_position_PE)]


def save_figures(results: dict, out_dir: pathlib.Path) -> list[str]:
    """Heat maps of routing by token and by position, the agreement curve, and drop rate vs
    position; returns the files written, or [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    spec, early, drops = results["specialization"], results["early_routing"], results["drops"]

    # Finding 1: routing by token id is nearly one-hot per row; by position it is nearly flat.
    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    for axis, (title, labels, matrix) in zip(axes, results["heat_maps"]):
        image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
        axis.set_title(title)
        axis.set_xlabel("expert")
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle(f"Routing distribution, MoE layer {spec['layer']} (share of assignments)")
    figure.tight_layout()
    written.append(out_dir / "specialization.png")
    figure.savefig(written[-1], dpi=120)

    # Finding 2 (with a series): how much of the final token → expert map each checkpoint has.
    if early is not None:
        figure, axis = plt.subplots(figsize=(6, 4))
        for layer, curve in early["agreement"].items():
            axis.plot(early["steps"], curve, marker="o", label=f"MoE layer {layer}")
        axis.axhline(early["chance"], color="grey", linestyle=":", label="chance")
        axis.set_xticks(early["steps"], [pathlib.Path(label).name for label in early["labels"]],
                        fontsize=7)
        axis.set(xlabel={"step": "training step", "checkpoint": "checkpoint, in training order"}[
                     early["step_name"]],
                 ylabel="favourite expert = final one", ylim=(0, 1.05),
                 title="Early routing learning")
        axis.legend()
        figure.tight_layout()
        written.append(out_dir / "early_routing.png")
        figure.savefig(written[-1], dpi=120)

    # Finding 3: drop rate along the sequence, one panel per capacity, in 16 bins of positions.
    settings = len(drops["curves"])
    figure, axes = plt.subplots(1, settings, figsize=(5 * settings, 4), sharey=True)
    for axis, (setting, curves) in zip(np.atleast_1d(axes), drops["curves"].items()):
        for source, curve_L in curves.items():
            bins = np.array_split(np.arange(len(curve_L)), 16)
            axis.plot([b.mean() for b in bins], [np.nanmean(np.asarray(curve_L)[b]) for b in bins],
                      label=source)
        axis.set(title=setting, xlabel="position in the sequence")
    np.atleast_1d(axes)[0].set_ylabel("share of assignments dropped")
    np.atleast_1d(axes)[0].legend()
    figure.suptitle(f"Drop-towards-the-end, MoE layer {drops['layer']}")
    figure.tight_layout()
    written.append(out_dir / "drop_towards_the_end.png")
    figure.savefig(written[-1], dpi=120)
    plt.close("all")
    return [str(p) for p in written]


# ------------------------------------------------------------------------------------------------
# Part 7: putting it together
# ------------------------------------------------------------------------------------------------

def default_layer(model_cfg) -> int:
    """The paper's figures use the third MoE layer; a smaller model's last one."""
    layers = model_cfg.moe_layers
    return layers[min(2, len(layers) - 1)]


def progress(message: str) -> None:
    """One line on stderr as the analysis goes: it routes every row several times (minutes)."""
    print(message, file=sys.stderr, flush=True)


def check_min_count(min_count: int, in_distribution: dict[str, dict], max_rows: int) -> None:
    """Refuse a min_count that no position or no token id can reach, before any routing.

    Findings 1 and 2 keep the keys seen at least min_count times among the in-distribution
    tokens. Each position occurs once per row, so above the row count no position is left (the
    tables would be NaN and the conclusion wrong); above the most frequent token id's count, no
    token id is left.
    """
    rows = {source: len(r["inputs"]) for source, r in in_distribution.items()}
    most_frequent = int(np.bincount(np.concatenate(
        [r["inputs"].ravel() for r in in_distribution.values()])).max())
    limit = min(sum(rows.values()), most_frequent)
    if min_count > limit:
        raise ValueError(
            f"min_count={min_count}: too little text to measure. Each position occurs once per "
            f"in-distribution row ({' + '.join(f'{n} {s}' for s, n in rows.items())} rows, at "
            f"most --rows {max_rows} per source) and the most frequent token id {most_frequent} "
            f"times; pass --min-count {limit} or less, or more --rows")


def last_checkpoint_findings(subject: Subject, rows_by_source: dict, layer: int,
                             sweep: tuple[float, ...]) -> tuple[Decisions, dict]:
    """The last checkpoint in full: its decisions at the evaluation capacity (specialization is
    what the router wants) and the drop study, each capacity under study routed once (the
    settings and the sweep share some). Its parameters are released on return, so only one
    checkpoint is ever in memory: the earlier ones load next, for early routing."""
    params = subject.checkpoints[-1].load()

    @functools.cache  # keyed by the arguments as given: always pass both
    def decisions_at(capacity_factor: float, rule: str) -> Decisions:
        progress(f"routing every row at capacity factor {capacity_factor} ({rule} rule)")
        model_cfg = analysis_config(subject, capacity_factor=capacity_factor, capacity_rule=rule)
        return record_decisions(params, model_cfg, rows_by_source)

    decisions = decisions_at(subject.model_cfg.eval_capacity_factor, "t5x")
    return decisions, drop_towards_the_end(subject, decisions_at, layer, sweep)


def analyse(subject: Subject, *, layer: int | None = None, max_rows: int = 128,
            min_count: int = 128, sweep: tuple[float, ...] = SWEEP,
            out_dir: pathlib.Path | None = None, figures: bool = True) -> dict:
    """All three findings on `subject`; writes report.txt, analysis.json and figures to out_dir
    (default: the subject's). Finding 2 needs at least two checkpoints; with one it is None."""
    model_cfg = subject.model_cfg
    if not model_cfg.moe_layers:
        raise ValueError(f"{subject.name} ({subject.about}) has no MoE layer to analyse")
    layer = default_layer(model_cfg) if layer is None else layer
    if layer not in model_cfg.moe_layers:
        raise ValueError(f"layer={layer}: the MoE layers of {subject.name} are "
                         f"{model_cfg.moe_layers}")
    if max_rows < 1 or min_count < 1:
        raise ValueError(f"max_rows={max_rows} and min_count={min_count} must be >= 1")
    if len(set(sweep)) < 2 or min(sweep) <= 0:
        raise ValueError(f"sweep={tuple(sweep)}: give two or more different capacity factors, "
                         "each > 0")
    out_dir = pathlib.Path(out_dir or subject.out_dir)

    # Released weights read rows as T5X fed them, behind its start token (06's t5x_padding).
    rows_by_source = {source: pack_rows(texts, subject.tokenizer, subject.seq_len, max_rows,
                                        decoder_start=model_cfg.t5x_padding)
                      for source, texts in analysis_texts().items()}
    in_distribution = {s: rows_by_source[s] for s in IN_DISTRIBUTION}
    check_min_count(min_count, in_distribution, max_rows)

    progress(f"{subject.name}: {sum(len(r['inputs']) for r in rows_by_source.values())} rows of "
             f"{subject.seq_len} tokens from {len(rows_by_source)} sources; loading "
             f"{subject.step_name} {subject.checkpoints[-1].label}")
    decisions, drops = last_checkpoint_findings(subject, rows_by_source, layer, tuple(sweep))

    # Finding 2 compares every earlier checkpoint with the last one's favourite experts, which
    # come from the same decisions: the in-distribution rows at the evaluation capacity.
    final = favourite_experts(decisions.only(*IN_DISTRIBUTION), min_count)
    results = {"specialization": specialization(decisions, subject.tokenizer, layer, min_count),
               "early_routing": (early_routing(subject, in_distribution, final, min_count)
                                 if len(subject.checkpoints) > 1 else None),
               "drops": drops}
    rows = {source: len(r["inputs"]) for source, r in rows_by_source.items()}
    lines = report_lines(subject, results, rows)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    saved = dict(results, drops={**results["drops"], "curves": {
        setting: {s: [None if np.isnan(v) else float(v) for v in c] for s, c in curves.items()}
        for setting, curves in results["drops"]["curves"].items()}})
    (out_dir / "analysis.json").write_text(json.dumps(saved, indent=1, default=str) + "\n")
    if figures:
        results["heat_maps"] = heat_maps(decisions, subject.tokenizer, layer)
        results["figures"] = save_figures(results, out_dir)
    results.update(lines=lines, out_dir=str(out_dir), rows=rows)
    return results


def open_subject(*, run_dir: str | None = None, model: str | None = None,
                 series: list[str] | None = None, dtype: str = "float32",
                 seq_len: int | None = None) -> Subject:
    """What the command line names: a 09 run (`run_dir`, default runs/laptop), one released model
    (`model`) or checkpoints of one released model in training order (`series`), in `dtype`."""
    given = [flag for flag, value in (("--run-dir", run_dir), ("--model", model),
                                      ("--series", series)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} given together; analyse one thing: a 09 run "
                         "(--run-dir), one released model (--model) or a series (--series)")
    if series is not None and len(series) < 2:
        raise ValueError(f"--series {' '.join(series)}: a series needs two or more checkpoints "
                         "in training order (for one model, use --model)")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: choose 'float32' or 'bfloat16'")
    if model or series:
        return released_subject([model] if model else series, dtype=jnp.dtype(dtype),
                                seq_len=512 if seq_len is None else seq_len)
    if seq_len is not None:
        raise ValueError(f"--seq-len {seq_len} is for released models; a 09 run is analysed on "
                         "rows of its own training length")
    return run_subject(open_run(run_dir or "runs/laptop"), dtype=jnp.dtype(dtype))


def quick_run_config(run_dir: str = "runs/routing-quick") -> Any:
    """A run for the self-test: 06's tiny preset on short rows, every checkpoint kept."""
    return dataclasses.replace(
        train_lib.CONFIGS["quick"], preset="tiny", run_dir=run_dir, objective="lm",
        ul2_until_step=0,
        seq_len=64, batch_size=16, microbatches=1, steps=120, warmup_steps=12, eval_every=0,
        eval_batches=0, checkpoint_every=20, keep_last=1, keep_period=20, sample_tokens=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Reproduce OpenMoE's three routing findings (context-independent "
                    "specialization, early routing learning, drop-towards-the-end) on a run of "
                    "09_train.py or on released OpenMoE models: prints a report and writes "
                    "report.txt, analysis.json and PNG figures (with matplotlib: pip install -r "
                    "requirements-plots.txt).")
    parser.add_argument("--run-dir", default=None,
                        help="a 09_train.py run directory (default: runs/laptop)")
    parser.add_argument("--model", default=None,
                        help="a released model instead: a directory or a hub name, e.g. "
                             "OrionZheng/openmoe-base (downloaded once)")
    parser.add_argument("--series", nargs="+", default=None, metavar="MODEL",
                        help="checkpoints of one released model in training order, e.g. "
                             "OrionZheng/openmoe-8b-200B ... OrionZheng/openmoe-8b-1T: the last "
                             "is analysed in full, all of them for early routing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameters and activations of released models (router and logits "
                             "stay f32); bfloat16 halves the 8B's 47 GB")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per row for released models (default 512; a 09 run uses "
                             "its own)")
    parser.add_argument("--quick", action="store_true",
                        help="self-test: train a tiny run in a temporary directory (about 1.5 "
                             "minutes) and analyse it instead; nothing is left behind unless "
                             "--out is given")
    parser.add_argument("--layer", type=int, default=None,
                        help="block index of the MoE layer to detail (default: the third MoE layer)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows per source to route (default 128; --quick: 48)")
    parser.add_argument("--min-count", type=int, default=None,
                        help="token ids / positions seen fewer times are left out (default and "
                             "paper: 128; --quick: 32, for its shorter rows)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: RUN_DIR/routing_analysis, or "
                             "runs/routing_analysis/MODEL for released models)")
    parser.add_argument("--sweep", type=float, nargs="+", default=SWEEP, metavar="CF",
                        help=f"capacity factors of the drop study's sweep (default {SWEEP}); "
                             "each is one more pass over the rows")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints

    with contextlib.ExitStack() as scratch:
        try:
            if args.quick:
                if args.run_dir or args.model or args.series:
                    raise ValueError("--quick trains and analyses its own run: drop --run-dir, "
                                     "--model and --series")
                # The self-test's run lives in a temporary directory, removed at the end.
                args.run_dir = scratch.enter_context(tempfile.TemporaryDirectory(
                    prefix="openmoe-routing-quick-"))
                train_lib.train(quick_run_config(args.run_dir), overwrite=True, progress=False)
            subject = open_subject(run_dir=args.run_dir, model=args.model, series=args.series,
                                   dtype=args.dtype, seq_len=args.seq_len)
            # The quick run's rows are half as long: fewer of them, a lower count threshold.
            rows = (48 if args.quick else 128) if args.rows is None else args.rows
            min_count = (32 if args.quick else 128) if args.min_count is None else args.min_count
            results = analyse(subject, layer=args.layer, max_rows=rows, min_count=min_count,
                              sweep=args.sweep, out_dir=args.out, figures=not args.no_figures)
        except ValueError as error:
            sys.exit(f"error: {error}")
    print("\n".join(results["lines"]))
    figures = results.get("figures")
    written = "report.txt, analysis.json" + (
        ", " + ", ".join(pathlib.Path(f).name for f in figures) if figures else
        ("" if args.no_figures else " (no figures: pip install -r requirements-plots.txt)"))
    if args.quick and not args.out:
        print(f"{written} were written to a temporary directory, now removed (--out keeps them)")
    else:
        print(f"written to {results['out_dir']}: {written}")

    # What must hold on any trained model: the final checkpoint agrees with itself, more capacity
    # drops less, and (the paper's first finding, seen on every run here) token ids beat positions.
    # (Checked with `sys.exit`, not `assert`: a self-test's verdict must survive `python -O`.)
    spec, early, drops = results["specialization"], results["early_routing"], results["drops"]
    scores = spec["by_layer"][spec["layer"]]
    least, most = min(args.sweep), max(args.sweep)
    failures = (["the final checkpoint must agree with itself"]
                if early and any(curve[-1] != 1.0 for curve in early["agreement"].values()) else [])
    if scores["token_id"]["score"] <= scores["position"]["score"]:
        failures.append("routing should depend more on the token id than on the position")
    failures += [f"{source}: capacity factor {most} must drop less than {least}"
                 for source in results["rows"]
                 if drops["sweep"][most][source] >= drops["sweep"][least][source]]
    if failures:
        sys.exit("self-test FAILED: " + "; ".join(failures))
    print("OK: decisions recorded at every checkpoint; the three findings measured and reported.")
