"""Chapter 9: the training program: data pipeline, objective, sharded step, checkpoints, eval.

OpenMoE pretrained with T5X (arXiv 2402.01739 §2.4, App. B, Table 12; reference/openmoe-facts.md
§2): documents from a 50% text / 50% code mixture, packed into 2,048-token rows; Adafactor with
lr = 1/√max(step, 10⁴) (flat 0.01 for 10K steps); batch 1,024 (8B: 8 microbatches); load-balance,
z and router-z losses 0.01 / 0.001 / 0.0001; capacity factor 1.25 training, 2.0 evaluating. The
objective was UL2's mixture of denoisers on a causal decoder (50% PrefixLM "[S2S] ", span
corruption "[NLU] " µ=3,8 r=0.15 and "[NLG] " µ=3,8,64 r=0.5, loss on targets only), then plain
next-token prediction after 390K steps. This file is that program, one readable loop:
  data:  texts → tokens (+eos) → packed rows (LM: one causal stream, as OpenMoE's full_lm;
         UL2: one example per segment, with segment ids and positions, as T5X packs);
  step:  one jitted function on 07's mesh: grads (optionally over microbatches) → 08's Adafactor;
  loop:  tqdm, metrics.jsonl, per-domain eval, orbax checkpoints, exact resume, NaN stop.
`python 09_train.py` trains the small preset on the embedded corpus (~10 min on 2 CPU cores);
`--config openmoe-8b --mesh ... --mixture openmoe_v1` is the same program on a TPU v3 pod, and
`--dry-run [--topology v3:16x16]` compiles that step without running it (memory, FLOPs, MFU).
Left out: T5X's "NaN skipping", data-loader state beyond "rows consumed" (resume replays the
stream), pipeline parallelism. Self-test: `python 09_train.py --quick` (about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import itertools
import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

tok = importlib.import_module("01_tokenizer")
model_lib = importlib.import_module("06_model")
shard = importlib.import_module("07_sharding")
ada = importlib.import_module("08_adafactor")


# ------------------------------------------------------------------------------------------------
# Configuration: one frozen dataclass, named starting points, command-line overrides
# ------------------------------------------------------------------------------------------------

def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,expert=4,model=1" → {"data": 2, "expert": 4, "model": 1}; "" → {} (all on data)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in shard.MESH_AXES or not value.isdigit() or int(value) < 1 or name in sizes:
            raise ValueError(f"TrainConfig.mesh={text!r}: write it as 'data=N,expert=N,model=N' "
                             f"with each axis of {shard.MESH_AXES} at most once, sizes >= 1")
        sizes[name] = int(value)
    return sizes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are OpenMoE's (T5X gins, paper Table 12); CONFIGS scales them."""

    preset: str = "openmoe-8b"           # a model preset of 06_model.PRESETS
    run_dir: str = "runs/openmoe-8b"     # config.json, metrics.jsonl and checkpoints/ live here
    mixture: str = "openmoe_v1"          # "embedded" (offline 50/50) or a hub mixture of 01.MIXTURES
    tokenizer: str = ""                  # a SentencePiece .model (umT5's); "" = 01's embedded one
    objective: str = "ul2"               # "lm" (next token) or "ul2" (mixture of denoisers)
    ul2_until_step: int = 390_000        # with "ul2": plain LM from this step on (8B: 390K); 0 = never
    seq_len: int = 2048                  # tokens per row (UL2: inputs + targets together)
    batch_size: int = 1024               # rows per step, over all hosts (paper says 2048; gins 1024)
    microbatches: int = 8                # gradient accumulation: the batch in this many slices
    steps: int = 500_000                 # optimizer steps
    peak_lr: float = 0.01                # lr on the warmup plateau, then peak·√(warmup/step)
    warmup_steps: int = 10_000           # the plateau's length (T5X: flat, no ramp)
    train_capacity_factor: float = 1.25  # expert capacity while training
    eval_capacity_factor: float = 2.0    # ... while evaluating and sampling
    aux_loss_weight: float = 0.01        # load-balance loss
    z_loss_weight: float = 0.001         # output z-loss (paper; released gin: 1e-4)
    router_z_loss_weight: float = 0.0001  # router z-loss
    dtype: str = "bfloat16"              # activations: bfloat16 on TPU, float32 on CPU
    remat: bool = True                   # recompute blocks in the backward pass (memory for FLOPs)
    mesh: str = "data=2,expert=32,model=8"  # 8B on a v3-512 (gin); "" = all devices on data
    seed: int = 0                        # model init, data order and UL2 noise
    eval_every: int = 5_000              # steps between evaluations (0 = only at the end)
    eval_batches: int = 4                # validation batches per domain (text, code)
    checkpoint_every: int = 1_000        # steps between checkpoints
    keep_last: int = 3                   # newest checkpoints kept ...
    keep_period: int = 50_000            # ... plus every step divisible by this (for 10's analysis)
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = known accelerators only (TPU v3 core: 61.5)
    sample_tokens: int = 48              # tokens generated at the end (0 = none)

    def __post_init__(self):
        checks = {
            "preset": (self.preset in model_lib.PRESETS, f"one of {sorted(model_lib.PRESETS)}"),
            "mixture": (self.mixture in tok.MIXTURES, f"one of {sorted(tok.MIXTURES)}"),
            "objective": (self.objective in ("lm", "ul2"), "'lm' or 'ul2'"),
            "dtype": (self.dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
            "seq_len": (self.seq_len >= 32, "an int >= 32 (UL2 needs room for prefix and spans)"),
            "peak_lr": (self.peak_lr > 0, "> 0 (OpenMoE: 0.01)"),
            "train_capacity_factor": (self.train_capacity_factor > 0, "> 0 (OpenMoE: 1.25)"),
            "eval_capacity_factor": (self.eval_capacity_factor > 0, "> 0 (OpenMoE: 2.0)"),
            "run_dir": (bool(self.run_dir), "a directory path"),
        }
        for name in ("batch_size", "microbatches", "steps", "warmup_steps", "checkpoint_every",
                     "keep_last", "keep_period"):
            checks[name] = (getattr(self, name) >= 1, "an int >= 1")
        for name in ("ul2_until_step", "eval_every", "eval_batches", "sample_tokens"):
            checks[name] = (getattr(self, name) >= 0, "an int >= 0")
        for name in ("aux_loss_weight", "z_loss_weight", "router_z_loss_weight",
                     "peak_tflops_per_device"):
            checks[name] = (getattr(self, name) >= 0, ">= 0")
        checks["batch_size "] = (self.batch_size % self.microbatches == 0,
                                 f"divisible by microbatches={self.microbatches}")
        for name, (ok, allowed) in checks.items():
            if not ok:
                name = name.strip()
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be {allowed}")
        parse_mesh(self.mesh)


# Named starting points. "laptop" is the default run: the small preset, scaled so that 2 CPU
# cores see the loss fall within ~10 minutes. Its schedule keeps OpenMoE's shape (flat plateau,
# then 1/√step) with warmup a tenth of the run; peak 0.03 (3× OpenMoE's) because a 4-layer
# model seeing only ~1M tokens needs bigger steps: measured at step 80, train loss 5.97 with 0.03
# against 7.18 with 0.01. Every 80th step's checkpoint is kept (7 of 57 MB) for the early-routing
# curve of 11_routing_analysis.py. "quick" is the test suite's self-test: UL2, then LM, microbatches.
OPENMOE = TrainConfig()
CONFIGS: dict[str, TrainConfig] = {
    "laptop": dataclasses.replace(
        OPENMOE, preset="small", run_dir="runs/laptop", mixture="embedded", objective="lm",
        ul2_until_step=0, seq_len=128, batch_size=16, microbatches=1, steps=480, peak_lr=0.03,
        warmup_steps=48, dtype="float32", remat=False, mesh="", eval_every=120, eval_batches=4,
        checkpoint_every=40, keep_last=2, keep_period=80),
    "quick": dataclasses.replace(
        OPENMOE, preset="small", run_dir="runs/quick", mixture="embedded", objective="ul2",
        ul2_until_step=15, seq_len=64, batch_size=8, microbatches=2, steps=30, peak_lr=0.03,
        warmup_steps=5, dtype="float32", remat=False, mesh="", eval_every=15, eval_batches=1,
        checkpoint_every=10, keep_last=2, keep_period=20, sample_tokens=8),
    "openmoe-base": dataclasses.replace(OPENMOE, preset="openmoe-base", run_dir="runs/openmoe-base",
                                        microbatches=1, mesh="data=8,expert=16,model=1"),
    "openmoe-8b": OPENMOE,
    "openmoe-34b": dataclasses.replace(OPENMOE, preset="openmoe-34b", run_dir="runs/openmoe-34b",
                                       mixture="openmoe_v3", ul2_until_step=25_000, microbatches=16,
                                       mesh="data=1,expert=32,model=16"),
}
# Fields that may differ when a run is resumed (extending a run, changing how often it reports).
RESUMABLE_FIELDS = {"steps", "eval_every", "eval_batches", "sample_tokens", "checkpoint_every",
                    "keep_last", "keep_period", "peak_tflops_per_device"}


def model_config(cfg: TrainConfig) -> "model_lib.ModelConfig":
    """The preset with the run's sequence length, capacity factors, loss weights and dtype."""
    return dataclasses.replace(
        model_lib.PRESETS[cfg.preset], max_seq_len=cfg.seq_len,
        train_capacity_factor=cfg.train_capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor, aux_loss_weight=cfg.aux_loss_weight,
        z_loss_weight=cfg.z_loss_weight, router_z_loss_weight=cfg.router_z_loss_weight,
        dtype=jnp.dtype(cfg.dtype), remat=cfg.remat)


def build_mesh(cfg: TrainConfig, devices=None) -> jax.sharding.Mesh:
    """07's mesh from the config, checked against the devices and the batch before compiling."""
    sizes = parse_mesh(cfg.mesh)
    devices = list(devices if devices is not None else jax.devices())
    if sizes and math.prod(sizes.values()) != len(devices):
        raise ValueError(f"TrainConfig.mesh={cfg.mesh!r} has {math.prod(sizes.values())} devices "
                         f"but there are {len(devices)}; the axes' product must equal the count")
    if sizes:
        mesh = shard.make_mesh(model=sizes.get("model", 1), expert=sizes.get("expert", 1),
                               data=sizes.get("data", 1), devices=devices)
    else:
        mesh = shard.make_mesh(devices=devices)
    shards = shard.batch_shards(mesh) * cfg.microbatches
    if cfg.batch_size % shards:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} must be divisible by the batch "
                         f"shards × microbatches = {shard.batch_shards(mesh)} × {cfg.microbatches}")
    shard.config_for_mesh(model_config(cfg), mesh)  # raises if experts/heads/vocab do not divide
    return mesh


# ------------------------------------------------------------------------------------------------
# Data, part 1: documents → a stream of token ids → packed next-token rows
# ------------------------------------------------------------------------------------------------

def document_texts(sources: dict, probabilities: dict, seed: int) -> Iterator[str]:
    """Endless texts from 01's mixture. Each pass reshuffles every source (seed + pass number),
    so the order is a pure function of the seed: resuming can replay it exactly."""
    for epoch in itertools.count():
        shuffled = {name: s.shuffle(seed=seed + epoch) for name, s in sources.items()}
        for row in tok.mix(shuffled, probabilities, seed=seed + epoch):
            yield row["text"]


def token_stream(texts: Iterator[str], tokenizer, chunk: int = 64) -> Iterator[int]:
    """Every document's ids followed by eos, as one stream (encoded `chunk` documents at a time)."""
    while batch := list(itertools.islice(texts, chunk)):
        for ids in tokenizer.encode_batch(batch, add_eos=True):
            yield from ids


def pack_lm_rows(tokens: Iterator[int], seq_len: int) -> Iterator[dict]:
    """Cut the stream into rows of seq_len + 1 tokens: inputs row[:-1], targets row[1:].

    Documents are simply concatenated (eos between them) and attention runs across them, as
    OpenMoE's full_lm task did: no padding, every token is a target. E.g. with seq_len 4,
    [a b eos c d e ...] → inputs [a b eos c], targets [b eos c d].
    """
    while len(row := np.fromiter(itertools.islice(tokens, seq_len + 1), np.int32)) == seq_len + 1:
        yield {"inputs": row[:-1], "targets": row[1:], "loss_mask": np.ones(seq_len, np.float32),
               "segment_ids": np.ones(seq_len, np.int32),
               "positions": np.arange(seq_len, dtype=np.int32)}


# ------------------------------------------------------------------------------------------------
# Data, part 2: UL2's mixture of denoisers on a causal decoder
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 task (reference/openmoe-facts.md §2.3): its share, its prefix text and its noise."""

    rate: float        # share of examples
    prefix: str        # plain text prepended to the inputs (tokenized, not a special token)
    mean_span: float   # µ: mean length of a corrupted span; 0 = PrefixLM
    density: float     # r: fraction of tokens corrupted (PrefixLM: where the split falls on average)


UL2_DENOISERS = (
    Denoiser(0.5, "[S2S] ", 0, 0.5),
    Denoiser(0.1, "[NLU] ", 3, 0.15), Denoiser(0.1, "[NLU] ", 8, 0.15),
    Denoiser(0.1, "[NLG] ", 3, 0.5), Denoiser(0.1, "[NLG] ", 8, 0.5), Denoiser(0.1, "[NLG] ", 64, 0.5),
)


def random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `parts` non-empty pieces at random (T5's _random_segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's random_spans_noise_mask: round(length·density) noise tokens in about noise/µ spans,
    alternating clean span, noisy span, ...; the sequence starts clean."""
    noise = int(np.clip(round(length * density), 1, length - 1))
    spans = int(np.clip(round(noise / mean_span), 1, min(noise, length - noise)))
    clean_lengths = random_segmentation(length - noise, spans, rng)
    noise_lengths = random_segmentation(noise, spans, rng)
    pattern = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), pattern)


def span_corruption(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: list[int]):
    """Replace each noisy span by a sentinel in the inputs; the targets list each sentinel followed
    by the span it hides. E.g. [a b c d e] with c d noisy → inputs [a b <0> e], targets [<0> c d]."""
    inputs, targets, span = [], [], -1
    for index, (token, noisy) in enumerate(zip(tokens, mask)):
        starts = noisy and (index == 0 or not mask[index - 1])
        if starts:
            span += 1
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        (targets if noisy else inputs).append(int(token))
    return np.array(inputs, np.int32), np.array(targets, np.int32)


def prefix_lm(tokens: np.ndarray, rng: np.random.Generator):
    """PrefixLM: a random split point; the model reads the prefix and predicts the rest."""
    split = int(rng.integers(1, len(tokens)))
    return tokens[:split], tokens[split:]


def raw_length(denoiser: Denoiser, seq_len: int, prefix_len: int) -> int:
    """How many stream tokens one example takes so that prefix + inputs + targets + eos fits."""
    room = seq_len - prefix_len - 1
    if denoiser.mean_span == 0:
        return room
    # Span corruption adds two sentinels per span, at most density·n/µ + 1 spans.
    return int((room - 2) / (1 + 2 * denoiser.density / denoiser.mean_span))


def ul2_example(tokens: np.ndarray, denoiser: Denoiser, prefix_ids: list[int], tokenizer,
                rng: np.random.Generator):
    """One denoising example: (inputs = prefix + corrupted text, targets + eos)."""
    if denoiser.mean_span == 0:
        inputs, targets = prefix_lm(tokens, rng)
    else:
        mask = noise_mask(len(tokens), denoiser.density, denoiser.mean_span, rng)
        sentinels = [tokenizer.sentinel_id(i) for i in range(int(mask.sum()) + 1)]
        inputs, targets = span_corruption(tokens, mask, sentinels)
    return (np.concatenate([np.array(prefix_ids, np.int32), inputs]),
            np.concatenate([targets, np.array([tokenizer.eos_id], np.int32)]))


def reconstruct(inputs: np.ndarray, targets: np.ndarray, prefix_len: int, tokenizer) -> list[int]:
    """The inverse of span corruption (and of PrefixLM): the original tokens. Used by the tests."""
    inputs, targets = list(inputs[prefix_len:]), list(targets[:-1])  # drop prefix and eos
    sentinel_ids = {tokenizer.sentinel_id(i) for i in range(tokenizer.num_extra_ids)}
    if not any(t in sentinel_ids for t in inputs):
        return inputs + targets
    spans, current = {}, None
    for token in targets:
        if token in sentinel_ids:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    return [t for token in inputs for t in (spans[token] if token in sentinel_ids else [token])]


def decoder_row(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict:
    """Pack (inputs, targets) examples into one decoder row, as seqio's DecoderFeatureConverter:
    each example is the sequence inputs+targets, its decoder inputs shifted right by one with the
    start token 0, loss on targets only, its own segment id and positions from 0; zeros pad."""
    row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32)}
    start = 0
    for segment, (inputs, targets) in enumerate(examples, start=1):
        sequence = np.concatenate([inputs, targets])
        end = start + len(sequence)
        row["targets"][start:end] = sequence
        row["inputs"][start + 1:end] = sequence[:-1]
        row["loss_mask"][start + len(inputs):end] = 1.0
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(len(sequence))
        start = end
    return row


def pack_ul2_rows(tokens: Iterator[int], seq_len: int, tokenizer, rng: np.random.Generator,
                  denoisers=UL2_DENOISERS) -> Iterator[dict]:
    """Draw a denoiser per example (by its rate), cut its raw length from the stream (T5's
    reduce_concat_tokens + chunking), corrupt it, and pack examples into rows greedily."""
    prefixes = {d.prefix: tokenizer.encode(d.prefix) for d in denoisers}
    rates = np.array([d.rate for d in denoisers]) / sum(d.rate for d in denoisers)
    pending, used = [], 0
    while True:
        denoiser = denoisers[rng.choice(len(denoisers), p=rates)]
        prefix_ids = prefixes[denoiser.prefix]
        raw = np.fromiter(itertools.islice(tokens, raw_length(denoiser, seq_len, len(prefix_ids))),
                          np.int32)
        if len(raw) < 2:
            return
        example = ul2_example(raw, denoiser, prefix_ids, tokenizer, rng)
        size = len(example[0]) + len(example[1])
        if used + size > seq_len:
            yield decoder_row(pending, seq_len)
            pending, used = [], 0
        pending.append(example)
        used += size


# ------------------------------------------------------------------------------------------------
# Data, part 3: sources, per-step batches (with the objective switch), validation sets
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def embedded_corpus(split: str) -> dict:
    """01's embedded corpus, built once per process (it takes seconds)."""
    return tok.embedded_corpus(split)


def load_tokenizer(cfg: TrainConfig):
    return tok.Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else tok.embedded_tokenizer()


def training_sources(cfg: TrainConfig, process_index: int = 0, process_count: int = 1) -> dict:
    """This host's share of every source of the mixture (hub sources stream; errors come early)."""
    if cfg.mixture == "embedded":
        corpus = embedded_corpus("train")
        return {name: ds.shard(process_count, process_index) for name, ds in corpus.items()}
    return {name: tok.load_hub_source(name, process_index=process_index, process_count=process_count)
            for name in tok.mixture_probabilities(cfg.mixture)}


def train_batches(cfg: TrainConfig, tokenizer, sources: dict, *, start_step: int = 0,
                  local_rows: int | None = None) -> Iterator[dict]:
    """This host's batch for every step from `start_step` on, a pure function of (seed, step).

    The data position saved in a checkpoint is the step: resuming replays the stream from the
    start and drops the batches already trained on (seconds for the laptop run; at pod scale a
    loader with saved state, e.g. datasets' state_dict, would skip the replay).
    """
    local_rows = local_rows or cfg.batch_size // jax.process_count()
    probabilities = tok.mixture_probabilities(cfg.mixture)
    tokens = token_stream(document_texts(sources, probabilities, cfg.seed), tokenizer)
    lm_rows = pack_lm_rows(tokens, cfg.seq_len)
    ul2_rows = pack_ul2_rows(tokens, cfg.seq_len, tokenizer, np.random.default_rng(cfg.seed))
    for step in itertools.count():
        use_ul2 = cfg.objective == "ul2" and (cfg.ul2_until_step == 0 or step < cfg.ul2_until_step)
        rows = list(itertools.islice(ul2_rows if use_ul2 else lm_rows, local_rows))
        if step >= start_step:
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def validation_batches(cfg: TrainConfig, tokenizer, rows: int) -> dict[str, list[dict]]:
    """Held-out next-token batches per domain, from the embedded corpus' validation split (hub
    mixtures are evaluated on it too: it is held out from everything, and text and code apart)."""
    if cfg.eval_batches == 0:
        return {}
    batches = {}
    for domain, ds in embedded_corpus("validation").items():
        packed = pack_lm_rows(token_stream(iter(ds["text"]), tokenizer), cfg.seq_len)
        flat = list(itertools.islice(packed, rows * cfg.eval_batches))
        batches[domain] = [{k: np.stack([r[k] for r in flat[i:i + rows]]) for k in flat[0]}
                           for i in range(0, len(flat) - rows + 1, rows)]
    return batches


# ------------------------------------------------------------------------------------------------
# The step: one jitted function that takes the state and returns the new state
# ------------------------------------------------------------------------------------------------

def make_train_step(graphdef, rest, tx, microbatches: int):
    """grads of 06's loss (summed over microbatches, T5X-style) → Adafactor → new params.

    Microbatch i takes rows i, i+M, i+2M, … so that every device keeps its own rows; gradients
    and metrics are averaged over the M slices with a `lax.scan`, one slice in memory at a time.
    """
    def loss_of(params, batch):
        return model_lib.loss_fn(nnx.merge(graphdef, params, rest), batch, train=True)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(params, opt_state, batch):
        if microbatches == 1:
            (_, metrics), grads = grad_fn(params, batch)
        else:
            def slice_rows(x):
                return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

            def accumulate(grads_sum, microbatch):
                (_, metrics), grads = grad_fn(params, microbatch)
                return jax.tree.map(jnp.add, grads_sum, grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, metrics = jax.lax.scan(accumulate, zeros, jax.tree.map(slice_rows, batch))
            grads = jax.tree.map(lambda g: g / microbatches, grads)
            metrics = jax.tree.map(lambda m: m.mean(0), metrics)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    return train_step


def make_eval_step(graphdef, rest):
    def eval_step(params, batch):
        _, metrics = model_lib.loss_fn(nnx.merge(graphdef, params, rest), batch, train=False)
        return {"loss": metrics["cross_entropy"], "accuracy": metrics["accuracy"]}

    return eval_step


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs, built sharded on the mesh."""

    cfg: TrainConfig
    model_cfg: "model_lib.ModelConfig"
    mesh: jax.sharding.Mesh
    graphdef: object
    rest: object
    params: object
    opt_state: object
    tx: optax.GradientTransformation
    train_step: object
    eval_step: object


def schedule_config(cfg: TrainConfig) -> "ada.ScheduleConfig":
    return ada.ScheduleConfig(peak=cfg.peak_lr, warmup_steps=cfg.warmup_steps)


def build_trainer(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> Trainer:
    """Model born sharded (07), Adafactor state sharded like the params (08 + 07), jitted steps."""
    model_cfg = shard.config_for_mesh(model_config(cfg), mesh)
    with jax.set_mesh(mesh):
        model = shard.sharded_model(model_config(cfg), mesh, seed=cfg.seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = ada.openmoe_adafactor(params, schedule_config(cfg))
        opt_state = jax.jit(tx.init, out_shardings=shard.infer_shardings(tx.init, params, mesh=mesh))(params)
    train_step = jax.jit(make_train_step(graphdef, rest, tx, cfg.microbatches), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(graphdef, rest))
    return Trainer(cfg, model_cfg, mesh, graphdef, rest, params, opt_state, tx, train_step, eval_step)


def abstract_train_args(cfg: TrainConfig, mesh: jax.sharding.Mesh):
    """The step's function and its arguments as shapes + shardings only: nothing is allocated, so
    OpenMoE-8B's step can be compiled on a laptop (`--dry-run`)."""
    model_cfg = shard.config_for_mesh(model_config(cfg), mesh)
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    shard.use_expert_parallelism(abstract, mesh)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = shard.state_shardings(params, mesh)
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          params, shardings)
    tx = ada.openmoe_adafactor(params, schedule_config(cfg))
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                             opt_shapes, shard.infer_shardings(tx.init, params, mesh=mesh))
    batch_sharding = jax.NamedSharding(mesh, jax.P(shard.BATCH_AXES))
    shapes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
              "segment_ids": jnp.int32, "positions": jnp.int32}
    batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), d, sharding=batch_sharding)
             for k, d in shapes.items()}
    step = jax.jit(make_train_step(graphdef, rest, tx, cfg.microbatches), donate_argnums=(0, 1))
    return step, (params, opt_state, batch)


# ------------------------------------------------------------------------------------------------
# Dry run: compile the exact step, report memory, FLOPs and (on a TPU topology) time and MFU
# ------------------------------------------------------------------------------------------------

TPU_PEAK_TFLOPS = {"TPU v3": 61.5, "TPU v4": 137.5, "TPU v5 lite": 197.0, "TPU v5": 229.5}


def peak_tflops(cfg: TrainConfig, device) -> float | None:
    """bf16 peak of one JAX device (a TPU v3 device is one core: 123 TFLOP/s per chip / 2)."""
    if cfg.peak_tflops_per_device:
        return cfg.peak_tflops_per_device
    return next((v for k, v in sorted(TPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                 if getattr(device, "device_kind", "").startswith(k)), None)


def topology_devices(topology: str):
    """Devices of a TPU topology such as "v3:4x4", for compiling without the hardware (libtpu)."""
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as error:
        raise ValueError(f"--topology {topology!r} needs libtpu (pip install -r requirements-tpu.txt) "
                         f"and a name like 'v3:4x4': {error}") from error


def dry_run(cfg: TrainConfig, topology: str = "") -> dict:
    """Lower and compile the train step for the configured preset and mesh; run nothing."""
    devices = topology_devices(topology) if topology else None
    mesh = build_mesh(cfg, devices)
    with jax.set_mesh(mesh):
        step, args = abstract_train_args(cfg, mesh)
        compiled = step.lower(*args).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's cost analysis counts a loop body once, but the step runs the microbatch scan's body
    # `microbatches` times (measured: 2 microbatches report half the FLOPs of 1); scale for it.
    loop_trips = cfg.microbatches
    model_flops = model_lib.train_flops_per_token(model_config(cfg), cfg.seq_len) * cfg.batch_size * cfg.seq_len
    report = {"preset": cfg.preset, "mesh": dict(mesh.shape), "devices": mesh.size,
              "device_kind": mesh.devices.flat[0].device_kind,
              "argument_gib": getattr(memory, "argument_size_in_bytes", 0) / 2**30,
              "output_gib": getattr(memory, "output_size_in_bytes", 0) / 2**30,
              "temp_gib": getattr(memory, "temp_size_in_bytes", 0) / 2**30,
              "compiler_flops_per_device": float(cost.get("flops", 0.0)) * loop_trips,
              "model_flops_per_device": model_flops / mesh.size}
    report["total_gib"] = report["argument_gib"] + report["temp_gib"]
    seconds = cost.get("optimal_seconds") or cost.get("estimated_seconds")
    peak = peak_tflops(cfg, mesh.devices.flat[0])
    if seconds and seconds > 0 and peak:
        report["estimated_step_s"] = float(seconds) * loop_trips
        report["estimated_mfu"] = model_flops / mesh.size / report["estimated_step_s"] / (peak * 1e12)
    return report


# ------------------------------------------------------------------------------------------------
# Checkpoints: orbax, atomic, last N plus every K-th, with step, data position and RNG
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(cfg: TrainConfig):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_last, keep_period=cfg.keep_period,
                                           enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(pathlib.Path(cfg.run_dir).absolute() / "checkpoints", options=options)


def save_checkpoint(manager, step: int, trainer: Trainer, rng_key) -> None:
    """Params and Adafactor state (as leaves: every host writes its shards), plus step, data
    position (= rows consumed) and the RNG key. Orbax writes to a temporary name and renames,
    so a run killed mid-save leaves the previous checkpoint intact."""
    import orbax.checkpoint as ocp
    state = {"params": jax.tree.leaves(trainer.params), "opt_state": jax.tree.leaves(trainer.opt_state)}
    meta = {"step": step, "data_rows_consumed": step * trainer.cfg.batch_size,
            "rng": np.asarray(jax.random.key_data(rng_key)).tolist()}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore_checkpoint(manager, trainer: Trainer):
    """The latest checkpoint into the trainer (shardings from the fresh state); its step and key."""
    import orbax.checkpoint as ocp
    step = manager.latest_step()
    params_leaves, params_def = jax.tree.flatten(trainer.params)
    opt_leaves, opt_def = jax.tree.flatten(trainer.opt_state)

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    target = {"params": [abstract(x) for x in params_leaves],
              "opt_state": [abstract(x) for x in opt_leaves]}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    trainer.params = jax.tree.unflatten(params_def, restored["state"]["params"])
    trainer.opt_state = jax.tree.unflatten(opt_def, restored["state"]["opt_state"])
    key = jax.random.wrap_key_data(np.array(restored["meta"]["rng"], np.uint32))
    return step, key


def prepare_run_dir(cfg: TrainConfig, overwrite: bool) -> None:
    """Refuse to mix two different runs in one directory; with `overwrite`, start it afresh."""
    run_dir = pathlib.Path(cfg.run_dir)
    saved_path = run_dir / "config.json"
    if saved_path.exists() and overwrite:
        shutil.rmtree(run_dir)
    elif saved_path.exists():
        saved = json.loads(saved_path.read_text())
        differ = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                  if k not in RESUMABLE_FIELDS and saved.get(k) != v}
        if differ:
            raise ValueError(f"run directory {run_dir} holds a run with a different config "
                             f"(field: (saved, now) = {differ}); use another --run-dir, or pass "
                             "--overwrite to delete it and start again")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def evaluate(trainer: Trainer, batches: dict[str, list[dict]]) -> dict[str, float]:
    """Next-token loss and accuracy per domain at the eval capacity factor (train=False)."""
    results = {}
    with jax.set_mesh(trainer.mesh):
        for domain, domain_batches in batches.items():
            values = [trainer.eval_step(trainer.params, shard.global_batch(b, trainer.mesh))
                      for b in domain_batches]
            for name in ("loss", "accuracy"):
                results[f"eval/{domain}/{name}"] = float(np.mean([float(v[name]) for v in values]))
    return results


def step_record(step: int, metrics: dict, cfg: TrainConfig, lr: float, seconds: float,
                flops_per_token: float, peak: float | None, devices: int) -> dict:
    """One metrics.jsonl line: loss components, lr, speed, MFU, drop rate per MoE layer."""
    tokens_per_s = cfg.batch_size * cfg.seq_len / seconds
    record = {"step": step, "lr": lr, "tokens_per_s": tokens_per_s, "step_s": seconds}
    for name in ("loss", "cross_entropy", "z_loss", "load_balance_loss", "router_z_loss",
                 "accuracy", "fraction_dropped", "grad_norm"):
        record[name] = float(metrics[name])
    if "drop_rate_by_position" in metrics:
        record["drop_rate_by_layer"] = np.asarray(metrics["drop_rate_by_position"]).mean(-1).tolist()
    record["mfu"] = flops_per_token * tokens_per_s / (peak * 1e12 * devices) if peak else None
    return record


def sample_text(trainer: Trainer, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation from an unsharded copy of the model (one prompt cannot be split)."""
    plain_cfg = dataclasses.replace(trainer.model_cfg, group_multiple=1)
    graphdef, _, rest = nnx.split(model_lib.OpenMoE(plain_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    params = jax.tree.map(lambda x: jnp.asarray(jax.device_get(x)), trainer.params)
    model = nnx.merge(graphdef, params, rest)
    prompt_ids = [tokenizer.pad_id] + tokenizer.encode(prompt)
    room = min(max_new_tokens, plain_cfg.max_seq_len - len(prompt_ids))
    out = model_lib.generate(model, [prompt_ids], max_new_tokens=room, eos_id=tokenizer.eos_id)[0]
    return prompt + tokenizer.decode(out)


def train(cfg: TrainConfig, *, overwrite: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the run in cfg.run_dir; return a summary. `stop_after` ends the process's
    work after that step as if it were killed there (used to test exact resume)."""
    from tqdm import tqdm

    # Everything that can be wrong is checked before anything is compiled or written.
    mesh = build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    if tokenizer.vocab_size > model_config(cfg).vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but preset {cfg.preset!r} only "
                         f"{model_config(cfg).vocab_size} embedding rows; pick a matching --tokenizer")
    sources = training_sources(cfg, jax.process_index(), jax.process_count())
    prepare_run_dir(cfg, overwrite)

    trainer = build_trainer(cfg, mesh)
    manager = checkpoint_manager(cfg)
    start_step, rng_key = 0, jax.random.key(cfg.seed)
    if manager.latest_step() is not None:
        start_step, rng_key = restore_checkpoint(manager, trainer)
        print(f"resuming {cfg.run_dir} from step {start_step}")
    eval_sets = validation_batches(cfg, tokenizer, cfg.batch_size // jax.process_count())
    schedule = ada.openmoe_schedule(schedule_config(cfg))
    flops_per_token = model_lib.train_flops_per_token(trainer.model_cfg, cfg.seq_len)
    peak = peak_tflops(cfg, jax.devices()[0])
    metrics_file = open(pathlib.Path(cfg.run_dir) / "metrics.jsonl", "a")
    batches = train_batches(cfg, tokenizer, sources, start_step=start_step)
    last_step = min(cfg.steps, stop_after or cfg.steps)
    bar = tqdm(range(start_step, last_step), initial=start_step, total=cfg.steps,
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    losses, evals, started = {}, {}, time.time()

    for step in bar:
        # One step: this host's rows become global arrays, then the jitted step runs.
        tick = time.time()
        with jax.set_mesh(mesh):
            batch = shard.global_batch(next(batches), mesh)
            trainer.params, trainer.opt_state, metrics = trainer.train_step(
                trainer.params, trainer.opt_state, batch)
        loss = float(metrics["loss"])
        rng_key = jax.random.fold_in(rng_key, step)
        record = step_record(step + 1, metrics, cfg, float(schedule(step)), time.time() - tick,
                             flops_per_token, peak, mesh.size)

        # A NaN or inf stops the run before any checkpoint could store it.
        if not math.isfinite(loss):
            metrics_file.close()
            raise TrainingDiverged(
                f"loss became {loss} at step {step + 1}; stopping. The last good checkpoint "
                f"(step {manager.latest_step()}) in {cfg.run_dir}/checkpoints is kept. Lower "
                "--peak-lr, use float32, or check the data")
        losses[step + 1] = loss
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        drop=f"{record['fraction_dropped']:.1%}")

        # Periodic evaluation per domain, and checkpoints.
        done = step + 1
        if eval_sets and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            evals[done] = evaluate(trainer, eval_sets)
            record.update(evals[done])
            bar.write(f"step {done}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in evals[done].items()))
        if jax.process_index() == 0:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(manager, done, trainer, rng_key)
    metrics_file.close()
    bar.close()

    summary = {"run_dir": cfg.run_dir, "steps": last_step, "seconds": time.time() - started,
               "losses": losses, "eval": evals.get(max(evals)) if evals else {},
               "checkpoints": list(manager.all_steps())}
    if last_step == cfg.steps and cfg.sample_tokens and jax.process_index() == 0:
        summary["sample"] = sample_text(trainer, tokenizer, "def ", cfg.sample_tokens)
    manager.close()
    return summary


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Train OpenMoE. With no arguments: the small preset on the embedded 50/50 "
                    "text/code corpus on this machine's devices (~10 min on 2 CPU cores). "
                    "Every TrainConfig field below overrides the chosen --config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="laptop", choices=sorted(CONFIGS),
                        help="starting point: laptop (default run), quick (self-test), or an "
                             "OpenMoE pretraining recipe")
    parser.add_argument("--quick", action="store_true", help="short self-test run (= --config quick)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory whose config differs, and start again")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step for the preset and mesh, report memory/FLOPs, exit")
    parser.add_argument("--topology", default="", help="with --dry-run: compile for a TPU topology "
                        "such as v3:4x4 on this CPU machine (needs requirements-tpu.txt)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step as if killed (a later run resumes)")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port "
                        "(on a Cloud TPU pod use --multihost-auto instead)")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: host count")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this host's index")
    parser.add_argument("--multihost-auto", action="store_true",
                        help="multi-host on a Cloud TPU pod: discover the hosts automatically")
    fields = parser.add_argument_group("TrainConfig fields (default: the laptop config's value)")
    for field in dataclasses.fields(TrainConfig):
        kind = {"bool": lambda s: s.lower() in ("1", "true", "yes"), "int": int,
                "float": float}.get(str(field.type), str)
        fields.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind,
                            default=None, help=f"{field.type}; laptop: "
                            f"{getattr(CONFIGS['laptop'], field.name)!r}, OpenMoE-8B: "
                            f"{getattr(OPENMOE, field.name)!r}")
    args = parser.parse_args(argv)
    base = CONFIGS["quick" if args.quick else args.config]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    if args.config != "laptop" and "run_dir" not in overrides and not args.quick:
        overrides["run_dir"] = base.run_dir
    return dataclasses.replace(base, **overrides), args


def main(argv=None) -> None:
    try:
        cfg, args = parse_args(argv)
        shard.initialize_multihost(args.coordinator, args.num_processes, args.process_id,
                                   auto=args.multihost_auto)
        if args.dry_run:
            report = dry_run(cfg, args.topology)
            print(json.dumps(report, indent=2))
            fits = report["total_gib"] <= 16 if "v3" in args.topology else None
            if fits is not None:
                print(f"fits a 16 GiB TPU v3 core: {fits}")
            return
        summary = train(cfg, overwrite=args.overwrite or args.quick, stop_after=args.stop_after)
    except (ValueError, TrainingDiverged) as error:
        sys.exit(f"error: {error}")
    if summary["losses"]:
        first, last = summary["losses"][min(summary["losses"])], summary["losses"][max(summary["losses"])]
        print(f"\n{summary['steps']} steps in {summary['seconds']:.0f} s; train loss {first:.3f} -> {last:.3f}")
    for name, value in summary["eval"].items():
        print(f"  {name:24} {value:.3f}")
    if "sample" in summary:
        print(f"sample: {summary['sample']!r}")
    print(f"checkpoints at steps {summary['checkpoints']} in {cfg.run_dir}/checkpoints")
    if args.quick:
        values = list(summary["losses"].values())
        assert values[-1] < values[0], f"quick run: loss did not fall ({values[0]} -> {values[-1]})"
        print("OK: the quick run trained (UL2 then LM), evaluated, checkpointed and sampled.")


if __name__ == "__main__":
    main()
