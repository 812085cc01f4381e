"""Chapter 9: the training program: data objective, sharded step, checkpoints, eval, loop.

OpenMoE pretrained with T5X (arXiv 2402.01739 §2.3–2.5, App. B, Table 12; Fuzhao Xue's t5x fork,
`t5x/examples/t5/t5_1_1/examples/openmoe_*.gin`): a 50% text / 50% code mixture packed into
2,048-token rows; Adafactor with lr = 1/√max(step, 10⁴) (flat 0.01 for 10K steps); batch 1,024 (8B:
in 8 microbatches, slices whose gradients are averaged); capacity factor 1.25 in training, 2.0 in
evaluation. The objective was UL2's mixture of denoisers on a causal decoder (50% PrefixLM "[S2S] ":
read a prefix, predict the rest; span corruption, hidden spans of mean length µ covering a share r:
"[NLU] " µ=3,8 r=0.15, "[NLG] " µ=3,8,64 r=0.5; loss on targets), then next-token prediction (01's
packed rows) after 390K steps. §5's proposals are options, off by default: routers frozen after
warm-up, instruction data in warm-up, aux-loss-free balancing biases (Wang et al. 2024). Read top to
bottom: config → data (UL2 examples packed one per segment, as T5X packs them) → the step (one
jitted function on 07's mesh: grads over microbatches → 08's Adafactor), and the dry run (that step
compiled for a pod by 07's planner) → the loop (checkpoints, metrics, eval, exact resume) → the
command line. What keeps a run safe (one run per directory, nothing lost on a kill, no NaN saved) is
support/'s. `python 09_train.py` trains the small preset on the embedded corpus (~10 min on 2 CPU
cores); `--config openmoe-8b` is the same program on a TPU v3 pod, `--dry-run --topology v3:16x16`
its plan. Left out: T5X's "NaN skipping", data-loader state beyond "rows consumed" (resume replays
the stream), pipeline parallelism. Self-test: `python 09_train.py --quick` (about a minute)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import pathlib
import tempfile
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from support import checkpoints, cli, health, host, runs

tok = importlib.import_module("01_tokenizer")
ffn = importlib.import_module("03_swiglu")
router_lib = importlib.import_module("04_router")
moe = importlib.import_module("05_moe_layer")
model_lib = importlib.import_module("06_model")
shard = importlib.import_module("07_sharding")
ada = importlib.import_module("08_adafactor")


# --- Configuration: the model (06) plus everything about the run, in one frozen dataclass ---------
OBJECTIVES = ("lm", "ul2")


def tpu_model(preset: str) -> "model_lib.ModelConfig":
    """06's preset as OpenMoE pretrained it on TPUs: bf16 activations, every block rematerialized."""
    return dataclasses.replace(model_lib.PRESETS[preset], dtype=jnp.bfloat16, remat=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are OpenMoE-8B's (T5X gins, paper Table 12); CONFIGS scales
    them. The network, its routing, losses, dtype and remat are 06's ModelConfig, held whole."""

    model: model_lib.ModelConfig = tpu_model("openmoe-8b")  # the network, routing, losses, dtype, remat (06)
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
    mesh: str = "data=2,expert=32,model=8"  # 07's device mesh (8B on a v3-512); "" = all on data
    seed: int = 0                        # model init, data order and UL2 noise
    eval_every: int = 5_000              # steps between evaluations (0 = only at the end)
    eval_batches: int = 4                # validation batches per domain (text, code)
    checkpoint_every: int = 1_000        # steps between checkpoints
    keep_last: int = 3                   # newest checkpoints kept ...
    keep_period: int = 50_000            # ... plus every step divisible by this (for 11's analysis)
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = known accelerators only (07.TPU_PEAK_TFLOPS)
    sample_tokens: int = 48              # tokens generated at the end (0 = none)
    freeze_router_after: int = 0         # §5: router kernels stop training from this step; 0 = never
    warmup_mixture: str = ""             # §5: a 01.MIXTURES name for the warmup_steps; "" = mixture

    def __post_init__(self):
        # Every field's rule, checked before anything is built (ModelConfig checks its own).
        cli.check_fields(self, {
            "model": (lambda v: isinstance(v, model_lib.ModelConfig), "a 06_model.ModelConfig"),
            "mixture": (lambda v: v in tok.MIXTURES, f"one of {sorted(tok.MIXTURES)}"),
            "warmup_mixture": (lambda v: v in ("", *tok.MIXTURES), f"'' or one of {sorted(tok.MIXTURES)}"),
            "objective": (lambda v: v in OBJECTIVES, f"one of {OBJECTIVES}"),
            "run_dir": (bool, "a directory path"),
            "seq_len": (cli.int_at_least(32), "an int >= 32 (UL2 needs room for prefix and spans)"),
            "seed": (lambda v: cli.int_at_least(0)(v) and v < 2**32, "an int from 0 to 2**32 - 1"),
            "peak_lr": (cli.finite_at_least(0, above=True), "a finite number > 0 (OpenMoE: 0.01)"),
            "peak_tflops_per_device": (cli.finite_at_least(0), "a finite number >= 0"),
            "batch_size": (lambda v: cli.int_at_least(1)(v) and v % max(self.microbatches, 1) == 0,
                           f"an int >= 1 divisible by microbatches={self.microbatches}"),
            **{name: (cli.int_at_least(1), "an int >= 1") for name in ("microbatches", "steps",
               "warmup_steps", "checkpoint_every", "keep_last", "keep_period")},
            **{name: (cli.int_at_least(0), "an int >= 0") for name in ("ul2_until_step",
               "eval_every", "eval_batches", "sample_tokens", "freeze_router_after")}})
        shard.parse_mesh(self.mesh)

    def schedule(self) -> "ada.ScheduleConfig":
        return ada.ScheduleConfig(peak=self.peak_lr, warmup_steps=self.warmup_steps)

    def lr_schedule(self):  # step → lr; with make_optimizer, what the loop asks a config (13's too)
        return ada.openmoe_schedule(self.schedule())

    def make_optimizer(self, params) -> optax.GradientTransformation:  # §5's frozen routers (08)
        return ada.openmoe_adafactor(params, self.schedule(), frozen_from=ada.routing_frozen_from(
            params, self.freeze_router_after))


# Named starting points. "laptop", the default run, scales OpenMoE's recipe to 2 CPU cores and
# ~10 minutes: the same schedule shape (warmup a tenth of the run), peak 0.03 because a 4-layer
# model seeing ~1M tokens needs bigger steps (step 80: loss 5.97, against 7.18 with 0.01), and
# every 80th checkpoint kept for chapter 11's measure of how early routing settles.
OPENMOE = TrainConfig()
CONFIGS: dict[str, TrainConfig] = {
    "laptop": dataclasses.replace(
        OPENMOE, model=model_lib.PRESETS["small"], run_dir="runs/laptop", mixture="embedded",
        objective="lm", ul2_until_step=0, seq_len=128, batch_size=16, microbatches=1, steps=480,
        peak_lr=0.03, warmup_steps=48, mesh="", eval_every=120, eval_batches=4,
        checkpoint_every=40, keep_last=2, keep_period=80),
    "openmoe-base": dataclasses.replace(OPENMOE, model=tpu_model("openmoe-base"), run_dir="runs/openmoe-base",
                                        microbatches=1, mesh="data=8,expert=16,model=1"),
    "openmoe-8b": OPENMOE,
    # OpenMoE-34B ran on 16 model × 32 expert partitions (openmoe_xl.gin); 16 splits its 24 heads
    # in halves (07 warns), 8 keeps them whole: 53.6% estimated MFU on a v3-512, not 44.9%
    # (docs/measurements.md). `--mesh data=1,expert=32,model=16` runs the original layout.
    "openmoe-34b": dataclasses.replace(OPENMOE, model=tpu_model("openmoe-34b"), run_dir="runs/openmoe-34b",
                                       mixture="openmoe_v3", ul2_until_step=25_000, microbatches=16,
                                       mesh="data=2,expert=32,model=8"),
}
# `--quick`, the self-test: a short laptop run through both objectives with two microbatches.
QUICK = dataclasses.replace(
    CONFIGS["laptop"], run_dir="runs/quick", objective="ul2", ul2_until_step=15, seq_len=64,
    batch_size=8, microbatches=2, steps=30, warmup_steps=5, eval_every=15, eval_batches=1,
    checkpoint_every=10, keep_period=20, sample_tokens=8)
# What may change when a run resumes: its length, the schedule (the cure for a divergence), how
# often it evaluates and saves, the layout of the same math on devices, and where it lives; the
# rest (model, data, objective, seed, precision, losses, §5's options) is its locked identity.
RESUMABLE_FIELDS = {"steps", "peak_lr", "warmup_steps", "eval_every", "eval_batches", "sample_tokens",
                    "checkpoint_every", "keep_last", "keep_period", "peak_tflops_per_device", "mesh",
                    "microbatches", "model.remat", "model.remat_policy", "run_dir"}


def model_config(cfg: TrainConfig) -> "model_lib.ModelConfig":
    """The model the run trains: cfg.model, built for rows of cfg.seq_len tokens."""
    return dataclasses.replace(cfg.model, max_seq_len=cfg.seq_len)


def read_run_config(path: str | pathlib.Path) -> TrainConfig:
    """The TrainConfig of the run whose config.json is at `path` (support/runs writes it)."""
    return runs.read_config(TrainConfig, path)


def build_mesh(cfg: TrainConfig, devices=None) -> jax.sharding.Mesh:
    """07's mesh from the config, checked against the devices, the batch and the model."""
    return shard.training_mesh(cfg.mesh, devices, batch_size=cfg.batch_size,
                               microbatches=cfg.microbatches, model_cfg=model_config(cfg))


# --- Data: UL2's mixture of denoisers on a causal decoder, and each step's batch (LM rows: 01) ----
@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 task (the t5 fork's `t5/data/preprocessors.py`, `ul2_objective`)."""
    rate: float        # share of examples
    prefix: str        # plain text prepended to the inputs (tokenized, not a special token)
    mean_span: float   # µ: mean length of a corrupted span; 0 = PrefixLM
    density: float     # r: fraction of tokens corrupted (PrefixLM: where the split falls on average)


UL2_DENOISERS = (
    Denoiser(0.5, "[S2S] ", 0, 0.5),
    Denoiser(0.1, "[NLU] ", 3, 0.15), Denoiser(0.1, "[NLU] ", 8, 0.15),
    Denoiser(0.1, "[NLG] ", 3, 0.5), Denoiser(0.1, "[NLG] ", 8, 0.5), Denoiser(0.1, "[NLG] ", 64, 0.5))


def random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `parts` non-empty pieces at random (T5's _random_segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)


def noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's random_spans_noise_mask: round(length·density) noise tokens in about noise/µ spans,
    alternating clean span, noisy span, ...; the sequence starts clean."""
    noise = int(np.clip(round(length * density), 1, length - 1))
    spans = int(np.clip(round(noise / mean_span), 1, min(noise, length - noise)))
    pattern = np.stack([random_segmentation(length - noise, spans, rng),  # clean, noisy, ... lengths
                        random_segmentation(noise, spans, rng)], axis=1).reshape(-1)
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
    room = seq_len - prefix_len - 1  # span corruption adds 2 sentinels per span, ≤ density·n/µ + 1 spans
    return room if not denoiser.mean_span else int((room - 2) / (1 + 2 * denoiser.density / denoiser.mean_span))


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
        raw = np.fromiter(itertools.islice(tokens, raw_length(denoiser, seq_len, len(prefix_ids))), np.int32)
        if len(raw) < 2:
            return
        example = ul2_example(raw, denoiser, prefix_ids, tokenizer, rng)
        size = len(example[0]) + len(example[1])
        if used + size > seq_len:
            yield tok.decoder_row(pending, seq_len)
            pending, used = [], 0
        pending.append(example)
        used += size


def load_tokenizer(cfg: TrainConfig):
    """The run's tokenizer: its --tokenizer file, or 01's embedded one."""
    return tok.Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else tok.embedded_tokenizer()


def train_batches(cfg: TrainConfig, tokenizer, sources: dict, *, start_step: int = 0) -> Iterator[dict]:
    """This host's batch for every step from `start_step` on, a pure function of (seed, step):
    from `sources` ({mixture name: 01.mixture_sources}), the warmup_mixture's stream for the
    first warmup_steps steps if there is one, then the run's mixture's, from its start. The data
    position in a checkpoint is the step: a resumed run replays the stream and drops the batches
    already trained on (seconds here; at pod scale a loader with saved state would skip that)."""
    local_rows = cfg.batch_size // jax.process_count()

    def rows_of(mixture: str, rng: np.random.Generator):  # (LM rows, UL2 rows) of one stream
        tokens = tok.token_stream(tok.document_texts(sources[mixture], tok.mixture_probabilities(
            mixture), cfg.seed), tokenizer)
        return tok.pack_lm_rows(tokens, cfg.seq_len), pack_ul2_rows(tokens, cfg.seq_len, tokenizer, rng)

    run = rows_of(cfg.mixture, np.random.default_rng(cfg.seed))
    warmup = rows_of(cfg.warmup_mixture, np.random.default_rng([cfg.seed, 1])) if cfg.warmup_mixture else run
    for step in itertools.count():
        use_ul2 = cfg.objective == "ul2" and (cfg.ul2_until_step == 0 or step < cfg.ul2_until_step)
        lm_rows, ul2_rows = warmup if step < cfg.warmup_steps else run
        rows = list(itertools.islice(ul2_rows if use_ul2 else lm_rows, local_rows))
        if step >= start_step:
            yield tok.stack_rows(rows)


# --- The step: one jitted function that takes the state and returns the new state -----------------
def make_train_step(graphdef, rest, tx, microbatches: int, bias_rate: float = 0.0):
    """grads of 06's loss → Adafactor → new params; with `bias_rate`, then 08's balance rule for
    the routing biases. With m microbatches (T5X-style), microbatch i takes rows i, i+m, … (each
    device keeps its own rows); grads and metrics are averaged over them by a `lax.scan`."""
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
        if bias_rate:
            params = ada.with_balanced_biases(params, metrics["expert_load"], bias_rate)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # The loop saves a checkpoint only from a state it has seen to be finite.
        metrics["state_finite"] = health.all_finite((params, opt_state))
        return params, opt_state, metrics

    return train_step


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


def build_trainer(cfg: TrainConfig, mesh: jax.sharding.Mesh, *, abstract: bool = False,
                  params=None) -> Trainer:
    """Model born sharded with experts parallel (07), the optimizer's state sharded like the params
    (08 + 07), jitted steps. `abstract`: shapes and shardings only, nothing allocated (`--dry-run`
    compiles OpenMoE-8B's step on a laptop); `params`: start from these (13: a base model's)."""
    with jax.set_mesh(mesh):
        model = shard.sharded_model(model_config(cfg), mesh, seed=cfg.seed,
                                    abstract=abstract or params is not None)
        graphdef, fresh, rest = nnx.split(model, nnx.Param, ...)
        params = fresh if params is None else params
        tx = cfg.make_optimizer(params)
        opt_shardings = shard.infer_shardings(tx.init, params, mesh=mesh)
        opt_state = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  jax.eval_shape(tx.init, params), opt_shardings) if abstract
                     else jax.jit(tx.init, out_shardings=opt_shardings)(params))
    train_step = jax.jit(make_train_step(graphdef, rest, tx, cfg.microbatches, cfg.model.balance_bias_rate),
                         donate_argnums=(0, 1))

    def eval_step(params, batch):  # loss, accuracy and target tokens at the eval capacity factor
        metrics = model_lib.loss_fn(nnx.merge(graphdef, params, rest), batch, train=False)[1]
        return dict(loss=metrics["cross_entropy"], accuracy=metrics["accuracy"], tokens=metrics["num_tokens"])

    # model.cfg is the config as 07 adjusted it to the mesh (its group layout).
    return Trainer(cfg, model.cfg, mesh, params, opt_state, train_step, jax.jit(eval_step))


def dry_run(cfg: TrainConfig, topology: str = "") -> dict:
    """Compile the train step for the configured model and mesh, on this machine's devices or a
    TPU topology's (libtpu), and report 07's plan of it: memory, FLOPs, collectives, MFU."""
    mesh = build_mesh(cfg, shard.topology_devices(topology) if topology else None)
    trainer = build_trainer(cfg, mesh, abstract=True)
    rows = jax.NamedSharding(mesh, jax.P(shard.BATCH_AXES))
    batch = {name: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), dtype, sharding=rows)
             for name, dtype in tok.ROW_DTYPES.items()}
    with jax.set_mesh(mesh):
        compiled = trainer.train_step.lower(trainer.params, trainer.opt_state, batch).compile()
    flops = model_lib.train_flops_per_token(trainer.model_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    return shard.compile_report(compiled, mesh, loop_trips=cfg.microbatches, model_flops=flops,
                                peak=shard.peak_tflops(mesh.devices.flat[0], cfg.peak_tflops_per_device))


# --- The loop: checkpoints (what one holds; orbax's side is support/checkpoints'), eval, metrics --
def save_checkpoint(manager, step: int, trainer: Trainer) -> None:
    """Params and Adafactor state, plus the step and the data position (rows consumed): all a
    resumed run needs to continue exactly, as the data is a pure function of (seed, step)."""
    with checkpoints.resumable_write(f"checkpoint step {step} in {manager.directory}", manager):
        checkpoints.save(manager, step, trainer.params, trainer.opt_state,
                         {"step": step, "data_rows_consumed": step * trainer.cfg.batch_size})


def evaluate(trainer: Trainer, batches: dict[str, list[dict]]) -> dict[str, float]:
    """Per domain, next-token loss and accuracy over all its target tokens, at the eval capacity."""
    results = {}
    with jax.set_mesh(trainer.mesh):
        for domain, domain_batches in batches.items():
            values = [trainer.eval_step(trainer.params, shard.global_batch(b, trainer.mesh)) for b in domain_batches]
            tokens = [float(v["tokens"]) for v in values]  # batches weighted by their target tokens
            for name in ("loss", "accuracy"):
                results[f"eval/{domain}/{name}"] = float(np.average([float(v[name]) for v in values], weights=tokens))
    return results


def step_record(step: int, metrics: dict, *, lr: float, seconds: float, tokens: int,
                mfu_per_token_s: float | None) -> dict:
    """One metrics.jsonl line: lr, speed, losses, drop rate and MaxVio per MoE layer, and MFU
    (`mfu_per_token_s`: FLOPs per token ÷ the devices' peak FLOP/s; None where it is unknown)."""
    record = {"step": step, "lr": lr, "tokens_per_s": tokens / seconds, "step_s": seconds}
    record |= {name: float(metrics[name]) for name in ("loss", "cross_entropy", "z_loss",
               "load_balance_loss", "router_z_loss", "accuracy", "fraction_dropped", "grad_norm")}
    if "drop_rate_by_position" in metrics:
        record["drop_rate_by_layer"] = np.asarray(metrics["drop_rate_by_position"]).mean(-1).tolist()
        record["max_violation_by_layer"] = np.asarray(router_lib.max_violation(metrics["expert_load"])).tolist()
    record["mfu"] = mfu_per_token_s * record["tokens_per_s"] if mfu_per_token_s else None
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


def train(cfg: TrainConfig, *, overwrite: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train (or resume) the run in cfg.run_dir; return a summary. `stop_after` ends the work
    after that step as if the process were killed there (a later run resumes)."""
    # A finished run is reported at once, before any data, model or compile. With a warm-up
    # mixture, warmup_steps also says when the data switches, so then it is the run's identity.
    resumable = RESUMABLE_FIELDS - ({"warmup_steps"} if cfg.warmup_mixture else set())
    if not overwrite and (finished := runs.finished_summary(cfg.run_dir, cfg, resumable=resumable,
                                                            steps=cfg.steps)):
        return finished

    # Everything that can be wrong is checked before anything is compiled or written.
    mesh = build_mesh(cfg)
    shard.check_fits(model_config(cfg), mesh, batch=cfg.batch_size // cfg.microbatches, seq_len=cfg.seq_len)
    tokenizer = load_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{cfg.model.vocab_size} embedding rows; pick a matching --tokenizer")
    sources = {name: tok.mixture_sources(name, jax.process_index(), jax.process_count())
               for name in {cfg.mixture, cfg.warmup_mixture} - {""}}

    # One process per run directory: the first host holds its lock for the whole run.
    with (runs.claim(cfg.run_dir, cfg, resumable=resumable, overwrite=overwrite,
                     writer=jax.process_index() == 0),
          checkpoints.manager(cfg.run_dir, keep_last=cfg.keep_last, keep_period=cfg.keep_period) as manager):
        trainer, eval_sets = build_trainer(cfg, mesh), tok.validation_batches(
            tokenizer, cfg.seq_len, cfg.batch_size // jax.process_count(), cfg.eval_batches)
        summary = training_loop(trainer, manager, functools.partial(train_batches, cfg, tokenizer, sources),
                                eval_sets, stop_after=stop_after, progress=progress)
        if summary["steps"] == cfg.steps and cfg.sample_tokens and jax.process_index() == 0:
            summary["sample"] = sample_text(trainer, tokenizer, "def ", cfg.sample_tokens)
        return summary


def training_loop(trainer: Trainer, manager, batches_from, eval_sets: dict, *, stop_after: int | None,
                  progress: bool, data_counts: dict | None = None) -> dict:
    """The loop proper: resume, then step, evaluate, log and checkpoint until the run ends.
    `batches_from(start_step=n)` gives the batches from step n on; 13's fine-tunes run this loop too
    (their `data_counts`, updated by their batches, join each metrics line)."""
    cfg, mesh, schedule = trainer.cfg, trainer.mesh, trainer.cfg.lr_schedule()
    start_step, trainer.params, trainer.opt_state = checkpoints.restore_newest_readable(  # whole and finite
        manager, cfg.run_dir, trainer.params, trainer.opt_state, writer=jax.process_index() == 0)
    if start_step:
        print(f"resuming {cfg.run_dir} from step {start_step}")
    peak = shard.peak_tflops(jax.devices()[0], cfg.peak_tflops_per_device)
    mfu_per_token_s = (model_lib.train_flops_per_token(trainer.model_cfg, cfg.seq_len)
                       / (peak * 1e12 * mesh.size) if peak else None)
    # The metrics file holds one line per step: the lines of steps this run will redo go first.
    metrics_path, first_host = pathlib.Path(cfg.run_dir) / "metrics.jsonl", jax.process_index() == 0
    if first_host:
        runs.cut_metrics(metrics_path, start_step)
    batches, last_step = batches_from(start_step=start_step), min(cfg.steps, stop_after or cfg.steps)
    bar = tqdm(range(start_step, last_step), initial=start_step, total=cfg.steps,
               disable=not progress or not first_host, dynamic_ncols=True)
    losses, evals, started, stalls = {}, {}, time.time(), health.StallWatch()
    with contextlib.closing(bar):
        for step in bar:
            tick = time.time()  # one step: this host's rows become global arrays, the jitted step runs
            with jax.set_mesh(mesh):
                trainer.params, trainer.opt_state, metrics = trainer.train_step(
                    trainer.params, trainer.opt_state, shard.global_batch(next(batches), mesh))
            metrics, done = jax.device_get(metrics), step + 1  # waits for the step, so it is timed whole
            record = step_record(done, metrics, lr=float(schedule(step)), seconds=time.time() - tick,
                                 tokens=cfg.batch_size * cfg.seq_len, mfu_per_token_s=mfu_per_token_s)
            # A NaN stops the run here, before this step reaches the metrics or a checkpoint.
            health.stop_if_diverged(done, record["loss"], record["grad_norm"],
                                    bool(metrics["state_finite"]), run_dir=cfg.run_dir,
                                    peak_lr=cfg.peak_lr, saved_step=manager.latest_step())
            record |= {f"data/{name}": count for name, count in (data_counts or {}).items()}
            if warning := stalls.observe(done, record["loss"], record["grad_norm"]):
                bar.write(warning)
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
                with checkpoints.resumable_write(metrics_path, manager), open(metrics_path, "a") as file:
                    file.write(json.dumps(record) + "\n")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(manager, done, trainer)
    return {"run_dir": cfg.run_dir, "steps": last_step, "seconds": time.time() - started,
            "losses": losses, "eval": evals[max(evals)] if evals else {},
            "checkpoints": list(manager.all_steps()), "stalled_since": stalls.since}


# --- Command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[TrainConfig, object]:
    """The chosen --config (or --quick's), --preset's architecture, then every field flag given."""
    parser = cli.ArgumentParser(description=(
        "Train OpenMoE. With no arguments: the small preset on the embedded 50/50 text/code corpus "
        "on this machine's devices (~10 min on 2 CPU cores). Field flags override the --config."))
    parser.add_argument("--config", default="laptop", choices=sorted(CONFIGS),
                        help="starting point: laptop (the default run) or an OpenMoE recipe")
    parser.add_argument("--quick", action="store_true", help="the self-test: a short run (UL2 "
                        "then LM, 2 microbatches) in a temporary directory, or in --run-dir")
    parser.add_argument("--preset", choices=sorted(model_lib.PRESETS), help="06's model preset: its "
                        "architecture, keeping the config's dtype and remat")
    parser.add_argument("--overwrite", action="store_true", help="delete the run's own files in "
                        "--run-dir (config.json, metrics, checkpoints; nothing else), start again")
    parser.add_argument("--dry-run", action="store_true", help="compile the train step for the "
                        "model and mesh, report memory, FLOPs and MFU, exit")
    parser.add_argument("--topology", default="", help="with --dry-run: compile for a TPU topology "
                        "such as v3:4x4 on this CPU machine (needs requirements-tpu.txt)")
    parser.add_argument("--stop-after", type=cli.at_least_one, metavar="STEP",
                        help="stop after this step as if killed (a later run resumes)")
    cli.add_multihost_flags(parser)
    # Every field a flag; the model's length is --seq-len's, its group layout 07's (the mesh's).
    cli.add_config_flags(parser, TrainConfig, examples={"laptop": runs.flat_record(CONFIGS["laptop"]),
                                                        "OpenMoE-8B": runs.flat_record(OPENMOE)},
                         choices={"mixture": sorted(tok.MIXTURES), "objective": OBJECTIVES,
                                  "warmup_mixture": ["", *sorted(tok.MIXTURES)],
                                  "routing": router_lib.ROUTINGS,
                                  "dtype": ("float32", "bfloat16"), "ffn_variant": ffn.VARIANTS,
                                  "moe_wiring": ("sequential", "parallel"),
                                  "group_rule": router_lib.GROUP_RULES, "moe_dispatch": moe.DISPATCHES,
                                  "capacity_rule": router_lib.CAPACITY_RULES,
                                  "remat_policy": sorted(model_lib.REMAT_POLICIES)},
                         skip={"model.max_seq_len", "model.group_multiple", "model.expert_replicas"})
    args = parser.parse_args(argv)
    base = QUICK if args.quick else CONFIGS[args.config]
    if args.preset:
        base = dataclasses.replace(base, model=dataclasses.replace(
            model_lib.PRESETS[args.preset], dtype=base.model.dtype, remat=base.model.remat))
    record = runs.flat_record(base)
    return runs.from_flat_record(TrainConfig, {k: vars(args).get(k, v) for k, v in record.items()}), args


def show_ul2_example(tokenizer, text: str = "def mean(values):\n    return sum(values) / len(values)\n"):
    """The self-test's worked example: what each denoiser makes of one line of code, and how two
    examples share one packed decoder row (segment ids; loss on the targets only)."""
    tokens, rng, examples = np.array(tokenizer.encode(text), np.int32), np.random.default_rng(0), []
    print(f"UL2's denoisers on {text!r} ({len(tokens)} tokens): inputs (read) -> targets (learned)")
    for denoiser in UL2_DENOISERS:
        examples.append(ul2_example(tokens, denoiser, tokenizer.encode(denoiser.prefix), tokenizer, rng))
        print(f"  mean span {denoiser.mean_span:<2} rate {denoiser.density:<4}  "
              f"{tokenizer.decode(examples[-1][0])!r} -> {tokenizer.decode(examples[-1][1])!r} + eos")
    row = tok.decoder_row(examples[:2], sum(map(len, (*examples[0], *examples[1]))) + 3)
    print(f"The first two packed into one decoder row of {len(row['targets'])} tokens, 3 of them "
          "padding (positions restart at 0 in each segment):")
    print("\n".join(f"  {name:12} " + "".join(map(str, row[name].astype(int)))
                    for name in ("segment_ids", "loss_mask")))
    return row["loss_mask"].sum() == len(examples[0][1]) + len(examples[1][1])  # the targets only


def main(argv=None) -> None:
    """A dry run, or training (with --quick: the self-test, which also shows UL2's worked example
    and checks that the loss fell). A user's mistake is one `error:` line."""
    with cli.user_errors("interrupted; the same command resumes from the newest complete checkpoint"):
        cfg, args = parse_args(argv)
        shard.initialize_multihost(args.coordinator, args.num_processes, args.process_id, auto=args.multihost_auto)
        if args.dry_run:
            report = dry_run(cfg, args.topology)
            fits = f"\nfits a 16 GiB TPU v3 core: {report['total_gib'] <= 16}" if "v3" in args.topology else ""
            return print(json.dumps(report, indent=2) + fits)
        host.keep_freed_memory_mapped()
        if args.quick and not show_ul2_example(load_tokenizer(cfg)):
            raise SystemExit("self-test FAILED: the packed row's loss does not cover exactly the targets")
        # The self-test trains in a directory of its own (unless given one) and leaves nothing behind.
        scratch = (tempfile.TemporaryDirectory(prefix="openmoe-quick-")
                   if args.quick and not hasattr(args, "run_dir") else contextlib.nullcontext())
        with scratch as scratch_dir:
            summary = train(dataclasses.replace(cfg, run_dir=scratch_dir or cfg.run_dir),
                            overwrite=args.overwrite, stop_after=args.stop_after)
    print("\n".join(runs.summary_lines(summary)))
    losses = list(summary["losses"].values())
    if args.quick and not (losses and losses[-1] < losses[0]):
        raise SystemExit(f"self-test FAILED: the quick run's loss did not fall ({losses})")
    if args.quick:
        print("OK: the quick run trained (UL2 then LM), evaluated, checkpointed and sampled"
              + ("." if hasattr(args, "run_dir") else "; its temporary directory is removed."))


if __name__ == "__main__":
    main()
