"""Chapter 10: the released OpenMoE models, loaded into this code, run, and watched while they route.

OpenMoE's weights are public (arXiv 2402.01739 §1; the OpenMoE README): OpenMoE-Base, the 8B
(with checkpoints at 200B … 1T tokens), the 8B-Chat and the 34B, on the Hugging Face hub as
`OrionZheng/openmoe-*` in ColossalAI's PyTorch layout, and as T5X checkpoints. Both hold the same
tensors under two naming schemes, so the chapter's core is a *name table*: which of 06's
parameters each stored tensor becomes, and how (torch stores a linear weight [out, in], so it is
transposed; both store the double-gated wi_0 as [D, 2F], which we view as [D, 2, F], as in 03).
Reading the files themselves, without torch and safely, is plumbing: support/tensor_files.py.
Each tensor is read a block of rows at a time and goes straight to its device, or with a mesh
(07) each device receives only its slice, so a 34B loads across a pod with little host memory.
The weights were trained in T5X, so a loaded model runs T5X's evaluation semantics (04, 06):
padding masks, flaxformer's routing groups, and id 0 (T5's start token) before every prompt.
Left out: training the loaded models (09 does that).
Run: `python 10_released_models.py` (self-test), `... generate --model OrionZheng/openmoe-base
--prompt "..." --show-experts`, `... perplexity --model DIR`, `... export --run-dir runs/laptop`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pathlib
import sys
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from support import checkpoints, cli, tensor_files

tok = importlib.import_module("01_tokenizer")
model_lib = importlib.import_module("06_model")
shard = importlib.import_module("07_sharding")
train_lib = importlib.import_module("09_train")

# What is released, with its format (OpenMoE README; ColossalAI examples/language/openmoe).
HUB_MODELS = {
    "OrionZheng/openmoe-base": "OpenMoE-Base/16E, 128B tokens: one f32 pytorch_model.bin, 3.2 GB",
    "OrionZheng/openmoe-8b": "OpenMoE-8B/32E, 1.1T tokens: 6 f32 shards, ~47 GB "
                             "(also -200B, -400B, -600B, -800B, -1T)",
    "OrionZheng/openmoe-8b-chat": "OpenMoE-8B fine-tuned on WildChat's GPT-4 turns, ~47 GB",
    "OrionZheng/openmoe-34b-200B": "OpenMoE-34B/32E, 200B tokens: 12 fp16 shards, ~92 GB"}
# The chat model's prompt, as the OpenMoE README writes it.
CHAT_TEMPLATE = ("<<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n"
                 "<s>[INST] {query} [/INST]")


# --- Part 1: config.json ↔ ModelConfig ------------------------------------------------------------
# HF config key → ModelConfig field, for everything that maps one to one.
HF_FIELDS = {"vocab_size": "vocab_size", "num_hidden_layers": "num_layers",
             "hidden_size": "d_model", "num_attention_heads": "num_heads", "head_dim": "head_dim",
             "intermediate_size": "d_ff", "num_experts": "num_experts", "router_topk": "top_k",
             "moe_layer_interval": "moe_interval",
             "router_capacity_factor_train": "train_capacity_factor",
             "router_capacity_factor_eval": "eval_capacity_factor",
             "router_min_capacity": "min_capacity", "max_position_embeddings": "max_seq_len",
             "rope_theta": "rope_max_timescale", "router_aux_loss_factor": "aux_loss_weight",
             "router_z_loss_factor": "router_z_loss_weight"}
# The keys that fix the tensors' shapes: a config.json without them describes another model.
HF_SHAPES = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "head_dim",
             "intermediate_size", "num_experts", "moe_layer_interval")
# Keys whose value this code cannot honour unless it is exactly the released one.
HF_FIXED = {"hidden_act": "swiglu", "mlp_gated": True, "tie_word_embeddings": False,
            "attention_bias": False, "rope_scaling": None, "rms_norm_eps": 1e-6,
            "router_noisy_policy": None, "pretraining_tp": 1}
# Keys of the released config.json that only the port reads (its kernels, load balancer, training
# loss and init), with the released values, kernels off: `from_pretrained` fails without them.
HF_PORT_ONLY = {"enable_kernel": False, "enable_load_balance": False, "load_balance_tolerance": 0.1,
                "load_balance_beam_width": 8, "load_balance_group_swap_factor": 0.4,
                "enable_comm_overlap": False, "enable_hierarchical_alltoall": False,
                "label_smoothing": 0.001, "z_loss_factor": 0.01, "initializer_range": 0.02,
                "expert_parallel": None, "layer_norm_epsilon": 1e-6, "transformers_version": "4.34.0"}
# How T5X evaluated the released weights (06's padding masks, 04's flaxformer groups).
T5X_SEMANTICS = {"t5x_padding": True, "group_rule": "flaxformer"}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> Any:
    """06's ModelConfig for a released config.json, with T5X's evaluation semantics on.
    What config.json leaves out (the 34B's routing groups of 8192 tokens, set in T5X's gin) comes
    from the 06 preset of the same shapes; `overrides` are ModelConfig fields (dtype, ...)."""
    missing = [key for key in HF_SHAPES if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing}: it does not describe an OpenMoE model")
    # OpenMoE uses multi-head attention: one key/value head per query head.
    fixed = {**HF_FIXED, "num_key_value_heads": hf["num_attention_heads"]}
    for key, released in fixed.items():
        if key in hf and hf[key] != released:
            raise ValueError(f"config.json {key}={hf[key]!r}: this code implements only the "
                             f"released OpenMoE value {released!r}")
    fields = {field: hf[key] for key, field in HF_FIELDS.items() if key in hf}
    base = next((cfg for cfg in model_lib.PRESETS.values()
                 if all(getattr(cfg, HF_FIELDS[key]) == hf[key] for key in HF_SHAPES)),
                model_lib.ModelConfig())
    return dataclasses.replace(base, **{**fields, **T5X_SEMANTICS, **overrides})


def hf_config(cfg) -> dict:
    """The config.json that ColossalAI's `modeling_openmoe.py` reads, for a model of this code."""
    if cfg.ffn_variant != "double_gated" or cfg.moe_wiring != "sequential" or not cfg.moe_interval:
        raise ValueError(f"only the released architecture has an HF layout (MoE layers, double-"
                         f"gated FFN, sequential wiring); got moe_interval={cfg.moe_interval}, "
                         f"ffn_variant={cfg.ffn_variant!r}, moe_wiring={cfg.moe_wiring!r}")
    return {"architectures": ["OpenMoeForCausalLM"], "model_type": "llama",
            "auto_map": {"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"},
            **HF_FIXED, **HF_PORT_ONLY, **{key: getattr(cfg, field) for key, field in HF_FIELDS.items()},
            "num_key_value_heads": cfg.num_heads, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 0, "router_drop_tks": True, "dropout_rate": 0.0,
            "torch_dtype": "float32", "use_cache": True}


# --- Part 2: the name table -----------------------------------------------------------------------
class TensorName(NamedTuple):
    """One parameter under its three names. `transposed`: HF stores it [out, in]."""
    ours: tuple            # path in the model's nnx state, e.g. ("layers", 3, "mlp", "wi_0")
    t5x: str               # flaxformer's path, e.g. "decoder/layers_3/mlp/expert/wi_0/kernel"
    hf: str                # ColossalAI's name, e.g. "model.layers.3.mlp.experts.wi_gate"
    transposed: bool


# (ours, T5X, HF, transposed) relative to a layer: every block, then dense or MoE blocks only.
EVERY_BLOCK = [
    ("pre_self_attention_norm/scale", "pre_self_attention_layer_norm/scale",
     "input_layernorm.weight", False),
    ("self_attention/query", "self_attention/query/kernel", "self_attn.q_proj.weight", True),
    ("self_attention/key", "self_attention/key/kernel", "self_attn.k_proj.weight", True),
    ("self_attention/value", "self_attention/value/kernel", "self_attn.v_proj.weight", True),
    ("self_attention/out", "self_attention/out/kernel", "self_attn.o_proj.weight", True),
    ("pre_mlp_norm/scale", "pre_mlp_layer_norm/scale", "post_attention_layernorm.weight", False),
]


def ffn_names(module: str) -> list[tuple]:
    """A dense FFN's three kernels: named alike in our model and T5X; torch calls them the
    gate/up/down projections, stored [out, in]."""
    return [(f"{module}/{ours}", f"{module}/{ours}/kernel", f"{module}.{torch}_proj.weight", True)
            for ours, torch in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))]


DENSE_BLOCK = ffn_names("mlp")
MOE_BLOCK = [
    ("mlp/router/kernel", "mlp/router/router_weights/w/kernel", "mlp.gate_weight", True),
    ("mlp/wi_0", "mlp/expert/wi_0/kernel", "mlp.experts.wi_gate", False),  # [E, D, 2F] in both
    ("mlp/wi_1", "mlp/expert/wi_1/kernel", "mlp.experts.wi_up", False),
    ("mlp/wo", "mlp/expert/wo/kernel", "mlp.experts.wo", False),
    ("pre_extra_mlp_norm/scale", "pre_extra_mlp_layer_norm/scale",
     "pre_extra_mlp_layernorm.weight", False),
    *ffn_names("extra_mlp")]
OUTSIDE_BLOCKS = [
    ("token_embedder", "token_embedder/embedding", "model.embed_tokens.weight", False),
    ("decoder_norm/scale", "decoder/decoder_norm/scale", "model.norm.weight", False),
    ("logits_dense", "decoder/logits_dense/kernel", "lm_head.weight", True)]


def name_table(cfg) -> list[TensorName]:
    """Every parameter of a model with this config, under our, T5X's and HF's names."""
    def parse(ours: str) -> tuple:
        return tuple(int(part) if part.isdigit() else part for part in ours.split("/"))

    names = [TensorName(parse(o), t, h, tr) for o, t, h, tr in OUTSIDE_BLOCKS]
    for layer in range(cfg.num_layers):
        rows = EVERY_BLOCK + (MOE_BLOCK if cfg.is_moe_layer(layer) else DENSE_BLOCK)
        names += [TensorName(parse(f"layers/{layer}/{o}"), f"decoder/layers_{layer}/{t}",
                             f"model.layers.{layer}.{h}", tr) for o, t, h, tr in rows]
    return names


def stored_shape(shape: tuple, logical_axes: tuple) -> tuple:
    """A parameter's shape in both checkpoint formats: the double-gated pair axis folded into
    the hidden one ([.., D, 2, F] → [.., D, 2F]: a's columns, then b's, as 03 explains)."""
    if "pair" not in logical_axes:
        return tuple(shape)
    pair = logical_axes.index("pair")
    return (*shape[:pair], shape[pair] * shape[pair + 1], *shape[pair + 2:])


# --- Part 3: tensors into a model, each straight to its device (or its slices of a mesh) ----------
def read_tensors(path: str | os.PathLike) -> dict[str, tensor_files.Tensor]:
    """Every tensor of a checkpoint under its own names, values left on disk: a directory holding
    pytorch_model.bin, model.safetensors (or either's sharded `.index.json`) or a T5X
    `checkpoint`, or one file. (The readers are plumbing: support/tensor_files.py.)"""
    path = pathlib.Path(path)
    if path.is_file():
        return (tensor_files.read_safetensors(path) if path.suffix == ".safetensors"
                else tensor_files.read_torch_bin(path))
    if (path / "checkpoint").is_file():
        return tensor_files.read_t5x(path)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return read_tensors(path / single)
        if (path / f"{single}.index.json").is_file():
            return tensor_files.read_index(path / f"{single}.index.json", read_tensors)
    raise ValueError(f"{str(path)!r} holds no checkpoint: expected pytorch_model.bin, "
                     "pytorch_model.bin.index.json, model.safetensors or a T5X `checkpoint` file")


def match_names(flat: Mapping, cfg) -> dict[tuple, tuple[str, bool]]:
    """Our path → (the tensor's name in `flat`, whether it is stored transposed), in whichever
    naming `flat` uses: T5X's "/" paths or ColossalAI's HF names (torch: [out, in])."""
    t5x = any("/" in name for name in flat)
    names = {n.ours: (n.t5x, False) if t5x else (n.hf, n.transposed) for n in name_table(cfg)}
    expected = {name for name, _ in names.values()}
    missing, unexpected = sorted(expected - set(flat)), sorted(set(flat) - expected)
    problems = [f"{what} {len(some)} tensors, e.g. {some[:3]}"
                for what, some in (("missing", missing), ("no place for", unexpected)) if some]
    if problems:
        raise ValueError(f"{'T5X parameters' if t5x else 'HF state dict'}: {'; '.join(problems)} "
                         "(does config.json match the checkpoint? moe_layer_interval and "
                         "num_hidden_layers decide the names)")
    return names


def model_from_tensors(tensors: Mapping, cfg, *, param_dtype=jnp.float32, mesh=None) -> Any:
    """An OpenMoE from a checkpoint's tensors, `Tensor`s or arrays, under either naming (flax's
    nested tree or flat "/" paths, or HF names). Every name and shape is checked before any
    value is read; then each tensor is read in blocks, put in our layout and `param_dtype`, and
    sent to its device, or with a `mesh`, each device receives only its slice."""
    flat = traverse_util.flatten_dict(dict(tensors), sep="/")
    names = match_names(flat, cfg)
    run_groups = None  # 05's default; with a mesh, 07's all-to-all runner
    if mesh is not None:
        cfg, run_groups = shard.config_for_mesh(cfg, mesh), shard.expert_parallel_runner(mesh)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0), run_groups=run_groups)))
    variables = list(nnx.to_flat_state(state))
    for path, variable in variables:
        name, transposed = names[path]
        needed = stored_shape(variable.get_value().shape, variable.get_metadata()["logical_axes"])
        needed = needed[::-1] if transposed else needed
        if tuple(flat[name].shape) != needed:
            raise ValueError(f"tensor {name!r} has shape {tuple(flat[name].shape)}; a model with "
                             f"this config needs {needed}")
    shardings = {path: sharding.get_value() for path, sharding
                 in nnx.to_flat_state(shard.state_shardings(state, mesh))} if mesh else {}
    # Largest first: each host copy is freed before the next is read, so the copies still to
    # come shrink as the model fills up. Peak ≈ the model + a little.
    variables.sort(key=lambda item: -math.prod(item[1].get_value().shape))
    # The output projection and the routers compute in f32 (06, 04), so they stay f32: a bf16
    # copy would be converted on every step (for Base's [768, 256384] one, 0.25 s a token on CPU).
    leaves = []
    for path, variable in variables:
        dtype = jnp.float32 if path[0] == "logits_dense" or "router" in path else param_dtype
        host = tensor_files.host_array(flat[names[path][0]], names[path][1], dtype)
        host = host.reshape(variable.get_value().shape)
        leaves.append((path, variable.replace(tensor_files.on_device(host, shardings.get(path)))))
        del host
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def t5x_params(model) -> dict[str, np.ndarray]:
    """The model's parameters as a flat T5X dict: what `model_from_tensors` reads back."""
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {n.t5x: np.asarray(v.get_value()).reshape(
                stored_shape(v.get_value().shape, v.get_metadata()["logical_axes"]))
            for n in name_table(model.cfg) for v in [variables[n.ours]]}


# --- Part 4: whole models in (a directory, a hub name), the HF layout out -------------------------
def load_config(path: str | os.PathLike, *, preset: str | None = None,
                need_tokenizer: bool = False, **overrides) -> tuple[pathlib.Path, Any, Any]:
    """(directory, ModelConfig, tokenizer or None) of a checkpoint, its weights left unread.
    The config is config.json's (beside the weights or, for T5X's checkpoint_<step>/, in the
    parent) or `preset`'s; the tokenizer is spiece.model's, found the same way. `overrides`
    are ModelConfig fields. A hub name is downloaded here (weights and configs, never code)."""
    directory = tensor_files.local_or_download(path, released=HUB_MODELS)
    config_file, spiece = (next((d / name for d in (directory, directory.parent) if (d / name).is_file()),
                                None) for name in ("config.json", "spiece.model"))
    if preset is not None:
        if preset not in model_lib.PRESETS:
            raise ValueError(f"preset={preset!r}; choose one of {sorted(model_lib.PRESETS)}")
        cfg = dataclasses.replace(model_lib.PRESETS[preset], **{**T5X_SEMANTICS, **overrides})
    elif config_file is not None:
        cfg = config_from_hf(json.loads(config_file.read_text()), **overrides)
    else:
        raise ValueError(f"{directory} has no config.json (nor has its parent): pass --preset "
                         f"(one of {sorted(model_lib.PRESETS)}) to say which model it holds")
    if spiece is None and need_tokenizer:
        raise ValueError(f"{path} has no spiece.model beside its weights (or in its parent): "
                         "the hub models ship it; for a T5X checkpoint, copy it from the HF "
                         "model of the same size")
    tokenizer = tok.Tokenizer.load(spiece) if spiece else None
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{spiece} gives {tokenizer.vocab_size} ids but the model has "
                         f"vocab_size={cfg.vocab_size}: the tokenizer does not belong to it")
    return directory, cfg, tokenizer


def load_model(path: str | os.PathLike, *, param_dtype=jnp.float32, mesh=None,
               preset: str | None = None, need_tokenizer: bool = False, **overrides) -> tuple:
    """(model, tokenizer or None) from a checkpoint directory or a hub name (see `load_config`).
    With dtype=param_dtype=jnp.bfloat16 the 8B takes about 25 GB, not 47 (its output projection
    and routers stay f32)."""
    directory, cfg, tokenizer = load_config(path, preset=preset, need_tokenizer=need_tokenizer,
                                            **overrides)
    model = model_from_tensors(read_tensors(directory), cfg, param_dtype=param_dtype, mesh=mesh)
    return model, tokenizer


def export_hf(model, directory: str | os.PathLike, *, tokenizer=None,
              overwrite: bool = False) -> pathlib.Path:
    """Write `model` in the released HF layout, so ColossalAI's `modeling_openmoe.py` opens it:
    config.json, model.safetensors (ColossalAI's names, torch's [out, in]) and spiece.model."""
    tensor_files.refuse_to_replace(directory, overwrite)  # before any work
    params = t5x_params(model)
    config = {**hf_config(model.cfg), "torch_dtype": params["token_embedder/embedding"].dtype.name}
    tensors = {n.hf: params[n.t5x].T if n.transposed else params[n.t5x]
               for n in name_table(model.cfg)}
    spiece = pathlib.Path(tokenizer.path).read_bytes() if getattr(tokenizer, "path", None) else None
    return tensor_files.write_hf_checkpoint(directory, config, tensors, spiece, overwrite=overwrite)


# --- Part 5: checkpoints in training order: a 09 run's, or a series of released ones (for 11) -----
@dataclasses.dataclass(frozen=True)
class Run:
    """A 09_train.py run: its TrainConfig and the steps that have a checkpoint, oldest first."""
    path: pathlib.Path
    cfg: Any
    steps: tuple[int, ...]


def open_run(run_dir: str | os.PathLike) -> Run:
    """Read a 09 run's config.json and list its checkpoints; say what to do if it is not one."""
    path = pathlib.Path(run_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"run_dir={str(path)!r} has no config.json, so it is not a 09_train.py "
                         "run; train one with `python 09_train.py` (writes runs/laptop) or pass "
                         "--run-dir of an existing run")
    cfg, steps = train_lib.read_run_config(path / "config.json"), checkpoints.saved_steps(path)
    if not steps:
        raise ValueError(f"run_dir={str(path)!r} has no checkpoints yet; let 09_train.py reach "
                         f"its first checkpoint (step {cfg.checkpoint_every})")
    return Run(path, cfg, steps)


def load_params(run: Run, step: int):
    """The parameters saved at `step`, on one device; step 0 is 09's initialization (same seed).
    Only the parameters are read (orbax's partial restore): the optimizer state stays on disk."""
    model_cfg = train_lib.model_config(run.cfg)
    if step == 0:
        return nnx.state(model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(run.cfg.seed)), nnx.Param)
    if step not in run.steps:
        raise ValueError(f"step={step}: {run.path} has checkpoints at steps {list(run.steps)} "
                         "(and 0, the initialization)")
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.state(abstract, nnx.Param))
    return checkpoints.restore_params(run.path, step, like)


def run_model(run: Run, step: int | None = None, **overrides):
    """A 09 run's model at `step` (default: its latest checkpoint), with the run's config and
    `overrides` of ModelConfig fields that leave the parameters as they are (routing, dtype)."""
    cfg = dataclasses.replace(train_lib.model_config(run.cfg), **overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, load_params(run, run.steps[-1] if step is None else step))


@dataclasses.dataclass(frozen=True)
class Series:
    """Released checkpoints of one model in training order (e.g. OpenMoE-8B at 200B … 1T
    tokens): where each is, and the config and tokenizer they share. Weights are not read."""
    names: tuple[str, ...]                 # as given: hub names or directories
    directories: tuple[pathlib.Path, ...]  # where each one's files are (hub names downloaded)
    cfg: Any                               # 06's ModelConfig, the same for every checkpoint
    tokenizer: Any                         # the tokenizer they were trained with


def open_series(names, *, dtype=jnp.float32) -> Series:
    """A `Series` of released checkpoints (hub names or directories), oldest first, with T5X's
    evaluation semantics in `dtype`. Hub names are downloaded and every config and tokenizer is
    read now, so a missing one fails before hours of work; configs that differ are refused."""
    names = tuple(map(str, names))
    if not names:
        raise ValueError("a series needs at least one checkpoint (a hub name or a directory)")
    directories, configs, tokenizers = zip(*(load_config(name, need_tokenizer=True, dtype=dtype)
                                             for name in names))
    for name, cfg in zip(names, configs):
        changed = [f.name for f in dataclasses.fields(cfg)
                   if getattr(cfg, f.name) != getattr(configs[-1], f.name)]
        if changed:
            raise ValueError(f"{name} and {names[-1]} differ in {changed}: a series must be "
                             "checkpoints of one model")
    return Series(names, directories, configs[-1], tokenizers[-1])


def series_params(series: Series, index: int) -> nnx.State:
    """Checkpoint `index`'s parameters (nnx.Param state), in the series' dtype."""
    return nnx.state(model_from_tensors(read_tensors(series.directories[index]), series.cfg,
                                        param_dtype=series.cfg.dtype), nnx.Param)


# --- Part 6: talk to it, watch it route, measure it -----------------------------------------------
def prompt_ids(tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """T5X's decoder starts from id 0, so every prompt gets it first (OpenMoE issue #3)."""
    return [0] + tokenizer.encode(CHAT_TEMPLATE.format(query=text) if chat else text)


def piece(tokenizer, token: int) -> str:
    """A token as its SentencePiece piece, e.g. '▁the', '<0x0A>' (newline), '<extra_id_0>';
    id 0 shows as '<pad>', which is also T5X's start token."""
    return (tokenizer.processor.id_to_piece(int(token)) if token < tokenizer.piece_count
            else tokenizer.decode([token]))


def expert_table(tokenizer, routing: "model_lib.Routing", moe_layers: list[int]) -> list[str]:
    """One line per token of `routing`: its experts in each MoE layer, best first, ✗ if full."""
    lines = [f"{'token':>18} │ " + " │ ".join(f"layer {layer:<6}" for layer in moe_layers)]
    for position, token in enumerate(routing.tokens_BL[0]):
        cells = [" ".join(f"e{e}{'' if kept else '✗'}".ljust(4)
                          for e, kept in zip(expert_BLA[0, position], kept_BLA[0, position]))
                 for expert_BLA, kept_BLA in zip(routing.expert_BLA, routing.kept_BLA)]
        lines.append(f"{piece(tokenizer, token)[:18]:>18} │ "
                     + " │ ".join(cell.ljust(12) for cell in cells))
    return lines


def perplexity(model, tokenizer, *, rows: int = 16, seq_len: int | None = None) -> dict[str, dict]:
    """Next-token loss and accuracy per domain of 01's validation split: a sanity number for a
    loaded model (a trained one sits far below ln V, the uniform guess). Each row is one of the
    first `rows` documents as T5X scores it: inputs [0, t1 … t_{L-1}], targets [t1 … t_L], cut
    at `seq_len` (default min(512, max_seq_len)) and right-padded with 0, which T5X's padding
    masks and the loss leave out. (09's evaluation packs documents into full rows instead.)"""
    limit = model.cfg.max_seq_len
    seq_len = min(512, limit) if seq_len is None else seq_len
    if not 1 <= seq_len <= limit or rows < 1:
        raise ValueError(f"rows={rows} must be >= 1 and seq_len={seq_len} in [1, {limit}], "
                         "the model's max_seq_len")
    evaluate = jax.jit(lambda model, batch: model_lib.loss_fn(model, batch, train=False)[1])
    results = {}
    for domain, dataset in tok.embedded_corpus("validation").items():
        tokens_BL = np.zeros((rows, seq_len + 1), np.int32)  # L + 1: inputs and targets
        for row, ids in enumerate(tokenizer.encode_batch(dataset["text"][:rows])):
            tokens_BL[row, 1:len(ids[:seq_len]) + 1] = ids[:seq_len]
        metrics = evaluate(model, {"inputs": tokens_BL[:, :-1], "targets": tokens_BL[:, 1:],
                                   "loss_mask": (tokens_BL[:, 1:] > 0).astype(np.float32)})
        results[domain] = {"loss": float(metrics["cross_entropy"]),
                           "accuracy": float(metrics["accuracy"]),
                           "tokens": int(metrics["num_tokens"]), "seq_len": seq_len}
    return results


# --- The command line -----------------------------------------------------------------------------
# How a loaded model routes (--capacity-rule): as T5X ran the weights, or as ColossalAI's port ran
# them for the paper's drop analysis (§4.4): the whole batch one group, capacity floor(k·cf·T/E).
CAPACITY_RULES = {"t5x": {}, "colossalai": {"group_rule": "divisor", "max_group_size": 2**30,
                                            "capacity_rule": "colossalai"}}


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Load the released OpenMoE models (HF .bin, "
                                "safetensors or T5X; no torch). Without a command: the self-test.")
    commands = parser.add_subparsers(dest="command", title="commands")
    generate = commands.add_parser("generate", help="continue a prompt (and show the routing)")
    score = commands.add_parser("perplexity", help="loss and accuracy on 01's validation split")
    export = commands.add_parser("export", help="write a 09 run in the released HF layout")
    step = ("--step", cli.integer, None, "with --run-dir: the checkpoint (default: the latest; "
            "0: the initialization)")
    loading = [
        ("--preset", str, None, "the model's shape, for T5X directories without config.json",
         {"choices": sorted(model_lib.PRESETS)}),
        ("--dtype", str, "float32", "parameters and activations (router and logits stay f32)",
         {"choices": ["float32", "bfloat16"]}),
        ("--mesh", str, "", "07's mesh, e.g. 'data=1,expert=2,model=4', as 09's --mesh: the axes' "
         "product is the device count ('': one device, no mesh)"),
        ("--capacity-rule", str, "t5x", "t5x: as the weights were trained (flaxformer's groups); "
         "colossalai: as the paper's drop analysis ran them (one group)",
         {"choices": sorted(CAPACITY_RULES)}),
        ("--capacity-factor", cli.finite, None, "eval capacity factor (default: the model's, 2.0)"),
        ("--dropless", cli.boolean, False, "true: experts serve every assignment (default: false)"),
        step]
    for loads in (generate, score):
        cli.add_flags(loads.add_mutually_exclusive_group(required=True), [
            ("--model", str, None, "a checkpoint directory (HF .bin or safetensors, or T5X) or a "
             "hub name, e.g. OrionZheng/openmoe-base"),
            ("--run-dir", str, None, "a 09_train.py run directory instead")])
        cli.add_flags(loads, loading)
    cli.add_flags(generate, [
        ("--prompt", str, None, "the text to continue", {"required": True}),
        ("--chat", bool, False, "use the chat template (automatic for *chat* models)"),
        ("--max-new-tokens", cli.integer, 32, "new tokens at most (fewer if the text ends)"),
        ("--temperature", cli.finite, 0.0, "sampling temperature (default: %(default)s, greedy)"),
        ("--top-p", cli.finite, 1.0, "nucleus sampling: the likeliest tokens holding this mass"),
        ("--seed", cli.integer, 0, "the sampling seed"),
        ("--show-experts", bool, False, "show each token's experts and drops, routed in one pass")])
    cli.add_flags(score, [
        ("--rows", cli.at_least_one, 16, "documents scored per domain, one per row"),
        ("--seq-len", cli.at_least_one, None, "tokens per row (default: min(512, max_seq_len))")])
    cli.add_flags(export, [step, ("--run-dir", str, "runs/laptop", "the 09_train.py run directory"),
                           ("--out", str, None, "output directory (default: RUN_DIR/hf)"),
                           ("--overwrite", bool, False, "replace an earlier export in --out")])
    return parser.parse_args(argv)


def run_command(args) -> None:
    """`export` writes a 09 run in the HF layout; `generate` and `perplexity` load the model
    --model (a directory or hub name) or --run-dir names."""
    if args.command == "export":
        run = open_run(args.run_dir)
        out = pathlib.Path(args.out or run.path / "hf")
        tensor_files.refuse_to_replace(out, args.overwrite)  # before the model is read
        export_hf(run_model(run, args.step), out, tokenizer=train_lib.load_tokenizer(run.cfg),
                  overwrite=args.overwrite)
        print(f"wrote {out}/config.json, model.safetensors and spiece.model (step "
              f"{run.steps[-1] if args.step is None else args.step} of {run.path})")
        return
    factor = {} if args.capacity_factor is None else {"eval_capacity_factor": args.capacity_factor}
    overrides = {**CAPACITY_RULES[args.capacity_rule], **factor, "dtype": jnp.dtype(args.dtype),
                 "dropless": args.dropless}
    if args.run_dir:
        if args.mesh or args.preset:
            raise ValueError("--mesh and --preset apply to a --model; a --run-dir's model has "
                             "its run's shape and loads on one device")
        run = open_run(args.run_dir)
        model, tokenizer = run_model(run, args.step, **overrides), train_lib.load_tokenizer(run.cfg)
    elif args.step is not None:
        raise ValueError("--step picks a checkpoint of a --run-dir; a --model has one checkpoint")
    else:
        mesh = shard.mesh_from_text(args.mesh) if args.mesh else None
        model, tokenizer = load_model(args.model, param_dtype=jnp.dtype(args.dtype), mesh=mesh,
                                      preset=args.preset, need_tokenizer=True, **overrides)
    if args.command == "perplexity":
        results = perplexity(model, tokenizer, rows=args.rows, seq_len=args.seq_len)
        print(f"Scored: the first {args.rows} validation documents per domain, one per row, "
              f"truncated to {next(iter(results.values()))['seq_len']} tokens, "
              "right-padded; 09's evaluation packs documents into full rows, so its numbers "
              f"differ.\n{'domain':8}{'loss':>8}{'accuracy':>10}{'tokens':>9}   (uniform guess: "
              f"ln V = {math.log(model.cfg.vocab_size):.2f})")
        print("\n".join(f"{domain:8}{r['loss']:8.3f}{r['accuracy']:10.1%}{r['tokens']:9d}"
                        for domain, r in results.items()))
        return
    prompt = prompt_ids(tokenizer, args.prompt, chat=args.chat or "chat" in str(args.model).lower())
    (continuation,) = model_lib.generate(model, [prompt], max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p,
                                         seed=args.seed)
    print(tokenizer.decode(prompt[1:] + continuation))
    if args.show_experts:
        print(f"\nWhere each token went (✗: the expert was full, so it gave this token nothing; "
              f"capacity rule {args.capacity_rule}, capacity factor "
              f"{model.cfg.eval_capacity_factor}), the whole text routed in one pass as in training"
              " and the paper's analysis, so late tokens can be dropped. Decoding drops none of "
              "the tokens it adds: it routes each alone, a group of one token.")
        print("\n".join(expert_table(tokenizer, model_lib.routed_text(model, prompt + continuation),
                                     model.cfg.moe_layers)))


def main(argv=None) -> None:
    """The self-test without a command, else the command; a user's mistake is one line."""
    args = parse_args(argv)
    with cli.user_errors():
        if args.command is None:
            self_test()
        else:
            run_command(args)


def self_test() -> None:
    """A tiny model: its name table; exported and reloaded exactly; decoded, with its routing.
    The verdict is a `sys.exit`, not an `assert`, so that it holds under `python -O` too."""
    tokenizer = tok.embedded_tokenizer()
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size,
                              max_seq_len=64)
    print(f"Tiny OpenMoE: {cfg.num_layers} layers, MoE in {cfg.moe_layers}, E={cfg.num_experts}. "
          f"Names of layer {cfg.moe_layers[0]}'s tensors and the model's own (ᵀ: torch stores "
          "[out, in]; T5X's and HF's expert wi_0 is [E, D, 2F], ours [E, D, 2, F]):")
    rows = [("/".join(map(str, n.ours)), n.t5x, n.hf + ("  (ᵀ)" if n.transposed else ""))
            for n in name_table(cfg) if len(n.ours) == 1 or n.ours[1] == cfg.moe_layers[0]]
    width = [max(len(row[column]) for row in rows) for column in (0, 1)]
    print("\n".join(f"  {ours:{width[0]}}  {t5x:{width[1]}}  {hf}" for ours, t5x, hf in rows))
    model = model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as directory:
        export_hf(model, directory, tokenizer=tokenizer)
        loaded, loaded_tokenizer = load_model(directory)
    same = all(np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param))
                                                      for m in (model, loaded))))
    prompt = prompt_ids(loaded_tokenizer, "The experts of a mixture")
    (continuation,) = model_lib.generate(loaded, [prompt], max_new_tokens=4)
    routed = model_lib.routed_text(loaded, prompt + continuation)
    print(f"\nExported to HF safetensors and loaded back: parameters {'identical' if same else 'DIFFERENT'}."
          f" Greedy (random weights): {loaded_tokenizer.decode(continuation)!r}. Each token's experts, one pass:")
    print("\n".join(expert_table(loaded_tokenizer, routed, cfg.moe_layers)))
    for ok, failure in ((same, "exported and reloaded parameters differ"),
                        (loaded.cfg.t5x_padding and loaded.cfg.group_rule == "flaxformer",
                         "a loaded model must use T5X's evaluation semantics"),
                        ([e.shape for e in routed.expert_BLA] == [(1, len(prompt)
                          + len(continuation), cfg.top_k)] * len(cfg.moe_layers),
                         "the routing must cover the prompt and every generated token")):
        if not ok:
            sys.exit(f"self-test FAILED: {failure}")
    print("\nOK: names, export, reload and decoding agree.")


if __name__ == "__main__":
    main()
