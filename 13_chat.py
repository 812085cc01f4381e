"""Chapter 13: from a base OpenMoE to a chat model, by supervised fine-tuning (SFT).

OpenMoE-8B-Chat is the 8B fine-tuned on WildChat's GPT-4 conversations (arXiv 2402.01739 §2.4,
§3.3.2; the OpenMoE README; `openmoe_large_wildchat_sft.gin` in Fuzhao Xue's t5x fork): T5X's
Adafactor at a constant learning rate 1e-3, batch 128, inputs/targets 1024/1024, loss on the targets
only, dropout 0.05. Here a conversation becomes one packed row: id 0 first (T5X's decoder start),
each user turn in the released chat model's template (10's CHAT_TEMPLATE; later turns without the
system prompt), each assistant turn followed by eos. Only the assistant's tokens are targets, 06's
T5X loss weighing the others 0 (ColossalAI's `examples/language/openmoe/train.py` learns the prompt
too, and its port's label smoothing turns cross-entropy into a sum over the vocabulary: the 1e10
losses of ColossalAI issues #5163 and #5212). The base is a 09 run or a released checkpoint (10),
the fine-tune a 09-style run directory whose identity includes the base parameters' fingerprint.
Judged before and after: held-out chat loss, greedy answers, and 11's drops by position on chat text
(§4.4: later turns lose their experts, and SFT does not fix it, Fig. 12b). Left out: dropout, and
WildChat's toxic turns (use allenai/WildChat, the non-toxic release).
Run: `python 13_chat.py` (fine-tunes runs/laptop, ~5 min), `--quick` (self-test),
`chat --run-dir DIR` (talk to it), `--dry-run --topology v3:8x8 --config openmoe-8b-chat` (plan)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import itertools
import json
import pathlib
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from support import checkpoints, cli, host, runs, tensor_files

tok = importlib.import_module("01_tokenizer")
model_lib = importlib.import_module("06_model")
shard = importlib.import_module("07_sharding")
ada = importlib.import_module("08_adafactor")
train_lib = importlib.import_module("09_train")
released = importlib.import_module("10_released_models")
analysis = importlib.import_module("11_routing_analysis")

# --- Part 1: conversations → packed rows whose only targets are the assistant's tokens ------------
# Turn 1 is 10's CHAT_TEMPLATE (system prompt, then the user's words); later user turns start a
# new "<s>[INST]" without it, as Llama-2's template does, which OpenMoE's chat template follows.
NEXT_TURN = "<s>[INST] {query} [/INST]"
ROLES = ("user", "assistant")  # 01's pair's keys, and a message's role, in a turn's order

# Hub chat sets: 01's HubSource (its column of {"role", "content"} messages), the `model` prefix to
# keep ("" = all). OpenMoE-8B-Chat's: WildChat's GPT-4 chats (58K, 1.8 turns on average).
CHAT_SOURCES = {"embedded": None, "wildchat-gpt4": (
    tok.HubSource("allenai/WildChat", column="conversation"), "gpt-4")}


def conversation_turns(conversation, index: int = 0) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a conversation: 01's {"user", "assistant"} pair or WildChat's
    {"role", "content"} messages, less a trailing user turn; no assistant turn: a ValueError."""
    if isinstance(conversation, dict):
        conversation = [{"role": role, "content": conversation.get(role, "")} for role in ROLES]
    roles = [message.get("role") for message in conversation]
    if roles[-1:] == ["user"]:
        roles, conversation = roles[:-1], conversation[:-1]
    if roles and roles == ["user", "assistant"] * (len(roles) // 2):
        return [(u["content"], a["content"]) for u, a in zip(conversation[::2], conversation[1::2])]
    raise ValueError(f"conversation {index} has roles {roles or 'none'}: it needs user and assistant "
                     "turns alternating from the user's, and an assistant turn (the only targets)")


def encode_turns(turns: list[tuple[str, str]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids + eos) per turn; the first prompt is 10's prompt_ids (id 0 first)."""
    return [(released.prompt_ids(tokenizer, user, chat=True) if number == 0
             else tokenizer.encode(NEXT_TURN.format(query=user)),
             tokenizer.encode(" " + assistant) + [tokenizer.eos_id])
            for number, (user, assistant) in enumerate(turns)]


def conversation_example(turns, tokenizer, seq_len: int):
    """(sequence, is_target, turns kept) of one conversation cut at a turn boundary so that
    its sequence holds at most seq_len + 1 tokens (0 turns kept: even the first is too long)."""
    sequence, is_target, kept = [], [], 0
    for prompt, reply in encode_turns(turns, tokenizer):
        if len(sequence) + len(prompt) + len(reply) > seq_len + 1:
            break
        sequence += prompt + reply
        is_target += [False] * len(prompt) + [True] * len(reply)
        kept += 1
    return np.array(sequence, np.int32), np.array(is_target, bool), kept


def pack_chat_rows(conversations, tokenizer, seq_len: int, stats: dict):
    """Rows of ROW_DTYPES arrays, greedily packed: each conversation its own segment (they never
    attend to each other), positions from 0; inputs are the sequence, targets the sequence one
    ahead, loss_mask 1 where the target is the assistant's. `stats` counts conversations,
    truncated ones (turns cut at a boundary) and skipped ones (the first turn alone too long)."""
    row, used = {name: np.zeros(seq_len, dtype) for name, dtype in tok.ROW_DTYPES.items()}, 0
    for index, conversation in enumerate(conversations):
        turns = conversation_turns(conversation, index)
        sequence, is_target, kept = conversation_example(turns, tokenizer, seq_len)
        stats.update({key: stats.get(key, 0) + int(count) for key, count in (
            ("conversations", 1), ("truncated", 0 < kept < len(turns)), ("skipped", kept == 0))})
        if kept == 0:
            continue
        length = len(sequence) - 1
        if used + length > seq_len:
            yield row
            row, used = {name: np.zeros_like(array) for name, array in row.items()}, 0
        segment, span = row["segment_ids"].max() + 1, slice(used, used + length)
        row["inputs"][span], row["targets"][span] = sequence[:-1], sequence[1:]
        row["loss_mask"][span] = is_target[1:]
        row["segment_ids"][span], row["positions"][span] = segment, np.arange(length)
        used += length
    if used:
        yield row


@functools.lru_cache(maxsize=2)
def embedded_conversations(split: str) -> list[list[dict]]:
    """01's stdlib chats; a function's two questions ("what does it do", "show me its code")
    become one two-turn conversation, so multi-turn rows are in the offline set too."""
    by_function = itertools.groupby(tok.instruction_pairs(split), lambda p: p["user"].split("`")[1])
    return [[{"role": role, "content": pair[role]} for pair in pairs for role in ROLES]
            for _, pairs in by_function]


def hub_conversations(hub, model_prefix: str, process_index: int = 0, process_count: int = 1):
    """A hub chat set's conversations, streamed by 01's loader, which keeps one column: a second
    stream of the `model` column beside it leaves out other models' rows."""
    def column(name):
        rows = tok.load_hub_source(dataclasses.replace(hub, column=name),
                                   process_index=process_index, process_count=process_count)
        return (row["text"] for row in rows)
    models = column("model") if model_prefix else itertools.repeat("")
    return (chat for chat, model in zip(column(hub.column), models) if model.startswith(model_prefix))


def chat_batches(cfg, tokenizer, *, start_step: int = 0, counts: dict | None = None):
    """This host's batch for every step from `start_step` on, a pure function of (seed, step):
    the conversations reshuffled every pass (hub sets stream once, in their order)."""
    local_rows, counts = cfg.batch_size // jax.process_count(), {} if counts is None else counts
    source = CHAT_SOURCES[cfg.chat_data]
    if source is None:
        conversations = embedded_conversations("train")[jax.process_index()::jax.process_count()]
        orders = (np.random.default_rng(cfg.seed + epoch).permutation(len(conversations))
                  for epoch in itertools.count())
        stream = (conversations[i] for order in orders for i in order)
    else:
        stream = hub_conversations(*source, jax.process_index(), jax.process_count())
    rows = pack_chat_rows(stream, tokenizer, cfg.seq_len, counts)
    for step in itertools.count():
        batch = list(itertools.islice(rows, local_rows))
        if len(batch) < local_rows:
            return
        if step >= start_step:
            yield tok.stack_rows(batch)


def heldout_batches(tokenizer, seq_len: int, rows: int, count: int) -> dict[str, list]:
    """Held-out chats (01's validation split) as 09's eval sets: at most `count` batches of `rows`,
    the last padded with repeats at loss mask 0, so each held-out token counts once."""
    chats = embedded_conversations("validation")
    packed = list(pack_chat_rows(chats, tokenizer, seq_len, {}))[:rows * count]
    filler = itertools.islice(itertools.cycle(packed), -len(packed) % rows)
    packed += [dict(row, loss_mask=np.zeros_like(row["loss_mask"])) for row in filler]
    batches = [tok.stack_rows(packed[i:i + rows]) for i in range(0, len(packed), rows)]
    return {"chat": batches} if batches else {}


def eval_sets(cfg, tokenizer) -> dict[str, list]:
    """The fine-tune's held-out chat batches: what 09's loop evaluates and the judge scores."""
    local_rows = cfg.batch_size // jax.process_count()
    return heldout_batches(tokenizer, cfg.seq_len, local_rows, cfg.eval_batches)


# --- Part 2: the recipe and the base it starts from -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune. `model` and the fingerprints are filled in from the base (`resolve`)."""
    base: str = "runs/laptop"            # a 09 run directory, or a released checkpoint
                                         # (directory or hub name)
    base_step: int = 0                   # a 09 base's checkpoint; 0 = its newest (recorded as its step)
    chat_data: str = "embedded"          # "embedded" (01's stdlib chats) or a hub set of CHAT_SOURCES
    run_dir: str = "runs/laptop-chat"    # config.json, metrics.jsonl and checkpoints/ live here
    optimizer: str = "adafactor"         # "adafactor" (08, T5X mode, as OpenMoE-8B-Chat)
                                         # or "adamw" (optax)
    peak_lr: float = 1e-3                # learning rate after warm-up
                                         # (OpenMoE's SFT gin: constant 1e-3)
    warmup_steps: int = 0                # linear warm-up from 0 to lr; 0 = constant from the start
    weight_decay: float = 0.0            # AdamW's decoupled weight decay (Adafactor: none, as OpenMoE)
    train_routers: bool = True           # false: routers frozen (08's frozen_from),
                                         # chapter 11's routing kept
    train_capacity_factor: float = 1.25  # expert capacity factor while fine-tuning (OpenMoE: 1.25)
    eval_capacity_factor: float = 2.0    # ... while evaluating and answering (OpenMoE: 2.0)
    dtype: str = "float32"               # activations (bf16 on TPU); parameters and optimizer state f32
    remat: bool = False                  # recompute each block in the backward pass (saves memory)
    seq_len: int = 0                     # tokens per row; 0 = the base's max_seq_len
    batch_size: int = 16                 # rows per step, over all hosts (OpenMoE's SFT: 128)
    microbatches: int = 1                # gradient accumulation: the batch in this many slices
    steps: int = 360                     # optimizer steps
    mesh: str = ""                       # 07's device mesh; "" = all devices on data
    seed: int = 0                        # data order
    eval_every: int = 120                # steps between held-out chat evaluations (0 = only at the end)
    eval_batches: int = 4                # held-out chat batches per evaluation
    checkpoint_every: int = 40           # steps between checkpoints
    keep_last: int = 2                   # newest checkpoints kept (and every eval_every-th)
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = known accelerators only (07.TPU_PEAK_TFLOPS)
    model: model_lib.ModelConfig = model_lib.ModelConfig()  # the base's, with this recipe's fields
    base_fingerprint: str = ""           # of the base's parameters (identity: never another base)
    tokenizer_fingerprint: str = ""      # of the base's tokenizer model

    def __post_init__(self):
        cli.check_fields(self, {
            **{n: (lambda v, c=c: v in c, f"one of {sorted(c)}") for n, c in (
                ("chat_data", CHAT_SOURCES), ("optimizer", OPTIMIZERS), ("dtype", DTYPES))},
            **{n: (bool, "a path or hub name") for n in ("base", "run_dir")},
            "peak_lr": (cli.finite_at_least(0, above=True), "a finite number > 0"),
            "batch_size": (lambda v: cli.int_at_least(1)(v) and v % max(self.microbatches, 1) == 0,
                           f"an int >= 1 divisible by microbatches={self.microbatches}"),
            **{n: (cli.finite_at_least(0), "a finite number >= 0") for n in ("weight_decay",
                "train_capacity_factor", "eval_capacity_factor", "peak_tflops_per_device")},
            **{n: (cli.int_at_least(1), "an int >= 1") for n in (
                "microbatches", "steps", "checkpoint_every", "keep_last")},
            **{n: (cli.int_at_least(0), "an int >= 0") for n in (
                "base_step", "warmup_steps", "seq_len", "seed", "eval_every", "eval_batches")}})
        shard.parse_mesh(self.mesh)

    # What 09's loop asks of a config: the learning rate by step, and the optimizer.
    def lr_schedule(self):  # a linear warm-up from 0 to peak_lr, then constant
        return (optax.linear_schedule(0.0, self.peak_lr, self.warmup_steps) if self.warmup_steps
                else optax.constant_schedule(self.peak_lr))

    def make_optimizer(self, params) -> optax.GradientTransformation:
        """Adafactor (08, T5X mode) or AdamW (optax) on lr_schedule; routing biases (08's balance
        rule moves them, as in 09) and, with train_routers false, router kernels never update."""
        names = list(ada.leaf_kinds(params))
        frozen = set(ada.routing_frozen_from(params)) | {
            name for name in names if not self.train_routers and name.endswith("router/kernel")}
        if self.optimizer == "adafactor":
            return ada.adafactor(self.lr_schedule(), logical_axes=ada.logical_axes_by_name(params),
                                 frozen_from=dict.fromkeys(frozen, 0))
        labels = ["frozen" if name in frozen else "trained" for name in names]
        adamw = optax.adamw(self.lr_schedule(), weight_decay=self.weight_decay)
        return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()},
                                     jax.tree.unflatten(jax.tree.structure(params), labels))


OPTIMIZERS, DTYPES = ("adafactor", "adamw"), ("float32", "bfloat16")  # FinetuneConfig's choices
# OpenMoE-8B-Chat's recipe on the released 8B: WildChat GPT-4, Adafactor at 1e-3, batch 128 of
# 2048 tokens, bf16 with remat, on a v3-128 (64 chips); --dry-run --topology v3:8x8 plans it.
CONFIGS = {"laptop": FinetuneConfig(), "openmoe-8b-chat": FinetuneConfig(
    base="OrionZheng/openmoe-8b", chat_data="wildchat-gpt4", run_dir="runs/openmoe-8b-chat",
    dtype="bfloat16", remat=True, seq_len=2048, batch_size=128, steps=3000,
    mesh="data=1,expert=32,model=4", eval_every=500, checkpoint_every=250, keep_last=3)}
QUICK = dataclasses.replace(CONFIGS["laptop"], run_dir="runs/chat-quick", batch_size=8, steps=12,
                            peak_lr=1e-2, eval_every=6, eval_batches=1, checkpoint_every=6)
# What may change on resume; the rest (base, its fingerprint, data, recipe, model) is identity.
RESUMABLE_FIELDS = {"steps", "peak_lr", "warmup_steps", "eval_every", "eval_batches",
                    "checkpoint_every", "keep_last", "peak_tflops_per_device", "mesh",
                    "microbatches", "remat", "model.remat", "run_dir"}
HUB_PRESETS = {name: "openmoe-" + name.split("-")[1].lower() for name in released.HUB_MODELS}


def open_base(cfg: FinetuneConfig):
    """(base ModelConfig, tokenizer, 09 Run or released directory) with no weights read; a 09 run
    directory is one with a config.json beside checkpoints/, anything else goes to 10's loader."""
    path = pathlib.Path(cfg.base)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        run = released.open_run(path)
        return train_lib.model_config(run.cfg), train_lib.load_tokenizer(run.cfg), run
    directory, base_cfg, tokenizer = released.load_config(cfg.base, need_tokenizer=True)
    return base_cfg, tokenizer, directory


def resolve(cfg: FinetuneConfig, base_cfg, tokenizer, where) -> FinetuneConfig:
    """cfg with its model (the base's, this recipe's fields on top), the base's step and seq_len."""
    if tokenizer.vocab_size > base_cfg.vocab_size:
        raise ValueError(f"the base's tokenizer has {tokenizer.vocab_size} ids but its model only "
                         f"{base_cfg.vocab_size} embedding rows: the tokenizer does not match the base")
    step, seq_len = cfg.base_step, cfg.seq_len or base_cfg.max_seq_len
    if isinstance(where, released.Run):
        step = step or where.steps[-1]
        if step not in where.steps:
            raise ValueError(f"base_step={step}: {where.path} has checkpoints at {list(where.steps)}")
    template = len(encode_turns([("", "")], tokenizer)[0][0])
    if template + 1 > seq_len:  # an empty question's prompt, and one reply token
        raise ValueError(f"seq_len={seq_len}: the chat template alone takes {template} tokens, so no "
                         f"question and answer fit; use --seq-len of at least {template + 64}")
    model = dataclasses.replace(
        base_cfg, dtype=jnp.dtype(cfg.dtype), remat=cfg.remat, max_seq_len=seq_len,
        train_capacity_factor=cfg.train_capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor)
    tokenizer_hash = hashlib.sha256(tokenizer.processor.serialized_model_proto()).hexdigest()[:16]
    return dataclasses.replace(cfg, model=model, base_step=step, seq_len=seq_len,
                               tokenizer_fingerprint=tokenizer_hash)


# --- Part 3: the fine-tune, a run directory with 09's guarantees ----------------------------------
def base_params(cfg: FinetuneConfig, where, like):
    """The base's f32 parameters placed like `like` (ShapeDtypeStructs with shardings), read piece
    by piece from a 09 or released (10) checkpoint; `runtime_owned`, so never held twice."""
    if isinstance(where, released.Run):
        return tensor_files.runtime_owned(checkpoints.restore_params(where.path, cfg.base_step, like))
    mesh = jax.tree.leaves(like)[0].sharding.mesh
    model = released.model_from_tensors(released.read_tensors(where), cfg.model, mesh=mesh)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return tensor_files.runtime_owned(jax.tree.unflatten(jax.tree.structure(like), leaves))


def prepare(cfg: FinetuneConfig, mesh=None):
    """Everything checked, the base read onto the mesh and fingerprinted: (cfg, tokenizer, mesh,
    base params). Nothing is compiled for training or written yet."""
    base_cfg, tokenizer, where = open_base(cfg)
    cfg = resolve(cfg, base_cfg, tokenizer, where)
    mesh = mesh or train_lib.build_mesh(cfg)
    shard.check_fits(cfg.model, mesh, batch=cfg.batch_size // cfg.microbatches, seq_len=cfg.seq_len)
    like = nnx.state(shard.sharded_model(cfg.model, mesh, abstract=True), nnx.Param)
    params = base_params(cfg, where, like)
    cfg = dataclasses.replace(cfg, base_fingerprint=runs.params_fingerprint(params))
    return cfg, tokenizer, mesh, params


def finetune(cfg: FinetuneConfig, *, overwrite: bool = False, stop_after: int | None = None,
             progress: bool = True, mesh=None) -> dict:
    """Fine-tune (or resume) cfg.run_dir from its base with 09's trainer and loop (lock, identity,
    exact resume, divergence stop); the summary adds the resolved config and the data's counts."""
    cfg, tokenizer, mesh, params = prepare(cfg, mesh)
    # The base's host copies are gone: from here glibc keeps freed memory, process-wide (as 09).
    host.keep_freed_memory_mapped()
    with (runs.claim(cfg.run_dir, cfg, resumable=RESUMABLE_FIELDS, overwrite=overwrite,
                     writer=jax.process_index() == 0),
          checkpoints.manager(cfg.run_dir, keep_last=cfg.keep_last,
                              keep_period=cfg.eval_every or cfg.steps) as manager):
        counts = {}
        summary = train_lib.training_loop(
            train_lib.build_trainer(cfg, mesh, params=params), manager,
            functools.partial(chat_batches, cfg, tokenizer, counts=counts),
            eval_sets(cfg, tokenizer), stop_after=stop_after, progress=progress, data_counts=counts)
    return {**summary, "data": counts, "cfg": cfg}


def dry_run(cfg: FinetuneConfig, topology: str = "") -> dict:
    """Compile the fine-tune's step for the base's shapes on this machine's devices or a TPU
    topology's, and report 07's plan: memory per device, FLOPs, collectives (no weights read)."""
    if cfg.base in HUB_PRESETS and not pathlib.Path(cfg.base).exists():  # plan without downloading
        preset = model_lib.PRESETS[HUB_PRESETS[cfg.base]]
        base_cfg, where = dataclasses.replace(preset, **released.T5X_SEMANTICS), None
        tokenizer = tok.embedded_tokenizer()  # a stand-in: only the template's length is read
    else:
        base_cfg, tokenizer, where = open_base(cfg)
    return train_lib.dry_run(resolve(cfg, base_cfg, tokenizer, where), topology)


# --- Part 4: judge it, before and after, on one device --------------------------------------------
def plain_model(model_cfg, params):
    """An unsharded model holding a copy of `params` (a judge or a chat needs no mesh)."""
    cfg = dataclasses.replace(model_cfg, group_multiple=1, expert_replicas=1, remat=False)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(jax.device_get(x)), params))


def base_model(cfg: FinetuneConfig):
    """The base, unsharded (the judge's "before"), read and checked as the fine-tune reads it."""
    resolved, _, _, params = prepare(cfg, shard.mesh_from_text("", jax.devices()[:1]))
    return plain_model(resolved.model, params)


@jax.jit  # 06's loss metrics at the eval capacity (one compile serves base and fine-tune alike)
def chat_metrics(model, batch: dict) -> dict:
    return model_lib.loss_fn(model, batch, train=False)[1]


def heldout_loss(model, batches: list[dict]) -> dict[str, float]:
    """06's T5X cross-entropy and accuracy over the assistant tokens of held-out chats, weighted
    by tokens as 09's loop weighs them. Whole batches, as the loop routes them (a routing group
    spans rows), so one device holds a batch's logits: a judge for laptop-sized models."""
    values = [chat_metrics(model, batch) for batch in batches]
    weights = [float(v["num_tokens"]) for v in values]
    return {name: float(np.average([float(v[key]) for v in values], weights=weights))
            for name, key in (("loss", "cross_entropy"), ("accuracy", "accuracy"))}


def long_chat_rows(tokenizer, seq_len: int, count: int = 8) -> dict[str, np.ndarray]:
    """Rows that are each one long conversation (held-out chats chained as its turns, cut at a
    turn boundary), so a token's position in the row is its place in the conversation."""
    messages = list(itertools.chain.from_iterable(embedded_conversations("validation")))
    chats = [messages[i:i + 24] for i in range(0, len(messages), 24)]
    return tok.stack_rows([*itertools.islice(pack_chat_rows(chats, tokenizer, seq_len, {}), count)])


def drops_by_position(model, rows: dict) -> list[float]:
    """Chapter 11's drop rate by position at the training capacity, each row one routing group,
    averaged over MoE layers, as four quarter means (Drop-towards-the-End, paper §4.4)."""
    seq_len = rows["inputs"].shape[1]
    cfg = analysis.analysis_config(types.SimpleNamespace(model_cfg=model.cfg, seq_len=seq_len))
    decisions = analysis.record_decisions(nnx.state(model, nnx.Param), cfg, {"chat": rows})
    curve_L = np.mean([analysis.drop_rate_by_position(decisions.position_N, kept_NA, seq_len)
                          for kept_NA in decisions.kept_NA.values()], axis=0)
    return analysis.quarter_means(curve_L)


def answers(model, tokenizer, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to questions in the chat template (10's prompt_ids, id 0 first), decoded
    together: 06's generate left-pads them to one length, so one compile serves every model."""
    prompts = [released.prompt_ids(tokenizer, question, chat=True) for question in questions]
    room = max(min(max_new_tokens, model.cfg.max_seq_len - max(map(len, prompts))), 1)
    return list(map(tokenizer.decode, model_lib.generate(model, prompts, max_new_tokens=room)))


def judge(models: dict, tokenizer, cfg: FinetuneConfig, questions: int = 3) -> dict:
    """Each model's loss on the fine-tune's held-out chats (those its loop evaluates, at least
    one batch), drops by position on long chats, and greedy answers."""
    judged = dataclasses.replace(cfg, eval_batches=max(cfg.eval_batches, 1))  # at least one batch
    batches, rows = eval_sets(judged, tokenizer)["chat"], long_chat_rows(tokenizer, cfg.seq_len)
    prompts = [c[0]["content"] for c in embedded_conversations("validation")[:questions]]
    return {name: {**heldout_loss(model, batches), "drops": drops_by_position(model, rows),
                   "answers": answers(model, tokenizer, prompts), "prompts": prompts}
            for name, model in models.items()}


def judge_lines(results: dict) -> list[str]:  # the before/after table, then answers side by side
    names = list(results)
    rows = [("", lambda r: ""), ("held-out chat loss (assistant)", lambda r: f"{r['loss']:.3f}"),
            ("held-out chat accuracy", lambda r: f"{r['accuracy']:.1%}")] + [
        (f"drops, positions quarter {q + 1}/4", lambda r, q=q: f"{r['drops'][q]:.1%}")
        for q in range(4)]
    lines = [f"{name:34}" + "".join(f"{fmt(results[n]) or n:>16}" for n in names) for name, fmt in rows]
    for index, prompt in enumerate(results[names[0]]["prompts"]):
        lines.append(f"\nQ: {prompt}")
        lines += [f"  {name:>10}: {results[name]['answers'][index]!r}" for name in names]
    return lines


# --- Part 5: talk to it: the template per turn, one KV cache for the whole conversation -----------
class ChatSession:
    """A multi-turn chat with one model. Each turn feeds only its new tokens (the last reply's
    end, the next turn's template and question) into a cache that holds the whole conversation,
    so earlier turns are never recomputed; a reply ends at eos, as the fine-tune taught."""
    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.sampling, self.key = {"temperature": temperature, "top_p": top_p}, jax.random.key(seed)
        self.cache, self.used, self.unfed, self.turns = model_lib.init_cache(
            model.cfg, 1, model.cfg.max_seq_len), 0, [], 0

    def reply(self, text: str) -> list[int]:
        """The reply's ids (without eos); a ValueError when the conversation has no room left."""
        tokens = (self.unfed + self.tokenizer.encode(NEXT_TURN.format(query=text)) if self.turns
                  else released.prompt_ids(self.tokenizer, text, chat=True))
        room = self.model.cfg.max_seq_len - self.used - len(tokens)
        if room < 2:
            raise ValueError(f"the conversation fills max_seq_len={self.model.cfg.max_seq_len} "
                             "tokens; start a new one (/reset)")
        out, eos = [], self.tokenizer.eos_id
        for _ in range(min(self.max_new_tokens, room - 1)):
            positions = self.used + np.arange(len(tokens))
            logits_BV, self.cache = model_lib._decode_step(
                self.model, jnp.array([tokens], jnp.int32), jnp.array([positions], jnp.int32),
                jnp.ones((1, len(tokens)), jnp.int32), self.cache)
            self.used += len(tokens)
            self.key, key = jax.random.split(self.key)
            token = int(model_lib.sample_token(logits_BV, key, **self.sampling)[0])
            if token == eos:
                break
            out.append(token)
            tokens = [token]
        self.unfed, self.turns = [token] if token == eos else [token, eos], self.turns + 1
        return out


def chat_loop(run_dir: str, step: int | None, **sampling) -> None:
    """Read a line, answer it, until end of input; /reset starts a new conversation."""
    cfg = runs.read_config(FinetuneConfig, pathlib.Path(run_dir) / "config.json")
    step, model = run_model(dataclasses.replace(cfg, run_dir=run_dir), step)
    tokenizer = open_base(cfg)[1]
    session = ChatSession(model, tokenizer, **sampling)
    print(f"Chatting with {run_dir} (step {step}); /reset starts over, Ctrl-D ends.")
    for line in sys.stdin:
        if line.strip() == "/reset":
            session = ChatSession(model, tokenizer, **sampling)
            continue
        try:
            print(tokenizer.decode(session.reply(line.rstrip("\n"))), flush=True)
        except ValueError as error:
            print(f"({error})", flush=True)


# --- The command line, and the self-test ----------------------------------------------------------
def run_model(cfg: FinetuneConfig, step: int | None = None):
    """(step, unsharded model) of a fine-tune's checkpoint (default: the newest)."""
    steps = checkpoints.saved_steps(cfg.run_dir)
    if not steps or (step is not None and step not in steps):
        raise ValueError(f"{cfg.run_dir} has checkpoints at {list(steps)}; fine-tune it first or "
                         "pick one")
    one_device = shard.mesh_from_text("", jax.devices()[:1])
    like = nnx.state(shard.sharded_model(cfg.model, one_device, abstract=True), nnx.Param)
    step = step or steps[-1]
    return step, plain_model(cfg.model, checkpoints.restore_params(cfg.run_dir, step, like))


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=(
        "Fine-tune a base OpenMoE (a 09 run or a released checkpoint) into a chat model and compare the"
        " two. With no arguments: runs/laptop on the offline stdlib chats (~5 min on 2 CPU cores)."))
    commands = parser.add_subparsers(dest="command", title="commands")
    talk = commands.add_parser("chat", help="talk to a fine-tune (multi-turn, one KV cache)")
    cli.add_flags(talk, [("--run-dir", str, "runs/laptop-chat", "the fine-tune's run directory"),
                         ("--step", cli.at_least_one, None, "its checkpoint (default: the newest)"),
                         ("--max-new-tokens", cli.at_least_one, 64, "tokens per reply at most"),
                         ("--temperature", cli.finite, 0.0, "sampling temperature (0: greedy)"),
                         ("--top-p", cli.finite, 1.0, "nucleus sampling's probability mass")])
    parser.add_argument("--config", default="laptop", choices=sorted(CONFIGS), help="starting recipe")
    cli.add_flags(parser, [
        ("--quick", bool, False,
         "the self-test: a tiny released-format base, fine-tuned, resumed, judged"),
        ("--overwrite", bool, False, "delete the run's own files in --run-dir and start again"),
        ("--stop-after", cli.at_least_one, None,
         "stop after this step as if killed (a later run resumes)"),
        ("--dry-run", bool, False, "compile the fine-tune's step, report memory and FLOPs, exit"),
        ("--topology", str, "", "with --dry-run: a TPU topology such as v3:8x8 (requirements-tpu.txt)"),
        ("--judge", cli.boolean, True, "compare base and fine-tune on one device (off for big ones)")])
    cli.add_field_flags(
        parser.add_argument_group("fine-tune fields (FinetuneConfig)"), FinetuneConfig,
        skip={"model", "base_fingerprint", "tokenizer_fingerprint"},
        choices={"chat_data": sorted(CHAT_SOURCES), "optimizer": OPTIMIZERS, "dtype": DTYPES})
    args = parser.parse_args(argv)
    record = runs.flat_record(QUICK if args.quick else CONFIGS[args.config])
    values = {k: vars(args).get(k, v) for k, v in record.items()}
    return runs.from_flat_record(FinetuneConfig, values), args


def main(argv=None) -> None:
    cfg, args = parse_args(argv)
    with cli.user_errors("interrupted; the same command resumes from the newest complete checkpoint"):
        if args.command == "chat":
            return chat_loop(args.run_dir, args.step, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p)
        if args.dry_run:
            return print(json.dumps(dry_run(cfg, args.topology), indent=2))
        if args.quick:
            return self_test(cfg)
        base = open_base(cfg)  # judged first and let go, so the base is never held twice
        before = judge({"base": base_model(cfg)}, base[1], resolve(cfg, *base)) if args.judge else {}
        summary = finetune(cfg, overwrite=args.overwrite, stop_after=args.stop_after)
        print("\n".join(runs.summary_lines(summary)) + f"\nchat data: {summary['data']}")
        if args.judge:
            tuned = summary["cfg"]
            after = judge({"fine-tuned": run_model(tuned)[1]}, open_base(tuned)[1], tuned)
            print("\n".join(judge_lines(before | after)))


def self_test(cfg: FinetuneConfig) -> None:
    """A tiny random OpenMoE in the released layout is the base: a packed row shown, the fine-tune
    killed half-way and resumed, the judge's table, and a cached two-turn chat checked afresh."""
    tokenizer = tok.embedded_tokenizer()
    tiny = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size,
                               max_seq_len=128, eval_capacity_factor=8.0)
    turns = [("What does `os.sep` do?", "It separates."), ("And `os.walk`?", "Walks a tree.")]
    chat = [{"role": role, "content": text} for pair in turns for role, text in zip(ROLES, pair)]
    row = next(pack_chat_rows([chat], tokenizer, 128, {}))
    runs_ = itertools.groupby(zip(row["targets"][row["segment_ids"] > 0], row["loss_mask"]),
                              key=lambda x: x[1])
    shown = "".join((f"⟦{text}⟧" if mask else text) for mask, run in runs_
                    for text in [tokenizer.decode([t for t, _ in run]) + ("<eos>" if mask else "")])
    print("A two-turn chat as one row of targets (⟦…⟧: the loss, the assistant's tokens and "
          "eos):\n" + shown.replace("\n", "⏎"))
    masked, replies = row["loss_mask"].sum(), sum(len(tokenizer.encode(" " + a)) + 1 for _, a in turns)
    with tempfile.TemporaryDirectory() as tmp:
        base = released.export_hf(model_lib.OpenMoE(tiny, rngs=nnx.Rngs(0)), f"{tmp}/base",
                                  tokenizer=tokenizer)
        cfg = dataclasses.replace(cfg, base=str(base), run_dir=f"{tmp}/chat", eval_capacity_factor=8.0)
        models = {"base": base_model(cfg)}
        finetune(cfg, stop_after=cfg.steps // 2, progress=False)
        summary = finetune(cfg, progress=False)
        models["fine-tuned"] = after = run_model(summary["cfg"])[1]
        results = judge(models, tokenizer, summary["cfg"], questions=2)
    losses = list(summary["losses"].values())
    print(f"\nFine-tuned {cfg.steps} steps (killed after {cfg.steps // 2}, resumed): train loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}\n" + "\n".join(judge_lines(results)))
    session = ChatSession(after, tokenizer, max_new_tokens=6)
    first, second = session.reply(turns[0][0]), session.reply(turns[1][0])
    history = (encode_turns(turns[:1], tokenizer)[0][0] + first + [tokenizer.eos_id]
               + tokenizer.encode(NEXT_TURN.format(query=turns[1][0])))
    fresh = model_lib.generate(after, [history], max_new_tokens=6)[0]
    print(f"\nTwo-turn chat, KV cache kept across turns: {tokenizer.decode(first)!r}, "
          f"{tokenizer.decode(second)!r}")
    failures = [message for ok, message in (
        (masked == replies, f"loss mask covers {masked} tokens, not {replies}"),
        (results["fine-tuned"]["loss"] < results["base"]["loss"], "held-out chat loss did not fall"),
        (fresh == second, f"cached turn 2 {second} differs from decoding afresh {fresh}")) if not ok]
    if failures:
        sys.exit("self-test FAILED: " + "; ".join(failures))
    print("\nOK: assistant-only targets, fine-tune resumed, held-out chat loss fell, "
          "cached chat exact.")


if __name__ == "__main__":
    main()
