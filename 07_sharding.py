"""Chapter 7: spreading OpenMoE over a TPU pod: meshes, partitioning rules, expert parallelism.

OpenMoE trained on 64–512 TPU v3 chips (arXiv 2402.01739 §2.5) with T5X's MoE partitioner
(T5X `contrib/moe/partitioning.py`, `standard_logical_axis_rules`): the devices form a 3-D mesh
('data', 'expert', 'model'), and logical axis names on every parameter are mapped to mesh axes
by rules. The batch is split over
('expert', 'data'), so outside MoE layers the expert axis is simply more data parallelism; experts
are split over 'expert'; hidden units, heads and vocab over 'model' (8B: 8 model partitions,
32 expert partitions). Inside an MoE layer each device routes its own groups, then one
all-to-all along 'expert' sends every expert's buffer slots to the device that holds that
expert, and a second all-to-all brings the results back (GShard §3.2). T5X coaxes GSPMD into
those all-to-alls with sharding constraints; here they are written out with `jax.shard_map` and
`jax.lax.all_to_all`, so a reader can see them and the compiled program must contain them.
This file also builds models already sharded, feeds each host its slice of the global batch,
and estimates memory per device for any preset and mesh. Its last section plans for a pod this
machine does not have: a model of shapes and shardings only (`sharded_model(abstract=True)`),
compiled for a TPU topology (`topology_devices`, with libtpu), and the compiler's account of
the step (`compile_report`: memory per device, FLOPs, collectives, and time and MFU on TPUs).
Left out: pipeline parallelism, multi-slice meshes (several TPU slices joined over the
data-center network, DCN), and ragged all-to-all (dropless MoE).
Self-test: `python 07_sharding.py` simulates 8 CPU devices (about 30 s).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from support import cli, host

model_lib = importlib.import_module("06_model")
moe = importlib.import_module("05_moe_layer")

MESH_AXES = ("data", "expert", "model")
# Where a batch dimension lives: split over both axes, so every device holds different tokens.
BATCH_AXES = ("expert", "data")


# --- The mesh -------------------------------------------------------------------------------------
def make_mesh(*, model: int = 1, expert: int = 1, data: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'expert', 'model') mesh over `devices` (default: all of them).

    T5X's recipe (`default_moe_mesh`): take `model` partitions first; then factor the expert
    axis out of what remains, using the largest divisor not above the requested `expert`; the
    rest is 'data'. Pass `data` too to ask for an exact shape. Axes are Auto: the compiler
    (GSPMD) propagates shardings from the parameters and the batch through the model.
    """
    devices = list(devices if devices is not None else jax.devices())
    count = len(devices)
    for name, size in (("model", model), ("expert", expert), ("data", data)):
        if size is not None and size < 1:
            raise ValueError(f"mesh {name}={size} must be >= 1")
    if count % model:
        raise ValueError(f"model={model} partitions do not divide the {count} devices")
    rest = count // model
    if data is None:
        expert = max(d for d in range(1, min(expert, rest) + 1) if rest % d == 0)
        data = rest // expert
    elif data * expert * model != count:
        raise ValueError(f"mesh data={data} × expert={expert} × model={model} = "
                         f"{data * expert * model} does not match the {count} devices")
    return jax.make_mesh((data, expert, model), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch (and the MoE groups) are split: |expert| · |data|."""
    return mesh.shape["expert"] * mesh.shape["data"]


def parse_mesh(text: str) -> dict[str, int]:
    """A mesh as a command line writes it: "data=2,expert=4,model=1" → {"data": 2, "expert": 4,
    "model": 1}; "" → {} (every device on 'data')."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1 or name in sizes:
            raise ValueError(f"mesh={text!r}: write it as 'data=N,expert=N,model=N' with each "
                             f"axis of {MESH_AXES} at most once, sizes >= 1")
        sizes[name] = int(value)
    return sizes


def mesh_from_text(text: str, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh `text` names (see parse_mesh) over `devices` (default: all), whose axes'
    product must be the device count; "" puts every device on 'data'."""
    sizes, devices = parse_mesh(text), list(devices if devices is not None else jax.devices())
    if sizes and math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh={text!r} has {math.prod(sizes.values())} devices but there are "
                         f"{len(devices)}; the axes' product must equal the count")
    return make_mesh(**sizes, devices=devices) if sizes else make_mesh(devices=devices)


def training_mesh(text: str, devices=None, *, batch_size: int, microbatches: int, model_cfg):
    """The mesh `text` names, checked against a run before anything is compiled: the batch must
    split over the batch shards × microbatches, and the model over the axes (config_for_mesh)."""
    mesh = mesh_from_text(text, devices)
    if batch_size % (batch_shards(mesh) * microbatches):
        raise ValueError(f"batch_size={batch_size} must be divisible by the batch shards × "
                         f"microbatches = {batch_shards(mesh)} × {microbatches}")
    config_for_mesh(model_cfg, mesh)  # raises if experts/heads/vocab do not divide
    return mesh


# --- The rules: logical axis names -> mesh axes ---------------------------------------------------
# T5X's MoE rules (t5x/contrib/moe/partitioning.py `standard_logical_axis_rules`) for the names
# that 03–06 put on their parameters. A name missing here is replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),   # activations: every device a different slice of the batch
    ("expert", "expert"),    # stacked experts: each device holds E / |expert| of them
    ("mlp", "model"),        # FFN and expert hidden units: tensor (Megatron) parallelism
    ("joined_kv", "model"),  # attention heads
    ("vocab", "model"),      # embedding rows and output logits
    ("embed", None),         # d_model: replicated (FSDP_RULES splits it over 'data' instead)
    ("unmodeled", None),     # the router's expert axis: replicated, as is 03's "pair" (no rule)
)
# Fully sharded data parallelism for memory-bound runs: parameters' d_model split over 'data'
# too, gathered layer by layer as needed (T5X's parameter_partitioning_dims=2).
FSDP_RULES = tuple(("embed", "data") if name == "embed" else (name, axes) for name, axes in RULES)


def mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
              rules=RULES) -> P:
    """PartitionSpec of one array from its logical names, e.g. ("expert", "embed", "mlp") →
    P('expert', None, 'model'). A dimension stays whole if its size is not divisible by the
    mesh axes it would be split over, or if those axes are already used by another dimension."""
    table, used, spec = dict(rules), set(), []
    for name, size in zip(logical_axes, shape):
        axes = table.get(name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=RULES):
    """The NamedSharding of every parameter in an nnx State, read from its `logical_axes`."""
    def sharding(variable):
        shape = jnp.shape(variable.get_value())
        axes = variable.get_metadata().get("logical_axes", (None,) * len(shape))
        return variable.replace(NamedSharding(mesh, mesh_spec(axes, shape, mesh, rules)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(constructor: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules=RULES,
                   *, abstract: bool = False):
    """Build a module whose parameters are born sharded: never whole on any one device.

    The constructor runs once abstractly (`nnx.eval_shape`: shapes and names, no memory), the
    rules turn names into shardings, and then the constructor runs again under `jax.jit` with
    those output shardings, so each device computes only its own shards of the initial values.
    With `abstract`, it stops before that: every value is a `jax.ShapeDtypeStruct` carrying its
    NamedSharding, enough to compile a step for the module, and nothing is allocated.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
    shardings = state_shardings(abstract_state, mesh, rules)
    if abstract:
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             abstract_state, shardings)
    else:
        state = jax.jit(lambda: nnx.split(constructor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def infer_shardings(function: Callable, *arrays, mesh: jax.sharding.Mesh):
    """Shardings of `function(*arrays)`'s outputs, found by tracing, not by running.

    Traced on an Explicit copy of the mesh, sharding is part of every array's type, so JAX works
    out each output's sharding from its inputs' (e.g. 08's Adafactor keeps, per parameter, a mean
    of squared gradients for each row: for a parameter split as P('expert', None, 'model') it
    comes out as P('expert', None)). Those specs are then used
    on our Auto mesh, e.g. as `out_shardings` for creating the optimizer state.
    """
    explicit = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * 3)

    def as_explicit(x):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(explicit, spec))

    def on_auto_mesh(x):  # outputs made from no input (a step counter, say) are replicated
        return NamedSharding(mesh, x.sharding.spec if isinstance(x.sharding, NamedSharding) else P())

    with jax.set_mesh(explicit):
        outputs = jax.eval_shape(function, *jax.tree.map(as_explicit, arrays))
    return jax.tree.map(on_auto_mesh, outputs)


# --- Expert parallelism: tokens travel to their experts by all-to-all -----------------------------
def config_for_mesh(cfg, mesh: jax.sharding.Mesh):
    """The model config adjusted to a mesh: routing groups split evenly over the batch shards.

    Checks, before anything is compiled, that experts, hidden units, heads and vocabulary
    divide the axes they are split over; returns cfg with `group_multiple` = batch shards and
    `expert_replicas` = the 'data' size (flaxformer: devices ÷ (expert × model partitions)).
    Warns when whole heads do not divide 'model' (OpenMoE-34B's 24 heads on 16 partitions):
    H·K still splits, so the step compiles, but each device holds part of a head, and GSPMD
    gathers every layer's q, k and v back to whole heads and repeats each head's attention on
    model / gcd(H, model) devices (34B on a v3-512: 224 all-gathers, 9% of the step's time).
    """
    needs = {"num_experts": (cfg.num_experts, "expert"), "d_ff": (cfg.d_ff, "model"),
             "num_heads × head_dim": (cfg.num_heads * cfg.head_dim, "model"),
             "vocab_size": (cfg.vocab_size, "model")}
    for name, (size, axis) in needs.items():
        if size % mesh.shape[axis]:
            raise ValueError(f"{name}={size} is not divisible by the mesh's {axis} axis "
                             f"({mesh.shape[axis]}); choose a mesh whose {axis} size divides it")
    # Heads that straddle devices cost time, not correctness: a warning, and the mesh to use.
    model, whole = mesh.shape["model"], math.gcd(cfg.num_heads, mesh.shape["model"])
    if whole < model:
        warnings.warn(f"num_heads={cfg.num_heads} is not divisible by the mesh's model axis "
                      f"({model}): every attention layer all-gathers q, k and v to whole heads "
                      f"and computes each head on {model // whole} devices; model={whole} "
                      "(with more data or expert shards) keeps heads whole", stacklevel=2)
    return dataclasses.replace(cfg, group_multiple=batch_shards(mesh),
                               expert_replicas=mesh.shape["data"])


def expert_parallel_runner(mesh: jax.sharding.Mesh) -> Callable:
    """A runner for 05's `MoELayer(run_groups=...)`: each device routes its own groups, and
    tokens travel to their experts' devices and back by all-to-all.

    Outside, the groups [G, T, D] are split over ('expert', 'data') like the batch; the router
    (kernel, and any balancing bias) is whole on every device; the expert kernels [E, ...] are
    split over 'expert', their hidden units over 'model'. Inside `shard_map` each device sees
    its local pieces and:
      1. routes its groups: logits, top-k, queue, drops and losses never leave the device (the
         losses are then averaged over devices, which equals their mean over all groups);
      2. dispatches into buffers [G_local, E, C, D] and, all_to_all along 'expert', splits E into
         |expert| chunks and sends chunk i to the i-th device of that axis, receiving every
         group's slots for *its* experts;
      3. runs its E/|expert| experts (a slice of every expert's hidden units per 'model' device,
         so the output is a partial sum: psum over 'model' completes it); 05's "ragged" path
         runs them on the filled slots only (`compute=apply_experts_grouped`);
      4. all_to_all back: each group's slots return to the device that routed them; combines.
    Only activations travel, and only the expert buffers; no device gathers expert weights or
    another device's router probabilities. `check_vma` (on) tracks which values vary along which
    axes, so the psum's gradient is the identity it should be, and the gradients come out exact,
    with none of T5X's manual rescaling.
    """
    expert_spec = P("expert", None, None, "model")     # wi_0 [E, D, 2, F] (double-gated)
    up_spec, down_spec = P("expert", None, "model"), P("expert", "model", None)

    def run_experts(buffers_GECD, experts, variant, dtype, compute=moe.apply_experts):
        arrived_GECD = jax.lax.all_to_all(buffers_GECD, "expert", 1, 0, tiled=True)
        partial_GECD = compute(arrived_GECD, experts, variant, dtype)
        out_GECD = jax.lax.psum(partial_GECD, "model")
        return jax.lax.all_to_all(out_GECD, "expert", 0, 1, tiled=True)

    def run_groups(layer_fn, x_GTD, router, experts):
        def local(x_GTD, router, experts):
            y_GTD, routing, losses = layer_fn(x_GTD, router, experts, run_experts)
            return y_GTD, routing, jax.tree.map(lambda v: jax.lax.pmean(v, BATCH_AXES), losses)

        specs = tuple(expert_spec if k.ndim == 4 else (down_spec if i == 2 else up_spec)
                      for i, k in enumerate(experts))
        return jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES), P(), specs),
                             out_specs=(P(BATCH_AXES), P(BATCH_AXES), P()))(x_GTD, router,
                                                                            experts)

    return run_groups


def sharded_model(cfg, mesh: jax.sharding.Mesh, *, seed: int = 0, rules=RULES,
                  abstract: bool = False):
    """An OpenMoE for this mesh: config checked and adjusted, born sharded, and every MoE layer
    built with the all-to-all runner. `abstract`: parameters are shapes and shardings only
    (see `create_sharded`), for compiling a step on hardware this machine does not have."""
    cfg = config_for_mesh(cfg, mesh)
    runner = expert_parallel_runner(mesh)
    return create_sharded(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(seed), run_groups=runner),
                          mesh, rules, abstract=abstract)


# --- Feeding the batch, on one host or many -------------------------------------------------------
def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, *, auto: bool = False) -> None:
    """Join the hosts into one JAX cluster; a no-op for a single host.

    On a Cloud TPU pod every host runs the same command and `auto=True` lets JAX discover the
    others. Elsewhere (or to test on one machine over loopback), give all three values, e.g.
    ("10.0.0.2:1234", 4, this host's index). Must run before anything touches a device.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("multi-host needs coordinator_address, num_processes and process_id "
                             f"together; got {explicit}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """This host's rows → one global array per field, split over the batch axes.

    Each host passes only the rows it loaded (global batch / number of hosts); JAX stitches
    them into global arrays without moving data between hosts. On one host it is a device_put.
    """
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}


# --- Memory per device, computed from shapes alone ------------------------------------------------
def memory_per_device(cfg, mesh_shape: dict[str, int], *, batch: int, seq_len: int,
                      rules=RULES, remat: bool = True) -> dict[str, float]:
    """Bytes per device of parameters, gradients and activations for one (micro)batch (09 can
    split a step's batch into microbatches, run one at a time, and sum their gradients).

    Parameters and gradients are exact: each parameter's f32 bytes divided by the number of
    devices that split it. Activations are an estimate of what the backward pass keeps, per
    token on this device: with remat (06's `remat_policy="full"`; "dots" keeps more, which
    `compile_report` measures on the compiled step), each block's input (D) plus one block's
    working set; without, every block's working set (attention: x, q, k, v, output and the L×L
    scores per head; FFN: x and its 4 hidden vectors; MoE blocks add cf·k expert slots, router
    and extra FFN). Optimizer state is 08's business (Adafactor: about 0; AdamW: 2 × parameters).
    """
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape[a] for a in MESH_AXES), MESH_AXES)
    abstract = nnx.eval_shape(lambda: model_lib.OpenMoE(cfg, rngs=nnx.Rngs(0)))
    params = 0.0
    for _, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = variable.get_value().shape
        spec = mesh_spec(variable.get_metadata()["logical_axes"], shape, mesh, rules)
        split = math.prod(mesh.shape[a] for axes in spec if axes
                          for a in ((axes,) if isinstance(axes, str) else axes))
        params += 4 * math.prod(shape) / split
    tokens = batch * seq_len / (mesh_shape["expert"] * mesh_shape["data"])
    m, bytes_per_value = mesh_shape["model"], jnp.dtype(cfg.dtype).itemsize
    hk, f = cfg.num_heads * cfg.head_dim, cfg.d_ff
    attention = 3 * cfg.d_model + 5 * hk / m + 2 * cfg.num_heads / m * seq_len
    ffn_block = 2 * cfg.d_model + 4 * f / m
    moe_block = ffn_block + cfg.train_capacity_factor * cfg.top_k * (cfg.d_model + 4 * f / m) + cfg.num_experts
    per_block = [attention + (moe_block if cfg.is_moe_layer(i) else ffn_block)
                 for i in range(cfg.num_layers)]
    kept = cfg.num_layers * cfg.d_model + max(per_block) if remat else sum(per_block)
    logits = 2 * cfg.vocab_size / m * 4 / bytes_per_value  # f32 logits and their gradient
    activations = tokens * (kept + logits) * bytes_per_value
    return {"parameters": params, "gradients": params, "activations": activations,
            "total": 2 * params + activations}


def all_gather_sizes(hlo_text: str) -> list[int]:
    """Element counts of everything a compiled program all-gathers (to spot gathered weights)."""
    sizes = []
    for shape in re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\S* all-gather\(", hlo_text):
        sizes.append(math.prod(int(d) for d in shape.split(",") if d))
    return sizes


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each cross-device operation a compiled (or lowered) program names."""
    names = {"all-to-all": r"all-to-all\(|all_to_all", "all-gather": r"all-gather\(|all_gather",
             "all-reduce": r"all-reduce\(|all_reduce", "reduce-scatter": r"reduce-scatter\(",
             "collective-permute": r"collective-permute\("}
    return {name: len(re.findall(pattern, hlo_text)) for name, pattern in names.items()}


def collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
    """Count and MiB of each kind of collective in a compiled program, from its output shapes
    (an async pair, `-start`/`-done`, counts once), e.g. {"all-to-all": {"count": 24, ...}}."""
    itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
    result = {}
    for kind in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute"):
        found = re.findall(r"= \(?([^=]*?)\)? " + kind + r"(?:-start)?\(", hlo_text)
        total = sum(itemsize.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                    for shapes in found for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shapes))
        result[kind] = {"count": len(found), "mib": total / 2**20}
    return result


def check_fits(cfg, mesh: jax.sharding.Mesh, *, batch: int, seq_len: int) -> None:
    """Refuse a (micro)batch whose step cannot fit a device by memory_per_device's estimate,
    before anything is compiled: XLA would say so only after compiling, in a page of text."""
    device = mesh.devices.flat[0]
    available = host.memory_bytes(device)
    if available is None:
        return
    if device.platform == "cpu":  # the CPU devices share the host's memory
        available //= len(jax.local_devices(backend="cpu"))
    needed = memory_per_device(cfg, dict(mesh.shape), batch=batch, seq_len=seq_len, remat=cfg.remat)
    if needed["total"] > available:
        raise ValueError(
            f"seq_len={seq_len}, batch={batch} rows: one step needs about "
            f"{needed['total'] / 2**30:,.1f} GiB per device ({needed['activations'] / 2**30:,.1f} "
            f"GiB of activations; attention alone grows with seq_len²) but a device has "
            f"{available / 2**30:,.1f} GiB; lower --seq-len or --batch-size, or raise --microbatches")


# --- Planning for a pod: compile without the hardware ---------------------------------------------
# bf16 peak TFLOP/s of one JAX device, by `device_kind` prefix. A TPU v3 device is one core
# (123 TFLOP/s per chip, 2 cores); on later TPUs a device is a chip.
TPU_PEAK_TFLOPS = {"TPU v3": 61.5, "TPU v4": 137.5, "TPU v5 lite": 197.0, "TPU v5": 229.5}


def peak_tflops(device, override: float = 0.0) -> float | None:
    """One device's peak TFLOP/s, for MFU: `override` when > 0, else TPU_PEAK_TFLOPS by the
    longest prefix of its `device_kind` ("TPU v5 lite" before "TPU v5"); None when unknown."""
    if override > 0:
        return override
    kind = getattr(device, "device_kind", "")
    return next((TPU_PEAK_TFLOPS[prefix] for prefix in sorted(TPU_PEAK_TFLOPS, key=len, reverse=True)
                 if kind.startswith(prefix)), None)


def topology_devices(topology: str):
    """Devices of a TPU topology such as "v3:4x4", for compiling without the hardware (libtpu).

    A mesh over them is as good as a real one for `jax.jit(...).lower(...).compile()`: XLA's TPU
    compiler partitions, schedules and sizes the program; only running it needs the chips.
    """
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as error:
        raise ValueError(f"--topology {topology!r} needs libtpu (pip install -r requirements-tpu.txt) "
                         f"and a name like 'v3:4x4': {error}") from error


def compile_report(compiled, mesh: jax.sharding.Mesh, *, model_flops: float, loop_trips: int = 1,
                   peak: float | None = None) -> dict:
    """What the compiler knows of one step on this mesh, without running it: GiB per device
    (arguments, outputs, temporaries; total = arguments + temporaries), FLOPs per device as the
    compiler counts them and as the model needs them, and each collective's count and MiB.

    `compiled`: `jax.jit(step).lower(*args).compile()`, args possibly abstract (ShapeDtypeStructs
    with shardings, see `sharded_model(abstract=True)`). `model_flops`: the step's useful FLOPs
    on all devices together (06's `train_flops_per_token` × tokens). Where the compiler also
    estimates the step's time (TPU, not CPU) and `peak` (TFLOP/s per device) is known, the
    report adds "estimated_step_s" and "estimated_mfu" = model FLOPs per device / time / peak.
    """
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    # XLA's cost analysis counts a loop body once, but the step runs a scan's body (over
    # microbatches) `loop_trips` times (measured: 2 microbatches report half the FLOPs of 1).
    report = {"mesh": dict(mesh.shape), "devices": mesh.size,
              "device_kind": mesh.devices.flat[0].device_kind}
    for kind in ("argument", "output", "temp"):
        report[f"{kind}_gib"] = getattr(memory, f"{kind}_size_in_bytes", 0) / 2**30
    report["total_gib"] = report["argument_gib"] + report["temp_gib"]
    report["compiler_flops_per_device"] = float(cost.get("flops", 0.0)) * loop_trips
    report["model_flops_per_device"] = model_flops / mesh.size
    # As written in the program: those inside the microbatch loop run once per trip.
    report["collectives"] = collective_bytes(compiled.as_text())
    seconds = cost.get("optimal_seconds") or cost.get("estimated_seconds")
    if seconds and seconds > 0 and peak:
        report["estimated_step_s"] = float(seconds) * loop_trips
        report["estimated_mfu"] = (report["model_flops_per_device"] / report["estimated_step_s"]
                                   / (peak * 1e12))
    return report


# --- A small fixed problem, run sharded (self-test, tests and multi-host check share it) ----------
DEMO_CONFIG = dataclasses.replace(
    model_lib.PRESETS["small"], vocab_size=512, num_layers=2, d_model=64, num_heads=4,
    head_dim=16, d_ff=128, num_experts=8, max_seq_len=64)


def demo_batch(rows: int = 16, length: int = 32, vocab: int = 512) -> dict[str, np.ndarray]:
    """The same random next-token batch on every host (each then keeps its own rows)."""
    tokens = np.random.default_rng(0).integers(2, vocab, (rows, length + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((rows, length), np.float32)}


def sharded_loss_and_grads(model, batch: dict, mesh: jax.sharding.Mesh):
    """One jitted forward and backward of 06's loss under the mesh."""
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(model_lib.loss_fn, has_aux=True))
        (loss, metrics), grads = step(model, batch)
        return loss, metrics, grads, step.lower(model, batch)


def local_rows(batch: dict, process_index: int, process_count: int) -> dict:
    """This host's contiguous share of a global batch's rows."""
    rows = len(batch["inputs"]) // process_count
    return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def gib(count: float) -> str:
    return f"{count / 2**30:8.2f}"


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=(
        "Simulate 8 CPU devices: print the partitioning rules, shard a small OpenMoE on a "
        "2×2×2 ('data', 'expert', 'model') mesh, check the sharded loss and gradients equal the "
        "single-device ones, find the all-to-all in the compiled program, and print memory per "
        "device for OpenMoE-8B on TPU v3 meshes. With --coordinator/--num-processes/--process-id "
        "it instead joins a multi-host cluster and prints the sharded loss of a fixed batch."))
    parser.add_argument("--coordinator", help="host:port of process 0, for a multi-host run")
    parser.add_argument("--num-processes", type=int, help="hosts in the multi-host run")
    parser.add_argument("--process-id", type=int, help="this host's index, 0 .. num-processes-1")
    args = parser.parse_args()
    if args.coordinator is None:
        jax.config.update("jax_num_cpu_devices", 8)
    initialize_multihost(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh(model=2, expert=2)

    # Multi-host: every process builds the same sharded model and feeds only its own rows.
    if args.coordinator is not None:
        model = sharded_model(DEMO_CONFIG, mesh)
        batch = global_batch(local_rows(demo_batch(), jax.process_index(), jax.process_count()), mesh)
        loss = sharded_loss_and_grads(model, batch, mesh)[0]
        print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} "
              f"devices: loss {float(loss.addressable_data(0)):.6f}")
        raise SystemExit(0)

    # 1. The rules, as a table.
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} simulated CPU devices\n")
    print(f"{'logical axis':14}-> mesh axes")
    for name, axes in RULES:
        print(f"{name:14}   {axes}")

    # 2. A small OpenMoE, born sharded; where each kind of parameter lives.
    model = sharded_model(DEMO_CONFIG, mesh)
    print(f"\nsmall OpenMoE on the mesh (routing groups per step: multiple of {batch_shards(mesh)}):")
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[:2] in (("layers", 0), ("layers", 1)) or path[0] != "layers":
            name = "/".join(map(str, path))
            value = variable.get_value()
            print(f"  {name:42} {str(value.shape):16} {value.sharding.spec}")

    # 3. Sharded loss and gradients equal the single-device ones (same config, same seed).
    batch = demo_batch()
    loss, metrics, grads, lowered = sharded_loss_and_grads(model, global_batch(batch, mesh), mesh)
    single = model_lib.OpenMoE(config_for_mesh(DEMO_CONFIG, mesh), rngs=nnx.Rngs(0))
    (single_loss, _), single_grads = jax.jit(jax.value_and_grad(model_lib.loss_fn, has_aux=True))(
        single, {k: jnp.asarray(v) for k, v in batch.items()})
    grad_gap = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(
        jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(single_grads))))
    print(f"\nloss sharded {float(loss):.6f} vs one device {float(single_loss):.6f}; largest "
          f"gradient difference {grad_gap:.1e} (relative); drops {float(metrics['fraction_dropped']):.1%}")
    if not (abs(float(loss) - float(single_loss)) < 1e-5 and grad_gap < 1e-4):
        sys.exit("self-test FAILED: the sharded loss or gradients differ from one device's "
                 "(tolerances 1e-5 absolute on the loss, 1e-4 relative on gradients)")

    # 4. The compiled program moves tokens by all-to-all, and never gathers expert weights: every
    # all-gather in it is smaller than one device's shard of the smallest expert kernel.
    compiled_text = lowered.compile().as_text()
    collectives = count_collectives(compiled_text)
    expert_shard = min(v.get_value().addressable_shards[0].data.size
                       for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                       if v.logical_axes[0] == "expert")
    gathered = all_gather_sizes(compiled_text)
    print(f"collectives in the compiled train step: {collectives}\n"
          f"largest all-gather {max(gathered, default=0)} values; one expert-kernel shard "
          f"{expert_shard}")
    if count_collectives(lowered.as_text())["all-to-all"] != 4:
        sys.exit("self-test FAILED: the train step should name 4 all-to-alls (2 forward, 2 backward)")
    if max(gathered, default=0) >= expert_shard:
        sys.exit("self-test FAILED: the compiled step all-gathers something as large as an "
                 "expert-kernel shard, so it gathers weights")

    # 5. Why OpenMoE-8B needs expert and model parallelism on 16 GiB TPU v3 cores.
    cfg = model_lib.PRESETS["openmoe-8b"]
    print("\nOpenMoE-8B per device, 128 sequences × 2048 tokens per microbatch, remat, f32:")
    print(f"{'mesh (data, expert, model)':30}{'params':>9}{'grads':>9}{'activ.':>9}{'total GiB':>10}")
    for shape in ({"data": 256, "expert": 1, "model": 1}, {"data": 32, "expert": 1, "model": 8},
                  {"data": 1, "expert": 32, "model": 8}):
        memory = memory_per_device(cfg, shape, batch=128, seq_len=2048)
        print(f"{str(tuple(shape.values())):30}{gib(memory['parameters'])} {gib(memory['gradients'])}"
              f" {gib(memory['activations'])} {gib(memory['total'])}")
    print("  (a TPU v3 core has 16 GiB; OpenMoE-8B ran with 32 expert and 8 model partitions)")
    print("\nOK: sharded equals single-device, tokens travel by all-to-all, weights stay put.")
