"""Tests for support/tensor_files.py: every checkpoint file format read without torch, safely.

The checkpoints under tests/fixtures/released/ were written by the real writers (torch.save,
the safetensors library, T5X's tensorstore + msgpack layout; see make_fixtures.py there) from
one seeded tiny OpenMoE whose T5X parameters are kept in reference_t5x.npz. Each reader's output
is compared with that reference through `hf_name`, the fixtures' naming written out here.
The hostile inputs (a pickle that runs a command, views past their storage, offsets past the
file) must be refused without running or reading anything they point at.
"""

import importlib.util
import json
import mmap
import os
import pathlib
import pickle
import pickletools
import re
import struct
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from support import tensor_files

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "released"
T5X_DIR = FIXTURES / "t5x" / "checkpoint_100"
MARKER = "PWNED_BY_PICKLE"   # the file bad/evil.bin's pickle would create if it were run


def hf_name(t5x_path: str) -> tuple[str, bool]:
    """ColossalAI's name for a T5X parameter, and whether torch stores it transposed: the
    naming the fixtures were written in (ColossalAI's convert_openmoe_ckpt.py)."""
    fixed = {"token_embedder/embedding": ("model.embed_tokens.weight", False),
             "decoder/logits_dense/kernel": ("lm_head.weight", True),
             "decoder/decoder_norm/scale": ("model.norm.weight", False)}
    if t5x_path in fixed:
        return fixed[t5x_path]
    layer, rest = re.fullmatch(r"decoder/layers_(\d+)/(.+)", t5x_path).groups()
    per_layer = {
        "pre_self_attention_layer_norm/scale": ("input_layernorm.weight", False),
        "pre_mlp_layer_norm/scale": ("post_attention_layernorm.weight", False),
        "pre_extra_mlp_layer_norm/scale": ("pre_extra_mlp_layernorm.weight", False),
        "mlp/router/router_weights/w/kernel": ("mlp.gate_weight", True),
        "mlp/expert/wi_0/kernel": ("mlp.experts.wi_gate", False),
        "mlp/expert/wi_1/kernel": ("mlp.experts.wi_up", False),
        "mlp/expert/wo/kernel": ("mlp.experts.wo", False),
    }
    for t5x_proj, hf_proj in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
        per_layer[f"self_attention/{t5x_proj}/kernel"] = (f"self_attn.{hf_proj}_proj.weight", True)
    for block in ("mlp", "extra_mlp"):
        for t5x_w, hf_w in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            per_layer[f"{block}/{t5x_w}/kernel"] = (f"{block}.{hf_w}.weight", True)
    name, transposed = per_layer[rest]
    return f"model.layers.{layer}.{name}", transposed


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "reference_t5x.npz") as npz:
        return dict(npz)


def read_hf(directory: pathlib.Path) -> dict:
    """An HF fixture directory, through the index when it is sharded."""
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        return tensor_files.read_index(index, tensor_files.read_torch_bin)
    return tensor_files.read_torch_bin(directory / "pytorch_model.bin")


# --- Reading each format -----------------------------------------------------------------------

HF_DIRS = {"hf_single": np.float32, "hf_sharded": np.float32, "hf_fp16": np.float16}


@pytest.mark.parametrize("directory", sorted(HF_DIRS))
def test_hf_tensors_are_the_reference_under_colossalai_names(reference, directory):
    """Names, lazy shape and dtype, and values: [out, in] for 2-D weights, experts as stored."""
    dtype = HF_DIRS[directory]
    tensors = read_hf(FIXTURES / directory)
    assert sorted(tensors) == sorted(hf_name(path)[0] for path in reference)
    for path, value in reference.items():
        name, transposed = hf_name(path)
        expected = (value.T if transposed else value).astype(dtype)
        tensor = tensors[name]
        assert isinstance(tensor, tensor_files.Tensor)
        assert tuple(tensor.shape) == expected.shape and np.dtype(tensor.dtype) == dtype, name
        np.testing.assert_array_equal(np.asarray(tensor), expected, err_msg=name)
        # Row blocks (how the loader reads) are the same values as the whole.
        np.testing.assert_array_equal(tensor.rows(1, tensor.shape[0]), expected[1:], err_msg=name)


def test_safetensors_file_written_by_the_safetensors_library_reads_as_bf16(reference):
    """bf16 has no numpy dtype of its own: the reader returns ml_dtypes' bfloat16 values, the
    reference rounded to bf16 exactly as torch rounded it when the fixture was written."""
    tensors = tensor_files.read_safetensors(FIXTURES / "hf_safetensors" / "model.safetensors")
    assert sorted(tensors) == sorted(hf_name(path)[0] for path in reference)
    for path, value in reference.items():
        name, transposed = hf_name(path)
        expected = (value.T if transposed else value).astype(jnp.bfloat16)
        assert np.dtype(tensors[name].dtype) == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(tensors[name]), expected, err_msg=name)


def test_sharded_index_is_followed_not_guessed():
    """Every shard listed in the index is read, and each name comes from its own shard."""
    index = json.loads((FIXTURES / "hf_sharded" / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    tensors = read_hf(FIXTURES / "hf_sharded")
    assert set(tensors) == set(index["weight_map"])
    assert sum(int(np.prod(t.shape)) * 4 for t in tensors.values()) == index["metadata"]["total_size"]
    for name, file in list(index["weight_map"].items())[:5]:   # from the shard the index names
        own = tensor_files.read_torch_bin(FIXTURES / "hf_sharded" / file)[name]
        np.testing.assert_array_equal(np.asarray(tensors[name]), np.asarray(own))


def test_an_index_naming_a_tensor_its_shard_lacks_is_an_error(tmp_path):
    for file in (FIXTURES / "hf_sharded").glob("*.bin"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    index = json.loads((FIXTURES / "hf_sharded" / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.gate_weight"] = "pytorch_model-00001-of-00003.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape("model.layers.9.mlp.gate_weight")):
        tensor_files.read_index(tmp_path / "pytorch_model.bin.index.json",
                                tensor_files.read_torch_bin)


def test_bin_tensors_are_memory_mapped_not_copied():
    """A `.bin` storage is read through a memory map of the file, so a 3 GB checkpoint does not
    pass through Python's heap: the array's buffer chain ends in an np.memmap."""
    tensor = read_hf(FIXTURES / "hf_single")["model.layers.1.mlp.experts.wi_gate"]
    owner = np.asarray(tensor)
    while owner is not None and not isinstance(owner, (np.memmap, mmap.mmap)):
        owner = getattr(owner, "base", None)   # views (also as_strided's) keep their base
    assert owner is not None


def test_t5x_directory_yields_the_target_parameters_only(reference):
    """T5X's msgpack holds {"version", "optimizer": {"state": {"step"}, "target"}}: the reader
    returns the target's zarr arrays under their "/" paths, and no step or optimizer state."""
    tensors = tensor_files.read_t5x(T5X_DIR)
    assert sorted(tensors) == sorted(reference)
    for path, value in reference.items():
        assert tuple(tensors[path].shape) == value.shape
        assert np.dtype(tensors[path].dtype) == np.float32
        np.testing.assert_array_equal(np.asarray(tensors[path]), value, err_msg=path)


def test_write_safetensors_round_trips_and_leaves_no_partial_file(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.linspace(-1, 1, 5).astype(np.float16),
               "c": np.arange(6, dtype=np.float32).reshape(2, 3).astype(jnp.bfloat16)}
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"an older file")
    tensor_files.write_safetensors(path, tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + header_length) % 8 == 0   # the tensors start aligned
    read = tensor_files.read_safetensors(path)
    assert list(read) == ["a", "b", "c"]
    for name, value in tensors.items():
        assert np.dtype(read[name].dtype) == value.dtype
        np.testing.assert_array_equal(np.asarray(read[name]), value)


# --- Offsets and sizes from a file are checked before anything is read ----------------------------

def _safetensors_with(path: pathlib.Path, header: dict, data_bytes: int) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes))


@pytest.mark.parametrize("case", ["past the end", "negative start", "size mismatch", "truncated"])
def test_safetensors_offsets_outside_the_file_are_refused(tmp_path, case):
    path = tmp_path / "model.safetensors"
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if case == "past the end":
        _safetensors_with(path, {"w": {**entry, "data_offsets": [8, 24]}}, 16)
    elif case == "negative start":
        _safetensors_with(path, {"w": {**entry, "data_offsets": [-8, 8]}}, 16)
    elif case == "size mismatch":   # a [1000] tensor said to fit in 16 bytes
        _safetensors_with(path, {"w": {**entry, "shape": [1000]}}, 16)
    else:   # a header length past the end of the file
        path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        tensor_files.read_safetensors(path)


def _one_tensor_bin(path: pathlib.Path, *, numel: int, offset: int, size: tuple, stride: tuple) -> None:
    """A torch zip whose one tensor, "model.norm.weight", is a view (offset, size, stride) of a
    storage said to hold `numel` floats, while its record data/0 holds 4."""
    def text(value: str) -> bytes:
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    def int_tuple(values: tuple) -> bytes:
        return b"(" + b"".join(integer(v) for v in values) + b"t"

    data_pkl = b"".join([
        b"\x80\x02ccollections\nOrderedDict\n)R(", text("model.norm.weight"),
        b"ctorch._utils\n_rebuild_tensor_v2\n((", text("storage"), b"ctorch\nFloatStorage\n",
        text("0"), text("cpu"), integer(numel), b"tQ", integer(offset), int_tuple(size),
        int_tuple(stride), b"\x89ccollections\nOrderedDict\n)RtR", b"u."])
    root = path.name.split(".")[0]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}/data.pkl", data_pkl)
        archive.writestr(f"{root}/data/0", np.arange(4, dtype="<f4").tobytes())
        archive.writestr(f"{root}/data/1", np.arange(1024, dtype="<f4").tobytes())  # a neighbour
        archive.writestr(f"{root}/version", "3\n")


def test_a_well_formed_hand_written_bin_reads(tmp_path):
    """The control for the test below: the same writer, with honest numbers, is accepted."""
    _one_tensor_bin(tmp_path / "ok.bin", numel=4, offset=1, size=(3,), stride=(1,))
    tensors = tensor_files.read_torch_bin(tmp_path / "ok.bin")
    np.testing.assert_array_equal(np.asarray(tensors["model.norm.weight"]), [1.0, 2.0, 3.0])


def test_views_outside_their_storage_are_refused(tmp_path):
    """A pickle may only call the three allowed globals, but their *arguments* are the file's
    too: a size, stride or offset that reaches past the storage, or a storage said to be longer
    than its record, must be a ValueError, never a read of other memory or other records. Read
    in a child process, because the failure this guards against is a crash (SIGBUS)."""
    cases = {"size": dict(numel=4, offset=0, size=(1 << 20,), stride=(1,)),
             "stride": dict(numel=4, offset=0, size=(4,), stride=(1 << 20,)),
             "offset": dict(numel=4, offset=3, size=(4,), stride=(1,)),
             "numel": dict(numel=8, offset=0, size=(8,), stride=(1,))}   # data/1 follows data/0
    for name, case in cases.items():
        _one_tensor_bin(tmp_path / f"{name}.bin", **case)
    script = f"""
import json, sys, numpy as np
sys.path.insert(0, {str(REPO_ROOT)!r})
from support import tensor_files
results = {{}}
for name in {sorted(cases)!r}:
    try:
        tensors = tensor_files.read_torch_bin({str(tmp_path)!r} + "/" + name + ".bin")
        np.asarray(tensors["model.norm.weight"]).sum()
        results[name] = "accepted"
    except ValueError as error:
        results[name] = "ValueError: " + str(error)
print(json.dumps(results))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, f"the reader crashed (exit {result.returncode}): {result.stderr[-2000:]}"
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(outcomes) == sorted(cases)
    for name, outcome in outcomes.items():
        assert outcome.startswith("ValueError") and re.search(r"model\.norm\.weight|data/0", outcome), \
            f"{name}: {outcome}"


def test_a_truncated_download_is_not_called_a_legacy_file(tmp_path):
    """Half a `.bin` (an interrupted 47 GB download) has lost the zip's central directory; the
    error must name the file and not send the user off to re-save it with a newer torch."""
    data = (FIXTURES / "hf_single" / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin") as error:
        tensor_files.read_torch_bin(tmp_path / "pytorch_model.bin")
    assert "legacy" not in str(error.value) and "download it again" in str(error.value)


# --- Pickles that must never be run ----------------------------------------------------------------

def test_legacy_torch_format_is_refused_clearly():
    with pytest.raises(ValueError, match="legacy"):
        tensor_files.read_torch_bin(FIXTURES / "bad" / "legacy.bin")


def test_evil_fixture_really_holds_os_system():
    """The refusal test below means something only if the pickle does ask for os.system."""
    with zipfile.ZipFile(FIXTURES / "bad" / "evil.bin") as archive:
        ops = list(pickletools.genops(archive.read("evil/data.pkl")))
    globals_ = [arg for op, arg, _ in ops if op.name == "GLOBAL"]
    assert "os system" in globals_ and "torch._utils _rebuild_tensor_v2" in globals_


def test_forbidden_global_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # where `touch PWNED_BY_PICKLE` would land
    with pytest.raises(ValueError, match=r"os\.system|os system"):
        tensor_files.read_torch_bin(FIXTURES / "bad" / "evil.bin")
    assert not (tmp_path / MARKER).exists()
    assert not (REPO_ROOT / MARKER).exists()


class _Call:
    """Pickles as a call of `function(*args)`: what a hostile data.pkl does on load."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _bin_with_pickle(path: pathlib.Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("function, refused", [(os.system, r"(posix|os|nt)\.system"),
                                               (eval, r"builtins\.eval")])
def test_stack_global_payload_is_refused_without_running_it(tmp_path, monkeypatch, protocol,
                                                            function, refused):
    """Protocols 4 and 5 name globals with STACK_GLOBAL (module and name pushed as strings),
    not GLOBAL. The payload here, a state dict whose value runs a command, is live: unpickled
    unrestricted it creates the marker file. The reader refuses it and the marker never appears."""
    marker = tmp_path / MARKER
    command = (f"touch {marker}" if function is os.system
               else f"__import__('pathlib').Path({str(marker)!r}).touch()")
    data_pkl = pickle.dumps({"model.norm.weight": _Call(function, command)}, protocol=protocol)
    ops = [op.name for op, _, _ in pickletools.genops(data_pkl)]
    assert "STACK_GLOBAL" in ops and "GLOBAL" not in ops   # the opcode under test
    monkeypatch.chdir(tmp_path)
    pickle.loads(data_pkl)   # the control: unrestricted, the payload runs
    assert marker.exists()
    marker.unlink()
    _bin_with_pickle(tmp_path / "pytorch_model.bin", data_pkl)
    with pytest.raises(ValueError, match=refused) as error:
        tensor_files.read_torch_bin(tmp_path / "pytorch_model.bin")
    assert "refusing" in str(error.value)
    assert not marker.exists()


def test_stack_global_is_checked_for_every_global_not_only_the_first(tmp_path):
    """An allowed global first (collections.OrderedDict, by STACK_GLOBAL), then a forbidden one:
    admitting the first must not admit the rest."""
    payload = _Call(__import__("collections").OrderedDict,
                    [("model.norm.weight", _Call(exec, "raise SystemExit('ran')"))])
    data_pkl = pickle.dumps(payload, protocol=4)
    assert [op.name for op, _, _ in pickletools.genops(data_pkl)].count("STACK_GLOBAL") == 2
    _bin_with_pickle(tmp_path / "pytorch_model.bin", data_pkl)
    with pytest.raises(ValueError, match=r"builtins\.exec"):
        tensor_files.read_torch_bin(tmp_path / "pytorch_model.bin")


# --- Block-wise host arrays ----------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
def test_host_array_reads_a_block_of_rows_at_a_time(monkeypatch, transposed):
    """The loader's memory promise: besides the result, at most one block (BLOCK_BYTES) of the
    file is read at a time, and the result is 64-byte aligned (the CPU device then shares it)."""
    values = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    reads = []

    def rows(start, stop):
        reads.append((start, stop))
        return values[start:stop]

    monkeypatch.setattr(tensor_files, "BLOCK_BYTES", 3 * 6 * 4)   # three rows
    tensor = tensor_files.Tensor(values.shape, values.dtype, rows)
    out = tensor_files.host_array(tensor, transposed, jnp.bfloat16)
    assert reads == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert out.dtype == jnp.bfloat16 and out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out, (values.T if transposed else values).astype(jnp.bfloat16))


# --- benchmarks/load.py writes torch's format without torch: check it against torch's own file ------

def _benchmark_module():
    spec = importlib.util.spec_from_file_location("load_benchmark", REPO_ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_offsets(path: pathlib.Path) -> dict[str, int]:
    """Where each zip record's bytes start (after its local header, whose extra field pads)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        return {info.filename: info.header_offset + 30 + sum(struct.unpack(
                    "<HH", raw[info.header_offset + 26:info.header_offset + 30]))
                for info in archive.infolist()}


@pytest.mark.parametrize("torch_file, ordered", [
    ("hf_single/pytorch_model.bin", True),                    # an OrderedDict, f32
    ("hf_sharded/pytorch_model-00002-of-00003.bin", False),   # save_pretrained's plain dict
    ("hf_fp16/pytorch_model-00001-of-00002.bin", False),      # HalfStorage
])
def test_benchmark_writer_reproduces_torch_save(tmp_path, torch_file, ordered):
    """Same records in the same order, the same pickle byte for byte, the same storage bytes,
    every record 64-byte aligned: only torch's random serialization id differs."""
    bench = _benchmark_module()
    original = FIXTURES / torch_file
    tensors = tensor_files.read_torch_bin(original)
    entries = [(name, np.dtype(t.dtype).name, tuple(t.shape)) for name, t in tensors.items()]
    written = tmp_path / original.name
    bench.write_torch_bin(written, entries, lambda name: np.asarray(tensors[name]), ordered=ordered)
    with zipfile.ZipFile(original) as theirs, zipfile.ZipFile(written) as ours:
        assert ours.namelist() == theirs.namelist()
        for name in theirs.namelist():
            if not name.endswith("serialization_id"):
                assert ours.read(name) == theirs.read(name), name
    assert all(offset % 64 == 0 for offset in _record_offsets(written).values())
    assert all(offset % 64 == 0 for offset in _record_offsets(original).values())


def test_a_hub_name_downloads_weights_and_configs_but_never_code(tmp_path, monkeypatch):
    # The download is the hub client's; what it is asked for is ours: the files a checkpoint
    # needs, and no *.py (a model repository's modeling code would run on import elsewhere).
    import fnmatch

    import huggingface_hub

    asked = {}

    def fake_snapshot_download(name, allow_patterns):
        asked.update(name=name, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert tensor_files.local_or_download("OrionZheng/openmoe-base") == tmp_path
    repository = ["config.json", "pytorch_model.bin", "model.safetensors", "spiece.model",
                  "modeling_openmoe.py", "setup.py", "scripts/train.sh"]
    fetched = [f for f in repository if any(fnmatch.fnmatch(f, p) for p in asked["patterns"])]
    assert asked["name"] == "OrionZheng/openmoe-base"
    assert fetched == ["config.json", "pytorch_model.bin", "model.safetensors", "spiece.model"]
    assert tensor_files.local_or_download(tmp_path) == tmp_path  # a path is used as it is


def test_runtime_owned_copies_each_leaf_and_frees_the_shared_one():
    import jax
    host = np.arange(32, dtype=np.float32).reshape(4, 8)
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    shared = {"sharded": tensor_files.on_device(host, sharding),
              "whole": tensor_files.on_device(tensor_files.host_array(host, False, np.float32))}
    owned = tensor_files.runtime_owned(shared)
    for name in shared:
        assert shared[name].is_deleted() and not owned[name].is_deleted()
        assert owned[name].sharding == shared[name].sharding
        np.testing.assert_array_equal(np.asarray(owned[name]), host)
    # What it is for: a donated step writes its result into the very buffers it was given.
    def buffers(x):
        return [shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards]

    step = jax.jit(lambda x: x + 1, donate_argnums=0)
    for name, x in owned.items():
        before = buffers(x)
        assert buffers(step(x)) == before, name
