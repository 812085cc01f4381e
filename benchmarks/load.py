"""Loading a released checkpoint: peak memory and speed of chapter 10, on OpenMoE-Base's shapes.

A synthetic checkpoint with OpenMoE-Base's tensors (06 preset "openmoe-base": 0.8 B parameters,
3.2 GB in f32) is written once in the layout of the hub's `OrionZheng/openmoe-base`: config.json
and one `pytorch_model.bin`, produced here without torch (torch's zip layout and pickle, byte
for byte; tests/test_support_tensor_files.py checks that against a file torch wrote). Then,
each in a fresh process, chapter 10's `load_model` loads it as f32 and as bf16, and we report

  peak RSS / loaded model bytes   the goal is <= 1.2: the model plus about one tensor in flight.
                                  "above baseline" first subtracts the same process's RSS just
                                  before loading (Python, JAX and the chapters imported).
  load / raw read throughput      checkpoint bytes per second of the load, divided by those of
                                  a plain sequential read of the same file (cold, both): 1.0
                                  means loading is bound by the disk, not by Python.

Before every timed read the file's pages are dropped from the page cache (posix_fadvise
DONTNEED; `--warm` keeps them), and raw reads and loads alternate, so both see the same disk.
Peak RSS is the child's own `ru_maxrss` (RUSAGE_SELF, read as it exits); the parent's
RUSAGE_CHILDREN would report the largest child so far, hiding every later, smaller one.

    python benchmarks/load.py                 # writes ~3.2 GB to a temp dir, deleted afterwards
    python benchmarks/load.py --dir /data/ob  # write there once, reuse on later runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# ------------------------------------------------------------------------------------------------
# torch's checkpoint format, written without torch
# ------------------------------------------------------------------------------------------------
# A `torch.save` file is an uncompressed zip whose records all live under one folder named after
# the file (`pytorch_model.bin` → `pytorch_model/`):
#   data.pkl                 a pickle of the state dict, in which each tensor is a call
#                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
#                            and each storage a *persistent id* ('storage', torch.FloatStorage,
#                            key, 'cpu', numel): a reference to the record data/<key>
#   .format_version, .storage_alignment, byteorder
#                            "1", "64", "little" (torch >= 2.1 writes them; older files lack them)
#   data/0, data/1, ...      each storage's raw little-endian bytes, starting 64-byte aligned
#   version                  "3\n"; then .data/serialization_id, a 40-digit id of the save
# Alignment comes from padding each local zip header's extra field (id "FB", filled with "Z").

ALIGNMENT = 64
STORAGE_TYPES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage"}


class StateDictPickle:
    """The opcodes Python's pickler (protocol 2) emits when torch.save pickles a state dict.

    Writing them directly, rather than pickling stand-in objects, needs no fake `torch` module,
    and keeps the memo exactly as torch's: an object pickled twice (the rebuild function, the
    storage class, the strings 'storage' and 'cpu', the OrderedDict class) is stored in the
    memo (BINPUT n) the first time and fetched (BINGET n) after that; every fresh tuple, string
    and object is memoized once, in the order the pickler meets it.
    """

    def __init__(self):
        self.out = bytearray(b"\x80\x02")   # PROTO 2
        self.count = 0                       # memo slots used so far
        self.shared: dict[tuple, int] = {}   # object → its memo slot

    def put(self) -> None:
        """Memoize the object just written (BINPUT, or LONG_BINPUT from slot 256 on)."""
        self.out += b"q" + bytes([self.count]) if self.count < 256 else b"r" + struct.pack("<I", self.count)
        self.count += 1

    def once(self, key: tuple, opcodes: bytes) -> None:
        """An object the pickler sees many times: written and memoized once, fetched after."""
        if key in self.shared:
            slot = self.shared[key]
            self.out += b"h" + bytes([slot]) if slot < 256 else b"j" + struct.pack("<I", slot)
            return
        self.out += opcodes
        self.shared[key] = self.count
        self.put()

    def glob(self, module: str, name: str) -> None:
        self.once(("global", module, name), f"c{module}\n{name}\n".encode())

    def text(self, value: str, shared: bool = False) -> None:
        encoded = value.encode()
        opcodes = b"X" + struct.pack("<I", len(encoded)) + encoded   # BINUNICODE
        if shared:
            self.once(("str", value), opcodes)
        else:
            self.out += opcodes
            self.put()

    def integer(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])                         # BININT1
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)               # BININT2
        elif -2**31 <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)               # BININT
        else:
            encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(encoded)]) + encoded     # LONG1

    def int_tuple(self, values: tuple[int, ...]) -> None:
        if not values:
            self.out += b")"                                          # EMPTY_TUPLE: not memoized
            return
        if len(values) > 3:
            self.out += b"("
        for value in values:
            self.integer(value)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t")
        self.put()

    def empty_ordered_dict(self) -> None:
        """OrderedDict(): the class, no arguments, REDUCE."""
        self.glob("collections", "OrderedDict")
        self.out += b")R"
        self.put()

    def tensor(self, key: str, dtype: str, shape: tuple[int, ...]) -> None:
        """_rebuild_tensor_v2(storage <key>, 0, shape, C-order strides, False, OrderedDict())."""
        numel = int(np.prod(shape))
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("                                  # MARK: the call's arguments
        self.out += b"("                                  # MARK: the persistent id
        self.text("storage", shared=True)
        self.glob("torch", STORAGE_TYPES[dtype])
        self.text(key)
        self.text("cpu", shared=True)
        self.integer(numel)
        self.out += b"t"
        self.put()
        self.out += b"Q"                                  # BINPERSID
        self.integer(0)                                   # storage offset
        self.int_tuple(tuple(shape))
        self.int_tuple(strides)
        self.out += b"\x89"                               # requires_grad False
        self.empty_ordered_dict()                         # backward hooks
        self.out += b"t"
        self.put()
        self.out += b"R"
        self.put()


def state_dict_pickle(entries: list[tuple[str, str, tuple[int, ...]]], *, ordered: bool = True) -> bytes:
    """data.pkl for [(name, dtype name, shape)], storage keys "0", "1", ... in order.

    `ordered`: an OrderedDict (what `model.state_dict()` returns, so a single-file checkpoint
    holds one); False for a plain dict, as `save_pretrained` writes each shard of a sharded one.
    Items go in batches of 1000 (MARK ... SETITEMS), as the pickler batches them.
    """
    pickle = StateDictPickle()
    if ordered:
        pickle.empty_ordered_dict()
    else:
        pickle.out += b"}"
        pickle.put()
    for start in range(0, len(entries), 1000):
        batch = entries[start:start + 1000]
        if len(batch) > 1:
            pickle.out += b"("
        for index, (name, dtype, shape) in enumerate(batch, start=start):
            pickle.text(name)
            pickle.tensor(str(index), dtype, shape)
        pickle.out += b"u" if len(batch) > 1 else b"s"
    pickle.out += b"."
    return bytes(pickle.out)


def _aligned_info(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored (uncompressed) record whose bytes will start on a 64-byte boundary: the local
    header is 30 bytes + the name + our extra field "FB" <length> "ZZZ...", sized to fit."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    # zipfile appends a 20-byte zip64 field to the extra of records it expects to exceed 2 GiB.
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    header_end = archive.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    padding = -header_end % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    return info


def write_torch_bin(path: pathlib.Path, entries: list[tuple[str, str, tuple[int, ...]]],
                    values, *, ordered: bool = True) -> None:
    """A torch.save file for [(name, dtype name, shape)]; `values(name)` gives each tensor's
    array when its turn comes, so only one tensor is in memory at a time."""
    root = path.name.split(".")[0]   # torch names the folder after the file, up to its first dot
    serialization_id = "".join(str(d) for d in np.random.default_rng().integers(0, 10, 40))
    records = [("data.pkl", state_dict_pickle(entries, ordered=ordered)),
               (".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
               ("byteorder", b"little")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        def record(name: str, data) -> None:
            info = _aligned_info(archive, f"{root}/{name}", memoryview(data).nbytes)
            with archive.open(info, "w") as file:
                file.write(data)
            info.extra = b""   # the padding belongs to the local header only, as in torch's files

        for name, data in records:
            record(name, data)
        for index, (name, dtype, shape) in enumerate(entries):
            array = np.ascontiguousarray(values(name))
            if array.dtype.name != dtype or array.shape != tuple(shape):
                raise ValueError(f"values({name!r}) gave {array.dtype}{array.shape}; the pickle "
                                 f"already promised {dtype}{tuple(shape)}")
            record(f"data/{index}", array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
        record("version", b"3\n")
        record(".data/serialization_id", serialization_id.encode())


# ------------------------------------------------------------------------------------------------
# The synthetic OpenMoE-Base checkpoint
# ------------------------------------------------------------------------------------------------

def hf_entries(cfg) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, "float32", shape as torch stores it) of every tensor, in chapter 10's table
    order, shapes taken from 06's model built abstractly (no memory)."""
    from flax import nnx
    released = importlib.import_module("10_released_models")
    model_lib = importlib.import_module("06_model")
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)))
    state = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    entries = []
    for name in released.name_table(cfg):
        variable = state[name.ours]
        shape = released.stored_shape(variable.get_value().shape, variable.get_metadata()["logical_axes"])
        entries.append((name.hf, "float32", tuple(shape[::-1] if name.transposed else shape)))
    return entries


def write_checkpoint(directory: pathlib.Path, preset: str) -> pathlib.Path:
    """config.json + pytorch_model.bin with the preset's shapes and small random values."""
    model_lib = importlib.import_module("06_model")
    released = importlib.import_module("10_released_models")
    cfg = model_lib.PRESETS[preset]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = hf_entries(cfg)
    shapes = {name: shape for name, _, shape in entries}
    started = time.perf_counter()
    write_torch_bin(directory / "pytorch_model.bin.partial", entries,
                    lambda name: rng.standard_normal(shapes[name], np.float32) * np.float32(0.02))
    # Renamed only when complete, so an interrupted write is never mistaken for a checkpoint.
    (directory / "pytorch_model.bin.partial").rename(directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(released.hf_config(cfg), indent=2) + "\n")
    size = (directory / "pytorch_model.bin").stat().st_size
    print(f"wrote {directory / 'pytorch_model.bin'}: {len(entries)} tensors, {size / 1e9:.2f} GB "
          f"in {time.perf_counter() - started:.0f} s")
    return directory / "pytorch_model.bin"


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

def evict(path: pathlib.Path) -> None:
    """Drop the file's pages from the page cache, so the next read comes from the disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())   # pages not yet on disk cannot be dropped
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def raw_read_seconds(path: pathlib.Path, block: int = 16 << 20) -> float:
    """A plain sequential read of the whole file into one reused buffer: the disk's speed."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as file:
        while file.readinto(view):
            pass
    return time.perf_counter() - started


def child(directory: str, dtype_name: str) -> None:
    """Runs in a fresh process: import everything, note the RSS, load, report as JSON."""
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp
    from flax import nnx
    released = importlib.import_module("10_released_models")
    jax.devices()   # start the runtime now, so the baseline includes it
    imported = time.perf_counter()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    model, _ = released.load_model(directory, param_dtype=dtype)
    leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
    loaded = time.perf_counter()
    print(json.dumps({"import_s": imported - started, "load_s": loaded - imported,
                      "baseline_rss": baseline, "model_bytes": sum(x.nbytes for x in leaves),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure_load(directory: pathlib.Path, dtype: str) -> dict:
    """`child` in a fresh Python, so each load starts from nothing and has its own peak RSS."""
    result = subprocess.run([sys.executable, __file__, "--child", str(directory), dtype],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode:
        raise RuntimeError(f"loading as {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, help="where the checkpoint is (or is written "
                        "once); default: a temporary directory, deleted at the end")
    parser.add_argument("--preset", default="openmoe-base", help="06 preset whose shapes to use")
    parser.add_argument("--rounds", type=int, default=1, help="alternating read/load rounds")
    parser.add_argument("--warm", action="store_true", help="keep the file in the page cache")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    scratch = None if args.dir else tempfile.mkdtemp(prefix="openmoe-load-")
    directory = args.dir or pathlib.Path(scratch)
    try:
        path = directory / "pytorch_model.bin"
        if not path.is_file():
            write_checkpoint(directory, args.preset)
        size = path.stat().st_size
        rows = {"raw read": [], "float32": [], "bfloat16": []}
        for _ in range(args.rounds):
            for name in rows:
                if not args.warm:
                    evict(path)
                rows[name].append(raw_read_seconds(path) if name == "raw read"
                                  else measure_load(directory, name))
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    read_s = float(np.median(rows["raw read"]))
    print(f"\n{args.preset}: {size / 1e9:.2f} GB checkpoint, {'warm' if args.warm else 'cold'} "
          f"page cache, median of {args.rounds} round(s); raw sequential read "
          f"{size / read_s / 1e9:.2f} GB/s ({read_s:.1f} s)")
    print(f"{'load as':10}{'model GB':>10}{'load s':>8}{'GB/s':>7}{'vs read':>9}"
          f"{'peak RSS GB':>13}{'÷ model':>9}{'above baseline ÷ model':>24}")
    summary = {"preset": args.preset, "checkpoint_bytes": size, "raw_read_s": read_s,
               "cache": "warm" if args.warm else "cold"}
    for dtype in ("float32", "bfloat16"):
        runs = rows[dtype]
        load_s = float(np.median([r["load_s"] for r in runs]))
        peak = max(r["peak_rss"] for r in runs)
        model_bytes, baseline = runs[0]["model_bytes"], min(r["baseline_rss"] for r in runs)
        ratio, above = peak / model_bytes, (peak - baseline) / model_bytes
        print(f"{dtype:10}{model_bytes / 1e9:10.2f}{load_s:8.1f}{size / load_s / 1e9:7.2f}"
              f"{read_s / load_s:9.2f}{peak / 1e9:13.2f}{ratio:9.2f}{above:24.2f}")
        summary[dtype] = {"load_s": load_s, "model_bytes": model_bytes, "peak_rss_bytes": peak,
                          "baseline_rss_bytes": baseline, "peak_rss_over_model": ratio,
                          "peak_rss_above_baseline_over_model": above,
                          "load_over_read_throughput": read_s / load_s}
    print("goal: peak RSS ÷ model <= 1.2; load ÷ read throughput near 1 (disk-bound)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
