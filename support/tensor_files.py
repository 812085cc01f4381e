"""Plumbing: the tensors of a checkpoint file, read without torch, a block of rows at a time.

Formats: torch's `.bin` (a zip of one pickle, data.pkl, and one raw file per storage), the
safetensors layout (8 bytes of header length, a JSON header, the raw tensors), HF's sharded
`*.index.json`, and a T5X checkpoint directory (a msgpack of the train state whose arrays are
zarr files, read through tensorstore). Each reader returns {name: Tensor}: a tensor's shape and
dtype now, its values only when asked. Chapter 10 decides which reader a directory needs and
where each tensor goes.

Guarantees:
  - nothing from a checkpoint runs: a hub name downloads weights, configs and the tokenizer,
    never the repository's Python code (`local_or_download`), and no torch is needed;
  - safe unpickling: the unpickler admits only the globals a state dict needs
    (collections.OrderedDict, torch._utils._rebuild_tensor_v2 and three storage types), whether
    the pickle names them with GLOBAL (protocol 2) or STACK_GLOBAL (protocol 4+); any other
    global is refused before it is called, so a malicious pickle runs nothing;
  - every offset, size and stride a file states is checked against the bytes the file holds
    before anything is read: a damaged or hostile file is a ValueError naming it, never a read
    of other data or a crash past the end of a memory map;
  - a tensor is read a block of rows at a time (`host_array`, BLOCK_BYTES per block) into the
    one array that holds the result, and goes to its devices from there (`on_device`: with a
    sharding, each device receives only its slice), so a 34B loads with little host memory;
  - `runtime_owned` hands such arrays to buffers a train step can update in place, one leaf at
    a time, so training a loaded model never holds its parameters twice;
  - an HF checkpoint written here (`write_hf_checkpoint`) replaces an earlier one only when
    asked to (`overwrite`), and each of its files whole: a reader never sees half a file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from support import cli, files


def local_or_download(path_or_name, released: Iterable[str] = ()) -> pathlib.Path:
    """A local path as it is; a hub name ("owner/model") downloaded once, weights, configs and
    the tokenizer only: never the repository's Python code. Only here is the network used."""
    path, name = pathlib.Path(path_or_name), str(path_or_name)
    if path.exists():
        return path
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ValueError(f"model {name!r} is neither an existing path nor a hub name like "
                         f"'OrionZheng/openmoe-base' (released: {', '.join(released)})")
    from huggingface_hub import snapshot_download
    try:
        return pathlib.Path(snapshot_download(
            name, allow_patterns=["*.json", "*.bin", "*.safetensors", "*.model"]))
    except OSError as error:  # the hub's errors: not found, offline, refused
        raise ValueError(f"model {name!r} is not an existing path, and the hub could not give "
                         f"it ({cli.one_line(error)})") from None


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


# ------------------------------------------------------------------------------------------------
# torch's .bin: a zip of a pickle and raw storages
# ------------------------------------------------------------------------------------------------

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
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage is {type(storage).__name__}, not a storage: the "
                         "pickle is not a torch state dict")
    size, stride = tuple(map(int, size)), tuple(map(int, stride))
    reach = storage_offset + sum((n - 1) * step for n, step in zip(size, stride))
    if (len(size) != len(stride) or storage_offset < 0 or min(stride, default=0) < 0
            or min(size, default=0) < 0 or (0 not in size and reach >= storage.numel)):
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
    """Unpickles a torch state dict and nothing else: any other global is refused, unrun.

    Every global a pickle uses, named by GLOBAL or by STACK_GLOBAL, comes from `find_class`;
    reductions (REDUCE, NEWOBJ, BUILD) can only call what a global produced, so with nothing
    else admitted, nothing else can run.
    """

    ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch", "FloatStorage"): np.float32, ("torch", "HalfStorage"): np.float16,
               ("torch", "BFloat16Storage"): jnp.bfloat16}
    STORAGES = ("FloatStorage", "HalfStorage", "BFloat16Storage")

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
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and any(pid[1] is self.ALLOWED[("torch", kind)] for kind in self.STORAGES)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise ValueError(f"{self.path}: unexpected persistent id {pid!r} in its pickle")
        _, dtype, key, _, numel = pid
        record = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(record)
        except KeyError:
            raise ValueError(f"{self.path}: its pickle names storage {record}, which the zip "
                             "lacks: the file is damaged") from None
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
    path = pathlib.Path(path)
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
            try:
                state = _StateDictUnpickler(file, path, archive, pickles[0][:-len("data.pkl")]).load()
            except (pickle.UnpicklingError, EOFError, TypeError, IndexError) as error:
                raise ValueError(f"{path}: its pickle is damaged ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def read_index(index: pathlib.Path, read: Callable[[pathlib.Path], dict]) -> dict[str, Tensor]:
    """A sharded HF checkpoint: `index` (`*.index.json`) maps each tensor to the file holding it,
    whose tensors `read` gives; a name missing from its file is an error."""
    weight_map = json.loads(pathlib.Path(index).read_text())["weight_map"]
    shards = {file: read(index.parent / file) for file in set(weight_map.values())}
    absent = [name for name, file in weight_map.items() if name not in shards[file]]
    if absent:
        raise ValueError(f"{index} maps {absent[:3]} to shards that lack them")
    return {name: shards[file][name] for name, file in weight_map.items()}


# ------------------------------------------------------------------------------------------------
# safetensors, and T5X's msgpack + zarr
# ------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


def read_safetensors(path: pathlib.Path) -> dict[str, Tensor]:
    """A `.safetensors` file: 8 bytes of header length, a JSON header, then the raw tensors."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(8)
        header_length = struct.unpack("<Q", start)[0] if len(start) == 8 else size
        if 8 + header_length > size:
            raise ValueError(f"{path} is shorter than its header says: the file is truncated")
        header = json.loads(file.read(header_length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header is not a JSON object: not a safetensors file")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_length
    tensors = {}
    for name, entry in header.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
            raise ValueError(f"{path}: tensor {name!r} lacks a dtype, shape or data_offsets")
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}; parameters "
                             f"are one of {sorted(SAFETENSORS_DTYPES)}")
        dtype, shape = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"])
        start, end = entry["data_offsets"]
        if (min(shape, default=0) < 0 or not 0 <= start <= end <= data_bytes
                or end - start != math.prod(shape) * dtype.itemsize):
            raise ValueError(f"{path}: tensor {name!r} (shape {shape}, bytes {start}..{end}) does "
                             f"not fit its {data_bytes} bytes of data: the file is damaged")
        tensors[name] = in_file(path, 8 + header_length + start, shape, dtype)
    return tensors


def write_safetensors(path: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
    """The layout `read_safetensors` reads, tagged "pt" as transformers expects. The file is
    written under a temporary name and renamed: a reader never sees half of it."""
    path = pathlib.Path(path)
    names = {np.dtype(dtype): name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with files.replacing(path) as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in tensors.values():
            file.write(np.ascontiguousarray(array).tobytes())


HF_FILES = ("config.json", "model.safetensors", "spiece.model")


def refuse_to_replace(directory: pathlib.Path, overwrite: bool) -> None:
    """An HF checkpoint already in `directory` is replaced only when the user says so."""
    existing = [name for name in HF_FILES if (pathlib.Path(directory) / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"{directory} already holds {existing}; pass --overwrite "
                         "(overwrite=True) to replace them, or choose another directory")


def write_hf_checkpoint(directory: pathlib.Path, config: dict, tensors: Mapping[str, np.ndarray],
                        spiece: bytes | None, *, overwrite: bool = False) -> pathlib.Path:
    """An HF checkpoint directory: config.json, model.safetensors and (given its bytes)
    spiece.model, each replaced whole; an earlier one there only with `overwrite`."""
    directory = pathlib.Path(directory)
    refuse_to_replace(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    files.replace_file(directory / "config.json", json.dumps(config, indent=2) + "\n")
    if spiece is not None:
        files.replace_file(directory / "spiece.model", spiece)
    else:  # an earlier one would belong to another model
        (directory / "spiece.model").unlink(missing_ok=True)
    return directory


def read_t5x(directory: pathlib.Path) -> dict[str, Tensor]:
    """A T5X `checkpoint_<step>/`: a msgpack of the train state {"optimizer": {"target": ...}} whose
    parameters are tensorstore specs of zarr arrays beside it (small ones may be inline arrays)."""
    import tensorstore as ts
    from flax import serialization, traverse_util

    directory = pathlib.Path(directory)
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


# ------------------------------------------------------------------------------------------------
# Into host memory, a block of rows at a time, and onto the devices
# ------------------------------------------------------------------------------------------------

BLOCK_BYTES = 64 * 2**20  # how much of a tensor is read at a time


def host_array(tensor, transposed: bool, dtype) -> np.ndarray:
    """A tensor (or an array) in `dtype`, transposed if asked, in one new 64-byte-aligned array
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


def on_device(host: np.ndarray, sharding=None) -> jax.Array:
    """A host array on the devices: with a `sharding`, each device receives only its own slice;
    on a CPU, an f32 or f16 `host_array` is shared with the device, not copied."""
    if sharding is not None:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    if host.dtype in (np.float32, np.float16) and jax.default_backend() == "cpu":
        return jnp.from_dlpack(host)  # shares the aligned buffer
    return jnp.asarray(host)


def runtime_owned(tree):
    """`tree` with each array copied into a buffer the runtime allocated, one leaf at a time,
    each original deleted once its copy exists: the peak is the tree plus its largest leaf.

    A device buffer that shares a host array's memory (`on_device` on a CPU) cannot be reused
    for a jitted step's output when it is donated, so a train step would write new parameters
    beside the old ones: a second copy of them on the first step. The leaves must be distinct
    arrays (each is deleted once copied).
    """
    copy_of = jax.jit(jnp.copy)  # keeps each leaf's sharding

    def owned(x: jax.Array) -> jax.Array:
        copy = copy_of(x)
        copy.block_until_ready()
        x.delete()
        return copy
    return jax.tree.map(owned, tree)
