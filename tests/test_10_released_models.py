"""Tests for 10_released_models.py: every released format read without torch, into 06's model.

The checkpoints under tests/fixtures/released/ were written by the real writers (torch.save,
T5X's tensorstore + msgpack layout; see make_fixtures.py there) from one seeded tiny OpenMoE
whose T5X parameters are kept in reference_t5x.npz. Each test compares what the chapter loads
with that reference through a name table written here, independently of the chapter's own.
"""

import dataclasses
import importlib.util
import json
import mmap
import os
import pathlib
import pickletools
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, load

released = load("10_released_models")
shard = load("07_sharding")
model_lib = load("06_model")
tok = load("01_tokenizer")

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "released"
T5X_DIR = FIXTURES / "t5x" / "checkpoint_100"
MARKER = "PWNED_BY_PICKLE"   # the file bad/evil.bin's pickle would create if it were run


# --- The name table, written out here once more --------------------------------------------------

def our_path(t5x_path: str) -> str:
    """Where a T5X parameter lives in our model's nnx state ("layers/3/mlp/wi_0")."""
    fixed = {"token_embedder/embedding": "token_embedder",
             "decoder/logits_dense/kernel": "logits_dense",
             "decoder/decoder_norm/scale": "decoder_norm/scale"}
    if t5x_path in fixed:
        return fixed[t5x_path]
    layer, rest = re.fullmatch(r"decoder/layers_(\d+)/(.+)", t5x_path).groups()
    rest = (rest.removesuffix("/kernel").replace("_layer_norm/", "_norm/")
            .replace("router/router_weights/w", "router/kernel").replace("mlp/expert/", "mlp/"))
    return f"layers/{layer}/{rest}"


def hf_name(t5x_path: str) -> tuple[str, bool]:
    """ColossalAI's name for a T5X parameter, and whether torch stores it transposed."""
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


def to_ours(t5x_path: str, value: np.ndarray) -> np.ndarray:
    """Our layout: the double-gated wi_0 [.., D, 2F] viewed as [.., D, 2, F]; all else as is."""
    if t5x_path.endswith("wi_0/kernel"):
        return value.reshape(*value.shape[:-1], 2, value.shape[-1] // 2)
    return value


def nested(flat: dict) -> dict:
    """flax's nested parameter dict from flat "/"-joined paths."""
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def params_of(model) -> dict[str, jax.Array]:
    """The model's parameters by "/"-joined path."""
    return {"/".join(map(str, path)): variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_equal(model, reference: dict, dtype=np.float32):
    """Every parameter of `model` is the reference tensor mapped to it, cast to `dtype`, exactly."""
    params = params_of(model)
    assert sorted(params) == sorted(our_path(p) for p in reference)
    for path, value in reference.items():
        loaded = params[our_path(path)]
        assert loaded.dtype == dtype, path
        np.testing.assert_array_equal(np.asarray(loaded), to_ours(path, value).astype(dtype),
                                      err_msg=f"{path} → {our_path(path)}")


@jax.jit
def logits_of(model, tokens_BL):
    return model(tokens_BL, train=False)[0]


# --- Module-wide fixtures: read once, compile the forward pass once --------------------------------

@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "reference_t5x.npz") as npz:
        return dict(npz)


@pytest.fixture(scope="module")
def hf_json() -> dict:
    return json.loads((FIXTURES / "config.json").read_text())


@pytest.fixture(scope="module")
def cfg(hf_json):
    return released.config_from_hf(hf_json)


@pytest.fixture(scope="module")
def tokens_BL():
    """Two prompts as T5X feeds them: start id 0, then random ids."""
    ids = np.random.default_rng(0).integers(1, 256, size=(2, 12))
    ids[:, 0] = 0
    return jnp.asarray(ids, jnp.int32)


@pytest.fixture(scope="module")
def reference_model(reference, cfg):
    return released.model_from_tensors(reference, cfg)


@pytest.fixture(scope="module")
def reference_logits(reference_model, tokens_BL):
    return np.asarray(logits_of(reference_model, tokens_BL))


# --- config.json ↔ ModelConfig ---------------------------------------------------------------------

def test_fixture_config_maps_onto_model_config(cfg, hf_json):
    expected = {"vocab_size": 256, "num_layers": 4, "d_model": 16, "num_heads": 2, "head_dim": 12,
                "d_ff": 20, "num_experts": 4, "top_k": 2, "train_capacity_factor": 1.25,
                "eval_capacity_factor": 2.0, "min_capacity": 4, "max_seq_len": 64,
                "rope_max_timescale": 10_000.0, "ffn_variant": "double_gated",
                "moe_wiring": "sequential"}
    assert {field: getattr(cfg, field) for field in expected} == expected
    # HF's rule (i+1) % interval == 0 and ours pick the same MoE layers.
    interval = hf_json["moe_layer_interval"]
    assert cfg.moe_layers == [i for i in range(4) if (i + 1) % interval == 0] == [1, 3]
    # Released weights run with T5X's evaluation semantics.
    assert cfg.t5x_padding and cfg.group_rule == "flaxformer"


def test_config_overrides_are_model_config_fields(hf_json):
    cfg = released.config_from_hf(hf_json, dtype=jnp.bfloat16, eval_capacity_factor=4.0)
    assert cfg.dtype == jnp.bfloat16 and cfg.eval_capacity_factor == 4.0


@pytest.mark.parametrize("field, value", [
    ("num_key_value_heads", 1),        # grouped-query attention: OpenMoE uses multi-head
    ("tie_word_embeddings", True),     # OpenMoE's output projection is its own matrix
    ("mlp_gated", False),              # the double-gated FFN is the released one
    ("hidden_act", "gelu"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
])
def test_config_fields_we_cannot_honour_are_named(hf_json, field, value):
    with pytest.raises(ValueError, match=field):
        released.config_from_hf({**hf_json, field: value})


def test_hf_config_writes_back_what_config_from_hf_read(cfg, hf_json):
    written = released.hf_config(cfg)
    shared = ["vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "head_dim",
              "intermediate_size", "num_experts", "moe_layer_interval", "router_topk",
              "num_key_value_heads", "tie_word_embeddings", "mlp_gated", "hidden_act",
              "router_capacity_factor_train", "router_capacity_factor_eval", "router_min_capacity",
              "max_position_embeddings", "rope_theta", "rms_norm_eps"]
    assert {key: written[key] for key in shared} == {key: hf_json[key] for key in shared}
    assert released.config_from_hf(written) == cfg


# --- Reading each format -----------------------------------------------------------------------

HF_DIRS = {"hf_single": np.float32, "hf_sharded": np.float32, "hf_fp16": np.float16}


@pytest.mark.parametrize("directory", sorted(HF_DIRS))
def test_hf_tensors_are_the_reference_under_colossalai_names(reference, directory):
    """Names, lazy shape and dtype, and values: [out, in] for 2-D weights, experts as stored."""
    dtype = HF_DIRS[directory]
    tensors = released.read_checkpoint(FIXTURES / directory)
    assert sorted(tensors) == sorted(hf_name(path)[0] for path in reference)
    for path, value in reference.items():
        name, transposed = hf_name(path)
        expected = (value.T if transposed else value).astype(dtype)
        tensor = tensors[name]
        assert tuple(tensor.shape) == expected.shape and np.dtype(tensor.dtype) == dtype, name
        np.testing.assert_array_equal(np.asarray(tensor), expected, err_msg=name)


def test_safetensors_file_written_by_the_safetensors_library_reads_as_bf16(reference, cfg):
    """bf16 has no numpy dtype of its own: the reader returns ml_dtypes' bfloat16 values, the
    reference rounded to bf16 exactly as torch rounded it when the fixture was written."""
    tensors = released.read_checkpoint(FIXTURES / "hf_safetensors")
    assert sorted(tensors) == sorted(hf_name(path)[0] for path in reference)
    for path, value in reference.items():
        name, transposed = hf_name(path)
        expected = (value.T if transposed else value).astype(jnp.bfloat16)
        assert np.dtype(tensors[name].dtype) == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(tensors[name]), expected, err_msg=name)
    model, _ = released.load_model(FIXTURES / "hf_safetensors")   # f32 parameters by default
    assert_params_equal(model, {p: v.astype(jnp.bfloat16).astype(np.float32)
                                for p, v in reference.items()})


def test_sharded_index_is_followed_not_guessed():
    """Every shard listed in the index is read, and each name comes from its own shard."""
    index = json.loads((FIXTURES / "hf_sharded" / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    tensors = released.read_checkpoint(FIXTURES / "hf_sharded")
    assert set(tensors) == set(index["weight_map"])
    assert sum(int(np.prod(t.shape)) * 4 for t in tensors.values()) == index["metadata"]["total_size"]


def test_a_single_bin_file_can_be_named_directly(reference):
    tensors = released.read_checkpoint(FIXTURES / "hf_single" / "pytorch_model.bin")
    np.testing.assert_array_equal(np.asarray(tensors["lm_head.weight"]),
                                  reference["decoder/logits_dense/kernel"].T)


def test_bin_tensors_are_memory_mapped_not_copied():
    """A `.bin` storage is read through a memory map of the file, so a 3 GB checkpoint does not
    pass through Python's heap: the array's buffer chain ends in an np.memmap."""
    tensor = released.read_checkpoint(FIXTURES / "hf_single")["model.layers.1.mlp.experts.wi_gate"]
    owner = np.asarray(tensor)
    while owner is not None and not isinstance(owner, (np.memmap, mmap.mmap)):
        owner = getattr(owner, "base", None)   # views (also as_strided's) keep their base
    assert owner is not None


def test_t5x_directory_yields_the_target_parameters_only(reference):
    """T5X's msgpack holds {"version", "optimizer": {"state": {"step"}, "target"}}: the reader
    returns the target's zarr arrays under their "/" paths, and no step or optimizer state."""
    tensors = released.read_checkpoint(T5X_DIR)
    assert sorted(tensors) == sorted(reference)
    for path, value in reference.items():
        assert tuple(tensors[path].shape) == value.shape
        assert np.dtype(tensors[path].dtype) == np.float32
        np.testing.assert_array_equal(np.asarray(tensors[path]), value, err_msg=path)


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        released.read_checkpoint(tmp_path)


# --- Into the model: every tensor where the name table says, from every source -----------------

def test_t5x_in_memory_flat_dict_fills_every_parameter(reference_model, reference):
    assert_params_equal(reference_model, reference)


@pytest.mark.parametrize("source", ["hf_single", "hf_sharded", "t5x_dir", "npz_flat", "t5x_nested"])
def test_every_source_gives_the_same_parameters_and_logits(source, reference, cfg, tokens_BL,
                                                           reference_logits):
    if source.startswith("hf_"):
        model = released.model_from_tensors(released.read_checkpoint(FIXTURES / source), cfg)
    elif source == "t5x_dir":
        model = released.model_from_tensors(released.read_checkpoint(T5X_DIR), cfg)
    elif source == "npz_flat":   # np.load's lazy mapping, exactly as the chapter's docs suggest
        with np.load(FIXTURES / "reference_t5x.npz") as npz:
            model = released.model_from_tensors(npz, cfg)
    else:
        model = released.model_from_tensors(nested(reference), cfg)
    assert_params_equal(model, reference)
    np.testing.assert_array_equal(np.asarray(logits_of(model, tokens_BL)), reference_logits)


def test_reference_logits_are_a_real_forward_pass(reference_logits):
    """Guards the equality test above: finite logits that differ between positions."""
    assert np.isfinite(reference_logits).all()
    assert np.ptp(reference_logits, axis=-1).min() > 0.1


def test_fp16_checkpoint_loads_as_the_reference_rounded_to_fp16(reference, cfg):
    model = released.model_from_tensors(released.read_checkpoint(FIXTURES / "hf_fp16"), cfg)
    rounded = {path: value.astype(np.float16).astype(np.float32) for path, value in reference.items()}
    assert_params_equal(model, rounded)
    assert any(not np.array_equal(rounded[p], reference[p]) for p in reference)  # not vacuous


@pytest.mark.parametrize("source", ["t5x", "hf_single"])
def test_bf16_load_is_the_reference_cast_to_bf16(source, reference, cfg):
    if source == "t5x":
        model = released.model_from_tensors(reference, cfg, param_dtype=jnp.bfloat16)
    else:
        model = released.model_from_tensors(released.read_checkpoint(FIXTURES / "hf_single"), cfg,
                                  param_dtype=jnp.bfloat16)
    assert_params_equal(model, reference, dtype=jnp.bfloat16)


# --- Wrong names and shapes are errors that name the tensor ----------------------------------------

def test_missing_t5x_tensor_is_named(reference, cfg):
    broken = dict(reference)
    del broken["decoder/layers_3/mlp/expert/wo/kernel"]
    with pytest.raises(ValueError, match="decoder/layers_3/mlp/expert/wo/kernel"):
        released.model_from_tensors(broken, cfg)


def test_extra_t5x_tensor_is_named(reference, cfg):
    extra = {**reference, "decoder/layers_0/mlp/expert/wi_0/kernel": np.zeros((4, 16, 40), np.float32)}
    with pytest.raises(ValueError, match="decoder/layers_0/mlp/expert/wi_0/kernel"):
        released.model_from_tensors(extra, cfg)


def test_misshaped_t5x_tensor_is_named(reference, cfg):
    """An attention kernel handed over in torch's [out, in] order: [24, 16] instead of [16, 24]."""
    bad = {**reference, "decoder/layers_2/self_attention/query/kernel":
           reference["decoder/layers_2/self_attention/query/kernel"].T}
    with pytest.raises(ValueError, match="decoder/layers_2/self_attention/query/kernel"):
        released.model_from_tensors(bad, cfg)


def test_missing_extra_and_misshaped_hf_tensors_are_named(cfg):
    state = dict(released.read_checkpoint(FIXTURES / "hf_single"))
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.gate_weight"}
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.gate_weight")):
        released.model_from_tensors(missing, cfg)
    extra = {**state, "model.layers.0.mlp.gate_weight": np.zeros((4, 16), np.float32)}
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.gate_weight")):
        released.model_from_tensors(extra, cfg)
    untransposed = {**state, "lm_head.weight": np.asarray(state["lm_head.weight"]).T}
    with pytest.raises(ValueError, match=re.escape("lm_head.weight")):
        released.model_from_tensors(untransposed, cfg)


def test_a_config_that_does_not_match_the_checkpoint_is_an_error(reference, hf_json):
    """Interval 4 puts MoE in layer 3 only: layer 1's expert tensors have no place."""
    with pytest.raises(ValueError, match="missing.*decoder/layers_1/mlp/wi_0/kernel"):
        released.model_from_tensors(reference, released.config_from_hf({**hf_json, "moe_layer_interval": 4}))


# --- Pickles that must never be run ----------------------------------------------------------------

def test_legacy_torch_format_is_refused_clearly():
    with pytest.raises(ValueError, match="legacy"):
        released.read_checkpoint(FIXTURES / "bad" / "legacy.bin")


def test_evil_fixture_really_holds_os_system():
    """The refusal test below means something only if the pickle does ask for os.system."""
    with zipfile.ZipFile(FIXTURES / "bad" / "evil.bin") as archive:
        ops = list(pickletools.genops(archive.read("evil/data.pkl")))
    globals_ = [arg for op, arg, _ in ops if op.name == "GLOBAL"]
    assert "os system" in globals_ and "torch._utils _rebuild_tensor_v2" in globals_


def test_forbidden_global_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # where `touch PWNED_BY_PICKLE` would land
    with pytest.raises(ValueError, match=r"os\.system|os system"):
        released.read_checkpoint(FIXTURES / "bad" / "evil.bin")
    assert not (tmp_path / MARKER).exists()
    assert not (REPO_ROOT / MARKER).exists()


def test_a_truncated_download_is_not_called_a_legacy_file(tmp_path):
    """Half a `.bin` (an interrupted 47 GB download) has lost the zip's central directory; the
    error must name the file and not send the user off to re-save it with a newer torch."""
    data = (FIXTURES / "hf_single" / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin") as error:
        released.read_checkpoint(tmp_path)
    assert "legacy" not in str(error.value)


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
import importlib
released = importlib.import_module("10_released_models")
results = {{}}
for name in {sorted(cases)!r}:
    try:
        tensors = released.read_checkpoint({str(tmp_path)!r} + "/" + name + ".bin")
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
    for name, outcome in outcomes.items():
        assert outcome.startswith("ValueError") and re.search(r"model\.norm\.weight|data/0", outcome), \
            f"{name}: {outcome}"


# --- Sharded loading ---------------------------------------------------------------------------------

def test_sharded_load_places_each_tensor_by_07s_rules(reference, cfg, reference_model):
    mesh = shard.make_mesh(expert=2, model=2)
    model = released.model_from_tensors(released.read_checkpoint(T5X_DIR), cfg, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    expected = dict(nnx.to_flat_state(shard.state_shardings(state, mesh)))
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        assert value.sharding.is_equivalent_to(expected[path].get_value(), value.ndim), path
    # The mesh really splits parameters (experts over 'expert', hidden units over 'model').
    split = [path for path, variable in nnx.to_flat_state(state)
             if variable.get_value().addressable_shards[0].data.shape != variable.get_value().shape]
    assert ("layers", 1, "mlp", "wi_0") in split and ("layers", 0, "mlp", "wo") in split
    assert_params_equal(model, reference)


# --- load_model and export_hf ----------------------------------------------------------------------

def test_load_model_reads_config_and_weights_of_an_hf_directory(reference, cfg):
    model, tokenizer = released.load_model(FIXTURES / "hf_sharded")
    assert tokenizer is None   # the fixture ships no spiece.model
    assert model.cfg == cfg
    assert_params_equal(model, reference)


def test_load_model_on_a_t5x_directory_needs_a_config(tmp_path, reference, cfg, tokens_BL,
                                                      reference_logits):
    copy = tmp_path / "t5x" / "checkpoint_100"
    shutil.copytree(T5X_DIR, copy)
    with pytest.raises(ValueError, match="config.json"):
        released.load_model(copy)
    shutil.copy(FIXTURES / "config.json", copy.parent / "config.json")   # beside checkpoint_100/
    model, _ = released.load_model(copy)
    assert_params_equal(model, reference)
    np.testing.assert_array_equal(np.asarray(logits_of(model, tokens_BL)), reference_logits)


def test_load_model_passes_dtype_and_overrides(reference):
    model, _ = released.load_model(FIXTURES / "hf_single", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert model.cfg.dtype == jnp.bfloat16
    assert_params_equal(model, reference, dtype=jnp.bfloat16)


def test_export_hf_round_trips(tmp_path, reference_model, reference, tokens_BL, reference_logits):
    out = tmp_path / "export"
    released.export_hf(reference_model, out)
    # The files hold ColossalAI's names in torch's layout, exactly the reference values.
    tensors = released.read_checkpoint(out)
    assert sorted(tensors) == sorted(hf_name(p)[0] for p in reference)
    for path, value in reference.items():
        name, transposed = hf_name(path)
        np.testing.assert_array_equal(np.asarray(tensors[name]), value.T if transposed else value)
    # And they load back into the same model.
    model, _ = released.load_model(out)
    assert model.cfg == reference_model.cfg
    assert_params_equal(model, reference)
    np.testing.assert_array_equal(np.asarray(logits_of(model, tokens_BL)), reference_logits)


def test_export_hf_never_overwrites(tmp_path, reference_model):
    released.export_hf(reference_model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already"):
        released.export_hf(reference_model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before


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
    tensors = released.read_checkpoint(original)
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


# --- The commands: generate (with each token's experts) and perplexity ----------------------------

@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """06's tiny preset with the embedded tokenizer, exported as a released model would be."""
    tokenizer = tok.embedded_tokenizer()
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size, max_seq_len=64)
    directory = tmp_path_factory.mktemp("exported") / "tiny"
    released.export_hf(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)), directory, tokenizer=tokenizer)
    return directory, tokenizer


def _expert_rows(output: str) -> list[str]:
    """The table's body: one line per token fed to the model, cells separated by │."""
    table = output.split("Where each token went")[1].splitlines()[2:]
    return [line for line in table if "│" in line]


def test_generate_shows_every_token_its_experts_and_the_drops(exported_tiny, capsys):
    directory, tokenizer = exported_tiny
    prompt = "def add(a, b):\n    return a + b  # the sum of two numbers, as a function"
    common = ["generate", "--model", str(directory), "--prompt", prompt, "--max-new-tokens", "3",
              "--show-experts", "--routing", "colossalai", "--capacity-factor", "0.5"]
    released.main(common)
    rows = _expert_rows(capsys.readouterr().out)
    # The prompt with its start token, then each generated token; two MoE layers, top-2 each.
    prompt_length = len(released.prompt_ids(tokenizer, prompt))
    assert prompt_length + 1 <= len(rows) <= prompt_length + 3
    assert all(len(re.findall(r"e\d", row)) == 4 for row in rows)
    # One group of the whole prompt with half the slots it needs: later tokens lose places.
    assert sum(row.count("✗") for row in rows[:prompt_length]) > 0
    released.main(common + ["--dropless"])
    assert not any("✗" in row for row in _expert_rows(capsys.readouterr().out))


def test_perplexity_of_an_untrained_model_is_near_the_uniform_guess(exported_tiny):
    directory, tokenizer = exported_tiny
    model, _ = released.load_model(directory)
    results = released.perplexity(model, tokenizer, rows=2, seq_len=32)
    assert set(results) == {"text", "code"}
    for result in results.values():
        assert result["tokens"] > 0 and 0.0 <= result["accuracy"] <= 1.0
        assert abs(result["loss"] - np.log(model.cfg.vocab_size)) < 1.5
    with pytest.raises(ValueError, match="seq_len=65"):
        released.perplexity(model, tokenizer, rows=2, seq_len=65)
