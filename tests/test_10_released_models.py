"""Tests for 10_released_models.py: every released checkpoint into 06's model, and the commands.

The checkpoints under tests/fixtures/released/ were written by the real writers (torch.save,
T5X's tensorstore + msgpack layout; see make_fixtures.py there) from one seeded tiny OpenMoE
whose T5X parameters are kept in reference_t5x.npz. Each test compares what the chapter loads
with that reference through a name table written here, independently of the chapter's own.
The file readers themselves are tested in test_support_tensor_files.py.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import REPO_ROOT, load
from support import checkpoints
from test_support_tensor_files import FIXTURES, MARKER, T5X_DIR, hf_name

released = load("10_released_models")
train_lib = load("09_train")
shard = load("07_sharding")
model_lib = load("06_model")
tok = load("01_tokenizer")


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
    """Every parameter of `model` is the reference tensor mapped to it, cast to `dtype`, exactly;
    the output projection and the routers, which compute in f32, load as f32 whatever `dtype`."""
    params = params_of(model)
    assert sorted(params) == sorted(our_path(p) for p in reference)
    for path, value in reference.items():
        loaded = params[our_path(path)]
        kept_f32 = our_path(path).startswith("logits_dense") or "/router/" in our_path(path)
        expected = np.float32 if kept_f32 else dtype
        assert loaded.dtype == expected, path
        np.testing.assert_array_equal(np.asarray(loaded), to_ours(path, value).astype(expected),
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


# --- Which reader a checkpoint needs (the readers: test_support_tensor_files.py) ----------------

READERS = {  # a checkpoint as a user names it → the reader that must read it, and its file
    "hf_single": ("read_torch_bin", "hf_single/pytorch_model.bin"),
    "hf_single/pytorch_model.bin": ("read_torch_bin", "hf_single/pytorch_model.bin"),
    "hf_sharded": ("read_index", "hf_sharded/pytorch_model.bin.index.json"),
    "hf_fp16": ("read_index", "hf_fp16/pytorch_model.bin.index.json"),
    "hf_safetensors": ("read_safetensors", "hf_safetensors/model.safetensors"),
    "hf_safetensors/model.safetensors": ("read_safetensors", "hf_safetensors/model.safetensors"),
    "t5x/checkpoint_100": ("read_t5x", "t5x/checkpoint_100"),
}


@pytest.mark.parametrize("given", sorted(READERS))
def test_read_tensors_picks_the_reader_each_layout_needs(given, reference, monkeypatch):
    reader, file = READERS[given]
    calls, real = [], getattr(released.tensor_files, reader)
    monkeypatch.setattr(released.tensor_files, reader,
                        lambda path, *rest: calls.append(pathlib.Path(path)) or real(path, *rest))
    tensors = released.read_tensors(FIXTURES / given)
    assert calls[0] == FIXTURES / file
    expected = sorted(reference) if reader == "read_t5x" else sorted(hf_name(p)[0] for p in reference)
    assert sorted(tensors) == expected


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        released.read_tensors(tmp_path)


def test_safetensors_bf16_loads_as_f32_parameters(reference):
    model, _ = released.load_model(FIXTURES / "hf_safetensors")   # f32 parameters by default
    assert_params_equal(model, {p: v.astype(jnp.bfloat16).astype(np.float32)
                                for p, v in reference.items()})


# --- Into the model: every tensor where the name table says, from every source -----------------

def test_t5x_in_memory_flat_dict_fills_every_parameter(reference_model, reference):
    assert_params_equal(reference_model, reference)


@pytest.mark.parametrize("source", ["hf_single", "hf_sharded", "t5x_dir", "npz_flat", "t5x_nested"])
def test_every_source_gives_the_same_parameters_and_logits(source, reference, cfg, tokens_BL,
                                                           reference_logits):
    if source.startswith("hf_"):
        model = released.model_from_tensors(released.read_tensors(FIXTURES / source), cfg)
    elif source == "t5x_dir":
        model = released.model_from_tensors(released.read_tensors(T5X_DIR), cfg)
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
    model = released.model_from_tensors(released.read_tensors(FIXTURES / "hf_fp16"), cfg)
    rounded = {path: value.astype(np.float16).astype(np.float32) for path, value in reference.items()}
    assert_params_equal(model, rounded)
    assert any(not np.array_equal(rounded[p], reference[p]) for p in reference)  # not vacuous


@pytest.mark.parametrize("source", ["t5x", "hf_single"])
def test_bf16_load_is_the_reference_cast_to_bf16(source, reference, cfg):
    if source == "t5x":
        model = released.model_from_tensors(reference, cfg, param_dtype=jnp.bfloat16)
    else:
        model = released.model_from_tensors(released.read_tensors(FIXTURES / "hf_single"), cfg,
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
    state = dict(released.read_tensors(FIXTURES / "hf_single"))
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


# --- Sharded loading ---------------------------------------------------------------------------------

def test_sharded_load_places_each_tensor_by_07s_rules(reference, cfg, reference_model):
    mesh = shard.make_mesh(expert=2, model=2)
    model = released.model_from_tensors(released.read_tensors(T5X_DIR), cfg, mesh=mesh)
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
    tensors = released.read_tensors(out)
    assert sorted(tensors) == sorted(hf_name(p)[0] for p in reference)
    for path, value in reference.items():
        name, transposed = hf_name(path)
        np.testing.assert_array_equal(np.asarray(tensors[name]), value.T if transposed else value)
    # And they load back into the same model.
    model, _ = released.load_model(out)
    assert model.cfg == reference_model.cfg
    assert_params_equal(model, reference)
    np.testing.assert_array_equal(np.asarray(logits_of(model, tokens_BL)), reference_logits)


def test_an_exports_config_holds_every_key_of_the_released_config(tmp_path, reference_model,
                                                                  hf_json):
    # ColossalAI's OpenMoeForCausalLM reads keys our model never uses (config.enable_kernel, ...):
    # a plain `from_pretrained(dir)` fails on any one missing. The fixture's config.json carries
    # every key of the released one; the port-only keys get the released values (kernels off).
    written = json.loads((released.export_hf(reference_model, tmp_path) / "config.json").read_text())
    assert sorted(set(hf_json) - set(written)) == []
    port_only = ["enable_kernel", "enable_load_balance", "load_balance_tolerance",
                 "load_balance_beam_width", "load_balance_group_swap_factor", "enable_comm_overlap",
                 "enable_hierarchical_alltoall", "label_smoothing", "z_loss_factor", "initializer_range"]
    assert {key: written[key] for key in port_only} == {key: hf_json[key] for key in port_only}
    assert written["enable_kernel"] is False


def test_export_hf_replaces_an_export_only_when_told(tmp_path, reference_model):
    released.export_hf(reference_model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    other = model_lib.OpenMoE(reference_model.cfg, rngs=nnx.Rngs(7))
    with pytest.raises(ValueError, match="already.*--overwrite"):
        released.export_hf(other, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    released.export_hf(other, tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded, _ = released.load_model(tmp_path)
    for (path, a), (_, b) in zip(params_of(other).items(), params_of(reloaded).items()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


# --- The commands: generate (with each token's experts) and perplexity ----------------------------

@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    """06's tiny preset with the embedded tokenizer, exported as a released model would be."""
    tokenizer = tok.embedded_tokenizer()
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size, max_seq_len=64)
    directory = tmp_path_factory.mktemp("exported") / "tiny"
    released.export_hf(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)), directory, tokenizer=tokenizer)
    return directory, tokenizer


def _expert_cells(output: str) -> list[list[list[tuple[int, bool]]]]:
    """The table's body parsed back: per token, per MoE layer, its (expert, kept) choices."""
    table = output.split("Where each token went")[1].splitlines()
    rows = [line.split("│")[1:] for line in table if "│" in line][1:]   # after the header
    return [[[(int(e), kept == "") for e, kept in re.findall(r"e(\d+)(✗?)", cell)] for cell in row]
            for row in rows]


def test_show_experts_routes_the_whole_text_in_one_pass(exported_tiny, capsys):
    """--show-experts is one teacher-forced pass over prompt + continuation with the command's
    routing: the table equals that pass's decisions, computed here, and with one group of half
    the slots it needs, the continuation's tokens (routed last) are dropped too, which decoding
    token by token never shows."""
    directory, tokenizer = exported_tiny
    prompt_text = "def add(a, b):\n    return a + b  # the sum of two numbers, as a function"
    common = ["generate", "--model", str(directory), "--prompt", prompt_text,
              "--max-new-tokens", "6", "--show-experts", "--capacity-rule", "colossalai",
              "--capacity-factor", "0.5"]
    released.main(common)
    output = capsys.readouterr().out
    assert "Decoding drops none of the tokens it adds" in output
    cells = _expert_cells(output)
    # The same model, routing and text, decided here in one forward pass.
    model, _ = released.load_model(directory, **released.CAPACITY_RULES["colossalai"],
                                   eval_capacity_factor=0.5)
    prompt = released.prompt_ids(tokenizer, prompt_text)
    (continuation,) = model_lib.generate(model, [prompt], max_new_tokens=6)
    assert len(continuation) == 6 and len(cells) == len(prompt) + 6
    _, stats, _ = model(jnp.asarray([prompt + continuation]), train=False)
    for layer, layer_stats in enumerate(stats):
        expected = [list(zip(e.tolist(), k.tolist()))
                    for e, k in zip(np.asarray(layer_stats["expert_BLA"])[0],
                                    np.asarray(layer_stats["kept_BLA"])[0])]
        assert [row[layer] for row in cells] == expected
    assert any(not kept for row in cells[len(prompt):] for cell in row for _, kept in cell)
    released.main(common + ["--dropless", "true"])
    assert all(kept for row in _expert_cells(capsys.readouterr().out)
               for cell in row for _, kept in cell)


def test_perplexity_is_06s_loss_on_one_document_per_row(exported_tiny):
    """The oracle: 06's loss_fn (train=False) on rows built here from the first documents of
    each domain: [0, t1 … t_{L-1}] → [t1 … t_L], cut at seq_len, right-padded, padding unscored."""
    directory, tokenizer = exported_tiny
    model, _ = released.load_model(directory)
    rows, seq_len = 3, 24
    results = released.perplexity(model, tokenizer, rows=rows, seq_len=seq_len)
    assert set(results) == {"text", "code"}
    corpus = tok.embedded_corpus("validation")
    for domain, result in results.items():
        inputs, targets = np.zeros((rows, seq_len), np.int32), np.zeros((rows, seq_len), np.int32)
        for row, text in enumerate(corpus[domain]["text"][:rows]):
            ids = [0] + tokenizer.encode(text)[:seq_len]
            inputs[row, :len(ids) - 1], targets[row, :len(ids) - 1] = ids[:-1], ids[1:]
        _, metrics = model_lib.loss_fn(model, {"inputs": inputs, "targets": targets,
                                               "loss_mask": (targets > 0).astype(np.float32)},
                                       train=False)
        assert result["tokens"] == int((targets > 0).sum()) == int(metrics["num_tokens"])
        np.testing.assert_allclose(result["loss"], float(metrics["cross_entropy"]), rtol=1e-5)
        np.testing.assert_allclose(result["accuracy"], float(metrics["accuracy"]), rtol=1e-5)
    # The default length is the model's when that is shorter than 512; longer is refused.
    assert model.cfg.max_seq_len == 64
    assert released.perplexity(model, tokenizer, rows=1) == \
        released.perplexity(model, tokenizer, rows=1, seq_len=64)
    with pytest.raises(ValueError, match=r"seq_len=65 .*\[1, 64\], the model's max_seq_len"):
        released.perplexity(model, tokenizer, rows=2, seq_len=65)


# --- A user's mistake is one line, never a traceback ----------------------------------------------

def _one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        released.main(argv)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _model_dir(tmp_path, exported_tiny, weights: bytes | None) -> pathlib.Path:
    """A checkpoint directory with the tiny model's config and tokenizer, and `weights` as its
    pytorch_model.bin."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("config.json", "spiece.model"):
        shutil.copy(exported_tiny[0] / name, directory / name)
    if weights is not None:
        (directory / "pytorch_model.bin").write_bytes(weights)
    return directory


def test_a_model_that_does_not_exist_is_one_line(tmp_path):
    message = _one_line_error(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert "nowhere" in message and "neither an existing path nor a hub name" in message
    # A name shaped like a hub name: the hub (offline in tests) cannot give it.
    message = _one_line_error(["perplexity", "--model", "nobody-here/no-such-model"])
    assert "nobody-here/no-such-model" in message and "hub could not give it" in message


def test_a_directory_without_config_json_is_one_line(tmp_path):
    (tmp_path / "weights").mkdir()
    shutil.copy(FIXTURES / "hf_single" / "pytorch_model.bin", tmp_path / "weights")
    message = _one_line_error(["perplexity", "--model", str(tmp_path / "weights")])
    assert "has no config.json" in message and "--preset" in message


def test_a_run_directory_of_another_version_is_one_line(tmp_path):
    # A config.json this version did not write (here an early one's, which named a preset):
    # refused in one line that says what to do, never read as some other run.
    (tmp_path / "config.json").write_text(json.dumps({"preset": "tiny", "steps": 8}))
    for argv in (["perplexity", "--run-dir", str(tmp_path)], ["export", "--run-dir", str(tmp_path)]):
        message = _one_line_error(argv)
        assert "config.json cannot be read" in message and "another version" in message


def test_a_truncated_bin_is_one_line(tmp_path, exported_tiny):
    data = (FIXTURES / "hf_single" / "pytorch_model.bin").read_bytes()
    directory = _model_dir(tmp_path, exported_tiny, data[:len(data) // 2])
    message = _one_line_error(["generate", "--model", str(directory), "--prompt", "x"])
    assert "damaged zip" in message and "pytorch_model.bin" in message


def test_a_refused_pickle_is_one_line_from_the_command_line(tmp_path, exported_tiny):
    """End to end, as a user meets it: exit status 1, one line on stderr, and nothing ran."""
    directory = _model_dir(tmp_path, exported_tiny, (FIXTURES / "bad" / "evil.bin").read_bytes())
    result = subprocess.run([sys.executable, str(REPO_ROOT / "10_released_models.py"), "generate",
                             "--model", str(directory), "--prompt", "x"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "os.system" in lines[0], lines
    assert not (tmp_path / MARKER).exists()


def test_a_model_without_a_tokenizer_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(released, "read_tensors", lambda path: pytest.fail("weights were read"))
    message = _one_line_error(["generate", "--model", str(FIXTURES / "hf_single"), "--prompt", "x"])
    assert "spiece.model" in message


def test_an_export_of_a_missing_run_is_one_line(tmp_path):
    message = _one_line_error(["export", "--run-dir", str(tmp_path / "no-run")])
    assert "not a 09_train.py run" in message and "--run-dir" in message


def test_a_too_long_seq_len_names_the_models_limit(exported_tiny):
    message = _one_line_error(["perplexity", "--model", str(exported_tiny[0]), "--rows", "1",
                               "--seq-len", "65"])
    assert "seq_len=65" in message and "64" in message and "max_seq_len" in message


def test_flags_need_their_full_names():
    with pytest.raises(SystemExit):   # --max-new would be --max-new-tokens with prefix matching
        released.parse_args(["generate", "--model", "m", "--prompt", "x", "--max-new", "3"])


# --- A 09 run: generate, perplexity and export with --run-dir -------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 09 run of 06's tiny preset: two steps, a checkpoint at step 2, rows of 32 tokens."""
    cfg = dataclasses.replace(
        train_lib.QUICK, model=model_lib.PRESETS["tiny"], run_dir=str(tmp_path_factory.mktemp("run")),
        objective="lm", ul2_until_step=0, seq_len=32, batch_size=8, microbatches=1, steps=2,
        warmup_steps=1, eval_every=0, eval_batches=0, checkpoint_every=2, keep_last=1,
        keep_period=2, sample_tokens=0)
    train_lib.train(cfg, overwrite=True, progress=False)
    return released.open_run(cfg.run_dir)


def test_open_run_lists_the_saved_steps(tiny_run):
    assert tiny_run.steps == (2,) and tiny_run.cfg.seq_len == 32


def test_perplexity_of_a_run_defaults_to_its_length_and_says_what_it_scored(tiny_run, capsys):
    """The run's model holds 32 positions, under the default 512: the default follows it."""
    released.main(["perplexity", "--run-dir", str(tiny_run.path), "--rows", "2"])
    output = capsys.readouterr().out
    assert "first 2 validation documents per domain" in output
    assert "truncated to 32 tokens" in output and "09's evaluation packs" in output
    model = released.run_model(tiny_run, dtype=jnp.float32, dropless=False)
    expected = released.perplexity(model, train_lib.load_tokenizer(tiny_run.cfg), rows=2, seq_len=32)
    for domain, result in expected.items():
        assert re.search(rf"^{domain}\s+{result['loss']:.3f}\s", output, re.MULTILINE), output


def test_export_of_a_run_needs_overwrite_to_replace_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "hf"
    released.main(["export", "--run-dir", str(tiny_run.path), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    message = _one_line_error(["export", "--run-dir", str(tiny_run.path), "--out", str(out)])
    assert "already holds" in message and "--overwrite" in message
    released.main(["export", "--run-dir", str(tiny_run.path), "--out", str(out), "--overwrite"])
    exported, _ = released.load_model(out)
    for (path, a), (_, b) in zip(params_of(released.run_model(tiny_run)).items(),
                                 params_of(exported).items()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_run_dir_commands_print_no_absl_warnings(tiny_run, tmp_path):
    """Reading a run goes through a read-only orbax manager whose notes are silenced: a user
    sees the output and nothing else."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "10_released_models.py"), "generate", "--run-dir",
         str(tiny_run.path), "--prompt", "def", "--max-new-tokens", "2", "--show-experts"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Where each token went" in result.stdout
    assert not re.search(r"WARNING|absl|^[WI]\d{4} ", result.stderr, re.MULTILINE), result.stderr


# --- A series of released checkpoints of one model (what 11 analyses over training) ------------

@pytest.fixture(scope="module")
def tiny_series(tmp_path_factory):
    """Two exports of the tiny preset from different seeds: two 'checkpoints' of one model."""
    tokenizer = tok.embedded_tokenizer()
    cfg = dataclasses.replace(model_lib.PRESETS["tiny"], vocab_size=tokenizer.vocab_size, max_seq_len=64)
    root = tmp_path_factory.mktemp("series")
    models = [model_lib.OpenMoE(cfg, rngs=nnx.Rngs(seed)) for seed in (1, 2)]
    for step, model in zip(("early", "late"), models):
        released.export_hf(model, root / step, tokenizer=tokenizer)
    return [str(root / "early"), str(root / "late")], models


def test_open_series_reads_configs_and_series_params_loads_each_checkpoint(tiny_series):
    names, models = tiny_series
    series = released.open_series(names, dtype=jnp.bfloat16)
    assert series.names == tuple(names)
    assert series.directories == tuple(pathlib.Path(name) for name in names)
    assert series.cfg.dtype == jnp.bfloat16 and series.cfg.t5x_padding
    assert series.tokenizer.vocab_size == series.cfg.vocab_size
    for index, model in enumerate(models):
        params = released.series_params(series, index)
        ours = dict(nnx.to_flat_state(params))
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            # The output projection and the routers compute in f32, so they load as f32.
            expected = jnp.float32 if path[0] == "logits_dense" or "router" in path else jnp.bfloat16
            assert ours[path].get_value().dtype == expected, path
            np.testing.assert_array_equal(np.asarray(ours[path].get_value()),
                                          np.asarray(variable.get_value()).astype(expected))
    first, second = (jax.tree.leaves(released.series_params(series, i)) for i in (0, 1))
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))   # two checkpoints


def test_open_series_refuses_a_missing_tokenizer_and_differing_models(tiny_series, tmp_path):
    names, models = tiny_series
    with pytest.raises(ValueError, match="spiece.model"):
        released.open_series([str(FIXTURES / "hf_single")])
    other = tmp_path / "wider"
    cfg = dataclasses.replace(models[0].cfg, eval_capacity_factor=4.0)
    released.export_hf(model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)), other,
                       tokenizer=tok.embedded_tokenizer())
    with pytest.raises(ValueError, match=r"differ in \['eval_capacity_factor'\]"):
        released.open_series([names[0], str(other)])


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_load_params_reads_what_09_saved(tiny_run):
    """The oracle: the checkpoint's parameter arrays as orbax reads them back with no target
    (no partial restore, no shapes given), in 09's leaf order."""
    with checkpoints.quiet_orbax():
        saved = ocp.PyTreeCheckpointer().restore((tiny_run.path / "checkpoints" / "2" / "state").absolute())
    saved_leaves = saved["params"]
    saved_leaves = [saved_leaves[k] for k in sorted(saved_leaves, key=int)] \
        if isinstance(saved_leaves, dict) else list(saved_leaves)
    loaded = jax.tree.leaves(released.load_params(tiny_run, 2))
    initial = jax.tree.leaves(released.load_params(tiny_run, 0))
    assert len(loaded) == len(saved_leaves) == len(initial)
    for ours, theirs in zip(loaded, saved_leaves):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert any(not np.array_equal(a, b) for a, b in zip(loaded, initial))   # training moved them
