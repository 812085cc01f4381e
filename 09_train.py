"""Chapter 9: the training program: data pipeline, objective, sharded step, checkpoints, eval.

OpenMoE pretrained with T5X (arXiv 2402.01739 §2.3–2.5, App. B, Table 12; Fuzhao Xue's t5x
fork, `t5x/examples/t5/t5_1_1/examples/openmoe_*.gin`): documents from a 50% text / 50% code
mixture packed into 2,048-token rows; Adafactor with lr = 1/√max(step, 10⁴) (flat 0.01 for 10K
steps); batch 1,024 (8B: in 8 microbatches, slices of the batch whose gradients are averaged);
capacity factor 1.25 training, 2.0 evaluating. The objective was UL2's mixture of denoisers on a
causal decoder (50% PrefixLM "[S2S] ": read a prefix, predict the rest; span corruption, hidden
spans of mean length µ covering a share r of the tokens: "[NLU] " µ=3,8 r=0.15 and "[NLG] "
µ=3,8,64 r=0.5; loss on targets only), then plain next-token prediction after 390K steps.
This file is that program, read top to bottom:
  config: TrainConfig holds 06's ModelConfig and adds the data, schedule and bookkeeping;
  data:   texts → tokens (+eos) → packed rows (LM: one causal stream, as OpenMoE's full_lm;
          UL2: one example per segment, with segment ids and positions, as T5X packs);
  step:   one jitted function on 07's mesh: grads (over microbatches) → 08's Adafactor;
  run:    orbax checkpoints and a run directory that loses nothing when a run is killed;
  loop:   tqdm, metrics.jsonl, per-domain eval, exact resume, NaN stop.
`python 09_train.py` trains the small preset on the embedded corpus (~10 min on 2 CPU cores);
`--config openmoe-8b` is the same program on a TPU v3 pod, and `--dry-run [--topology
v3:16x16]` compiles that step with 07's pod planning, running nothing (memory, FLOPs, MFU).
Left out: T5X's "NaN skipping", data-loader state beyond "rows consumed" (resume replays the
stream), pipeline parallelism. Self-test: `python 09_train.py --quick` (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import importlib
import itertools
import json
import logging
import math
import os
import pathlib
import shutil
import socket
import sys
import tempfile
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
# Configuration: the model (06) plus everything about the run, in one frozen dataclass
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


OBJECTIVES = ("lm", "ul2")


def on_tpu(preset: str) -> "model_lib.ModelConfig":
    """06's preset as OpenMoE pretrained it on TPUs: bf16 activations, every block rematerialized
    (the preset's capacity factors and loss weights are already the released ones)."""
    return dataclasses.replace(model_lib.PRESETS[preset], dtype=jnp.bfloat16, remat=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are OpenMoE-8B's (T5X gins, paper Table 12); CONFIGS scales them.

    The network, its routing (capacity factors), its loss weights, dtype and remat are 06's
    ModelConfig, held whole in `model`: nothing here copies them. The command line sets its
    fields by name too (`--train-capacity-factor 2`), and `--preset` swaps its architecture.
    """

    model: model_lib.ModelConfig = on_tpu("openmoe-8b")  # the network, routing, losses, dtype, remat (06)
    run_dir: str = "runs/openmoe-8b"     # config.json, metrics.jsonl and checkpoints/ live here
    mixture: str = "openmoe_v1"          # "embedded" (offline 50/50) or a hub mixture of 01.MIXTURES
    tokenizer: str = ""                  # a SentencePiece .model (umT5's); "" = 01's embedded one
    objective: str = "ul2"               # "lm" (next token) or "ul2" (mixture of denoisers)
    ul2_until_step: int = 390_000        # with "ul2": plain LM from this step on (8B: 390K); 0 = never
    seq_len: int = 2048                  # tokens per row (UL2: inputs + targets); the model's max
    batch_size: int = 1024               # rows per step, over all hosts (paper says 2048; gins 1024)
    microbatches: int = 8                # gradient accumulation: the batch in this many slices
    steps: int = 500_000                 # optimizer steps
    peak_lr: float = 0.01                # lr on the warmup plateau, then peak·√(warmup/step)
    warmup_steps: int = 10_000           # the plateau's length (T5X: flat, no ramp)
    mesh: str = "data=2,expert=32,model=8"  # 8B on a v3-512 (gin); "" = all devices on data
    seed: int = 0                        # model init, data order and UL2 noise
    eval_every: int = 5_000              # steps between evaluations (0 = only at the end)
    eval_batches: int = 4                # validation batches per domain (text, code)
    checkpoint_every: int = 1_000        # steps between checkpoints
    keep_last: int = 3                   # newest checkpoints kept ...
    keep_period: int = 50_000            # ... plus every step divisible by this (for 11's analysis)
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = known accelerators only (07.TPU_PEAK_TFLOPS)
    sample_tokens: int = 48              # tokens generated at the end (0 = none)

    def __post_init__(self):
        # Every field's rule in one table, checked before anything is built; the error names
        # the field, its value and what is allowed. (ModelConfig checks its own fields.)
        def at_least(low):
            return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low

        def finite_at_least(low, above=False):
            return lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > low if above else v >= low)

        rules = {
            "model": (lambda v: isinstance(v, model_lib.ModelConfig), "a 06_model.ModelConfig"),
            "mixture": (lambda v: v in tok.MIXTURES, f"one of {sorted(tok.MIXTURES)}"),
            "objective": (lambda v: v in OBJECTIVES, f"one of {OBJECTIVES}"),
            "run_dir": (bool, "a directory path"),
            "seq_len": (at_least(32), "an int >= 32 (UL2 needs room for prefix and spans)"),
            "seed": (lambda v: at_least(0)(v) and v < 2**32, "an int from 0 to 2**32 - 1"),
            "peak_lr": (finite_at_least(0, above=True), "a finite number > 0 (OpenMoE: 0.01)"),
            "peak_tflops_per_device": (finite_at_least(0), "a finite number >= 0"),
            "batch_size": (lambda v: at_least(1)(v) and v % max(self.microbatches, 1) == 0,
                           f"an int >= 1 divisible by microbatches={self.microbatches}"),
            **{name: (at_least(1), "an int >= 1") for name in (
                "microbatches", "steps", "warmup_steps", "checkpoint_every", "keep_last",
                "keep_period")},
            **{name: (at_least(0), "an int >= 0") for name in (
                "ul2_until_step", "eval_every", "eval_batches", "sample_tokens")},
        }
        for name, (valid, allowed) in rules.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be {allowed}")
        parse_mesh(self.mesh)


# Named starting points. "laptop" is the default run: the small preset, scaled so that 2 CPU
# cores see the loss fall within ~10 minutes. Its schedule keeps OpenMoE's shape (flat plateau,
# then 1/√step) with warmup a tenth of the run; peak 0.03 (3× OpenMoE's) because a 4-layer
# model seeing only ~1M tokens needs bigger steps (at step 80: train loss 5.97 against 7.18 with
# 0.01). Every 80th step's checkpoint is kept for chapter 11's measure of how early each
# token's experts settle.
OPENMOE = TrainConfig()
CONFIGS: dict[str, TrainConfig] = {
    "laptop": dataclasses.replace(
        OPENMOE, model=model_lib.PRESETS["small"], run_dir="runs/laptop", mixture="embedded",
        objective="lm", ul2_until_step=0, seq_len=128, batch_size=16, microbatches=1, steps=480,
        peak_lr=0.03, warmup_steps=48, mesh="", eval_every=120, eval_batches=4,
        checkpoint_every=40, keep_last=2, keep_period=80),
    "openmoe-base": dataclasses.replace(
        OPENMOE, model=on_tpu("openmoe-base"),
        run_dir="runs/openmoe-base", microbatches=1, mesh="data=8,expert=16,model=1"),
    "openmoe-8b": OPENMOE,
    "openmoe-34b": dataclasses.replace(
        OPENMOE, model=on_tpu("openmoe-34b"),
        run_dir="runs/openmoe-34b", mixture="openmoe_v3", ul2_until_step=25_000, microbatches=16,
        mesh="data=1,expert=32,model=16"),
}
# `--quick`, the self-test: a short laptop run through both objectives with two microbatches.
QUICK = dataclasses.replace(
    CONFIGS["laptop"], run_dir="runs/quick", objective="ul2", ul2_until_step=15, seq_len=64,
    batch_size=8, microbatches=2, steps=30, warmup_steps=5, eval_every=15, eval_batches=1,
    checkpoint_every=10, keep_period=20, sample_tokens=8)
# Fields that may change when a run is resumed: its length, the learning-rate schedule (the cure
# for a divergence), how often it evaluates, saves and reports, and how the same math is laid out
# on devices. Everything else (model, data, objective, seed, precision, losses) is the run's
# identity and stays locked; the run directory's name is not part of it (a run may be moved).
RESUMABLE_FIELDS = {"steps", "peak_lr", "warmup_steps", "eval_every", "eval_batches",
                    "sample_tokens", "checkpoint_every", "keep_last", "keep_period",
                    "peak_tflops_per_device", "mesh", "microbatches", "model.remat",
                    "model.remat_policy"}


def model_config(cfg: TrainConfig) -> "model_lib.ModelConfig":
    """The model the run trains: cfg.model, built for rows of cfg.seq_len tokens."""
    return dataclasses.replace(cfg.model, max_seq_len=cfg.seq_len)


def config_json(cfg: TrainConfig) -> dict:
    """The run's config.json: one flat record, the model's fields as "model.<name>"."""
    record = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
    for field in dataclasses.fields(cfg.model):
        value = getattr(cfg.model, field.name)
        record[f"model.{field.name}"] = jnp.dtype(value).name if field.name == "dtype" else value
    return record


def config_from_json(record: dict) -> TrainConfig:
    """The inverse of config_json, also for a config.json written before the model moved into
    TrainConfig: that one named a `preset` and carried seven of the model's fields flat."""
    record = dict(record)
    if "preset" in record:
        model = model_lib.PRESETS[record.pop("preset")]
        for name in ("train_capacity_factor", "eval_capacity_factor", "aux_loss_weight",
                     "z_loss_weight", "router_z_loss_weight", "dtype", "remat"):
            record[f"model.{name}"] = record.pop(name)
    else:
        model = model_lib.ModelConfig()
    fields = {k[len("model."):]: record.pop(k) for k in list(record) if k.startswith("model.")}
    fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
    return TrainConfig(model=dataclasses.replace(model, **fields), **record)


def read_run_config(path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of the run whose config.json is at `path`."""
    return config_from_json(json.loads(pathlib.Path(path).read_text()))


def build_mesh(cfg: TrainConfig, devices=None) -> jax.sharding.Mesh:
    """07's mesh from the config, checked against the devices and the batch before compiling."""
    sizes = parse_mesh(cfg.mesh)
    devices = list(devices if devices is not None else jax.devices())
    if sizes and math.prod(sizes.values()) != len(devices):
        raise ValueError(f"TrainConfig.mesh={cfg.mesh!r} has {math.prod(sizes.values())} devices "
                         f"but there are {len(devices)}; the axes' product must equal the count")
    mesh = shard.make_mesh(**sizes, devices=devices) if sizes else shard.make_mesh(devices=devices)
    if cfg.batch_size % (shard.batch_shards(mesh) * cfg.microbatches):
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} must be divisible by the batch "
                         f"shards × microbatches = {shard.batch_shards(mesh)} × {cfg.microbatches}")
    shard.config_for_mesh(model_config(cfg), mesh)  # raises if experts/heads/vocab do not divide
    return mesh


# ------------------------------------------------------------------------------------------------
# Data, part 1: documents → a stream of token ids → packed next-token rows
# ------------------------------------------------------------------------------------------------

# The arrays of every row, as 06's loss_fn reads them.
ROW_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
              "segment_ids": np.int32, "positions": np.int32}


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
    """One UL2 task (the t5 fork's `t5/data/preprocessors.py`, `ul2_objective`): its share, its
    prefix text and its noise."""

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
        if noisy and (index == 0 or not mask[index - 1]):  # a span starts
            span += 1
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        (targets if noisy else inputs).append(int(token))
    return np.array(inputs, np.int32), np.array(targets, np.int32)


def raw_length(denoiser: Denoiser, seq_len: int, prefix_len: int) -> int:
    """How many stream tokens one example takes so that prefix + inputs + targets + eos fits."""
    room = seq_len - prefix_len - 1
    if denoiser.mean_span == 0:
        return room
    # Span corruption adds two sentinels per span, at most density·n/µ + 1 spans.
    return int((room - 2) / (1 + 2 * denoiser.density / denoiser.mean_span))


def ul2_example(tokens: np.ndarray, denoiser: Denoiser, prefix_ids: list[int], tokenizer,
                rng: np.random.Generator):
    """One denoising example: (inputs = prefix + corrupted text, targets + eos). PrefixLM splits
    at a random point: the model reads the prefix and predicts the rest."""
    if denoiser.mean_span == 0:
        split = int(rng.integers(1, len(tokens)))
        inputs, targets = tokens[:split], tokens[split:]
    else:
        mask = noise_mask(len(tokens), denoiser.density, denoiser.mean_span, rng)
        sentinels = [tokenizer.sentinel_id(i) for i in range(int(mask.sum()) + 1)]
        inputs, targets = span_corruption(tokens, mask, sentinels)
    return (np.concatenate([np.array(prefix_ids, np.int32), inputs]),
            np.concatenate([targets, np.array([tokenizer.eos_id], np.int32)]))


def decoder_row(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict:
    """Pack (inputs, targets) examples into one decoder row, as seqio's DecoderFeatureConverter:
    each example is the sequence inputs+targets, its decoder inputs shifted right by one with the
    start token 0, loss on targets only, its own segment id and positions from 0; zeros pad."""
    row = {name: np.zeros(seq_len, dtype) for name, dtype in ROW_DTYPES.items()}
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

def load_tokenizer(cfg: TrainConfig):
    return tok.Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else tok.embedded_tokenizer()


def training_sources(cfg: TrainConfig, process_index: int = 0, process_count: int = 1) -> dict:
    """This host's share of every source of the mixture (hub sources stream; errors come early)."""
    if cfg.mixture == "embedded":
        return {name: ds.shard(process_count, process_index)
                for name, ds in tok.embedded_corpus("train").items()}
    return {name: tok.load_hub_source(name, process_index=process_index, process_count=process_count)
            for name in tok.mixture_probabilities(cfg.mixture)}


def stack_rows(rows: list[dict]) -> dict:
    """Rows of ROW_DTYPES arrays → one batch of arrays [rows, seq_len]."""
    return {name: np.stack([row[name] for row in rows]) for name in ROW_DTYPES}


def train_batches(cfg: TrainConfig, tokenizer, sources: dict, *, start_step: int = 0) -> Iterator[dict]:
    """This host's batch for every step from `start_step` on, a pure function of (seed, step).

    The data position saved in a checkpoint is the step: resuming replays the stream from the
    start and drops the batches already trained on (seconds for the laptop run; at pod scale a
    loader with saved state, e.g. datasets' state_dict, would skip the replay).
    """
    local_rows = cfg.batch_size // jax.process_count()
    tokens = token_stream(document_texts(sources, tok.mixture_probabilities(cfg.mixture), cfg.seed),
                          tokenizer)
    lm_rows = pack_lm_rows(tokens, cfg.seq_len)
    ul2_rows = pack_ul2_rows(tokens, cfg.seq_len, tokenizer, np.random.default_rng(cfg.seed))
    for step in itertools.count():
        use_ul2 = cfg.objective == "ul2" and (cfg.ul2_until_step == 0 or step < cfg.ul2_until_step)
        rows = list(itertools.islice(ul2_rows if use_ul2 else lm_rows, local_rows))
        if step >= start_step:
            yield stack_rows(rows)


def validation_batches(cfg: TrainConfig, tokenizer, rows: int) -> dict[str, list[dict]]:
    """Held-out next-token batches per domain, from the embedded corpus' validation split (hub
    mixtures are evaluated on it too: it is held out from everything, and text and code apart)."""
    if cfg.eval_batches == 0:
        return {}
    batches = {}
    for domain, ds in tok.embedded_corpus("validation").items():
        packed = pack_lm_rows(token_stream(iter(ds["text"]), tokenizer), cfg.seq_len)
        flat = list(itertools.islice(packed, rows * cfg.eval_batches))
        batches[domain] = [stack_rows(flat[i:i + rows]) for i in range(0, len(flat) - rows + 1, rows)]
    return batches


# ------------------------------------------------------------------------------------------------
# The step: one jitted function that takes the state and returns the new state
# ------------------------------------------------------------------------------------------------

def all_finite(tree) -> jax.Array:
    """True when no floating-point leaf of `tree` holds a NaN or an inf."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(graphdef, rest, tx, microbatches: int):
    """grads of 06's loss (averaged over microbatches, T5X-style) → Adafactor → new params.

    With m microbatches, microbatch i takes rows i, i+m, i+2m, … so that every device keeps its
    own rows; gradients and metrics are averaged over the m slices with a `lax.scan`, one slice
    in memory at a time.
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
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # The loop saves a checkpoint only from a state it has seen to be finite.
        metrics["state_finite"] = all_finite((params, opt_state))
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef, rest):
    """Next-token loss and accuracy of a batch, at the evaluation capacity factor (train=False)."""
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
    params: object
    opt_state: object
    train_step: object
    eval_step: object


def schedule_config(cfg: TrainConfig) -> "ada.ScheduleConfig":
    return ada.ScheduleConfig(peak=cfg.peak_lr, warmup_steps=cfg.warmup_steps)


def build_trainer(cfg: TrainConfig, mesh: jax.sharding.Mesh, *, abstract: bool = False) -> Trainer:
    """Model born sharded with experts parallel (07), Adafactor state sharded like the params
    (08 + 07), jitted steps. `abstract`: shapes and shardings only, nothing allocated, so that
    OpenMoE-8B's step can be compiled on a laptop (`--dry-run`)."""
    with jax.set_mesh(mesh):
        model = shard.sharded_model(model_config(cfg), mesh, seed=cfg.seed, abstract=abstract)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = ada.openmoe_adafactor(params, schedule_config(cfg))
        opt_shardings = shard.infer_shardings(tx.init, params, mesh=mesh)
        if abstract:
            opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     jax.eval_shape(tx.init, params), opt_shardings)
        else:
            opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    train_step = jax.jit(make_train_step(graphdef, rest, tx, cfg.microbatches), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(graphdef, rest))
    # model.cfg is the config as 07 adjusted it to the mesh (its group layout).
    return Trainer(cfg, model.cfg, mesh, params, opt_state, train_step, eval_step)


def dry_run(cfg: TrainConfig, topology: str = "") -> dict:
    """Compile the train step for the configured model and mesh, on this machine's devices or a
    TPU topology's (libtpu), and report 07's plan of it: memory, FLOPs, collectives, MFU."""
    mesh = build_mesh(cfg, shard.topology_devices(topology) if topology else None)
    trainer = build_trainer(cfg, mesh, abstract=True)
    rows = jax.NamedSharding(mesh, jax.P(shard.BATCH_AXES))
    batch = {name: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), dtype, sharding=rows)
             for name, dtype in ROW_DTYPES.items()}
    with jax.set_mesh(mesh):
        compiled = trainer.train_step.lower(trainer.params, trainer.opt_state, batch).compile()
    tokens = cfg.batch_size * cfg.seq_len
    return shard.compile_report(
        compiled, mesh, loop_trips=cfg.microbatches,
        model_flops=model_lib.train_flops_per_token(trainer.model_cfg, cfg.seq_len) * tokens,
        peak=shard.peak_tflops(mesh.devices.flat[0], cfg.peak_tflops_per_device))


# ------------------------------------------------------------------------------------------------
# Checkpoints: orbax, atomic, last N plus every K-th; a damaged one is set aside
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(cfg: TrainConfig):
    """Orbax's manager of run_dir/checkpoints. A save killed half-way leaves only a temporary
    directory, which the next manager of this directory removes (cleanup_tmp_directories)."""
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_last, keep_period=cfg.keep_period,
                                           enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(pathlib.Path(cfg.run_dir).absolute() / "checkpoints", options=options)


def save_checkpoint(manager, step: int, trainer: Trainer) -> None:
    """Params and Adafactor state (as leaves: every host writes its shards), plus the step and the
    data position (rows consumed). Orbax writes to a temporary name and renames, so a run killed
    mid-save leaves the previous checkpoint intact. A disk without room for the state is an
    OSError before orbax starts writing."""
    import orbax.checkpoint as ocp
    state = {"params": jax.tree.leaves(trainer.params), "opt_state": jax.tree.leaves(trainer.opt_state)}
    needed, free = sum(x.nbytes for x in jax.tree.leaves(state)), shutil.disk_usage(manager.directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"the checkpoint needs about {needed / 2**20:.0f} MiB, "
                                    f"{free / 2**20:.0f} MiB are free")
    meta = {"step": step, "data_rows_consumed": step * trainer.cfg.batch_size}
    with orbax_errors_reported_once():
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()


@contextlib.contextmanager
def orbax_errors_reported_once():
    """Around an orbax save or restore whose failure the caller reports in one line.

    Orbax logs such an error with its traceback (absl), and its abandoned reads and writes report
    it again when collected, once per array (asyncio's "exception was never retrieved",
    tensorstore's "Event loop is closed"). All are silenced while it works and, if it fails, for
    the rest of the process: the one line the caller prints carries the cause.
    """
    logs = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels, report_unraisable = [log.level for log in logs], sys.unraisablehook

    def drop_closed_loop_reports(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            report_unraisable(unraisable)

    for log in logs:
        log.setLevel(logging.CRITICAL)
    sys.unraisablehook = drop_closed_loop_reports
    yield
    for log, level in zip(logs, levels):  # reached only on success: nothing was abandoned
        log.setLevel(level)
    sys.unraisablehook = report_unraisable


def read_checkpoint(manager, trainer: Trainer, step: int):
    """Checkpoint `step` as (params, opt_state), sharded like the trainer's fresh state."""
    import orbax.checkpoint as ocp
    params_leaves, params_def = jax.tree.flatten(trainer.params)
    opt_leaves, opt_def = jax.tree.flatten(trainer.opt_state)
    target = {name: [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
              for name, leaves in (("params", params_leaves), ("opt_state", opt_leaves))}
    with orbax_errors_reported_once():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return (jax.tree.unflatten(params_def, restored["state"]["params"]),
            jax.tree.unflatten(opt_def, restored["state"]["opt_state"]))


def one_line(error: BaseException) -> str:
    """An exception as one short line: its type and message, the middle cut out when long
    (orbax puts the cause, e.g. "File too large", at the end)."""
    line = " ".join(str(error).split())
    return f"{type(error).__name__}: {line if len(line) <= 300 else line[:150] + ' ... ' + line[-150:]}"


def restore_newest_readable(cfg: TrainConfig, manager, trainer: Trainer) -> int:
    """Load the newest checkpoint that reads back whole and finite into the trainer; return its
    step (0 when there is none).

    A checkpoint that fails to restore, or holds NaN or inf (written by an older version of
    this program), is moved to run_dir/unreadable_checkpoints/ and the one before it is tried:
    nothing is deleted, and the run continues from the newest state it can trust.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            params, opt_state = read_checkpoint(manager, trainer, step)
            problem = None if bool(jax.jit(all_finite)((params, opt_state))) else "holds NaN or inf"
        except Exception as error:  # orbax and tensorstore raise many types for a damaged file
            problem = f"cannot be read ({one_line(error)})"
        if problem is None:
            trainer.params, trainer.opt_state = params, opt_state
            return step
        aside = pathlib.Path(cfg.run_dir) / "unreadable_checkpoints" / f"{step}-{time.time():.0f}"
        if jax.process_index() == 0:
            aside.parent.mkdir(exist_ok=True)
            os.replace(pathlib.Path(manager.directory) / str(step), aside)
        print(f"warning: checkpoint step {step} {problem}; moved it to {aside} and trying the "
              "one before it", file=sys.stderr)
        manager.reload()
    return 0


# ------------------------------------------------------------------------------------------------
# The run directory: one run per directory, locked while it trains, nothing lost
# ------------------------------------------------------------------------------------------------

# What a run writes into its directory, and all that `--overwrite` deletes: anything else there
# (notes, 11's routing_analysis/, ...) is never touched.
RUN_FILES = ("config.json", "config_history.jsonl", "metrics.jsonl", "checkpoints",
             "unreadable_checkpoints")


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on; the message says what to do."""


class TrainingDiverged(RunError):
    """The loss, gradient or new state became NaN or inf; no checkpoint holds such a state."""


@contextlib.contextmanager
def run_lock(run_dir: pathlib.Path):
    """Hold run_dir/run.lock while training, so that a second process is refused at its start.

    The lock is the kernel's (flock) on an open file, released when the process ends in any way,
    SIGKILL included: a killed run never leaves a stale lock behind. The file names the holder.
    """
    path = run_dir / "run.lock"
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise ValueError(f"cannot write {str(path)!r} ({error.strerror}); the run directory must "
                         "be writable: fix its permissions or choose another --run-dir") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunError(f"run directory {str(run_dir)!r} is in use by {holder}; wait for it "
                           "to finish, or stop it (it resumes from its last checkpoint), or "
                           "choose another --run-dir") from None
        except OSError as error:  # a file system without locks (some bucket mounts)
            print(f"warning: {path} cannot be locked ({error.strerror}); make sure no other "
                  "process trains in this directory", file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {now()}\n")
        handle.flush()
        yield


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def replace_file(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` atomically: a reader (or a kill) sees the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def saved_config(run_dir: pathlib.Path) -> dict | None:
    """The config.json of the run in run_dir, as config_json writes it today (None if absent)."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        return config_json(read_run_config(path))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path} cannot be read ({one_line(error)}); restore it, or choose "
                         "another --run-dir") from error


def identity_differences(saved: dict, cfg: TrainConfig) -> dict:
    """{field: (saved, now)} for the fields of a run's identity that `cfg` changes."""
    return {k: (saved.get(k), v) for k, v in config_json(cfg).items()
            if k not in RESUMABLE_FIELDS | {"run_dir"} and saved.get(k) != v}


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The summary of this run if cfg.run_dir holds it finished (a checkpoint at cfg.steps or
    later), read from the files alone; None when there is training to do (or a problem that
    train() will report)."""
    run_dir = pathlib.Path(cfg.run_dir)
    try:
        saved = saved_config(run_dir)
        steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if not saved or identity_differences(saved, cfg) or not steps or steps[-1] < cfg.steps:
        return None
    evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in records]
    return {"run_dir": cfg.run_dir, "steps": steps[-1], "complete": True, "losses": {},
            "eval": next((e for e in reversed(evals) if e), {}), "checkpoints": steps}


def prepare_run_dir(cfg: TrainConfig, overwrite: bool, write: bool = True) -> None:
    """Make run_dir hold this run (every host checks; the one that `write`s holds the lock).

    A directory with another run in it is refused, whatever the spelling of its path: a run's
    identity is its config outside RESUMABLE_FIELDS. Changed resumable fields are accepted and
    appended to config_history.jsonl. `overwrite` deletes the previous run's own files
    (RUN_FILES) and says so. Every check comes before the first change to the directory.
    """
    run_dir = pathlib.Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"TrainConfig.run_dir={cfg.run_dir!r} is a file, not a directory; "
                         "pass a directory path to --run-dir")
    saved = None if overwrite else saved_config(run_dir)
    if saved and (locked := identity_differences(saved, cfg)):
        raise ValueError(
            f"run directory {run_dir} holds a different run (field: (saved, now) = {locked}); "
            f"only {sorted(RESUMABLE_FIELDS)} may change when resuming. Choose another "
            "--run-dir, or pass --overwrite to delete this run's files "
            f"({', '.join(RUN_FILES)}) and start again here")
    for path in (run_dir / "config.json", run_dir / "metrics.jsonl"):
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"cannot write {path}: it is a directory or read-only; move it "
                             "away or choose another --run-dir")
    if not write:
        return

    removed = [name for name in RUN_FILES if overwrite and (run_dir / name).exists()]
    for path in (run_dir / name for name in removed):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        print(f"--overwrite: deleted {', '.join(removed)} from {run_dir} (nothing else)")
    record = config_json(cfg)
    if changed := {k: [saved.get(k), v] for k, v in record.items() if saved and saved.get(k) != v}:
        with open(run_dir / "config_history.jsonl", "a") as history:
            history.write(json.dumps({"time": now(), "changed": changed}) + "\n")
        print(f"resuming {run_dir} with changed settings (recorded in config_history.jsonl): "
              + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    replace_file(run_dir / "config.json", json.dumps(record, indent=2) + "\n")


def cut_metrics(path: pathlib.Path, last_step: int) -> None:
    """Leave metrics.jsonl with exactly one line per step 1..last_step, in order.

    Lines past the restored checkpoint are dropped (this run redoes those steps), and so is a
    line cut short by a kill; where an older version of this program appended duplicates, the
    newest line of each step is kept.
    """
    lines = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(step, int) and 1 <= step <= last_step:
            lines[step] = line
    replace_file(path, "".join(lines[step] + "\n" for step in sorted(lines)))


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

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
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(jax.device_get(x)), trainer.params), rest)
    prompt_ids = [tokenizer.pad_id] + tokenizer.encode(prompt)
    room = min(max_new_tokens, plain_cfg.max_seq_len - len(prompt_ids))
    out = model_lib.generate(model, [prompt_ids], max_new_tokens=room, eos_id=tokenizer.eos_id)[0]
    return prompt + tokenizer.decode(out)


# A step whose gradient is exactly zero changes nothing; this many in a row is a stalled run.
STALL_STEPS = 5


def divergence_message(cfg: TrainConfig, step: int, metrics: dict, saved_step: int | None) -> str:
    """What went non-finite at `step`, and the command that continues from the last good state."""
    state = "finite" if bool(metrics["state_finite"]) else "NaN or inf"
    lower = f"--peak-lr {cfg.peak_lr / 10:g}"
    if saved_step:
        advice = (f"The newest checkpoint, step {saved_step} in {cfg.run_dir}/checkpoints, holds "
                  f"finite values: run the same command with {lower} to resume from it (the "
                  "change is recorded in config_history.jsonl). If it diverges again at once, that "
                  "state is already damaged (metrics.jsonl shows the loss climbing before it): "
                  f"add --overwrite to start again with {lower}")
    else:
        advice = f"No checkpoint was saved yet: run the same command with {lower} to start again"
    return (f"training diverged at step {step}: loss {float(metrics['loss']):g}, gradient norm "
            f"{float(metrics['grad_norm']):g}, new parameters and optimizer state {state}; nothing "
            f"of this step was saved. {advice}. Using --dtype float32 or checking the data can also help")


def check_health(cfg: TrainConfig, step: int, metrics: dict, manager, stalled_since: int | None,
                 write) -> int | None:
    """Stop the run at a NaN or inf in the loss, the gradient or the new state, before this step
    reaches the metrics file or a checkpoint, so every checkpoint holds finite values. An exactly
    zero gradient leaves every parameter where it is: say so once. Returns the step such a stall
    began (None while the parameters move)."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm) and bool(metrics["state_finite"])):
        raise TrainingDiverged(divergence_message(cfg, step, metrics, manager.latest_step()))
    stalled_since = (stalled_since or step) if grad_norm == 0 else None
    if stalled_since and step - stalled_since + 1 == STALL_STEPS:
        write(f"warning: the gradient has been exactly zero since step {stalled_since} (loss "
              f"{loss:.3f}): training has stalled, the parameters are not changing. A learning "
              "rate far too high does this: lower --peak-lr")
    return stalled_since


@contextlib.contextmanager
def resumable_write(what, manager):
    """Around a write that may fail mid-run (a full disk, a quota): one line saying what, why,
    and that the same command resumes from the newest complete checkpoint."""
    saved_step = manager.latest_step()
    try:
        yield
    except Exception as error:  # a full disk surfaces from orbax in several types
        raise RunError(f"could not write {what} ({one_line(error)}); make room or fix permissions, "
                       f"then run the same command again: it resumes from step {saved_step or 0}, "
                       "the newest complete checkpoint") from error


def train(cfg: TrainConfig, *, overwrite: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the run in cfg.run_dir; return a summary. `stop_after` ends the work
    after that step as if the process were killed there (a later run resumes)."""
    # A finished run is reported at once, before any data, model or compile.
    if not overwrite and (finished := finished_summary(cfg)):
        return finished

    # Everything that can be wrong is checked before anything is compiled or written.
    mesh = build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{cfg.model.vocab_size} embedding rows; pick a matching --tokenizer")
    sources = training_sources(cfg, jax.process_index(), jax.process_count())
    run_dir, first_host = pathlib.Path(cfg.run_dir), jax.process_index() == 0
    prepare_run_dir(cfg, overwrite, write=False)

    # One process per run directory: the first host holds its lock for the whole run, checks
    # the directory again holding it, then writes.
    if first_host:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"TrainConfig.run_dir={cfg.run_dir!r} cannot be created "
                             f"({error.strerror}); choose a writable --run-dir") from error
    with run_lock(run_dir) if first_host else contextlib.nullcontext():
        prepare_run_dir(cfg, overwrite, write=first_host)
        manager = checkpoint_manager(cfg)
        try:
            return train_steps(cfg, mesh, tokenizer, sources, manager, stop_after, progress)
        finally:
            manager.close()


def train_steps(cfg: TrainConfig, mesh, tokenizer, sources: dict, manager,
                stop_after: int | None, progress: bool) -> dict:
    """The loop proper: restore, then step, evaluate, log and checkpoint until the run ends."""
    from tqdm import tqdm

    trainer = build_trainer(cfg, mesh)
    if start_step := restore_newest_readable(cfg, manager, trainer):
        print(f"resuming {cfg.run_dir} from step {start_step}")
    eval_sets = validation_batches(cfg, tokenizer, cfg.batch_size // jax.process_count())
    schedule = ada.openmoe_schedule(schedule_config(cfg))
    speed = (model_lib.train_flops_per_token(trainer.model_cfg, cfg.seq_len),
             shard.peak_tflops(jax.devices()[0], cfg.peak_tflops_per_device), mesh.size)
    # The metrics file holds one line per step: the lines of steps this run will redo go first.
    metrics_path, first_host = pathlib.Path(cfg.run_dir) / "metrics.jsonl", jax.process_index() == 0
    if first_host:
        cut_metrics(metrics_path, start_step)
    batches = train_batches(cfg, tokenizer, sources, start_step=start_step)
    last_step = min(cfg.steps, stop_after or cfg.steps)
    bar = tqdm(range(start_step, last_step), initial=start_step, total=cfg.steps,
               disable=not progress or not first_host, dynamic_ncols=True)
    losses, evals, started, stalled_since = {}, {}, time.time(), None

    with contextlib.closing(bar):
        for step in bar:
            # One step: this host's rows become global arrays, then the jitted step runs.
            tick = time.time()
            with jax.set_mesh(mesh):
                trainer.params, trainer.opt_state, metrics = trainer.train_step(
                    trainer.params, trainer.opt_state, shard.global_batch(next(batches), mesh))
            done = step + 1
            record = step_record(done, metrics, cfg, float(schedule(step)), time.time() - tick, *speed)
            stalled_since = check_health(cfg, done, metrics, manager, stalled_since, bar.write)
            losses[done] = record["loss"]
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            drop=f"{record['fraction_dropped']:.1%}")

            # Periodic evaluation per domain, the step's metrics line, and checkpoints.
            if eval_sets and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                record.update(evals.setdefault(done, evaluate(trainer, eval_sets)))
                bar.write(f"step {done}: " + ", ".join(
                    f"{k[5:]} {v:.1%}" if k.endswith("accuracy") else f"{k[5:]} {v:.3f}"
                    for k, v in evals[done].items()))
            if first_host:
                with resumable_write(metrics_path, manager), open(metrics_path, "a") as metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                with resumable_write(f"checkpoint step {done} in {manager.directory}", manager):
                    save_checkpoint(manager, done, trainer)

    summary = {"run_dir": cfg.run_dir, "steps": last_step, "seconds": time.time() - started,
               "losses": losses, "eval": evals[max(evals)] if evals else {},
               "checkpoints": list(manager.all_steps()), "stalled_since": stalled_since}
    if last_step == cfg.steps and cfg.sample_tokens and first_host:
        summary["sample"] = sample_text(trainer, tokenizer, "def ", cfg.sample_tokens)
    return summary


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_value(kind: str, text: str):
    """A flag's value by its field's type; booleans are true/false, yes/no or 1/0 (any case)."""
    if kind == "bool":
        forms = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() not in forms:
            raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: write true or false")
        return forms[text.lower()]
    try:
        return {"int": int, "float": float}.get(kind, str)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind == 'int' else 'a number'}") from None


def step_number(text: str) -> int:
    """--stop-after's value: a step, an int >= 1."""
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step: write an int >= 1")
    return int(text)


def add_field_flags(parser, fields, prefix: str = "") -> None:
    """One --flag per dataclass field, whose value replaces the chosen --config's; its help
    shows the laptop run's value and OpenMoE-8B's."""
    choices = {"mixture": sorted(tok.MIXTURES), "objective": OBJECTIVES,
               "dtype": ("float32", "bfloat16")}
    laptop, openmoe = config_json(CONFIGS["laptop"]), config_json(OPENMOE)
    for field in fields:
        name, kind = prefix + field.name, "str" if field.name == "dtype" else str(field.type)
        parser.add_argument("--" + field.name.replace("_", "-"), dest=name,
                            type=functools.partial(parse_value, kind), default=argparse.SUPPRESS,
                            choices=choices.get(field.name),
                            metavar="{true,false}" if kind == "bool" else
                            None if field.name in choices else field.name.upper(),
                            help=f"{kind}; laptop: {laptop[name]!r}, OpenMoE-8B: {openmoe[name]!r}")


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    """The chosen --config (or --quick's) with --preset's architecture and every field flag
    given on the command line replacing its value."""
    parser = argparse.ArgumentParser(
        description="Train OpenMoE. With no arguments: the small preset on the embedded 50/50 "
                    "text/code corpus on this machine's devices (~10 min on 2 CPU cores). "
                    "Every field flag below overrides the chosen --config.")
    parser.add_argument("--config", default="laptop", choices=sorted(CONFIGS),
                        help="starting point: laptop (the default run) or an OpenMoE recipe")
    parser.add_argument("--quick", action="store_true",
                        help="the self-test: a short run (UL2 then LM, 2 microbatches) in a "
                             "temporary directory, removed afterwards; with --run-dir, it trains there")
    parser.add_argument("--preset", choices=sorted(model_lib.PRESETS), default=None,
                        help="06's model preset: its architecture, keeping the config's dtype and remat")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run's own files in --run-dir (config.json, metrics, "
                             "checkpoints; nothing else) and start again")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step for the model and mesh, report memory/FLOPs, exit")
    parser.add_argument("--topology", default="", help="with --dry-run: compile for a TPU topology "
                        "such as v3:4x4 on this CPU machine (needs requirements-tpu.txt)")
    parser.add_argument("--stop-after", type=step_number, default=None,
                        help="stop after this step as if killed (a later run resumes)")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port "
                        "(on a Cloud TPU pod use --multihost-auto instead)")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: host count")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this host's index")
    parser.add_argument("--multihost-auto", action="store_true",
                        help="multi-host on a Cloud TPU pod: discover the hosts automatically")
    add_field_flags(parser.add_argument_group("run fields (TrainConfig)"),
                    [f for f in dataclasses.fields(TrainConfig) if f.name != "model"])
    # The model's length is --seq-len's, and its group layout 07's (from the mesh).
    add_field_flags(parser.add_argument_group("model fields (06's ModelConfig)"),
                    [f for f in dataclasses.fields(model_lib.ModelConfig)
                     if f.name not in ("max_seq_len", "group_multiple", "expert_replicas")],
                    prefix="model.")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else CONFIGS[args.config]
    model = base.model
    if args.preset:
        model = dataclasses.replace(model_lib.PRESETS[args.preset], dtype=model.dtype, remat=model.remat)
    record = {**config_json(dataclasses.replace(base, model=model)), **vars(args)}
    return config_from_json({k: record[k] for k in config_json(base)}), args


def summary_lines(summary: dict) -> list[str]:
    """The end-of-run report: train loss smoothed over ten steps, validation loss and accuracy."""
    lines, losses = [], list(summary["losses"].items())
    if summary.get("complete"):
        lines.append(f"{summary['run_dir']} is complete: {summary['steps']} steps. Its loss curve "
                     f"is {summary['run_dir']}/metrics.jsonl; pass a larger --steps to train further.")
    elif losses:
        window = max(1, min(10, len(losses) // 2))
        first, last = (f"step{'s' * (window > 1)} {part[0][0]}"
                       + (f"-{part[-1][0]}" if window > 1 else "")
                       + f": {np.mean([loss for _, loss in part]):.3f}"
                       for part in (losses[:window], losses[-window:]))
        lines.append(f"\n{len(losses)} steps in {summary['seconds']:.0f} s; train loss"
                     f"{f' (mean of {window} steps)' if window > 1 else ''}, {first} -> {last}")
    lines += [f"  {name:24} " + (f"{value:.1%}" if name.endswith("accuracy") else f"{value:.3f}")
              for name, value in summary["eval"].items()]
    if summary.get("stalled_since"):
        lines.append(f"warning: the gradient has been exactly zero since step "
                     f"{summary['stalled_since']}: the run stalled; lower --peak-lr")
    if "sample" in summary:
        lines.append(f"sample: {summary['sample']!r}")
    lines.append(f"checkpoints at steps {summary['checkpoints']} in {summary['run_dir']}/checkpoints")
    return lines


def keep_freed_memory_mapped() -> bool:
    """On a CPU, ask glibc to keep freed memory for reuse rather than hand it back to the OS.

    XLA:CPU allocates and frees buffers of many MiB every step, and glibc returns blocks that
    large to the OS at once, so every step page-faults fresh memory. With no block served by
    mmap and trimming off, the pages stay and are reused (README's Benchmarks section has the figure).
    Set OPENMOE_MALLOC=default to turn it off. Returns whether it was applied.
    """
    if os.environ.get("OPENMOE_MALLOC", "keep") == "default" or jax.default_backend() != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def show_ul2_example(tokenizer, text: str = "def mean(values):\n    return sum(values) / len(values)\n"):
    """The self-test's worked example: what each denoiser makes of one line of code, and how two
    examples share one packed decoder row (segment ids; loss on the targets only)."""
    tokens, rng, examples = np.array(tokenizer.encode(text), np.int32), np.random.default_rng(0), []
    print(f"UL2's denoisers on {text!r} ({len(tokens)} tokens): inputs (read) -> targets (learned)")
    for denoiser in UL2_DENOISERS:
        examples.append(ul2_example(tokens, denoiser, tokenizer.encode(denoiser.prefix), tokenizer, rng))
        print(f"  mean span {denoiser.mean_span:<2} rate {denoiser.density:<4}  "
              f"{tokenizer.decode(examples[-1][0])!r} -> {tokenizer.decode(examples[-1][1])!r} + eos")
    (first_inputs, first_targets), (second_inputs, second_targets) = examples[:2]
    length = len(first_inputs) + len(first_targets) + len(second_inputs) + len(second_targets)
    row = decoder_row(examples[:2], length + 3)
    print(f"The first two packed into one decoder row of {len(row['targets'])} tokens, 3 of them "
          "padding (positions restart at 0 in each segment):")
    for name in ("segment_ids", "loss_mask"):
        print(f"  {name:12} " + "".join(str(int(v)) for v in row[name]))
    if row["loss_mask"].sum() != len(first_targets) + len(second_targets):
        sys.exit("self-test FAILED: the packed row's loss does not cover exactly the targets")


def main(argv=None) -> None:
    try:
        cfg, args = parse_args(argv)
        shard.initialize_multihost(args.coordinator, args.num_processes, args.process_id,
                                   auto=args.multihost_auto)
        if args.dry_run:
            report = dry_run(cfg, args.topology)
            print(json.dumps(report, indent=2))
            if "v3" in args.topology:
                print(f"fits a 16 GiB TPU v3 core: {report['total_gib'] <= 16}")
            return
        keep_freed_memory_mapped()
        if args.quick:
            show_ul2_example(load_tokenizer(cfg))
        # The self-test trains in a directory of its own and leaves nothing behind.
        scratch = (tempfile.TemporaryDirectory(prefix="openmoe-quick-")
                   if args.quick and not hasattr(args, "run_dir") else contextlib.nullcontext())
        with scratch as scratch_dir:
            summary = train(dataclasses.replace(cfg, run_dir=scratch_dir or cfg.run_dir),
                            overwrite=args.overwrite, stop_after=args.stop_after)
    except (ValueError, RunError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # Ctrl-C: the lock is released, a half-written checkpoint ignored
        print("\ninterrupted; the same command resumes from the newest complete checkpoint",
              file=sys.stderr)
        sys.exit(130)
    print("\n".join(summary_lines(summary)))
    if args.quick:
        values = list(summary["losses"].values())
        if not (values and values[-1] < values[0]):
            sys.exit(f"self-test FAILED: the quick run's loss did not fall ({values})")
        print("OK: the quick run trained (UL2 then LM), evaluated, checkpointed and sampled."
              + ("" if hasattr(args, "run_dir") else " Its directory was temporary and is now "
                 "removed; pass --run-dir to keep the run."))


if __name__ == "__main__":
    main()
