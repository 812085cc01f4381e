"""Decoding speed of a released-shape model: 06's `generate` on chapter 10's `load_model`.

Decoding is one token at a time, so each step reads the weights that token needs once and does
little arithmetic with them: its speed is set by memory bandwidth. For each dtype, in a fresh
process (as load.py, so each has the machine's memory to itself), we load a checkpoint with
OpenMoE-Base's shapes (benchmarks/load.py writes one), decode greedily after a 64-token prompt,
and report

  s/token, tokens/s       decode steps only: the time of a generation minus its prefill
  prefill s               the prompt's one forward pass (a group of 64 tokens), cache filled
  floor bytes / token     the weights one token needs: every non-expert weight (attention,
                          dense FFNs, norms, routers, the output projection), top_k experts
                          per MoE layer, one embedding row; "all experts" counts all E instead
  fraction of floor       (floor bytes ÷ bandwidth) ÷ s/token: 1.0 reads nothing but the
                          floor, at the machine's full memory-read speed
  bandwidth               a jitted sum over 1 GiB of f32, best of several, measured in the
                          same process just before decoding

    python benchmarks/generate.py --dir /data/ob       # the checkpoint is written there once
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def read_bandwidth(repeats: int = 10) -> float:
    """Bytes per second of a jitted sum over 1 GiB of f32: the best of `repeats`."""
    import jax
    import jax.numpy as jnp
    data = jnp.ones((1 << 28,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def bytes_per_token(model) -> dict:
    """Bytes of weights one decoded token needs (floor) and what reading every expert costs."""
    from flax import nnx
    cfg = model.cfg
    floor = every_expert = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        if path[0] == "token_embedder":
            share = value.nbytes // value.shape[0]  # one row
            floor, every_expert = floor + share, every_expert + share
        elif variable.get_metadata()["logical_axes"][0] == "expert":
            floor += value.nbytes * cfg.top_k // cfg.num_experts
            every_expert += value.nbytes
        else:
            floor, every_expert = floor + value.nbytes, every_expert + value.nbytes
    return {"floor_bytes": floor, "all_experts_bytes": every_expert}


def child(directory: str, dtype_name: str, prompt_len: int, new_tokens: int) -> None:
    """Runs in a fresh process: load, measure the bandwidth, time prefill and decode, as JSON."""
    import jax.numpy as jnp
    from support import host
    host.keep_freed_memory_mapped()  # as 09 and the other benchmarks do on a CPU
    released = importlib.import_module("10_released_models")
    model_lib = importlib.import_module("06_model")
    dtype = jnp.dtype(dtype_name)
    model, _ = released.load_model(directory, param_dtype=dtype, dtype=dtype)
    prompt = [0] + [(7 * i) % 30_000 + 5 for i in range(prompt_len - 1)]  # id 0 starts (10)

    def generate_s(steps: int) -> float:
        started = time.perf_counter()
        model_lib.generate(model, [prompt], max_new_tokens=steps, eos_id=-1)
        return time.perf_counter() - started

    # The cache's length is the prompt's + max_new_tokens, so each length compiles once, untimed.
    generate_s(1), generate_s(new_tokens + 1)
    bandwidth = read_bandwidth()
    prefill_s = min(generate_s(1) for _ in range(3))
    decode_s = (min(generate_s(new_tokens + 1) for _ in range(2)) - prefill_s) / new_tokens
    print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "prefill_s": prefill_s,
                      "s_per_token": decode_s, **bytes_per_token(model)}))


def measure(directory: pathlib.Path, dtype: str, prompt_len: int, new_tokens: int) -> dict:
    """`child` in a fresh Python, so each dtype's model and compilations start from nothing."""
    result = subprocess.run([sys.executable, __file__, "--child", str(directory), dtype,
                             str(prompt_len), str(new_tokens)], capture_output=True, text=True,
                            cwd=REPO_ROOT)
    if result.returncode:
        raise RuntimeError(f"decoding in {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/openmoe-base"),
                        help="checkpoint directory, written there by load.py's writer if missing")
    parser.add_argument("--preset", default="openmoe-base", help="06 preset, if it is written")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16, help="timed decode steps")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        directory, dtype, prompt_len, new_tokens = args.child
        return child(directory, dtype, int(prompt_len), int(new_tokens))

    if not (args.dir / "pytorch_model.bin").is_file():
        importlib.import_module("load").write_checkpoint(args.dir, args.preset)
    results = {dtype: measure(args.dir, dtype, args.prompt_len, args.new_tokens)
               for dtype in ("float32", "bfloat16")}
    print(f"\n{args.dir}: greedy decoding after a {args.prompt_len}-token prompt, "
          f"{args.new_tokens} timed steps")
    print(f"{'dtype':10}{'s/token':>9}{'tokens/s':>10}{'floor GB':>10}{'all-E GB':>10}"
          f"{'GB/s read':>11}{'floor s':>9}{'of floor':>10}{'prefill s':>11}")
    for dtype, r in results.items():
        floor_s = r["floor_bytes"] / r["bandwidth_bytes_per_s"]
        r |= {"tokens_per_s": 1 / r["s_per_token"], "floor_s_per_token": floor_s,
              "fraction_of_floor": floor_s / r["s_per_token"]}
        print(f"{dtype:10}{r['s_per_token']:9.3f}{r['tokens_per_s']:10.2f}"
              f"{r['floor_bytes'] / 1e9:10.2f}{r['all_experts_bytes'] / 1e9:10.2f}"
              f"{r['bandwidth_bytes_per_s'] / 1e9:11.1f}{floor_s:9.3f}"
              f"{r['fraction_of_floor']:10.1%}{r['prefill_s']:11.2f}")
    print("goal: float32 ≥ 50% of the floor; bfloat16 at least as fast as float32")
    print(json.dumps({"benchmark": "generate", "dir": str(args.dir),
                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, **results}))


if __name__ == "__main__":
    main()
