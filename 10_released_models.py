"""Chapter 10: the released OpenMoE models, loaded into this code, run, and watched while they route.

OpenMoE's weights are public (arXiv 2402.01739 §1; the OpenMoE README): OpenMoE-Base, the 8B
(with checkpoints at 200B … 1T tokens), the 8B-Chat and the 34B, on the Hugging Face hub as
`OrionZheng/openmoe-*` in ColossalAI's PyTorch layout, and as T5X checkpoints. Both hold the same
tensors under two naming schemes, so the chapter's core is a *name table*: which of 06's
parameters each stored tensor becomes, and how (torch stores a linear weight [out, in], so it is
transposed; both store the double-gated wi_0 as [D, 2F], which we view as [D, 2, F], as in 03).
No torch is needed: a `.bin` is a zip of raw storages plus a pickle that names them, unpickled
here with only the three globals a state dict needs; T5X's arrays are zarr files (tensorstore).
Each tensor is read a block of rows at a time and goes straight to its device, or with a mesh
(07) each device receives only its slice, so a 34B loads across a pod with little host memory.
The weights were trained in T5X, so a loaded model runs T5X's evaluation semantics (04, 06):
padding masks, flaxformer's routing groups, and id 0 (T5's start token) before every prompt.
Public API: `config_from_hf`, `hf_config`, `name_table`, `read_checkpoint`, `model_from_tensors`,
`t5x_params`, `load_config`, `load_model`, `export_hf`; `open_run`, `load_params`, `run_model`
for 09's runs. Left out: training the loaded models (09 does that).
Run: `python 10_released_models.py` (self-test), `... generate --model OrionZheng/openmoe-base
--prompt "..." --show-experts`, `... perplexity --model DIR`, `... export --run runs/laptop`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import json
import math
import os
import pathlib
import pickle
import struct
import sys
import tempfile
import zipfile
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

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
    "OrionZheng/openmoe-34b-200B": "OpenMoE-34B/32E, 200B tokens: 12 fp16 shards, ~92 GB",
}
# The chat model's prompt, as the OpenMoE README writes it.
CHAT_TEMPLATE = ("<<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n"
                 "<s>[INST] {query} [/INST]")


# ------------------------------------------------------------------------------------------------
# Part 1: config.json ↔ ModelConfig
# ------------------------------------------------------------------------------------------------

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
# How T5X evaluated the released weights (06's padding masks, 04's flaxformer groups).
T5X_SEMANTICS = {"t5x_padding": True, "group_rule": "flaxformer"}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> Any:
    """06's ModelConfig for a released config.json, with T5X's evaluation semantics on.

    What config.json leaves out (the 34B's routing groups of 8192 tokens, set in T5X's gin) comes
    from the 06 preset of the same shapes; `overrides` are ModelConfig fields (dtype, ...).
    """
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
        raise ValueError(f"only the released architecture has an HF layout (MoE layers, "
                         f"double-gated FFN, sequential wiring); got moe_interval="
                         f"{cfg.moe_interval}, ffn_variant={cfg.ffn_variant!r}, "
                         f"moe_wiring={cfg.moe_wiring!r}")
    return {"architectures": ["OpenMoeForCausalLM"], "model_type": "llama",
            "auto_map": {"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"},
            **HF_FIXED, **{key: getattr(cfg, field) for key, field in HF_FIELDS.items()},
            "num_key_value_heads": cfg.num_heads, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 0, "router_drop_tks": True, "dropout_rate": 0.0,
            "torch_dtype": "float32", "use_cache": True}


# ------------------------------------------------------------------------------------------------
# Part 2: the name table
# ------------------------------------------------------------------------------------------------

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
    *ffn_names("extra_mlp"),
]
OUTSIDE_BLOCKS = [
    ("token_embedder", "token_embedder/embedding", "model.embed_tokens.weight", False),
    ("decoder_norm/scale", "decoder/decoder_norm/scale", "model.norm.weight", False),
    ("logits_dense", "decoder/logits_dense/kernel", "lm_head.weight", True),
]


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


# ------------------------------------------------------------------------------------------------
# Part 3: reading the three formats without torch, a tensor's rows at a time
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor still on disk: its shape and dtype now, its values when asked, by rows [start,
    stop) of its first axis (how the loader reads) or whole, through `np.asarray(tensor)`."""

    shape: tuple
    dtype: np.dtype
    rows: Callable[[int, int], np.ndarray]
    whole: Callable[[], np.ndarray] | None = None  # where reading it all has a shortcut (a map)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.whole() if self.whole else self.rows(0, self.shape[0]), dtype)


def in_file(path: pathlib.Path, offset: int, shape, dtype) -> Tensor:
    """A C-ordered tensor at `offset` in a file: rows by plain reads (a memory map's pages of a
    3 GB file would stay counted against the process), whole through a memory map."""
    shape, dtype = tuple(shape), np.dtype(dtype)

    def rows(start: int, stop: int) -> np.ndarray:
        block = np.empty((stop - start, *shape[1:]), dtype)
        with open(path, "rb") as file:
            file.seek(offset + start * block[0].nbytes)
            if file.readinto(block.view(np.uint8).reshape(-1)) != block.nbytes:
                raise ValueError(f"{path} ends inside a tensor: the file is truncated")
        return block
    return Tensor(shape, dtype, rows, lambda: (np.memmap(path, dtype, "r", offset, shape)
                                               if math.prod(shape) else np.zeros(shape, dtype)))


class _Storage(NamedTuple):
    path: pathlib.Path
    record: str     # its zip member, e.g. "archive/data/0"
    offset: int     # where its bytes start in the file
    dtype: Any
    numel: int


def _rebuild_tensor(storage: _Storage, storage_offset, size, stride, *_) -> Tensor:
    """Our stand-in for torch._utils._rebuild_tensor_v2: a strided view of a storage.

    Its numbers come from the file, so every element it can reach, offset + Σ (size_i − 1) ·
    stride_i, must lie inside the storage (else a read of other data, or a crash past the end).
    """
    size, stride = tuple(map(int, size)), tuple(map(int, stride))
    reach = storage_offset + sum((n - 1) * step for n, step in zip(size, stride))
    if (len(size) != len(stride) or storage_offset < 0 or min(stride, default=0) < 0
            or (0 not in size and reach >= storage.numel)):
        raise ValueError(f"{storage.path}: a tensor viewing {storage.record} (offset "
                         f"{storage_offset}, size {size}, stride {stride}) reaches past its "
                         f"{storage.numel} elements: the file is damaged")
    itemsize = np.dtype(storage.dtype).itemsize
    if stride == tuple(math.prod(size[i + 1:]) for i in range(len(size))):  # C order
        return in_file(storage.path, storage.offset + storage_offset * itemsize, size, storage.dtype)

    def view() -> np.ndarray:
        flat = np.memmap(storage.path, storage.dtype, "r", storage.offset, (storage.numel,))
        return np.lib.stride_tricks.as_strided(flat[storage_offset:], size,
                                               tuple(s * itemsize for s in stride), writeable=False)
    return Tensor(size, np.dtype(storage.dtype), lambda start, stop: view()[start:stop], view)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict and nothing else: any other global is refused, unrun."""

    ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch", "FloatStorage"): np.float32, ("torch", "HalfStorage"): np.float16,
               ("torch", "BFloat16Storage"): jnp.bfloat16}

    def __init__(self, file, path: pathlib.Path, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.path, self.archive, self.prefix = path, archive, prefix

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"{self.path}: its pickle asks for {module}.{name}, which a state "
                             f"dict never needs; refusing to load it (allowed: "
                             f"{sorted(f'{m}.{n}' for m, n in self.ALLOWED)})")
        return self.ALLOWED[(module, name)]

    def persistent_load(self, pid):
        # torch writes ('storage', storage type, key, device, number of elements).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"{self.path}: unexpected persistent id {pid!r} in its pickle")
        _, dtype, key, _, numel = pid
        record = f"{self.prefix}data/{key}"
        info = self.archive.getinfo(record)
        if info.compress_type != zipfile.ZIP_STORED or numel * np.dtype(dtype).itemsize > info.file_size:
            raise ValueError(f"{self.path}: storage {record} is compressed or holds fewer than "
                             f"its {numel} elements: the file is damaged")
        # Its bytes start after the record's local header: 30 bytes, its name, an extra field.
        with open(self.path, "rb") as file:
            file.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
        offset = info.header_offset + 30 + name_length + extra_length
        return _Storage(self.path, record, offset, dtype, numel)


def read_torch_bin(path: pathlib.Path) -> dict[str, Tensor]:
    """A `pytorch_model*.bin`: torch's zip of a pickle (data.pkl) and one raw file per storage."""
    if not zipfile.is_zipfile(path):  # say what it is instead, from its first bytes
        with open(path, "rb") as file:
            start = file.read(2)
        if start == b"PK":
            raise ValueError(f"{path} is a damaged zip (an interrupted download?): its directory "
                             "of contents is missing; download it again")
        if start[:1] == b"\x80":
            raise ValueError(f"{path} is in torch's legacy (pre-1.6) format, which cannot be read "
                             "without running its pickle; re-save it with a current torch")
        raise ValueError(f"{path} is not a torch checkpoint (neither a zip nor a pickle)")
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip but not a torch checkpoint (no single data.pkl)")
        with archive.open(pickles[0]) as file:
            state = _StateDictUnpickler(file, path, archive, pickles[0][:-len("data.pkl")]).load()
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


def read_safetensors(path: pathlib.Path) -> dict[str, Tensor]:
    """A `.safetensors` file: 8 bytes of header length, a JSON header, then the raw tensors."""
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    header.pop("__metadata__", None)
    data_bytes = path.stat().st_size - 8 - header_length
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; parameters "
                             f"are one of {sorted(SAFETENSORS_DTYPES)}")
        dtype, shape = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"])
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_bytes or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} (shape {shape}, bytes {start}..{end}) does "
                             f"not fit its {data_bytes} bytes of data: the file is damaged")
        tensors[name] = in_file(path, 8 + header_length + start, shape, dtype)
    return tensors


def write_safetensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
    """The layout `read_safetensors` reads, tagged "pt" as transformers expects."""
    names = {np.dtype(dtype): name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in tensors.values():
            file.write(np.ascontiguousarray(array).tobytes())


def read_t5x(directory: pathlib.Path) -> dict[str, Tensor]:
    """A T5X `checkpoint_<step>/`: a msgpack of the train state {"optimizer": {"target": ...}} whose
    parameters are tensorstore specs of zarr arrays beside it (small ones may be inline arrays)."""
    import tensorstore as ts
    from flax import serialization

    state = serialization.msgpack_restore((directory / "checkpoint").read_bytes())
    state = state.get("optimizer", state)
    if "target" not in state:
        raise ValueError(f"{directory / 'checkpoint'} has no parameters ('target'): not a T5X "
                         "train-state checkpoint")
    leaves = traverse_util.flatten_dict(state["target"], sep="/",
                                        is_leaf=lambda _, v: isinstance(v, dict) and "kvstore" in v)
    tensors = {}
    for path, leaf in leaves.items():
        if not isinstance(leaf, dict):  # stored inline in the msgpack
            tensors[path] = np.asarray(leaf)
            continue
        # Written on GCS or locally, the kvstore path is relative to the checkpoint directory.
        spec = {**leaf, "kvstore": {"driver": "file", "path": str(directory / leaf["kvstore"]["path"])}}
        tensors[path] = Tensor(tuple(leaf["metadata"]["shape"]), jnp.dtype(leaf["dtype"]),
                               lambda start, stop, s=spec:
                               ts.open(s).result()[start:stop].read().result())
    return tensors


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a checkpoint under its own names: a directory holding pytorch_model.bin,
    model.safetensors (or either's sharded `.index.json`) or a T5X `checkpoint`, or one file."""
    path = pathlib.Path(path)
    if path.is_file():
        return read_safetensors(path) if path.suffix == ".safetensors" else read_torch_bin(path)
    if (path / "checkpoint").is_file():
        return read_t5x(path)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return read_checkpoint(path / single)
        index = path / f"{single}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = {file: read_checkpoint(path / file) for file in set(weight_map.values())}
            absent = [name for name, file in weight_map.items() if name not in shards[file]]
            if absent:
                raise ValueError(f"{index} maps {absent[:3]} to shards that lack them")
            return {name: shards[file][name] for name, file in weight_map.items()}
    raise ValueError(f"{str(path)!r} holds no checkpoint: expected pytorch_model.bin, "
                     "pytorch_model.bin.index.json, model.safetensors or a T5X `checkpoint` file")


# ------------------------------------------------------------------------------------------------
# Part 4: tensors into a model, each straight to its device (or its slices of a mesh)
# ------------------------------------------------------------------------------------------------

BLOCK_BYTES = 64 * 2**20  # how much of a tensor is read at a time


def host_array(tensor, transposed: bool, dtype) -> np.ndarray:
    """A tensor (or an array) in our orientation and `dtype`, in one new 64-byte-aligned array
    (the CPU device then uses it without a copy), filled a block of rows at a time: besides the
    result, at most one block of the file is ever in memory."""
    rows = tensor.rows if isinstance(tensor, Tensor) else lambda start, stop: tensor[start:stop]
    shape = tensor.shape[::-1] if transposed else tensor.shape
    size = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + size].view(dtype).reshape(shape)
    row_bytes = math.prod(tensor.shape[1:]) * np.dtype(tensor.dtype).itemsize
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for first in range(0, tensor.shape[0], step):
        block = np.asarray(rows(first, min(tensor.shape[0], first + step)))
        if transposed:
            out[..., first:first + len(block)] = block.T
        else:
            out[first:first + len(block)] = block
    return out


def match_names(flat: Mapping, cfg) -> dict[tuple, tuple[str, bool]]:
    """Our path → (the tensor's name in `flat`, whether it is stored transposed), in whichever
    naming `flat` uses: T5X's "/" paths or ColossalAI's HF names (torch: [out, in]). Names
    missing or left over are an error that lists a few of each."""
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
    shardings = dict(nnx.to_flat_state(shard.state_shardings(state, mesh))) if mesh else {}
    # Largest first: each host copy is freed before the next is read, so the copies still to
    # come shrink as the model fills up. Peak ≈ the model + a little.
    variables.sort(key=lambda item: -math.prod(item[1].get_value().shape))
    leaves = []
    for path, variable in variables:
        name, transposed = names[path]
        host = host_array(flat[name], transposed, param_dtype).reshape(variable.get_value().shape)
        if mesh is not None:  # each device receives only its own slice of the tensor
            value = jax.make_array_from_callback(host.shape, shardings[path].get_value(),
                                                 lambda index, host=host: host[index])
        elif host.dtype in (np.float32, np.float16) and jax.default_backend() == "cpu":
            value = jnp.from_dlpack(host)  # shares the aligned buffer: no copy
        else:
            value = jnp.asarray(host)
        del host
        leaves.append((path, variable.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def t5x_params(model) -> dict[str, np.ndarray]:
    """The model's parameters as a flat T5X dict: what `model_from_tensors` reads back."""
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    params = {}
    for n in name_table(model.cfg):
        value = np.asarray(variables[n.ours].get_value())
        params[n.t5x] = value.reshape(stored_shape(value.shape,
                                                   variables[n.ours].get_metadata()["logical_axes"]))
    return params


# ------------------------------------------------------------------------------------------------
# Part 5: whole models in (a directory, a hub name, a 09 run), the HF layout out
# ------------------------------------------------------------------------------------------------

def _local(path_or_name: str | os.PathLike) -> pathlib.Path:
    """A local path as it is; a hub name ("owner/model") downloaded once, weights and configs
    only (never the repository's Python code). Only here is the network used, when asked."""
    path = pathlib.Path(path_or_name)
    if path.exists():
        return path
    name = str(path_or_name)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ValueError(f"model {name!r} is neither an existing path nor a hub name like "
                         f"'OrionZheng/openmoe-base' (released: {', '.join(HUB_MODELS)})")
    from huggingface_hub import snapshot_download
    return pathlib.Path(snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.safetensors",
                                                                "*.model"]))


def load_config(path: str | os.PathLike, *, preset: str | None = None,
                **overrides) -> tuple[pathlib.Path, Any, Any]:
    """(directory, ModelConfig, tokenizer or None) of a checkpoint, its weights left unread.

    The config is config.json's (beside the weights or, for T5X's checkpoint_<step>/, in the parent)
    or `preset`'s; the tokenizer is spiece.model's, found the same way. `overrides` are
    ModelConfig fields. A hub name is downloaded here.
    """
    directory = _local(path)

    def beside(filename: str) -> pathlib.Path | None:
        return next((d / filename for d in (directory, directory.parent)
                     if (d / filename).is_file()), None)

    config_file, spiece = beside("config.json"), beside("spiece.model")
    if preset is not None:
        if preset not in model_lib.PRESETS:
            raise ValueError(f"preset={preset!r}; choose one of {sorted(model_lib.PRESETS)}")
        cfg = dataclasses.replace(model_lib.PRESETS[preset], **{**T5X_SEMANTICS, **overrides})
    elif config_file is not None:
        cfg = config_from_hf(json.loads(config_file.read_text()), **overrides)
    else:
        raise ValueError(f"{directory} has no config.json (nor has its parent): pass preset= "
                         f"(one of {sorted(model_lib.PRESETS)}) to say which model it holds")
    tokenizer = tok.Tokenizer.load(spiece) if spiece else None
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{spiece} gives {tokenizer.vocab_size} ids but the model has "
                         f"vocab_size={cfg.vocab_size}: the tokenizer does not belong to it")
    return directory, cfg, tokenizer


def load_model(path: str | os.PathLike, *, param_dtype=jnp.float32, mesh=None,
               preset: str | None = None, **overrides) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a checkpoint directory or a hub name (see `load_config`).
    With dtype=param_dtype=jnp.bfloat16 the 8B takes 24 GB, not 47."""
    directory, cfg, tokenizer = load_config(path, preset=preset, **overrides)
    model = model_from_tensors(read_checkpoint(directory), cfg, param_dtype=param_dtype, mesh=mesh)
    return model, tokenizer


def export_hf(model, directory: str | os.PathLike, *, tokenizer=None) -> pathlib.Path:
    """Write `model` in the released HF layout, so ColossalAI's `modeling_openmoe.py` opens it:
    config.json, model.safetensors (ColossalAI's names, torch's [out, in]) and spiece.model.
    Refuses to replace an existing export."""
    directory = pathlib.Path(directory)
    existing = [name for name in ("config.json", "model.safetensors", "spiece.model")
                if (directory / name).exists()]
    if existing:
        raise ValueError(f"{directory} already holds {existing}; choose an empty directory")
    config = hf_config(model.cfg)
    params = t5x_params(model)
    tensors = {n.hf: params[n.t5x].T if n.transposed else params[n.t5x]
               for n in name_table(model.cfg)}
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    config["torch_dtype"] = params["token_embedder/embedding"].dtype.name
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None and tokenizer.path:
        (directory / "spiece.model").write_bytes(pathlib.Path(tokenizer.path).read_bytes())
    return directory


@dataclasses.dataclass(frozen=True)
class Run:
    """A 09_train.py run: its TrainConfig and the steps that have a checkpoint, oldest first."""

    path: pathlib.Path
    cfg: Any
    steps: tuple[int, ...]


def _run_checkpoints(run_dir: pathlib.Path):
    """Orbax's view of run_dir/checkpoints, read-only: loading a run never changes it."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(run_dir.absolute() / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def open_run(run_dir: str | os.PathLike) -> Run:
    """Read a 09 run's config.json and list its checkpoints; say what to do if it is not one."""
    path = pathlib.Path(run_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"run_dir={str(path)!r} has no config.json, so it is not a 09_train.py "
                         "run; train one with `python 09_train.py` (writes runs/laptop) or pass "
                         "--run-dir of an existing run")
    cfg = train_lib.read_run_config(path / "config.json")
    steps = ()
    if (path / "checkpoints").is_dir():
        with _run_checkpoints(path) as manager:
            steps = tuple(sorted(manager.all_steps()))
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
    import orbax.checkpoint as ocp
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_cfg, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(nnx.state(abstract, nnx.Param))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device) for x in leaves]}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    with _run_checkpoints(run.path) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    return jax.tree.unflatten(treedef, restored["state"]["params"])


def run_model(run: Run, step: int | None = None, **overrides):
    """A 09 run's model at `step` (default: its latest checkpoint), with the run's config and
    `overrides` of ModelConfig fields that leave the parameters as they are (routing, dtype)."""
    step = run.steps[-1] if step is None else step
    cfg = dataclasses.replace(train_lib.model_config(run.cfg), **overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, load_params(run, step))


# ------------------------------------------------------------------------------------------------
# Part 6: talk to it, watch it route, measure it
# ------------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """T5X's decoder starts from id 0, so every prompt gets it first (OpenMoE issue #3)."""
    return [0] + tokenizer.encode(CHAT_TEMPLATE.format(query=text) if chat else text)


def piece(tokenizer, token: int) -> str:
    """A token as its SentencePiece piece, e.g. '▁the', '<0x0A>' (newline), '<extra_id_0>';
    id 0 shows as '<pad>', which is also T5X's start token."""
    if token < tokenizer.piece_count:
        return tokenizer.processor.id_to_piece(int(token))
    return tokenizer.decode([token])


def expert_table(tokenizer, steps: list, moe_layers: list[int]) -> list[str]:
    """One line per token fed to the model (the prompt, then each generated token): the experts
    each MoE layer sent it to, best first, with ✗ where that expert was already full."""
    lines = [f"{'token':>18} │ " + " │ ".join(f"layer {layer:<6}" for layer in moe_layers)]
    for step in steps:
        for position, token in enumerate(step.tokens_BL[0]):
            cells = [" ".join(f"e{e}{'' if kept else '✗'}".ljust(4)
                              for e, kept in zip(expert_BLA[0, position], kept_BLA[0, position]))
                     for expert_BLA, kept_BLA in zip(step.expert_BLA, step.kept_BLA)]
            lines.append(f"{piece(tokenizer, token)[:18]:>18} │ "
                         + " │ ".join(cell.ljust(12) for cell in cells))
    return lines


def perplexity(model, tokenizer, *, rows: int = 16, seq_len: int = 512) -> dict[str, dict]:
    """Next-token loss and accuracy per domain of 01's validation split: a sanity number for a
    loaded model (a trained one sits far below ln V, the uniform guess).

    Each row is one document as T5X scores it: inputs [0, t1 … t_{L-1}], targets [t1 … t_L],
    right-padded with 0, which T5X's padding masks and the loss leave out.
    """
    if not 1 <= seq_len <= model.cfg.max_seq_len or rows < 1:
        raise ValueError(f"rows={rows} must be >= 1 and seq_len={seq_len} in "
                         f"[1, max_seq_len={model.cfg.max_seq_len}]")
    evaluate = jax.jit(lambda model, batch: model_lib.loss_fn(model, batch, train=False)[1])
    results = {}
    for domain, dataset in tok.embedded_corpus("validation").items():
        tokens_BL = np.zeros((rows, seq_len + 1), np.int32)  # L + 1: inputs and targets
        for row, ids in enumerate(tokenizer.encode_batch(dataset["text"][:rows])):
            ids = ids[:seq_len]
            tokens_BL[row, 1:len(ids) + 1] = ids
        metrics = evaluate(model, {"inputs": tokens_BL[:, :-1], "targets": tokens_BL[:, 1:],
                                   "loss_mask": (tokens_BL[:, 1:] > 0).astype(np.float32)})
        results[domain] = {"loss": float(metrics["cross_entropy"]),
                           "accuracy": float(metrics["accuracy"]),
                           "tokens": int(metrics["num_tokens"])}
    return results


# How a loaded model routes: as T5X ran the weights, or as ColossalAI's port ran them for the
# paper's drop analysis (§4.4): the whole batch one group, capacity floor(k · cf · T / E).
ROUTING = {"t5x": {}, "colossalai": {"group_rule": "divisor", "max_group_size": 2**30,
                                     "capacity_rule": "colossalai"}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(
        "Load the released OpenMoE models (HF .bin / safetensors / T5X checkpoints, no torch) into "
        "this code. Without a command: the self-test (a tiny model exported, reloaded and decoded, "
        "with the name table). Commands: generate, perplexity, export."))
    commands = parser.add_subparsers(dest="command")
    for name, help_text in (("generate", "continue a prompt; --show-experts prints the routing"),
                            ("perplexity", "loss and accuracy on 01's validation text and code")):
        command = commands.add_parser(name, help=help_text)
        source = command.add_mutually_exclusive_group(required=True)
        source.add_argument("--model", help="checkpoint directory or hub name, e.g. "
                                            "OrionZheng/openmoe-base")
        source.add_argument("--run", help="a 09_train.py run directory instead")
        command.add_argument("--step", type=int, help="with --run: the checkpoint (default latest)")
        command.add_argument("--preset", choices=sorted(model_lib.PRESETS),
                             help="the model's shape, for T5X directories without config.json")
        command.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                             help="parameters and activations (router and logits stay f32)")
        command.add_argument("--mesh", default="", help="e.g. 'data=1,expert=2,model=4' "
                                                        "(default: one device)")
        command.add_argument("--routing", default="t5x", choices=sorted(ROUTING),
                             help="t5x: as the weights were trained (flaxformer's groups); "
                                  "colossalai: the PyTorch port the paper's drop analysis used")
        command.add_argument("--capacity-factor", type=float,
                             help="evaluation capacity factor (default: the model's, 2.0)")
        command.add_argument("--dropless", action="store_true",
                             help="experts serve every assignment: no Drop-towards-the-End")
    generate = commands.choices["generate"]
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat "
                          "template (automatic for models named *chat*)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--show-experts", action="store_true",
                          help="print each token's experts per MoE layer, and drops")
    commands.choices["perplexity"].add_argument("--rows", type=int, default=16)
    commands.choices["perplexity"].add_argument("--seq-len", type=int, default=512)
    export = commands.add_parser("export", help="write a 09 run in the released HF layout")
    export.add_argument("--run", default="runs/laptop", help="the 09_train.py run directory")
    export.add_argument("--step", type=int, help="the checkpoint (default: latest)")
    export.add_argument("--out", help="output directory (default: RUN/hf)")
    return parser.parse_args(argv)


def _load_for_cli(args) -> tuple[Any, Any]:
    """The model and tokenizer a command names: --model (a directory or hub name) or --run (09)."""
    overrides = dict(ROUTING[args.routing], dtype=jnp.dtype(args.dtype), dropless=args.dropless)
    if args.capacity_factor is not None:
        overrides["eval_capacity_factor"] = args.capacity_factor
    if args.run:
        run = open_run(args.run)
        return run_model(run, args.step, **overrides), train_lib.load_tokenizer(run.cfg)
    mesh = shard.make_mesh(**train_lib.parse_mesh(args.mesh)) if args.mesh else None
    model, tokenizer = load_model(args.model, param_dtype=jnp.dtype(args.dtype), mesh=mesh,
                                  preset=args.preset, **overrides)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no spiece.model; put umT5's spiece.model beside it")
    return model, tokenizer


def main(argv=None) -> None:
    """The command line: the self-test without a command; `export` writes a 09 run in the HF
    layout; `generate` and `perplexity` load a model (--model or --run) and use it."""
    args = parse_args(argv)
    if args.command is None:
        self_test()
    elif args.command == "export":
        run = open_run(args.run)
        out = pathlib.Path(args.out or run.path / "hf")
        export_hf(run_model(run, args.step), out, tokenizer=train_lib.load_tokenizer(run.cfg))
        print(f"wrote {out}/config.json, model.safetensors and spiece.model "
              f"(step {args.step or run.steps[-1]} of {run.path})")
    elif args.command == "perplexity":
        model, tokenizer = _load_for_cli(args)
        results = perplexity(model, tokenizer, rows=args.rows, seq_len=args.seq_len)
        print(f"{'domain':8}{'loss':>8}{'accuracy':>10}{'tokens':>9}   (uniform guess: ln V = "
              f"{math.log(model.cfg.vocab_size):.2f})")
        for domain, result in results.items():
            print(f"{domain:8}{result['loss']:8.3f}{result['accuracy']:10.1%}"
                  f"{result['tokens']:9d}")
    else:
        model, tokenizer = _load_for_cli(args)
        prompt = prompt_ids(tokenizer, args.prompt,
                            chat=args.chat or "chat" in str(args.model).lower())
        (continuation,), steps = model_lib.generate(
            model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, return_routing=True)
        print(tokenizer.decode(prompt[1:] + continuation))
        if args.show_experts:
            print(f"\nWhere each token went (✗: the expert was full, so it gave this token "
                  f"nothing; routing {args.routing}, capacity factor "
                  f"{model.cfg.eval_capacity_factor}):")
            print("\n".join(expert_table(tokenizer, steps, model.cfg.moe_layers)))


def self_test() -> None:
    """A tiny model: its name table; exported and reloaded exactly; decoded, with its routing.
    The verdict is a `sys.exit`, not an `assert`, so that it holds under `python -O` too."""
    tokenizer = tok.embedded_tokenizer()
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size,
                              max_seq_len=64)
    model = model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0))
    print(f"Tiny OpenMoE: {cfg.num_layers} layers, MoE in {cfg.moe_layers}, E={cfg.num_experts}. "
          f"Names of layer {cfg.moe_layers[0]}'s tensors and the model's own:")
    rows = [n for n in name_table(cfg) if len(n.ours) == 1 or n.ours[1] == cfg.moe_layers[0]]
    width = max(len("/".join(map(str, n.ours))) for n in rows), max(len(n.t5x) for n in rows)
    for n in rows:
        print(f"  {'/'.join(map(str, n.ours)):{width[0]}}  {n.t5x:{width[1]}}  {n.hf}"
              f"{'  (ᵀ)' if n.transposed else ''}")
    print("  (ᵀ: torch stores [out, in], transposed; T5X's and HF's expert wi_0 is [E, D, 2F], "
          "ours [E, D, 2, F])")

    with tempfile.TemporaryDirectory() as directory:
        export_hf(model, directory, tokenizer=tokenizer)
        loaded, loaded_tokenizer = load_model(directory)
    ours, theirs = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (model, loaded))
    same = all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    in_memory = model_from_tensors(t5x_params(model), loaded.cfg)
    ids = jnp.array([prompt_ids(tokenizer, "def add(a, b):\n    return a + b")])
    same_logits = np.array_equal(loaded(ids, train=False)[0], in_memory(ids, train=False)[0])
    print(f"\nExported to HF safetensors and loaded back: {len(ours)} tensors "
          f"{'identical' if same else 'DIFFERENT'}; logits "
          f"{'identical' if same_logits else 'DIFFERENT'} to the in-memory T5X path's.")

    prompt = prompt_ids(loaded_tokenizer, "The experts of a mixture")
    (continuation,), steps = model_lib.generate(loaded, [prompt], max_new_tokens=4,
                                                return_routing=True)
    print(f"\nGreedy continuation (random weights, so nonsense): "
          f"{loaded_tokenizer.decode(continuation)!r}. Each token's experts:")
    print("\n".join(expert_table(loaded_tokenizer, steps, cfg.moe_layers)))
    failures = [message for ok, message in (
        (same, "exported and reloaded parameters differ"),
        (loaded.cfg.t5x_padding and loaded.cfg.group_rule == "flaxformer",
         "a loaded model must use T5X's evaluation semantics"),
        (same_logits, "the safetensors and in-memory paths give different logits"),
        (len(steps) == 1 + len(continuation) and steps[0].tokens_BL.shape == (1, len(prompt)),
         "the routing record must cover the prompt and every generated token")) if not ok]
    if failures:
        sys.exit("self-test FAILED: " + "; ".join(failures))
    print("\nOK: names, export, reload and decoding agree.")


if __name__ == "__main__":
    main()
