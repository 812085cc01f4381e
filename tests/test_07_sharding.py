"""Tests for 07_sharding.py on 8 simulated CPU devices (and 2 processes × 4 devices)."""

import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO_ROOT, load

ffn = load("03_swiglu")
model_lib = load("06_model")
shard = load("07_sharding")


# --- The mesh --------------------------------------------------------------------------------

def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("request_, shape", [
    ({"model": 2, "expert": 2}, (2, 2, 2)),
    ({"model": 1, "expert": 8}, (1, 8, 1)),
    ({"model": 2, "expert": 3}, (2, 2, 2)),   # the largest divisor of 4 not above 3
    ({"model": 8}, (1, 1, 8)),
    ({"data": 4, "expert": 2, "model": 1}, (4, 2, 1)),
])
def test_mesh_follows_t5x_recipe(request_, shape):
    mesh = shard.make_mesh(**request_)
    assert mesh.axis_names == ("data", "expert", "model")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == shape


@pytest.mark.parametrize("request_, message", [
    ({"model": 3}, "model=3 partitions do not divide the 8 devices"),
    ({"data": 3, "expert": 2, "model": 1}, "does not match the 8 devices"),
    ({"expert": 0}, "expert=0 must be >= 1"),
])
def test_impossible_meshes_are_clear_errors(request_, message):
    with pytest.raises(ValueError, match=message):
        shard.make_mesh(**request_)


# --- Rules and parameter shardings -----------------------------------------------------------

def test_mesh_spec_maps_names_and_skips_indivisible_or_reused_axes():
    mesh = shard.make_mesh(model=2, expert=2)
    assert shard.mesh_spec(("expert", "embed", "mlp"), (8, 64, 128), mesh) == P("expert", None, "model")
    assert shard.mesh_spec(("batch", "length"), (16, 32), mesh) == P(("expert", "data"), None)
    assert shard.mesh_spec(("vocab", "embed"), (511, 64), mesh) == P(None, None)   # 511 is odd
    assert shard.mesh_spec(("mlp", "mlp"), (4, 4), mesh) == P("model", None)      # axis used once
    assert shard.mesh_spec(("embed", "mlp"), (64, 128), mesh, shard.FSDP_RULES) == P("data", "model")


@pytest.mark.parametrize("name", ["small", "openmoe-base", "openmoe-8b", "openmoe-34b"])
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 1, 8), (4, 2, 1)])
def test_every_parameter_of_every_preset_gets_a_valid_sharding(name, shape):
    # Abstract meshes describe pods this machine does not have; shapes only, no memory.
    mesh = jax.sharding.AbstractMesh(shape, shard.MESH_AXES)
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(model_lib.PRESETS[name], rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value = variable.get_value()
        spec = shard.mesh_spec(variable.logical_axes, value.shape, mesh)
        assert len(spec) == len(value.shape), path
        used = [a for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)]
        assert len(used) == len(set(used)), f"{path}: {spec} uses a mesh axis twice"
        for size, axes in zip(value.shape, spec):
            if axes:
                names = (axes,) if isinstance(axes, str) else axes
                assert size % np.prod([mesh.shape[a] for a in names]) == 0, (path, spec)
        if variable.logical_axes[0] == "expert" and mesh.shape["expert"] > 1:
            assert spec[0] == "expert", f"{path}: experts must be split over 'expert'"


def test_config_for_mesh_checks_divisibility_and_sets_groups():
    mesh = shard.make_mesh(model=2, expert=2)
    cfg = shard.config_for_mesh(shard.DEMO_CONFIG, mesh)
    assert cfg.group_multiple == 4
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by the mesh's expert axis"):
        shard.config_for_mesh(dataclasses.replace(shard.DEMO_CONFIG, num_experts=3), mesh)


def test_heads_split_across_devices_are_warned_about_and_gathered():
    # OpenMoE-34B's 24 heads on model=16 in miniature: 6 heads on model=4 leave each device one
    # and a half heads, so GSPMD all-gathers q, k and v (each at least one device's share,
    # tokens × H·K / model) back to whole heads; 4 heads on model=4 move no activation at all.
    mesh = shard.make_mesh(model=4, expert=2)
    batch = shard.global_batch(shard.demo_batch(), mesh)
    local_tokens = shard.demo_batch()["inputs"].size // shard.batch_shards(mesh)
    for heads, head_dim in ((4, 16), (6, 16)):
        cfg = dataclasses.replace(shard.DEMO_CONFIG, num_heads=heads, head_dim=head_dim)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = shard.sharded_model(cfg, mesh)
        warned = [str(w.message) for w in caught if "num_heads" in str(w.message)]
        lowered = shard.sharded_loss_and_grads(model, batch, mesh)[3]
        largest = max(shard.all_gather_sizes(lowered.compile().as_text()), default=0)
        share = local_tokens * heads * head_dim // mesh.shape["model"]
        if heads == 4:
            assert not warned and largest < share
        else:
            assert largest >= share
            assert "num_heads=6 is not divisible by the mesh's model axis (4)" in warned[0]
            assert "on 2 devices; model=2" in warned[0]


# --- Sharded equals single-device ------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_run():
    mesh = shard.make_mesh(model=2, expert=2)
    model = shard.sharded_model(shard.DEMO_CONFIG, mesh)
    batch = shard.demo_batch()
    loss, metrics, grads, lowered = shard.sharded_loss_and_grads(model, shard.global_batch(batch, mesh), mesh)
    single = model_lib.OpenMoE(shard.config_for_mesh(shard.DEMO_CONFIG, mesh), rngs=nnx.Rngs(0))
    (single_loss, single_metrics), single_grads = jax.jit(
        jax.value_and_grad(model_lib.loss_fn, has_aux=True))(single, {k: jnp.asarray(v) for k, v in batch.items()})
    return locals()


def test_parameters_are_born_sharded_by_their_logical_names(sharded_run):
    state = nnx.state(sharded_run["model"], nnx.Param)
    moe_layer = sharded_run["model"].layers[1].mlp
    assert moe_layer.wi_0.get_value().sharding.spec == P("expert", None, None, "model")
    assert moe_layer.wo.get_value().sharding.spec == P("expert", "model", None)
    assert moe_layer.router.kernel.get_value().sharding.spec == P(None, None)
    assert sharded_run["model"].token_embedder.get_value().sharding.spec == P("model", None)
    # No device holds a whole expert kernel: each shard is 1/(expert·model) of it.
    wi_1 = moe_layer.wi_1.get_value()
    assert wi_1.addressable_shards[0].data.size == wi_1.size // 4
    assert all(isinstance(v.get_value().sharding, jax.NamedSharding)
               for _, v in nnx.to_flat_state(state))


def test_sharded_loss_and_gradients_equal_single_device(sharded_run):
    run = sharded_run
    assert float(run["metrics"]["fraction_dropped"]) > 0  # the MoE layer drops tokens here
    np.testing.assert_allclose(float(run["loss"]), float(run["single_loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(run["grads"])), jax.tree.leaves(nnx.state(run["single_grads"]))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("dropless", [False, True], ids=["capacity", "dropless"])
def test_ragged_experts_under_expert_parallelism_equal_single_device(dropless):
    # 05's ragged path on the 2×2×2 mesh: fixed-size buffers by all-to-all, grouped matmuls on
    # each device's filled slots; loss and gradients equal one device's ragged (no buffers).
    cfg = dataclasses.replace(shard.DEMO_CONFIG, num_layers=2, moe_dispatch="ragged",
                              dropless=dropless)
    mesh = shard.make_mesh(model=2, expert=2)
    batch = shard.demo_batch(rows=8)
    loss, metrics, grads, lowered = shard.sharded_loss_and_grads(
        shard.sharded_model(cfg, mesh), shard.global_batch(batch, mesh), mesh)
    single = model_lib.OpenMoE(shard.config_for_mesh(cfg, mesh), rngs=nnx.Rngs(0))
    (single_loss, single_metrics), single_grads = jax.jit(jax.value_and_grad(
        model_lib.loss_fn, has_aux=True))(single, {k: jnp.asarray(v) for k, v in batch.items()})
    assert (float(metrics["fraction_dropped"]) == 0) == dropless
    assert shard.count_collectives(lowered.as_text())["all-to-all"] == 4
    np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(single_grads))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_tokens_travel_by_all_to_all_and_weights_are_never_gathered(sharded_run):
    lowered = sharded_run["lowered"]
    assert shard.count_collectives(lowered.as_text())["all-to-all"] == 4  # 2 forward, 2 backward
    compiled_text = lowered.compile().as_text()
    assert shard.count_collectives(compiled_text)["all-to-all"] >= 4
    # Any gathered weight would be at least one device's shard of it; nothing that big is gathered.
    expert_shards = [v.get_value().addressable_shards[0].data.size
                     for _, v in nnx.to_flat_state(nnx.state(sharded_run["model"], nnx.Param))
                     if v.logical_axes[0] == "expert"]
    assert max(shard.all_gather_sizes(compiled_text), default=0) < min(expert_shards)
    # Each device routes its own groups, so no router activation is gathered either: any
    # all-gather left is smaller than one device's router probabilities, tokens × E.
    local_tokens = shard.demo_batch()["inputs"].size // shard.batch_shards(sharded_run["mesh"])
    assert max(shard.all_gather_sizes(compiled_text), default=0) < local_tokens * shard.DEMO_CONFIG.num_experts


def test_dense_ffn_split_over_model_moves_only_activations():
    # 03's dense FFN slices the (a, b) pair out of wi_0 [D, 2, F], so GSPMD keeps F split over
    # 'model': each device multiplies its own hidden units and all-reduces its partial sums;
    # no kernel moves. (05's experts view wi_0 as [D, 2F] instead, which would interleave F's
    # shards here; they do so only where F is local, inside 07's shard_map.)
    mesh = shard.make_mesh(model=2)
    d_model, d_ff = 16, 32
    shapes = ffn.ffn_kernel_shapes(d_model, d_ff)
    specs = {"wi_0": P(None, None, "model"), "wi_1": P(None, "model"), "wo": P("model", None)}
    kernels = [jax.device_put(jnp.ones(shapes[name]), NamedSharding(mesh, specs[name]))
               for name in ("wi_0", "wi_1", "wo")]
    x_ND = jax.device_put(jnp.ones((64, d_model)), NamedSharding(mesh, P(shard.BATCH_AXES)))

    def loss(x_ND, *kernels):
        return jnp.sum(ffn.swiglu(x_ND, *kernels) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x_ND, *kernels).compile()
    counts = shard.count_collectives(compiled.as_text())
    assert counts["collective-permute"] == counts["all-to-all"] == counts["all-gather"] == 0, counts


def test_all_gather_sizes_reads_hlo_shapes():
    text = ("%a = f32[4,128,8]{2,1,0} all-gather(%x), dimensions={0}\n"
            "%b = s32[16]{0} all-gather(%y)\n%c = f32[2,2]{1,0} all-reduce(%z)")
    assert shard.all_gather_sizes(text) == [4096, 16]


def test_collective_bytes_sums_every_output_once():
    # A tuple-shaped async all-to-all (two bf16 outputs) counts once, with both outputs' bytes.
    text = ("%a = f32[256,1024]{1,0} all-gather(%x), dimensions={0}\n"
            "%b = (bf16[512,1024]{1,0}, bf16[512,1024]{1,0}) all-to-all-start(%y, %z)\n"
            "%c = (bf16[512,1024]{1,0}, bf16[512,1024]{1,0}) all-to-all-done(%b)\n"
            "%d = pred[8]{0} all-reduce(%w), to_apply=%or")
    measured = shard.collective_bytes(text)
    assert measured["all-gather"] == {"count": 1, "mib": 1.0}
    assert measured["all-to-all"] == {"count": 1, "mib": 2.0}
    assert measured["all-reduce"] == {"count": 1, "mib": 8 / 2**20}
    assert measured["reduce-scatter"] == {"count": 0, "mib": 0.0}


def test_optimizer_state_shardings_are_inferred_from_the_parameters():
    mesh = shard.make_mesh(model=2, expert=2)
    weight = jax.device_put(jnp.ones((8, 64, 128)), jax.NamedSharding(mesh, P("expert", None, "model")))

    def row_and_column_means(w):
        return jnp.mean(w, axis=-1), jnp.mean(w, axis=-2)

    rows, columns = shard.infer_shardings(row_and_column_means, weight, mesh=mesh)
    assert rows.spec == P("expert", None) and columns.spec == P("expert", "model")
    assert rows.mesh == mesh


# --- Memory ----------------------------------------------------------------------------------

def test_memory_per_device_equals_the_bytes_a_device_really_holds(sharded_run):
    # The abstract count must match the shards that the sharded demo model put on device 0.
    held = sum(4 * v.get_value().addressable_shards[0].data.size
               for _, v in nnx.to_flat_state(nnx.state(sharded_run["model"], nnx.Param)))
    estimate = shard.memory_per_device(shard.DEMO_CONFIG, {"data": 2, "expert": 2, "model": 2},
                                     batch=16, seq_len=32)
    assert estimate["parameters"] == held == estimate["gradients"]


def test_openmoe_8b_fits_a_v3_core_only_with_expert_and_model_parallelism():
    cfg = model_lib.PRESETS["openmoe-8b"]
    replicated = shard.memory_per_device(cfg, {"data": 256, "expert": 1, "model": 1}, batch=128, seq_len=2048)
    assert replicated["parameters"] == 4 * model_lib.parameter_counts(cfg)["total"]
    split = shard.memory_per_device(cfg, {"data": 1, "expert": 32, "model": 8}, batch=128, seq_len=2048)
    assert split["total"] < 16 * 2**30 < replicated["total"]


# --- Planning for a pod ----------------------------------------------------------------------

def test_abstract_model_holds_shapes_and_shardings_and_compiles_the_same_step(sharded_run):
    mesh = sharded_run["mesh"]
    abstract = shard.sharded_model(shard.DEMO_CONFIG, mesh, abstract=True)
    placed = dict(nnx.to_flat_state(nnx.state(sharded_run["model"], nnx.Param)))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        value, real = variable.get_value(), placed[path].get_value()
        assert type(value) is jax.ShapeDtypeStruct, f"{path} was allocated"
        assert (value.shape, value.dtype, value.sharding) == (real.shape, real.dtype, real.sharding)
    # Lowered from shapes alone, the step still routes tokens by 4 all-to-alls, as the real one.
    rows = NamedSharding(mesh, P(shard.BATCH_AXES))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows)
             for k, v in shard.demo_batch().items()}
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(model_lib.loss_fn, has_aux=True)).lower(abstract, batch)
    assert shard.count_collectives(lowered.as_text())["all-to-all"] == 4


def test_peak_tflops_reads_the_table_by_longest_prefix_unless_overridden():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert shard.peak_tflops(device("TPU v3")) == 61.5
    assert shard.peak_tflops(device("TPU v5 lite")) == 197.0    # not "TPU v5"'s 229.5
    assert shard.peak_tflops(device("TPU v5p")) == 229.5
    assert shard.peak_tflops(device("TPU v3"), override=100.0) == 100.0
    assert shard.peak_tflops(jax.devices()[0]) is None         # a CPU: unknown
    assert shard.peak_tflops(jax.devices()[0], override=2.5) == 2.5


def test_topology_devices_without_libtpu_is_a_clear_error():
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed: the topology exists")
    with pytest.raises(ValueError, match=r"'v3:4x4' needs libtpu \(pip install -r requirements-tpu"):
        shard.topology_devices("v3:4x4")


def test_compile_report_of_a_matmul_split_over_model():
    # x [64, 32] @ w [32, 16] with the contracted axis split over 'model' (2): every device
    # multiplies x [64, 16] by w [16, 16], and one all-reduce sums the partial [64, 16] outputs.
    mesh = shard.make_mesh(model=2, expert=2)
    x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P(None, "model")))
    w = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, P("model", None)))
    compiled = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P())).lower(x, w).compile()
    report = shard.compile_report(compiled, mesh, model_flops=2 * 64 * 32 * 16, loop_trips=3,
                                  peak=100.0)
    assert set(report) == {"mesh", "devices", "device_kind", "argument_gib", "output_gib",
                           "temp_gib", "total_gib", "compiler_flops_per_device",
                           "model_flops_per_device", "collectives"}  # no time estimate on CPU
    assert (report["mesh"], report["devices"]) == ({"data": 2, "expert": 2, "model": 2}, 8)
    assert report["argument_gib"] * 2**30 == 4 * (64 * 16 + 16 * 16)
    assert report["output_gib"] * 2**30 == 4 * 64 * 16
    assert report["total_gib"] == report["argument_gib"] + report["temp_gib"]
    # The local matmul and the all-reduce's additions, counted once per loop trip.
    assert report["compiler_flops_per_device"] == 3 * (2 * 64 * 16 * 16 + 64 * 16)
    assert report["model_flops_per_device"] == 2 * 64 * 32 * 16 / 8
    assert report["collectives"]["all-reduce"] == {"count": 1, "mib": 4 * 64 * 16 / 2**20}
    assert report["collectives"]["all-to-all"]["count"] == 0


def test_compile_report_estimates_step_time_and_mfu_where_the_compiler_does():
    class TpuLikeCompiled:  # what a TPU compile answers: the compiler's own time estimate
        def memory_analysis(self):
            return None

        def cost_analysis(self):
            return {"flops": 1e12, "optimal_seconds": 0.5}

        def as_text(self):
            return ""

    mesh = shard.make_mesh(model=2, expert=2)
    report = shard.compile_report(TpuLikeCompiled(), mesh, model_flops=8 * 20e12, loop_trips=2,
                                  peak=50.0)
    assert report["estimated_step_s"] == 1.0 and report["compiler_flops_per_device"] == 2e12
    assert report["estimated_mfu"] == pytest.approx(20e12 / 1.0 / 50e12)
    assert report["total_gib"] == 0.0
    assert "estimated_mfu" not in shard.compile_report(TpuLikeCompiled(), mesh, model_flops=1.0)


# --- Multi-host ------------------------------------------------------------------------------

def test_two_processes_compute_the_same_loss_as_one(sharded_run):
    # A real JAX cluster over loopback: 2 processes × 4 CPU devices = the same 8-device mesh.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen(
        [sys.executable, "07_sharding.py", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    losses = [float(out.strip().split("loss ")[-1]) for out, _ in outputs]
    assert losses[0] == losses[1]
    np.testing.assert_allclose(losses[0], float(sharded_run["loss"]), rtol=1e-6)


def test_multihost_arguments_must_come_together():
    with pytest.raises(ValueError, match="together"):
        shard.initialize_multihost("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="process_id=2"):
        shard.initialize_multihost("127.0.0.1:1234", 2, 2)
