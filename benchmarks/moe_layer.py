"""How much does routing cost? MoE layer forward+backward time / one dense FFN's, side by side.

Every path (05_moe_layer.py's loop, einsum, gather and ragged dispatch, router included) and one
dense 03 FFN with the same D and F run on the same T tokens, interleaved round by round, and we
report median-time ratios, so a noisy machine slows all of them alike. The row "experts" is the
floor every path is judged against: the E experts alone on ready-made [E, C] buffers of the same
tokens (05's `apply_experts`), with no router, dispatch or combine. The baseline is the dense FFN on
the token matrix [N, D]; the row "dense BLD" is the same FFN called on [B, L, D] as 06 calls it
(03 flattens it to [N, D] itself, so the two should match). The experts' buffers hold cf · T
token-slots, so cf (1.25) is the compute floor. On top of it the experts' weights and their
gradients are E times the dense FFN's: every step reads the weights twice and writes fresh
gradients (E=32: 268 MB, ~0.25× a dense FFN's time here on a 2-core CPU), a cost per step that
more tokens per step amortize (`--tokens 16384`: gather at E=32 drops to ~1.5×).
Peak memory is XLA's compiled estimate: temporaries plus outputs (gradients included).
Rows "bpr" and "exp-choice" are 04's batch-prioritized routing and expert choice on the gather
path; the last column divides each row by plain gather's time at the same E.

    python benchmarks/moe_layer.py            # T=4096, D=512, F=1024, E in {8, 32}, k=2, cf=1.25
    python benchmarks/moe_layer.py --tokens 16384 --paths gather ragged
    python benchmarks/moe_layer.py --dtype bfloat16    # activations in bf16 (params stay f32)

XLA:CPU runs `jax.lax.ragged_dot` as dense matmuls over every group (slow, and E times the
memory), so "ragged" is for GPUs and TPUs; on CPU keep it to small T.
"""

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
ffn = importlib.import_module("03_swiglu")
moe = importlib.import_module("05_moe_layer")
from support import host  # noqa: E402

# 04's routing variants, each timed on the gather path beside plain gather (same parameters).
VARIANTS = {"bpr": {"batch_prioritized": True}, "exp-choice": {"routing": "experts_choose"}}


def forward_backward(module, x):
    """A compiled step: value and gradients (w.r.t. input and params) of a random probe loss.

    x is [B, L, D] or the token matrix [N, D]; the MoE layer's output is (y, stats). The loss
    value matters: this probe loss is linear in y, so its gradient alone would let XLA skip the
    dense FFN's last forward matmul (hidden·wo), which the MoE layer cannot skip (the router's
    gradient needs the experts' outputs) and which any real loss needs.
    """
    probe = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

    def loss(module, x):
        y = module(x)
        return jnp.sum((y[0] if isinstance(y, tuple) else y) * probe)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(module, x).compile()
    memory = compiled.memory_analysis()
    peak_bytes = memory.temp_size_in_bytes + memory.output_size_in_bytes
    return (lambda: jax.block_until_ready(compiled(module, x))), peak_bytes


class ExpertsOnly(nnx.Module):
    """A layer's E experts on buffers filled straight from the tokens (repeated to cf·T slots):
    [1, E, C, D], C = cf·T/E, the same matmuls as the layer's with nothing around them."""

    def __init__(self, layer, capacity: int):
        copy = nnx.clone(layer)
        self.cfg, self.capacity = layer.cfg, capacity
        self.wi_0, self.wi_1, self.wo = copy.wi_0, copy.wi_1, copy.wo

    def __call__(self, x_BLD):
        cfg, rows = self.cfg, self.cfg.num_experts * self.capacity
        slots_ND = jnp.resize(x_BLD.reshape(-1, cfg.d_model), (rows, cfg.d_model))
        buffers_GECD = slots_ND.reshape(1, cfg.num_experts, self.capacity, cfg.d_model)
        experts = (self.wi_0[...], self.wi_1[...], self.wo[...])
        out_GECD = moe.apply_experts(buffers_GECD, experts, cfg.ffn_variant, cfg.dtype)
        return jnp.resize(out_GECD.reshape(rows, cfg.d_model), x_BLD.shape)  # the probe's shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="T, all in one routing group")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    accelerator = jax.default_backend() != "cpu"
    parser.add_argument("--paths", nargs="+", choices=moe.DISPATCHES,
                        default=["gather", "einsum"] + (["ragged"] if accelerator else []),
                        help="add 'loop' to time the oracle too (about E dense FFNs: slow); "
                             "'ragged' is a default on GPU and TPU only")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="routing variants on the gather path: batch-prioritized routing, "
                             "expert choice (each token lists all E experts: E/k times the rows)")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="activation dtype of every layer's math; parameters stay f32")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    host.keep_freed_memory_mapped()  # as 09 runs on a CPU (OPENMOE_MALLOC=default: off)

    seq_len = min(args.tokens, 2048)
    x_BLD = jax.random.normal(jax.random.key(0), (args.tokens // seq_len, seq_len, args.d_model),
                              dtype)
    dense = ffn.FeedForward(ffn.FFNConfig(d_model=args.d_model, d_ff=args.d_ff, dtype=dtype),
                            rngs=nnx.Rngs(0))
    steps = {("dense", "-"): forward_backward(dense, x_BLD.reshape(-1, args.d_model)),
             ("dense BLD", "-"): forward_backward(dense, x_BLD)}
    for experts in args.experts:
        cfg = moe.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=experts,
                            max_group_size=args.tokens, train_capacity_factor=args.capacity_factor,
                            dtype=dtype)
        layers = moe.layers_per_dispatch(cfg)
        capacity = cfg.capacity(args.tokens, args.capacity_factor)
        steps[("experts", experts)] = forward_backward(ExpertsOnly(layers["gather"], capacity), x_BLD)
        for name, layer in layers.items():
            if name in args.paths:
                steps[(name, experts)] = forward_backward(layer, x_BLD)
        for name in args.variants:
            layer = moe.MoELayer(dataclasses.replace(cfg, **VARIANTS[name]), rngs=nnx.Rngs(0))
            steps[(name, experts)] = forward_backward(layer, x_BLD)

    # Warm up once, then time round-robin so every path sees the same machine conditions.
    for run, _ in steps.values():
        run()
    seconds = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, (run, _) in steps.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)
    median = {key: float(np.median(times)) for key, times in seconds.items()}
    dense_time, dense_bytes = median[("dense", "-")], steps[("dense", "-")][1]

    print(f"MoE layer forward+backward vs one dense FFN: T={args.tokens} tokens, D={args.d_model}, "
          f"F={args.d_ff}, k=2, cf={args.capacity_factor}, {args.dtype}; {jax.devices()[0].device_kind}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'path':10s} {'E':>3s} {'ms':>9s} {'x dense':>8s} {'peak MiB':>9s} {'x dense':>8s} "
          f"{'x gather':>8s}")
    rows = []
    for (name, experts), (_, peak_bytes) in steps.items():
        row = {"path": name, "experts": experts, "ms": round(median[(name, experts)] * 1e3, 1),
               "time_ratio": round(median[(name, experts)] / dense_time, 2),
               "peak_mib": round(peak_bytes / 2**20, 1),
               "memory_ratio": round(peak_bytes / dense_bytes, 2)}
        if ("gather", experts) in median:  # every path's time over plain gather's, same E
            row["vs_gather"] = round(median[(name, experts)] / median[("gather", experts)], 3)
        rows.append(row)
        print(f"{name:10s} {experts!s:>3s} {row['ms']:9.1f} {row['time_ratio']:8.2f} "
              f"{row['peak_mib']:9.1f} {row['memory_ratio']:8.2f} {row.get('vs_gather', ''):>8}")
    print(json.dumps({"benchmark": "moe_layer", "tokens": args.tokens, "d_model": args.d_model,
                      "d_ff": args.d_ff, "capacity_factor": args.capacity_factor, "dtype": args.dtype,
                      "rows": rows}))


if __name__ == "__main__":
    main()
