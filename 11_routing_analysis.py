"""Chapter 11: what the routers learned. OpenMoE's three routing findings, on your run or theirs.

The paper's analysis (arXiv 2402.01739 §4, App. E; OpenMoE's `analysis/colossalai_replace/`)
records which experts each token is sent to, and finds three things:
  1. Context-independent specialization: a token's *id* decides its experts far more than its
     context or position: the routing distribution varies more across token ids than across
     positions, and each expert's top tokens are low-level look-alikes ("," "and" ".": Table 9).
  2. Early routing learning: the token → expert map is fixed early in pretraining and barely
     moves after (the 8B's checkpoints at 200B … 1T tokens agree: Fig. 11).
  3. Drop-towards-the-End: an expert's buffer fills in token order, so a sequence's late tokens
     are dropped more, and far more on text the router was not balanced on (Fig. 12).
It analyses a `Subject`, one model's checkpoints in training order: a 09 run (step 0, the
initialization, then every kept checkpoint) or released models loaded by chapter 10 (`--model`,
or a `--series` such as the 8B at 200B … 1T tokens), one checkpoint in memory at a time. The
last checkpoint routes validation text and code and two kinds of text the router never saw
(chat turns, other languages); every MoE layer's decisions (05's expert_BLA, kept_BLA) are
recorded, each finding and its mitigations (evaluation capacity, dropless experts, a capacity
sweep) measured, and report.txt and analysis.json written (docs/make_figures.py draws them).
Shapes as in 02, plus U: the distinct values of a grouping (token ids, positions or sources).
Left out: the paper's radar plots over RedPajama subsets and programming languages (our corpus
has two domains), and its training-time mitigation (instruction data during warmup).
Self-test: `python 11_routing_analysis.py --quick` trains a tiny run and analyses it (about 1.5
minutes); `python 11_routing_analysis.py` analyses the default run (`python 09_train.py` first),
`... --model OrionZheng/openmoe-base` a released model (downloaded once).
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

OTHER_LANGUAGES = pathlib.Path(__file__).resolve().parent / "data" / "other_languages.txt"
IN_DISTRIBUTION = ("text", "code")  # the embedded corpus' two domains, validation split
SWEEP = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # the drop study's capacity factors, by default


# ------------------------------------------------------------------------------------------------
# Part 1: what is analysed: a 09 run's checkpoints, or released models
# ------------------------------------------------------------------------------------------------

class Checkpoint(NamedTuple):
    """One point of a model's training: its name, its place, and its parameters on demand."""

    label: str               # a 09 step ("240") or a released model ("OrionZheng/openmoe-8b-400B")
    step: int                # 09: the training step; released: its place in the series, 1, 2, …
    load: Callable[[], Any]  # reads its parameters (an nnx.State of nnx.Param) when called


@dataclasses.dataclass(frozen=True)
class Subject:
    """One model's config and tokenizer, and its parameters at checkpoints in training order.
    The last is analysed in full, the earlier ones for finding 2 only; each is loaded when it is
    needed and released after, so a series of 8B checkpoints never sits in memory twice."""

    name: str                            # what the report calls it: a run directory, a model
    about: str                           # one line on it, for the report's header
    out_dir: pathlib.Path                # where report.txt and analysis.json go
    model_cfg: Any                       # 06's ModelConfig, shared by every checkpoint
    tokenizer: Any                       # the tokenizer the model was trained with
    seq_len: int                         # tokens per routed row
    checkpoints: tuple[Checkpoint, ...]  # oldest first
    step_name: str                       # "step" (a 09 run: training steps) or "checkpoint"
    total_steps: int                     # 09: the run's length; released: the series' length


def describe(cfg) -> str:
    """A model in one line: '4 layers, MoE in [1, 3], 8 experts, top-2, float32'."""
    return (f"{cfg.num_layers} layers, MoE in {cfg.moe_layers}, {cfg.num_experts} experts, "
            f"top-{cfg.top_k}, {jnp.dtype(cfg.dtype).name}")


def run_subject(run, *, dtype=jnp.float32) -> Subject:
    """A 09 run (10's `open_run`): step 0, 09's initialization rebuilt from the seed, then every
    kept checkpoint."""
    cfg, model_cfg = run.cfg, dataclasses.replace(train_lib.model_config(run.cfg), dtype=dtype)
    checkpoints = tuple(Checkpoint(str(step), step, functools.partial(released.load_params, run,
                                                                      step))
                        for step in (0, *run.steps))
    return Subject(str(run.path), f"{describe(model_cfg)}; {cfg.steps} steps, checkpoints "
                                  f"{list(run.steps)}", run.path / "routing_analysis", model_cfg,
                   train_lib.load_tokenizer(cfg), cfg.seq_len, checkpoints, "step", cfg.steps)


def released_subject(names: list[str], *, dtype=jnp.float32, seq_len: int = 512) -> Subject:
    """Released models (hub names or directories): one model, or checkpoints of one model in
    training order, as chapter 10 loads them (T5X's evaluation semantics). Hub names are
    downloaded and configs and tokenizers read now, so a missing one fails before hours of
    routing; the weights (in `dtype`) are read only when a checkpoint is used."""
    directories, configs, tokenizers = zip(*(released.load_config(name, dtype=dtype)
                                             for name in names))
    model_cfg = configs[-1]
    for name, cfg, tokenizer in zip(names, configs, tokenizers):
        if tokenizer is None:
            raise ValueError(f"{name} has no spiece.model beside its weights (or in its parent): "
                             "the hub models ship it; for a T5X checkpoint, copy it from the HF "
                             "model of the same size")
        changed = [f.name for f in dataclasses.fields(cfg)
                   if getattr(cfg, f.name) != getattr(model_cfg, f.name)]
        if changed:
            raise ValueError(f"{name} and {names[-1]} differ in {changed}: a series must be "
                             "checkpoints of one model")
    if not 1 <= seq_len <= model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in [1, max_seq_len={model_cfg.max_seq_len}] "
                         f"of {names[-1]}")

    def loader(directory):
        return lambda: nnx.state(released.load_model(directory, param_dtype=dtype, dtype=dtype)[0],
                                 nnx.Param)

    checkpoints = tuple(Checkpoint(name, index, loader(directory))
                        for index, (name, directory) in enumerate(zip(names, directories), 1))
    about = (f"{describe(model_cfg)}, T5X evaluation semantics"
             + (f"; series {list(names)}" if len(names) > 1 else ""))
    return Subject(names[-1], about, pathlib.Path("runs", "routing_analysis",
                                                  pathlib.Path(names[-1]).name),
                   model_cfg, tokenizers[-1], seq_len, checkpoints, "checkpoint", len(names))


def analysis_config(subject: Subject, *, capacity_factor: float | None = None,
                    capacity_rule: str = "t5x"):
    """The subject's model with the capacity under study (train=False; default: the training
    factor; the rule "dropless" is 05's `dropless`), and each row its own routing group.

    OpenMoE's analysis ran one sequence at a time through ColossalAI, so a group is one row and
    the queue order is the position in the sequence. (T5X evaluated the released models with
    flaxformer's groups, at least E per batch, where the drops depend on the batch.)
    """
    cfg = subject.model_cfg
    dropless = capacity_rule == "dropless"
    return dataclasses.replace(
        cfg, remat=False, dropless=dropless, capacity_rule="t5x" if dropless else capacity_rule,
        eval_capacity_factor=cfg.train_capacity_factor if capacity_factor is None else capacity_factor,
        max_group_size=subject.seq_len, group_rule="divisor")


# ------------------------------------------------------------------------------------------------
# Part 2: the text we route: validation text and code, and two kinds the router never saw
# ------------------------------------------------------------------------------------------------

def chat_formatted(texts: list[str]) -> list[str]:
    """Each document as a conversation: its paragraphs alternate between user and assistant turns
    behind role markers, the shape of the MT-Bench prompts fed to OpenMoE-8B-Chat. The words are
    in distribution; the format is what the router never trained on."""
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
    """Source name → documents: in-distribution validation text and code, then the two
    out-of-distribution sets (text the router never trained on)."""
    validation = tok.embedded_corpus("validation")
    texts = {name: list(validation[name]["text"]) for name in IN_DISTRIBUTION}
    return {**texts, "chat": chat_formatted(texts["text"]), "other languages": other_language_texts()}


def pack_rows(texts: list[str], tokenizer, seq_len: int, max_rows: int, *,
              decoder_start: bool = False) -> dict[str, np.ndarray]:
    """Documents → [B, L] rows packed exactly as 09 trains (eos between documents). With
    `decoder_start`, the rows T5X fed the released models: shifted right behind id 0, its start
    token, e.g. [a b eos c] → [0 a b eos]."""
    rows = list(itertools.islice(train_lib.pack_lm_rows(
        train_lib.token_stream(iter(texts), tokenizer), seq_len), max_rows))
    if not rows:
        raise ValueError(f"the texts hold fewer than seq_len + 1 = {seq_len + 1} tokens: nothing "
                         "to route")
    packed = {key: np.stack([row[key] for row in rows])
              for key in ("inputs", "positions", "segment_ids")}
    if decoder_start:
        inputs_BL = packed["inputs"]
        packed["inputs"] = np.concatenate([np.zeros_like(inputs_BL[:, :1]), inputs_BL[:, :-1]], 1)
    return packed


# ------------------------------------------------------------------------------------------------
# Part 3: recording every routing decision
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decisions:
    """Every MoE layer's decisions on a set of rows, flat over the N routed tokens:
    `expert_NA[layer]` holds each token's k experts (first choice first), `kept_NA[layer]`
    whether that expert had room; `source_N` indexes `sources`."""

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
    """Run the model over every source's rows, `batch_rows` at a time, keeping each MoE layer's
    decisions. The last batch is filled up with copies of the first row, whose decisions are
    dropped: each row is its own routing group (`analysis_config`), so no row changes another's.
    """
    keys = ("inputs", "positions", "segment_ids")
    every = {key: np.concatenate([rows[key] for rows in rows_by_source.values()]) for key in keys}
    count, seq_len = every["inputs"].shape
    padded = {key: np.concatenate([v, np.repeat(v[:1], -count % batch_rows, axis=0)])
              for key, v in every.items()}
    decide = decision_step(model_cfg)
    batches = [decide(params, *(padded[key][start:start + batch_rows] for key in keys))
               for start in range(0, count, batch_rows)]

    def flat_NA(layer_index: int, which: int) -> np.ndarray:  # which: 0 expert_BLA, 1 kept_BLA
        parts = [np.asarray(batch[layer_index][which]) for batch in batches]
        return np.concatenate(parts)[:count].reshape(-1, model_cfg.top_k)

    rows_per_source = [len(rows["inputs"]) for rows in rows_by_source.values()]
    source_N = np.repeat(np.arange(len(rows_by_source)), np.array(rows_per_source) * seq_len)
    layers = list(enumerate(model_cfg.moe_layers))
    return Decisions(tuple(rows_by_source), source_N, every["inputs"].ravel(),
                     every["positions"].ravel(), {layer: flat_NA(i, 0) for i, layer in layers},
                     {layer: flat_NA(i, 1) for i, layer in layers}, model_cfg.num_experts, seq_len)


# ------------------------------------------------------------------------------------------------
# Part 4: the statistics, small pure functions of decisions (tests feed them constructed ones)
# ------------------------------------------------------------------------------------------------

def routing_distribution(group_N, expert_NA, num_experts: int, min_count: int = 1):
    """Per distinct value of a grouping (a token id, a position, a source): the share of its
    assignments that went to each expert, counting all k choices, before capacity (what the
    router *wants*). Returns (values [U], tokens per value [U], distribution [U, E]) for the
    values seen at least `min_count` times.

    E.g. group [7, 7, 9], k=1, experts [[0], [1], [1]] → 7: [.5, .5], 9: [0, 1].
    """
    values_U, inverse_N, counts_U = np.unique(group_N, return_inverse=True, return_counts=True)
    top_k = expert_NA.shape[1]
    hits_UE = np.zeros((len(values_U), num_experts))
    np.add.at(hits_UE, (np.repeat(inverse_N, top_k), expert_NA.ravel()), 1.0)
    distribution_UE = hits_UE / (counts_U[:, None] * top_k)
    frequent_U = counts_U >= min_count
    return values_U[frequent_U], counts_U[frequent_U], distribution_UE[frequent_U]


def max_spread(num_experts: int, top_k: int) -> float:
    """The std over experts of a value that always picks the same k experts (k at 1/k, the rest
    at 0), √(1/(kE) − 1/E²): the largest spread a routing distribution can have. Uniform: 0."""
    return float(np.sqrt(1.0 / (top_k * num_experts) - 1.0 / num_experts**2))


def specialization_score(group_N, expert_NA, num_experts: int, min_count: int) -> dict:
    """The paper's App. E measure: the std over experts of each value's routing distribution,
    averaged over the values seen at least `min_count` times, divided by `max_spread`: 1 when
    every value always goes to the same experts, near 0 when it says nothing about routing.
    "keys" counts the values kept (a value of the grouping, not an attention key)."""
    values_U, _, distribution_UE = routing_distribution(group_N, expert_NA, num_experts, min_count)
    spread_U = distribution_UE.std(axis=1)
    reference = max_spread(num_experts, expert_NA.shape[1])
    mean = float(spread_U.mean()) if len(values_U) else float("nan")
    return {"keys": len(values_U), "mean_std": mean, "score": mean / reference,
            "max_std": reference}


def top_tokens(token_N, expert_NA, num_experts: int, count: int = 8) -> list[list[tuple]]:
    """Per expert, the token ids that make up most of its assignments (the paper's Table 9), each
    as (token id, its tokens sent to this expert, the share of that id's tokens sent here: 1.0
    means every occurrence of the id chose this expert as one of its k)."""
    values_U, counts_U, distribution_UE = routing_distribution(token_N, expert_NA, num_experts)
    share_UE = distribution_UE * expert_NA.shape[1]  # a token picks an expert at most once
    hits_UE = np.rint(share_UE * counts_U[:, None]).astype(int)
    table = []
    for expert in range(num_experts):
        order = np.argsort(-hits_UE[:, expert], kind="stable")[:count]
        table.append([(int(values_U[u]), int(hits_UE[u, expert]), float(share_UE[u, expert]))
                      for u in order if hits_UE[u, expert] > 0])
    return table


def top1_experts(token_N, expert_NA, num_experts: int, min_count: int):
    """Each frequent token id's favourite expert: its most common *first* choice over contexts."""
    values_U, _, distribution_UE = routing_distribution(token_N, expert_NA[:, :1], num_experts,
                                                        min_count)
    return values_U, distribution_UE.argmax(axis=1)


def agreement(values_a, top1_a, values_b, top1_b) -> float:
    """Share of the token ids present in both whose favourite expert is the same in a and b."""
    common, index_a, index_b = np.intersect1d(values_a, values_b, return_indices=True)
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
# Part 5: the three findings, measured
# ------------------------------------------------------------------------------------------------

def heat_maps(seen: Decisions, tokenizer, layer: int, tokens: int = 24,
              position_bins: int = 16) -> dict[str, tuple[list[str], list]]:
    """The routing distributions docs/make_figures.py draws, per title (row labels, [U, E]): the
    most frequent token ids (nearly one-hot rows) and bins of positions (nearly flat ones)."""
    values_U, counts_U, by_token_UE = routing_distribution(seen.token_N, seen.expert_NA[layer],
                                                           seen.num_experts)
    frequent = np.argsort(-counts_U, kind="stable")[:tokens]
    _, _, by_bin_UE = routing_distribution(seen.position_N * position_bins // seen.seq_len,
                                           seen.expert_NA[layer], seen.num_experts)
    width = seen.seq_len // position_bins
    return {"by token id (most frequent)": (
                [repr(released.piece(tokenizer, values_U[u])) for u in frequent],
                by_token_UE[frequent].tolist()),
            "by position": ([f"{b * width}-{(b + 1) * width - 1}" for b in range(position_bins)],
                            by_bin_UE.tolist())}


def specialization(decisions: Decisions, tokenizer, layer: int, min_count: int) -> dict:
    """Finding 1, on in-distribution tokens: token id vs position per MoE layer; in `layer`, each
    expert's top tokens, the expert shares by source, and the heat maps."""
    experts = decisions.num_experts
    seen = decisions.only(*IN_DISTRIBUTION)
    by_layer = {moe_layer: {name: specialization_score(group_N, expert_NA, experts, min_count)
                            for name, group_N in (("token_id", seen.token_N),
                                                  ("position", seen.position_N))}
                for moe_layer, expert_NA in seen.expert_NA.items()}
    tops = top_tokens(seen.token_N, seen.expert_NA[layer], experts)
    _, _, by_source_UE = routing_distribution(decisions.source_N, decisions.expert_NA[layer],
                                              experts)
    text, code = (by_source_UE[decisions.sources.index(s)] for s in IN_DISTRIBUTION)
    return {
        "layer": layer, "min_count": min_count, "by_layer": by_layer,
        "top_tokens": [[(released.piece(tokenizer, t), n, share) for t, n, share in row]
                       for row in tops],
        "by_source": {s: by_source_UE[i].tolist() for i, s in enumerate(decisions.sources)},
        "text_code_distance": float(0.5 * np.abs(text - code).sum()),
        "uniform_share": 1.0 / experts, "heat_maps": heat_maps(seen, tokenizer, layer)}


def favourite_experts(decisions: Decisions, min_count: int) -> dict[int, tuple]:
    """Per MoE layer, (frequent token ids, the favourite expert of each): finding 2's measure."""
    return {layer: top1_experts(decisions.token_N, expert_NA, decisions.num_experts, min_count)
            for layer, expert_NA in decisions.expert_NA.items()}


def early_routing(subject: Subject, rows_by_source: dict, final: dict, min_count: int) -> dict:
    """Finding 2: at every earlier checkpoint (a 09 run's first is its initialization, step 0),
    each frequent token id's favourite expert, compared per MoE layer with `final`, the last
    checkpoint's `favourite_experts`. One checkpoint is in memory at a time."""
    model_cfg = analysis_config(subject, capacity_factor=subject.model_cfg.eval_capacity_factor)
    favourites = []
    for index, checkpoint in enumerate(subject.checkpoints[:-1], start=1):
        progress(f"early routing: {subject.step_name} {checkpoint.label} "
                 f"({index} of {len(subject.checkpoints) - 1})")
        decisions = record_decisions(checkpoint.load(), model_cfg, rows_by_source)
        favourites.append(favourite_experts(decisions, min_count))
    favourites.append(final)
    return {"steps": [checkpoint.step for checkpoint in subject.checkpoints],
            "labels": [checkpoint.label for checkpoint in subject.checkpoints],
            "step_name": subject.step_name, "total_steps": subject.total_steps,
            "agreement": {layer: [agreement(*favourite[layer], *final[layer])
                                  for favourite in favourites] for layer in final},
            "chance": 1.0 / model_cfg.num_experts,
            "tokens": {layer: len(values) for layer, (values, _) in final.items()}}


def capacity_settings(cfg) -> dict[str, tuple[float, str]]:
    """The capacities the drop study compares (`cfg`: 06's ModelConfig): how OpenMoE trained;
    how the paper measured (Fig. 12: ColossalAI's port, k in the capacity); the evaluation
    capacity, OpenMoE's mitigation; and 05's dropless experts, the cure (a flat zero curve)."""
    train_cf, eval_cf = cfg.train_capacity_factor, cfg.eval_capacity_factor
    return {f"train cf {train_cf} (T5X)": (train_cf, "t5x"),
            f"train cf {train_cf} x k (ColossalAI)": (train_cf, "colossalai"),
            f"eval cf {eval_cf} (T5X)": (eval_cf, "t5x"),
            "dropless": (train_cf, "dropless")}


def drop_towards_the_end(subject: Subject, decisions_at: Callable[[float, str], Decisions],
                         layer: int, sweep: tuple[float, ...] = SWEEP) -> dict:
    """Finding 3: per source, the drop rate by position under each capacity setting, and the
    last quarter's drop rate over a sweep of capacity factors (T5X rule): how much capacity it
    takes. `decisions_at(capacity_factor, rule)` routes the rows at that capacity."""
    def curves(decisions: Decisions) -> dict[str, np.ndarray]:
        parts = {source: decisions.only(source) for source in decisions.sources}
        return {source: drop_rate_by_position(part.position_N, part.kept_NA[layer], part.seq_len)
                for source, part in parts.items()}

    return {"layer": layer,
            "curves": {name: curves(decisions_at(*setting))
                       for name, setting in capacity_settings(subject.model_cfg).items()},
            "sweep": {capacity_factor: {source: quarter_means(curve_L)[-1] for source, curve_L
                                        in curves(decisions_at(capacity_factor, "t5x")).items()}
                      for capacity_factor in sweep}}


# ------------------------------------------------------------------------------------------------
# Part 6: the report: each finding's numbers and a conclusion in words
# ------------------------------------------------------------------------------------------------

def specialization_lines(spec: dict) -> list[str]:
    """Finding 1: scores per layer, each expert's top tokens, expert shares by source."""
    scores = spec["by_layer"][spec["layer"]]
    lines = [f"1. Context-independent specialization (token ids and positions seen >= "
             f"{spec['min_count']} times; score = mean std over experts / "
             f"{scores['token_id']['max_std']:.3f}, the std of one that always picks the same "
             "experts)",
             f"   {'MoE layer':>10} {'token ids':>10} {'score':>7} {'positions':>10} {'score':>7}"]
    lines += [f"   {layer:>10} {s['token_id']['keys']:>10} {s['token_id']['score']:7.2f} "
              f"{s['position']['keys']:>10} {s['position']['score']:7.2f}"
              for layer, s in spec["by_layer"].items()]
    lines.append(f"   Top tokens of each expert, layer {spec['layer']} (tokens sent there, and "
                 "the share of that token id's occurrences this is):")
    lines += [f"   E{expert:<3}" + "  ".join(f"{p!r} {n} ({share:.0%})" for p, n, share in row[:6])
              for expert, row in enumerate(spec["top_tokens"])]
    lines.append(f"   Expert shares by source, layer {spec['layer']} (uniform: "
                 f"{spec['uniform_share']:.1%}); top three experts:")
    lines += [f"   {source:16} " + ", ".join(f"E{e} {shares[e]:.1%}"
                                             for e in np.argsort(shares)[::-1][:3])
              for source, shares in spec["by_source"].items()]
    token, position = scores["token_id"]["score"], scores["position"]["score"]
    distance = spec["text_code_distance"]
    verdict = ("a token's id predicts its experts far better than its position does"
               if token > 2 * position else
               "token id and position predict routing about equally (no context independence)")
    domains = "share experts" if distance < 0.5 else "go to different experts"
    return [*lines, f"   text vs code: total variation distance {distance:.3f} (0 = same "
                    "experts, 1 = disjoint)",
            f"   Conclusion: {verdict} (score {token:.2f} vs {position:.2f}); text and code "
            f"mostly {domains}."]


def early_routing_lines(early: dict | None) -> list[str]:
    """Finding 2: the agreement table over checkpoints, and where it stands halfway."""
    if early is None:
        return ["2. Early routing learning: needs checkpoints from along training (a 09 run, or "
                "--series A B ...); one model was given, so it is not measured."]
    curves, labels, step_name = early["agreement"], early["labels"], early["step_name"]
    width = max(6, *map(len, labels))
    lines = ["2. Early routing learning: share of frequent token ids whose favourite expert (most "
             f"common first choice) equals the final checkpoint's (chance {early['chance']:.0%})",
             f"   {step_name:>{width}} " + " ".join(f"{'layer ' + str(layer):>9}"
                                                  for layer in curves)]
    lines += [f"   {label:>{width}} " + " ".join(f"{curve[i]:9.0%}" for curve in curves.values())
              for i, label in enumerate(labels)]
    half = next(i for i, step in enumerate(early["steps"]) if step >= early["total_steps"] / 2)
    # A 09 run counts training steps from initialization; a released series, its checkpoints.
    run = step_name == "step"
    return [*lines, f"   Conclusion: by {step_name} {labels[half]} (half of "
                    f"{'training' if run else 'the series'}) "
                    + ", ".join(f"{c[half]:.0%} in layer {layer}" for layer, c in curves.items())
                    + " of frequent tokens already have their final favourite expert (at "
                    + ("initialization" if run else f"the first, {labels[0]}") + ": "
                    + ", ".join(f"{c[0]:.0%}" for c in curves.values()) + ")."]


def drop_lines(drops: dict, sources: list[str]) -> list[str]:
    """Finding 3: drop rate by quarter of the sequence per setting, then the capacity sweep."""
    end = {setting: {source: quarter_means(curve_L)[-1] for source, curve_L in curves.items()}
           for setting, curves in drops["curves"].items()}  # the last quarter's drop rate
    lines = [f"3. Drop-towards-the-end, layer {drops['layer']}: share of assignments dropped in "
             "each quarter of the sequence (one row per routing group, as in the paper's "
             "analysis; its Fig. 12 used ColossalAI's rule, k in the capacity)"]
    for setting, curves in drops["curves"].items():
        lines += [f"   {setting}"] + [f"     {source:16} " + "  ".join(
            f"{q:6.1%}" for q in quarter_means(curve_L)) for source, curve_L in curves.items()]
    lines += ["   Capacity sweep (T5X rule): dropped in the last quarter of the sequence",
              f"     {'cf':>5} " + " ".join(f"{s:>16}" for s in sources)]
    lines += [f"     {cf:5.2f} " + " ".join(f"{by_source[s]:16.1%}" for s in sources)
              for cf, by_source in drops["sweep"].items()]
    train, colossal, evaluation, dropless = end.values()
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


# ------------------------------------------------------------------------------------------------
# Part 7: putting it together
# ------------------------------------------------------------------------------------------------

def progress(message: str) -> None:
    """One line on stderr as the analysis goes: it routes every row several times (minutes)."""
    print(message, file=sys.stderr, flush=True)


def check_min_count(min_count: int, in_distribution: dict[str, dict], max_rows: int) -> None:
    """Refuse a min_count that no position or no token id reaches, before any routing: findings
    1 and 2 keep the values seen min_count times among the in-distribution tokens, and each
    position occurs once per row (above that the tables would be NaN, the conclusions wrong)."""
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
    """The last checkpoint in full: its decisions at the evaluation capacity (for finding 1) and
    the drop study, each capacity routed once (the settings and the sweep share some). Its
    parameters are released on return, before the earlier checkpoints load for finding 2."""
    params = subject.checkpoints[-1].load()

    @functools.cache  # keyed by the arguments as given: always pass both
    def decisions_at(capacity_factor: float, rule: str) -> Decisions:
        progress(f"routing every row at capacity factor {capacity_factor} ({rule} rule)")
        model_cfg = analysis_config(subject, capacity_factor=capacity_factor, capacity_rule=rule)
        return record_decisions(params, model_cfg, rows_by_source)

    decisions = decisions_at(subject.model_cfg.eval_capacity_factor, "t5x")
    return decisions, drop_towards_the_end(subject, decisions_at, layer, sweep)


def report_lines(subject: Subject, results: dict, rows: dict[str, int]) -> list[str]:
    """The whole report: what was analysed, then the three findings with a conclusion each."""
    return [f"Routing analysis of {subject.name} ({subject.about})",
            f"rows of {subject.seq_len} tokens per source: "
            + ", ".join(f"{source} {count}" for source, count in rows.items()), "",
            *specialization_lines(results["specialization"]), "",
            *early_routing_lines(results["early_routing"]), "",
            *drop_lines(results["drops"], list(rows)), ""]


def analyse(subject: Subject, *, layer: int | None = None, max_rows: int = 128,
            min_count: int = 128, sweep: tuple[float, ...] = SWEEP,
            out_dir: pathlib.Path | None = None) -> dict:
    """All three findings on `subject`, detailed for `layer` (default: the third MoE layer, as in
    the paper's figures, or a smaller model's last); writes report.txt and analysis.json to
    `out_dir` (default: the subject's). Finding 2 needs two checkpoints or more, else is None."""
    moe_layers = subject.model_cfg.moe_layers
    if not moe_layers:
        raise ValueError(f"{subject.name} ({subject.about}) has no MoE layer to analyse")
    layer = moe_layers[min(2, len(moe_layers) - 1)] if layer is None else layer
    if layer not in moe_layers:
        raise ValueError(f"layer={layer}: the MoE layers of {subject.name} are {moe_layers}")
    if max_rows < 1 or min_count < 1 or len(set(sweep)) < 2 or min(sweep) <= 0:
        raise ValueError(f"max_rows={max_rows} and min_count={min_count} must be >= 1, and "
                         f"sweep={tuple(sweep)} two or more different capacity factors > 0")
    # Released weights read their rows as T5X fed them, behind its start token (06's t5x_padding).
    rows_by_source = {source: pack_rows(texts, subject.tokenizer, subject.seq_len, max_rows,
                                        decoder_start=subject.model_cfg.t5x_padding)
                      for source, texts in analysis_texts().items()}
    in_distribution = {s: rows_by_source[s] for s in IN_DISTRIBUTION}
    check_min_count(min_count, in_distribution, max_rows)
    rows = {source: len(r["inputs"]) for source, r in rows_by_source.items()}
    progress(f"{subject.name}: {sum(rows.values())} rows of {subject.seq_len} tokens from "
             f"{len(rows)} sources; loading {subject.step_name} {subject.checkpoints[-1].label}")
    decisions, drops = last_checkpoint_findings(subject, rows_by_source, layer, tuple(sweep))
    # Finding 2 compares every earlier checkpoint with the last one's favourite experts, from the
    # same decisions: the in-distribution rows at the evaluation capacity.
    final = favourite_experts(decisions.only(*IN_DISTRIBUTION), min_count)
    results = {"specialization": specialization(decisions, subject.tokenizer, layer, min_count),
               "early_routing": (early_routing(subject, in_distribution, final, min_count)
                                 if len(subject.checkpoints) > 1 else None),
               "drops": drops}
    lines = report_lines(subject, results, rows)
    out_dir = pathlib.Path(out_dir or subject.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    saved = dict(results, drops={**drops, "curves": {
        setting: {s: [None if np.isnan(v) else float(v) for v in c] for s, c in curves.items()}
        for setting, curves in drops["curves"].items()}})
    (out_dir / "analysis.json").write_text(json.dumps(saved, indent=1, default=str) + "\n")
    return {**results, "lines": lines, "out_dir": str(out_dir), "rows": rows}


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
    return run_subject(released.open_run(run_dir or "runs/laptop"), dtype=jnp.dtype(dtype))


def quick_run_config(run_dir: str = "runs/routing-quick") -> Any:
    """The self-test's run: 06's tiny preset on short rows, every checkpoint kept."""
    return dataclasses.replace(
        train_lib.QUICK, model=model_lib.PRESETS["tiny"], run_dir=run_dir, objective="lm",
        ul2_until_step=0, seq_len=64, batch_size=16, microbatches=1, steps=120, warmup_steps=12,
        eval_every=0, eval_batches=0, checkpoint_every=20, keep_last=1, keep_period=20,
        sample_tokens=0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(
        "Reproduce OpenMoE's three routing findings (context-independent specialization, early "
        "routing learning, drop-towards-the-end) on a run of 09_train.py or on released OpenMoE "
        "models: prints a report and writes report.txt and analysis.json (docs/make_figures.py "
        "draws them)."))
    parser.add_argument("--run-dir", help="a 09_train.py run directory (default: runs/laptop)")
    parser.add_argument("--model", help="a released model instead: a directory or a hub name, "
                                        "e.g. OrionZheng/openmoe-base (downloaded once)")
    parser.add_argument("--series", nargs="+", metavar="MODEL",
                        help="checkpoints of one released model in training order, e.g. "
                             "OrionZheng/openmoe-8b-200B ... OrionZheng/openmoe-8b-1T: the last "
                             "is analysed in full, all of them for early routing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameters and activations of released models (router and logits "
                             "stay f32); bfloat16 halves the 8B's 47 GB")
    parser.add_argument("--seq-len", type=int, help="tokens per row for released models "
                                                    "(default 512; a 09 run uses its own)")
    parser.add_argument("--quick", action="store_true",
                        help="self-test: train a tiny run in a temporary directory (about 1.5 "
                             "minutes) and analyse it instead; nothing is left behind unless "
                             "--out is given")
    parser.add_argument("--layer", type=int, help="block index of the MoE layer to detail "
                                                  "(default: the third MoE layer)")
    parser.add_argument("--rows", type=int, help="rows per source to route (default 128; "
                                                 "--quick: 48)")
    parser.add_argument("--min-count", type=int,
                        help="token ids / positions seen fewer times are left out (default and "
                             "paper: 128; --quick: 32, for its shorter rows)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/routing_analysis, or "
                                      "runs/routing_analysis/MODEL for released models)")
    parser.add_argument("--sweep", type=float, nargs="+", default=SWEEP, metavar="CF",
                        help=f"capacity factors of the drop study's sweep (default {SWEEP}); "
                             "each is one more pass over the rows")
    return parser.parse_args(argv)


def self_test_failures(results: dict, sweep: tuple[float, ...]) -> list[str]:
    """What must hold on any trained model: the final checkpoint agrees with itself, more capacity
    drops less, and (the paper's first finding, seen on every run here) token ids beat positions."""
    spec, early, drops = results["specialization"], results["early_routing"], results["drops"]
    scores = spec["by_layer"][spec["layer"]]
    least, most = min(sweep), max(sweep)
    failures = (["the final checkpoint must agree with itself"]
                if early and any(curve[-1] != 1.0 for curve in early["agreement"].values()) else [])
    if scores["token_id"]["score"] <= scores["position"]["score"]:
        failures.append("routing should depend more on the token id than on the position")
    return failures + [f"{source}: capacity factor {most} must drop less than {least}"
                       for source in results["rows"]
                       if drops["sweep"][most][source] >= drops["sweep"][least][source]]


def main(argv=None) -> None:
    """The command line: analyse what it names (with --quick, a tiny run trained first in a
    temporary directory), print the report, and give the self-test's verdict by exit status
    (not `assert`, so that it holds under `python -O`)."""
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
    with contextlib.ExitStack() as scratch:
        try:
            if args.quick:
                if args.run_dir or args.model or args.series:
                    raise ValueError("--quick trains and analyses its own run: drop --run-dir, "
                                     "--model and --series")
                args.run_dir = scratch.enter_context(tempfile.TemporaryDirectory(
                    prefix="openmoe-routing-quick-"))
                train_lib.train(quick_run_config(args.run_dir), overwrite=True, progress=False)
            subject = open_subject(run_dir=args.run_dir, model=args.model, series=args.series,
                                   dtype=args.dtype, seq_len=args.seq_len)
            # The quick run's rows are half as long: fewer of them, a lower count threshold.
            rows = (48 if args.quick else 128) if args.rows is None else args.rows
            min_count = (32 if args.quick else 128) if args.min_count is None else args.min_count
            results = analyse(subject, layer=args.layer, max_rows=rows, min_count=min_count,
                              sweep=args.sweep, out_dir=args.out)
        except ValueError as error:
            sys.exit(f"error: {error}")
    print("\n".join(results["lines"]))
    if args.quick and not args.out:
        print("report.txt, analysis.json were written to a temporary directory, now removed "
              "(--out keeps them)")
    else:
        print(f"written to {results['out_dir']}: report.txt, analysis.json")
    failures = self_test_failures(results, args.sweep)
    if failures:
        sys.exit("self-test FAILED: " + "; ".join(failures))
    print("OK: decisions recorded at every checkpoint; the three findings measured and reported.")


if __name__ == "__main__":
    main()
