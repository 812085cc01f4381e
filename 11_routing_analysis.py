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
It analyses a 09 run's checkpoints (step 0, the initialization, then every kept one) or released
ones opened by chapter 10 (`--model`, or a `--series` such as the 8B at 200B … 1T tokens). The
last routes validation text and code and two kinds the router never saw (01's chats and other
languages). Every MoE layer's decisions (05's expert_BLA, kept_BLA) are recorded; the findings
go to report.txt and analysis.json. Shapes as in 02, plus U: the distinct values of a grouping
(token ids, positions, sources). Left out: the paper's radar plots over data subsets.
Self-test: `python 11_routing_analysis.py --quick` (about 1.5 minutes)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import itertools
import pathlib
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from support import cli, report

tok = importlib.import_module("01_tokenizer")
model_lib = importlib.import_module("06_model")
train_lib = importlib.import_module("09_train")
released = importlib.import_module("10_released_models")

IN_DISTRIBUTION = ("text", "code")  # the embedded corpus' two domains, validation split
SWEEP = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # the drop study's capacity factors, by default


# --- Part 1: what is analysed: a 09 run's checkpoints, or released models -------------------------
@dataclasses.dataclass(frozen=True)
class Subject:
    """One model's checkpoints in training order (the last analysed in full), read when needed."""

    name: str                   # what the report calls it: a run directory, a model
    about: str                  # one line on it, for the report's header
    out_dir: pathlib.Path       # where report.txt and analysis.json go
    model_cfg: Any              # 06's ModelConfig, shared by every checkpoint
    tokenizer: Any              # the tokenizer the model was trained with
    seq_len: int                # tokens per routed row
    labels: tuple[str, ...]     # each checkpoint: a 09 step ("240") or a model ("…/openmoe-8b-1T")
    steps: tuple[int, ...]      # 09: its training step; released: its place in the series, 1, 2, …
    load: Callable[[int], Any]  # i → checkpoint i's parameters (nnx.State of nnx.Param), read then
    step_name: str              # "step" (a 09 run: training steps) or "checkpoint"
    total_steps: int            # 09: the run's length; released: the series' length


def describe(cfg) -> str:
    return (f"{cfg.num_layers} layers, MoE in {cfg.moe_layers}, {cfg.num_experts} experts, "
            f"top-{cfg.top_k}, {jnp.dtype(cfg.dtype).name}")


def run_subject(run, *, dtype=jnp.float32) -> Subject:
    """A 09 run (10's `open_run`): step 0 (the seeded initialization), then every kept one."""
    cfg, model_cfg = run.cfg, dataclasses.replace(train_lib.model_config(run.cfg), dtype=dtype)
    steps = (0, *run.steps)
    return Subject(
        name=str(run.path), about=f"{describe(model_cfg)}; {cfg.steps} steps, checkpoints "
                                  f"{list(run.steps)}", out_dir=run.path / "routing_analysis",
        model_cfg=model_cfg, tokenizer=train_lib.load_tokenizer(cfg), seq_len=cfg.seq_len,
        labels=tuple(map(str, steps)), steps=steps,
        load=lambda i: released.load_params(run, steps[i]), step_name="step", total_steps=cfg.steps)


def released_subject(names: list[str], *, dtype=jnp.float32, seq_len: int = 512) -> Subject:
    """Released models in training order, opened by 10's `open_series` (configs and tokenizer
    read now, so a missing one fails before hours of routing; weights only when used)."""
    series = released.open_series(names, dtype=dtype)
    last, cfg = series.names[-1], series.cfg
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in [1, max_seq_len={cfg.max_seq_len}] "
                         f"of {last}")
    count = len(series.names)
    return Subject(
        name=last, about=f"{describe(cfg)}, T5X evaluation semantics"
                         + (f"; series {list(series.names)}" if count > 1 else ""),
        out_dir=pathlib.Path("runs", "routing_analysis", pathlib.Path(last).name), model_cfg=cfg,
        tokenizer=series.tokenizer, seq_len=seq_len, labels=series.names,
        steps=tuple(range(1, count + 1)), load=lambda i: released.series_params(series, i),
        step_name="checkpoint", total_steps=count)


def analysis_config(subject: Subject, *, capacity_factor: float | None = None,
                    capacity_rule: str = "t5x"):
    """The model at the capacity under study, one row per routing group (as OpenMoE's analysis)."""
    cfg, dropless = subject.model_cfg, capacity_rule == "dropless"
    return dataclasses.replace(
        cfg, remat=False, dropless=dropless, capacity_rule="t5x" if dropless else capacity_rule,
        eval_capacity_factor=cfg.train_capacity_factor if capacity_factor is None else capacity_factor,
        max_group_size=subject.seq_len, group_rule="divisor")


# --- Part 2: the text we route: validation text and code, and two kinds the router never saw ------
def analysis_texts() -> dict[str, list[str]]:
    """Source name → documents: in-distribution validation text and code, then the two
    out-of-distribution sets (text the router never trained on)."""
    validation = tok.embedded_corpus("validation")
    texts = {name: list(validation[name]["text"]) for name in IN_DISTRIBUTION}
    return {**texts, "chat": tok.chat_formatted(texts["text"]),
            "other languages": tok.other_language_texts()}


def pack_rows(texts: list[str], tokenizer, seq_len: int, max_rows: int, *,
              decoder_start: bool = False) -> dict[str, np.ndarray]:
    """Documents → at most `max_rows` rows [B, L], packed by 01 exactly as 09 trains (eos between
    documents). With `decoder_start`, the rows T5X fed the released models: shifted right behind
    id 0, its start token, e.g. [a b eos c] → [0 a b eos]."""
    rows = list(itertools.islice(
        tok.pack_lm_rows(tok.token_stream(iter(texts), tokenizer), seq_len), max_rows))
    if not rows:
        raise ValueError(f"the texts hold fewer than seq_len + 1 = {seq_len + 1} tokens: nothing "
                         "to route")
    packed = tok.stack_rows(rows)
    if decoder_start:
        inputs_BL = packed["inputs"]
        packed["inputs"] = np.concatenate([np.zeros_like(inputs_BL[:, :1]), inputs_BL[:, :-1]], 1)
    return packed


# --- Part 3: recording every routing decision -----------------------------------------------------
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
        mask_N = np.isin(self.source_N, [self.sources.index(source) for source in sources])
        return dataclasses.replace(
            self, source_N=self.source_N[mask_N], token_N=self.token_N[mask_N],
            position_N=self.position_N[mask_N],
            expert_NA={layer: e[mask_N] for layer, e in self.expert_NA.items()},
            kept_NA={layer: k[mask_N] for layer, k in self.kept_NA.items()})


@functools.cache
def decision_step(model_cfg):
    """A compiled forward pass (train=False: no jitter, eval capacity) returning only the
    routing: {"expert_BLA": [one per MoE layer], "kept_BLA": [one per MoE layer]}."""
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)

    @jax.jit
    def decide(params, inputs_BL, positions_BL, segment_ids_BL):
        model = nnx.merge(graphdef, params, rest)
        _, routings, _ = model(inputs_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                               train=False)
        return {name: [r[name] for r in routings] for name in ("expert_BLA", "kept_BLA")}

    return decide


def record_decisions(params, model_cfg, rows_by_source: dict[str, dict], batch_rows: int = 16) -> Decisions:
    """Every MoE layer's decisions on all rows; the last batch is padded with copies of row 0."""
    fields = ("inputs", "positions", "segment_ids")
    every = {f: np.concatenate([rows[f] for rows in rows_by_source.values()]) for f in fields}
    count, seq_len = every["inputs"].shape
    padded = {f: np.concatenate([v, np.repeat(v[:1], -count % batch_rows, axis=0)])
              for f, v in every.items()}
    decide = decision_step(model_cfg)
    batches = [decide(params, *(padded[f][start:start + batch_rows] for f in fields))
               for start in range(0, count, batch_rows)]

    def by_layer_NA(name: str) -> dict[int, np.ndarray]:
        """05's `name` (expert_BLA or kept_BLA) per MoE layer, flat over the real rows' tokens;
        a token's first k (expert choice lists all E experts, best first: its k favourites)."""
        k = model_cfg.top_k
        return {layer: np.concatenate([np.asarray(batch[name][i]) for batch in batches])[:count, ..., :k]
                .reshape(-1, k) for i, layer in enumerate(model_cfg.moe_layers)}

    rows_per_source = [len(rows["inputs"]) for rows in rows_by_source.values()]
    source_N = np.repeat(np.arange(len(rows_by_source)), np.array(rows_per_source) * seq_len)
    return Decisions(tuple(rows_by_source), source_N, every["inputs"].ravel(),
                     every["positions"].ravel(), by_layer_NA("expert_BLA"),
                     by_layer_NA("kept_BLA"), model_cfg.num_experts, seq_len)


# --- Part 4: the statistics, small pure functions of decisions (tests feed them constructed ones) -
def routing_distribution(group_N, expert_NA, num_experts: int, min_count: int = 1):
    """Per distinct value of a grouping (token id, position, source) seen `min_count` times, the
    shares of its k-choice assignments per expert: (values [U], counts [U], distribution [U, E])."""
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
    """The paper's App. E measure: the mean std over experts of each frequent value's routing
    distribution, over `max_spread`: 1 when a value always picks the same experts, 0 uniform."""
    values_U, _, distribution_UE = routing_distribution(group_N, expert_NA, num_experts, min_count)
    spread_U = distribution_UE.std(axis=1)
    reference = max_spread(num_experts, expert_NA.shape[1])
    mean = float(spread_U.mean()) if len(values_U) else float("nan")
    return {"distinct_values": len(values_U), "mean_std": mean, "score": mean / reference,
            "max_std": reference}


def top_tokens(token_N, expert_NA, num_experts: int, count: int = 8) -> list[list[tuple]]:
    """Per expert, its most frequent token ids (Table 9): (id, tokens sent, share of the id)."""
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
    return [float(np.nanmean(part)) for part in np.array_split(values_L, 4)]


# --- Part 5: the three findings, measured ---------------------------------------------------------
def heat_maps(seen: Decisions, tokenizer, layer: int, tokens: int = 24,
              position_bins: int = 16) -> dict[str, tuple[list[str], list]]:
    """Distributions for docs/make_figures.py, title → (labels, [U, E]): by token id, position."""
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
    num_experts = decisions.num_experts
    seen = decisions.only(*IN_DISTRIBUTION)
    by_layer = {moe_layer: {name: specialization_score(group_N, expert_NA, num_experts, min_count)
                            for name, group_N in (("token_id", seen.token_N),
                                                  ("position", seen.position_N))}
                for moe_layer, expert_NA in seen.expert_NA.items()}
    tops = top_tokens(seen.token_N, seen.expert_NA[layer], num_experts)
    _, _, by_source_UE = routing_distribution(decisions.source_N, decisions.expert_NA[layer],
                                              num_experts)
    text, code = (by_source_UE[decisions.sources.index(s)] for s in IN_DISTRIBUTION)
    return {
        "layer": layer, "min_count": min_count, "by_layer": by_layer,
        "top_tokens": [[(released.piece(tokenizer, t), n, share) for t, n, share in row]
                       for row in tops],
        "by_source": {s: by_source_UE[i].tolist() for i, s in enumerate(decisions.sources)},
        "text_code_distance": float(0.5 * np.abs(text - code).sum()),
        "uniform_share": 1.0 / num_experts, "heat_maps": heat_maps(seen, tokenizer, layer)}


def favourite_experts(decisions: Decisions, min_count: int) -> dict[int, tuple]:
    """Per MoE layer, (frequent token ids, the favourite expert of each): finding 2's measure."""
    return {layer: top1_experts(decisions.token_N, expert_NA, decisions.num_experts, min_count)
            for layer, expert_NA in decisions.expert_NA.items()}


def early_routing(subject: Subject, rows_by_source: dict, final: dict, min_count: int) -> dict:
    """Finding 2: per MoE layer, how many frequent token ids' favourite expert at each earlier
    checkpoint equals `final`'s (the last checkpoint's). One checkpoint is in memory at a time."""
    model_cfg = analysis_config(subject, capacity_factor=subject.model_cfg.eval_capacity_factor)
    favourites = []
    for index, label in enumerate(subject.labels[:-1]):
        cli.progress(f"early routing: {subject.step_name} {label} "
                     f"({index + 1} of {len(subject.labels) - 1})")
        decisions = record_decisions(subject.load(index), model_cfg, rows_by_source)
        favourites.append(favourite_experts(decisions, min_count))
    return {"steps": list(subject.steps), "labels": list(subject.labels),
            "step_name": subject.step_name, "total_steps": subject.total_steps,
            "agreement": {layer: [agreement(*favourite[layer], *final[layer])
                                  for favourite in (*favourites, final)] for layer in final},
            "chance": 1.0 / model_cfg.num_experts,
            "token_ids_compared": {layer: len(values) for layer, (values, _) in final.items()}}


def capacity_settings(cfg) -> dict[str, tuple[float, str]]:
    """The drop study's capacities: as trained, as the paper measured (Fig. 12), eval, dropless."""
    train_cf, eval_cf = cfg.train_capacity_factor, cfg.eval_capacity_factor
    return {f"train cf {train_cf} (T5X)": (train_cf, "t5x"),
            f"train cf {train_cf} x k (ColossalAI)": (train_cf, "colossalai"),
            f"eval cf {eval_cf} (T5X)": (eval_cf, "t5x"),  # expert choice has no dropless form:
            **({"dropless": (train_cf, "dropless")} if cfg.routing == "tokens_choose" else {})}


def drop_towards_the_end(subject: Subject, decisions_at: Callable[[float, str], Decisions],
                         layer: int, sweep: tuple[float, ...] = SWEEP) -> dict:
    """Finding 3: per source, drops by position per setting; the last quarter's over the sweep."""
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


# --- Part 6: the report: each finding's numbers and a conclusion in words -------------------------
def specialization_lines(spec: dict) -> list[str]:
    """Finding 1: scores per layer, each expert's top tokens, expert shares by source."""
    scores = spec["by_layer"][spec["layer"]]
    token, position = scores["token_id"]["score"], scores["position"]["score"]
    distance = spec["text_code_distance"]
    verdict = ("a token's id predicts its experts far better than its position does"
               if token > 2 * position else
               "token id and position predict routing about equally (no context independence)")
    return [f"1. Context-independent specialization (token ids and positions seen >= "
            f"{spec['min_count']} times; score = mean std over experts / "
            f"{scores['token_id']['max_std']:.3f}, the std of one that always picks the same "
            "experts)",
            *report.table(("MoE layer", "token ids", "score", "positions", "score"),
                          [(layer, s["token_id"]["distinct_values"], s["token_id"]["score"],
                            s["position"]["distinct_values"], s["position"]["score"])
                           for layer, s in spec["by_layer"].items()],
                          (">10", ">10", "7.2f", ">10", "7.2f")),
            f"   Top tokens of each expert, layer {spec['layer']} (tokens sent there, and the "
            "share of that token id's occurrences this is):",
            *(f"   E{expert:<3}" + "  ".join(f"{p!r} {n} ({share:.0%})" for p, n, share in row[:6])
              for expert, row in enumerate(spec["top_tokens"])),
            f"   Expert shares by source, layer {spec['layer']} (uniform: "
            f"{spec['uniform_share']:.1%}); top three experts:",
            *(f"   {source:16} " + ", ".join(f"E{e} {shares[e]:.1%}"
                                            for e in np.argsort(shares)[::-1][:3])
              for source, shares in spec["by_source"].items()),
            f"   text vs code: total variation distance {distance:.3f} (0 = same experts, 1 = "
            "disjoint)",
            f"   Conclusion: {verdict} (score {token:.2f} vs {position:.2f}); text and code "
            f"mostly {'share experts' if distance < 0.5 else 'go to different experts'}."]


def early_routing_lines(early: dict | None) -> list[str]:
    """Finding 2: the agreement table over checkpoints, and where it stands halfway."""
    if early is None:
        return ["2. Early routing learning: needs checkpoints from along training (a 09 run, or "
                "--series A B ...); one model was given, so it is not measured."]
    curves, labels, step_name = early["agreement"], early["labels"], early["step_name"]
    half = next(i for i, step in enumerate(early["steps"]) if step >= early["total_steps"] / 2)
    run = step_name == "step"  # a 09 run counts training steps from initialization
    return ["2. Early routing learning: share of frequent token ids whose favourite expert (most "
            f"common first choice) equals the final checkpoint's (chance {early['chance']:.0%})",
            *report.table((step_name, *(f"layer {layer}" for layer in curves)),
                          [(label, *(c[i] for c in curves.values()))
                           for i, label in enumerate(labels)],
                          (f">{max(6, *map(len, labels))}", *["9.0%"] * len(curves))),
            f"   Conclusion: by {step_name} {labels[half]} (half of "
            f"{'training' if run else 'the series'}) "
            + ", ".join(f"{c[half]:.0%} in layer {layer}" for layer, c in curves.items())
            + " of frequent tokens already have their final favourite expert (at "
            + ("initialization" if run else f"the first, {labels[0]}") + ": "
            + ", ".join(f"{c[0]:.0%}" for c in curves.values()) + ")."]


def drop_lines(drops: dict, sources: list[str]) -> list[str]:
    """Finding 3: drop rate by quarter of the sequence per setting, then the capacity sweep."""
    train, colossal, evaluation, *dropless = (  # each setting's last-quarter drop rate per source
        {source: quarter_means(curve_L)[-1] for source, curve_L in curves.items()}
        for curves in drops["curves"].values())
    worst = max(colossal, key=colossal.get)
    seen = np.mean([colossal[s] for s in IN_DISTRIBUTION])
    shrink = np.mean([evaluation[s] / train[s] for s in sources if train[s] > 0])
    return [f"3. Drop-towards-the-end, layer {drops['layer']}: share of assignments dropped in "
            "each quarter of the sequence (one row per routing group, as in the paper's "
            "analysis; its Fig. 12 used ColossalAI's rule, k in the capacity)",
            *(line for setting, curves in drops["curves"].items() for line in [f"   {setting}", *(
                f"     {source:16} " + report.joined(quarter_means(curve_L), "6.1%", "  ")
                for source, curve_L in curves.items())]),
            "   Capacity sweep (T5X rule): dropped in the last quarter of the sequence",
            *report.table(("cf", *sources), [(cf, *(by_source[s] for s in sources))
                                             for cf, by_source in drops["sweep"].items()],
                          ("5.2f", *["16.1%"] * len(sources)), indent="     "),
            "   Conclusion: with OpenMoE's T5X capacity (k not included) the second choices fill "
            "the buffers in order, so late tokens lose by construction; with ColossalAI's "
            "capacity drops come from imbalance alone, and the end of a sequence loses most on "
            f"'{worst}' ({colossal[worst]:.1%} vs {seen:.1%} in-distribution). The evaluation "
            f"capacity leaves {shrink:.0%} of the training capacity's end-of-sequence drops; "
            + (f"dropless experts leave {max(dropless[0].values()):.0%}." if dropless else "")]


# --- Part 7: putting it together ------------------------------------------------------------------
def check_min_count(min_count: int, in_distribution: dict[str, dict], max_rows: int) -> None:
    """Refuse, before routing, a min_count no position or token id reaches."""
    rows_per_source = {source: len(r["inputs"]) for source, r in in_distribution.items()}
    most_frequent = int(np.bincount(np.concatenate(
        [r["inputs"].ravel() for r in in_distribution.values()])).max())
    if min_count > (limit := min(sum(rows_per_source.values()), most_frequent)):
        raise ValueError(
            f"min_count={min_count}: too little text to measure. Each position occurs once per "
            f"in-distribution row ({' + '.join(f'{n} {s}' for s, n in rows_per_source.items())} "
            f"rows, at most --rows {max_rows} per source) and the most frequent token id "
            f"{most_frequent} times; pass --min-count {limit} or less, or more --rows")


def last_checkpoint_findings(subject: Subject, rows_by_source: dict, layer: int,
                             sweep: tuple[float, ...]) -> tuple[Decisions, dict]:
    """The last checkpoint's decisions and drop study; its parameters are freed on return."""
    params = subject.load(-1)

    @functools.cache  # keyed by the arguments as given: always pass both
    def decisions_at(capacity_factor: float, rule: str) -> Decisions:
        cli.progress(f"routing every row at capacity factor {capacity_factor} ({rule} rule)")
        model_cfg = analysis_config(subject, capacity_factor=capacity_factor, capacity_rule=rule)
        return record_decisions(params, model_cfg, rows_by_source)

    decisions = decisions_at(subject.model_cfg.eval_capacity_factor, "t5x")
    return decisions, drop_towards_the_end(subject, decisions_at, layer, sweep)


def report_lines(subject: Subject, results: dict, rows_per_source: dict[str, int]) -> list[str]:
    """The whole report: what was analysed, then the three findings with a conclusion each."""
    return [f"Routing analysis of {subject.name} ({subject.about})",
            f"rows of {subject.seq_len} tokens per source: "
            + ", ".join(f"{source} {count}" for source, count in rows_per_source.items()), "",
            *specialization_lines(results["specialization"]), "",
            *early_routing_lines(results["early_routing"]), "",
            *drop_lines(results["drops"], list(rows_per_source)), ""]


def analyse(subject: Subject, *, layer: int | None = None, max_rows: int = 128,
            min_count: int = 128, sweep: tuple[float, ...] = SWEEP,
            out_dir: pathlib.Path | None = None) -> dict:
    """All three findings on `subject` (finding 2 needs two checkpoints), detailed for `layer`
    (default: the third MoE layer, or the last); writes report.txt and analysis.json."""
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
    rows_per_source = {source: len(r["inputs"]) for source, r in rows_by_source.items()}
    cli.progress(f"{subject.name}: {sum(rows_per_source.values())} rows of {subject.seq_len} "
                 f"tokens, {len(rows_per_source)} sources; loading {subject.labels[-1]}")
    decisions, drops = last_checkpoint_findings(subject, rows_by_source, layer, tuple(sweep))
    # Finding 2 compares every earlier checkpoint with the last one's favourite experts, from the
    # same decisions: the in-distribution rows at the evaluation capacity.
    final = favourite_experts(decisions.only(*IN_DISTRIBUTION), min_count)
    results = {"specialization": specialization(decisions, subject.tokenizer, layer, min_count),
               "early_routing": (early_routing(subject, in_distribution, final, min_count)
                                 if len(subject.labels) > 1 else None),
               "drops": drops}
    lines = report_lines(subject, results, rows_per_source)
    out_dir = report.write(out_dir or subject.out_dir, lines, results)
    return {**results, "lines": lines, "out_dir": str(out_dir),
            "rows_per_source": rows_per_source}


# --- Part 8: the command line and the self-test ---------------------------------------------------
def quick_run_config(run_dir: str = "runs/routing-quick") -> Any:
    return dataclasses.replace(
        train_lib.QUICK, model=model_lib.PRESETS["tiny"], run_dir=run_dir, objective="lm",
        ul2_until_step=0, seq_len=64, batch_size=16, microbatches=1, steps=120, warmup_steps=12,
        eval_every=0, eval_batches=0, checkpoint_every=20, keep_last=1, keep_period=20,
        sample_tokens=0)


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=(
        "Reproduce OpenMoE's three routing findings on a 09_train.py run or released OpenMoE "
        "models: print a report, write report.txt and analysis.json (docs/make_figures.py)."))
    cli.add_flags(parser.add_mutually_exclusive_group(), [
        ("--run-dir", str, "runs/laptop", "the 09_train.py run to analyse"),
        ("--model", str, None, "a released model: a directory or hub name"),
        ("--series", str, None, "checkpoints of one released model in training order; the last "
         "is analysed in full", {"nargs": "+", "metavar": "MODEL"}),
        ("--quick", bool, False, "self-test: train a tiny run in a temporary directory and "
         "analyse it (kept only with --out)")])
    cli.add_flags(parser, [
        ("--dtype", str, "float32", "parameters and activations of released models",
         {"choices": ["float32", "bfloat16"]}),
        ("--seq-len", cli.at_least_one, None, "tokens per row, released models only (default: 512)"),
        ("--layer", cli.integer, None, "the MoE layer to detail (default: the third MoE layer)"),
        ("--rows", cli.at_least_one, None, "rows per source (default: 128; --quick: 48)"),
        ("--min-count", cli.at_least_one, None,
         "leave out rarer token ids and positions (default: 128; --quick: 32)"),
        ("--out", str, None, "output directory (default: next to the run or model)"),
        ("--sweep", cli.finite, SWEEP, "capacity factors of the drop study's sweep",
         {"nargs": "+", "metavar": "CF"})])
    return parser.parse_args(argv)


def self_test_failures(results: dict, sweep: tuple[float, ...]) -> list[str]:
    """What holds on any trained model: self-agreement, ids beat positions, capacity helps."""
    spec, early, drops = results["specialization"], results["early_routing"], results["drops"]
    scores = spec["by_layer"][spec["layer"]]
    least, most = min(sweep), max(sweep)
    failures = (["the final checkpoint must agree with itself"]
                if early and any(curve[-1] != 1.0 for curve in early["agreement"].values()) else [])
    if scores["token_id"]["score"] <= scores["position"]["score"]:
        failures.append("routing should depend more on the token id than on the position")
    return failures + [f"{source}: capacity factor {most} must drop less than {least}"
                       for source in results["rows_per_source"]
                       if drops["sweep"][most][source] >= drops["sweep"][least][source]]


def main(argv=None) -> None:
    """Analyse what the command line names, print the report, exit 1 if the self-test fails."""
    args = parse_args(argv)
    scratch = (tempfile.TemporaryDirectory(prefix="openmoe-routing-quick-") if args.quick
               else contextlib.nullcontext(args.run_dir))
    with cli.user_errors(), scratch as run_dir:
        if args.series is not None and len(args.series) < 2:
            raise ValueError(f"--series {' '.join(args.series)}: a series needs two or more "
                             "checkpoints in training order (for one model, use --model)")
        if args.seq_len is not None and not (args.model or args.series):
            raise ValueError(f"--seq-len {args.seq_len} is for released models; a 09 run is "
                             "analysed on rows of its own training length")
        if args.quick:
            cli.progress("--quick: training a tiny run (06's tiny preset, 120 steps) to analyse")
            train_lib.train(quick_run_config(run_dir), overwrite=True, progress=False)
        dtype = jnp.dtype(args.dtype)
        subject = (released_subject(args.series or [args.model], dtype=dtype,
                                    seq_len=args.seq_len or 512) if args.model or args.series
                   else run_subject(released.open_run(run_dir), dtype=dtype))
        # The quick run's rows are half as long: fewer of them, a lower count threshold.
        results = analyse(subject, layer=args.layer, sweep=args.sweep, out_dir=args.out,
                          max_rows=args.rows or (48 if args.quick else 128),
                          min_count=args.min_count or (32 if args.quick else 128))
    print("\n".join(results["lines"]))
    print("report.txt, analysis.json: removed with the temporary directory (--out keeps them)"
          if args.quick and not args.out else f"written to {results['out_dir']}: report.txt, analysis.json")
    failures = self_test_failures(results, args.sweep)
    if failures:
        sys.exit("self-test FAILED: " + "; ".join(failures))
    print("OK: decisions recorded at every checkpoint; the three findings measured and reported.")


if __name__ == "__main__":
    main()
