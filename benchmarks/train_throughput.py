"""Tokens/s and MFU of 09_train.py's train step, for the small preset and a 2x-wider one.

MFU is measured against this machine's own matmul peak, measured in the same run (jitted
matmul chains of several sizes in the model's activation dtype, `--dtype`, f32 by default;
before and after each preset's steps; the best of all of them, since a busy moment can only make
a measurement slower), so the ratio means the same thing on a laptop and on a server, and a load
spike during the peak cannot inflate MFU. FLOPs per token are 06's `train_flops_per_token` (6 x
active weights + attention). Last line: one JSON object.
Run: `python benchmarks/train_throughput.py [--steps 10] [--dtype bfloat16]`; bfloat16 runs the
model's activations in bf16 (parameters, router and logits stay f32, as 06 does on a TPU).
"""

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

model_lib = importlib.import_module("06_model")
shard = importlib.import_module("07_sharding")
train_lib = importlib.import_module("09_train")
from support import host  # noqa: E402

model_lib.PRESETS.setdefault("small-wide", dataclasses.replace(
    model_lib.PRESETS["small"], d_model=512, num_heads=8, d_ff=1024))


def matmul_peak_flops(dtype=jnp.float32, sizes=(512, 1024, 2048), repeats: int = 3) -> float:
    """The best FLOP/s of one device over chains of square matmuls in `dtype`, of several sizes."""
    best = 0.0
    for size in sizes:
        a = jnp.ones((size, size), dtype) / size

        @jax.jit
        def chain(x, a=a):
            for _ in range(8):
                x = x @ a
            return x

        chain(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            chain(a).block_until_ready()
            best = max(best, 8 * 2 * size**3 / (time.perf_counter() - start))
    return best / jax.device_count()


def step_throughput(preset: str, steps: int, batch: int, seq_len: int, dtype) -> dict:
    model = dataclasses.replace(model_lib.PRESETS[preset], dtype=dtype)
    cfg = dataclasses.replace(train_lib.CONFIGS["laptop"], model=model, batch_size=batch,
                              seq_len=seq_len)
    mesh = train_lib.build_mesh(cfg)
    trainer = train_lib.build_trainer(cfg, mesh)
    tokens = np.random.default_rng(0).integers(2, 8000, (batch, seq_len + 1), dtype=np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((batch, seq_len), np.float32),
             "segment_ids": np.ones((batch, seq_len), np.int32),
             "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))}
    with jax.set_mesh(mesh):
        batch_arrays = shard.global_batch(local, mesh)
        params, opt_state = trainer.params, trainer.opt_state
        for index in range(steps + 2):  # two warm-up steps (compile), then timed ones
            if index == 2:
                start = time.perf_counter()
            params, opt_state, metrics = trainer.train_step(params, opt_state, batch_arrays)
        jax.block_until_ready(metrics["loss"])
    seconds = (time.perf_counter() - start) / steps
    flops = model_lib.train_flops_per_token(trainer.model_cfg, seq_len) * batch * seq_len
    return {"preset": preset, "step_s": seconds, "tokens_per_s": batch * seq_len / seconds,
            "model_tflops_per_s": flops / seconds / 1e12}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per preset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="activation dtype of the model and of the matmul peak")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    malloc = "kept" if host.keep_freed_memory_mapped() else "default"  # as 09 on a CPU
    peaks, rows = [matmul_peak_flops(dtype)], []
    for preset in ("small", "small-wide"):
        rows.append(step_throughput(preset, args.steps, args.batch_size, args.seq_len, dtype))
        peaks.append(matmul_peak_flops(dtype))
    peak = max(peaks)
    print(f"{jax.devices()[0].device_kind} (freed memory {malloc}): matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s per device in {args.dtype} "
          f"({jax.device_count()} devices; best of {len(peaks)} measurements, spread "
          f"{min(peaks) / peak:.0%}–100%)")
    print(f"{'preset':12}{'step s':>9}{'tokens/s':>10}{'MFU':>8}")
    for row in rows:
        row["mfu"] = row["model_tflops_per_s"] * 1e12 / (peak * jax.device_count())
        print(f"{row['preset']:12}{row['step_s']:>9.3f}{row['tokens_per_s']:>10.0f}{row['mfu']:>8.1%}")
    print(json.dumps({"device": jax.devices()[0].device_kind, "malloc": malloc, "dtype": args.dtype,
                      "matmul_peak_gflops": peak / 1e9, "results": rows}))
