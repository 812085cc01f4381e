"""Does the code run, and agree with itself, on an accelerator? One command, one JSON file.

Every figure in this project so far came from a CPU. On a GPU or TPU three things change: XLA
compiles other kernels (`jax.lax.ragged_dot` becomes a real grouped matmul instead of dense work
over every group), f32 matmuls may run in a lower precision (NVIDIA GPUs use TF32 by default:
a 10-bit mantissa), and bf16 becomes fast. This script checks all three on whatever device JAX
finds; it forces nothing, so with no accelerator it runs on the CPU.

1. Self-tests: the chapters whose math runs on the device (02 RoPE, 03 SwiGLU, 04 router, 05
   MoE layer, 06 model, 10 released models), each as `python NN_name.py` in a fresh process with
   this environment, so each sees the same device and says which one it saw.
2. Dispatch equality: 05's gather, einsum and ragged paths against its loop oracle on one layer
   larger than the self-test's, outputs and gradients in f32. Matmul precision is "highest" for
   this check, so TF32 can neither cause a difference nor hide one: what is compared is the
   dispatch, and the tolerance is 05's own (1e-5 of the oracle's largest value).
3. Timings in bf16: benchmarks/moe_layer.py (ragged against gather) and train_throughput.py,
   each as a subprocess; their final JSON lines are kept whole.

The subprocesses run first and the in-process check last, because a process that has started
a backend holds the device: a TPU admits one process, and JAX takes 75% of a GPU's memory.

    python benchmarks/accelerator_check.py            # meant to take under 10 minutes on a GPU
    python benchmarks/accelerator_check.py --quick    # small sizes: a few minutes on a 2-core CPU
    python benchmarks/accelerator_check.py --out gpu.json

It writes one JSON file and prints a table, then the same JSON as its last line. Exit status 1
if any self-test, equality check or benchmark failed.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
moe = importlib.import_module("05_moe_layer")
from support import cli  # noqa: E402

SELF_TESTS = ("02_rope", "03_swiglu", "04_router", "05_moe_layer", "06_model",
              "10_released_models")
# Each benchmark's flags: always bf16; --quick shrinks the sizes to what a 2-core CPU runs fast.
BENCHMARKS = {
    "moe_layer.py": (["--paths", "ragged", "gather", "--dtype", "bfloat16"],
                     ["--tokens", "256", "--d-model", "64", "--d-ff", "128", "--experts", "8",
                      "--rounds", "2"]),
    "train_throughput.py": (["--dtype", "bfloat16"],
                            ["--steps", "2", "--batch-size", "4", "--seq-len", "32"]),
}
# One layer per size: the full one is OpenMoE-8B's expert count on 4 groups of 1024 tokens.
EQUALITY_SIZES = {"full": dict(batch=4, seq_len=1024, d_model=512, d_ff=1024, num_experts=32),
                  "quick": dict(batch=2, seq_len=64, d_model=32, d_ff=64, num_experts=8)}
TOLERANCE = 1e-5  # largest |path - oracle| / largest |oracle|, as in 05's self-test
DEVICE_MARK = "accelerator_check: device "
# How a script runs: as `python script args` would (run_path with __main__), then, whether it
# passed or failed, one line on stderr naming the device its JAX saw, if it used JAX at all.
RUNNER = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
          "    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
          "    if 'jax' in sys.modules:\n"
          "        import jax\n        d = jax.devices()\n"
          f"        print({DEVICE_MARK!r}"
          " + f'{len(d)} x {d[0].device_kind} ({d[0].platform})', file=sys.stderr)\n")


def run_script(argv: list[str], timeout: float) -> dict:
    """One script in a fresh Python process in the repository root, with this environment (so
    it finds the same device), through RUNNER: its exit status (None if it ran past `timeout`),
    seconds, the device it saw, its stdout, and the tail of its output."""
    # The self-tests need no network; offline, a machine without one fails fast instead of waiting.
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:  # its partial output arrives as bytes
        status, (stdout, stderr) = None, (
            (part or b"").decode(errors="replace") for part in (expired.stdout, expired.stderr))
        stderr += f"\nran past the timeout of {timeout:g} s"
    seconds = time.perf_counter() - start
    marks = [line for line in stderr.splitlines() if line.startswith(DEVICE_MARK)]
    output = stdout + "".join(f"{line}\n" for line in stderr.splitlines()
                              if not line.startswith(DEVICE_MARK))
    return {"returncode": status, "seconds": round(seconds, 1),
            "device": marks[-1][len(DEVICE_MARK):] if marks else None,
            "stdout": stdout, "output_tail": output[-3000:]}


def self_tests(timeout: float) -> list[dict]:
    """Each chapter's self-test; it passed if it exited with status 0 (every chapter's verdict)."""
    results = []
    for chapter in SELF_TESTS:
        cli.progress(f"self-test {chapter}.py ...")
        run = run_script([f"{chapter}.py"], timeout)
        passed = run["returncode"] == 0
        results.append({"chapter": chapter, "passed": passed, "returncode": run["returncode"],
                        "seconds": run["seconds"], "device": run["device"],
                        **({} if passed else {"output_tail": run["output_tail"]})})
    return results


def benchmarks(quick: bool, timeout: float) -> list[dict]:
    """Each benchmark in bf16; it passed if it exited with status 0 and ended with a JSON line."""
    results = []
    for script, (flags, quick_flags) in BENCHMARKS.items():
        argv = [f"benchmarks/{script}", *flags, *(quick_flags if quick else [])]
        cli.progress(f"benchmark {' '.join(argv)} ...")
        run = run_script(argv, timeout)
        lines = run["stdout"].strip().splitlines()
        try:
            result = json.loads(lines[-1]) if run["returncode"] == 0 and lines else None
        except json.JSONDecodeError:
            result = None
        passed = result is not None
        results.append({"script": script, "args": argv[1:], "passed": passed,
                        "returncode": run["returncode"], "seconds": run["seconds"],
                        "device": run["device"], "result": result,
                        **({} if passed else {"output_tail": run["output_tail"]})})
    return results


def dispatch_equality(batch: int, seq_len: int, d_model: int, d_ff: int, num_experts: int,
                      capacity_factor: float = 1.25) -> dict:
    """05's gather, einsum and ragged paths against the loop oracle: outputs and the gradients of
    a probe loss w.r.t. every parameter and the input, on one layer in f32 at matmul precision
    "highest". Each path passes if both gaps (relative to the oracle's largest value) are within
    TOLERANCE; at the train capacity factor some assignments are dropped, as in training."""
    start = time.perf_counter()
    cfg = moe.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts,
                        max_group_size=seq_len)
    x_BLD = jax.random.normal(jax.random.key(1), (batch, seq_len, d_model), jnp.float32)
    with jax.default_matmul_precision("highest"):
        results = {name: moe.outputs_and_grads(layer, x_BLD, capacity_factor)
                   for name, layer in moe.layers_per_dispatch(cfg).items()}
    y_oracle, stats, grads_oracle = results.pop("loop")
    paths = {}
    for name, (y_BLD, _, grads) in results.items():
        pairs = list(zip(grads, grads_oracle))
        row = {"output_max_abs_diff": float(jnp.max(jnp.abs(y_BLD - y_oracle))),
               "grad_max_abs_diff": max(float(jnp.max(jnp.abs(g - o))) for g, o in pairs),
               "output_gap": moe.relative_gap(y_BLD, y_oracle),
               "grad_gap": max(moe.relative_gap(g, o) for g, o in pairs)}
        row["passed"] = row["output_gap"] <= TOLERANCE and row["grad_gap"] <= TOLERANCE
        paths[name] = row
    return {"batch": batch, "seq_len": seq_len, "d_model": d_model, "d_ff": d_ff,
            "num_experts": num_experts, "capacity_factor": capacity_factor,
            "fraction_dropped": float(stats["fraction_dropped"]), "precision": "highest",
            "tolerance": TOLERANCE, "paths": paths,
            "passed": all(row["passed"] for row in paths.values()),
            "seconds": round(time.perf_counter() - start, 1)}


def headline(result: dict) -> str:
    """A benchmark's JSON line in a few words: each row's time against the dense FFN (moe_layer)
    or each preset's tokens/s and MFU (train_throughput)."""
    if "rows" in result:
        return "x dense FFN: " + ", ".join(f"{row['path']} E={row['experts']} {row['time_ratio']}"
                                           for row in result["rows"]
                                           if row["path"] in ("gather", "ragged"))
    return ", ".join(f"{row['preset']} {row['tokens_per_s']:,.0f} tok/s {row['mfu']:.1%} MFU"
                     for row in result["results"])


def ran(part: dict) -> str:
    """How a subprocess ended, and where: "ran on 1 x NVIDIA H200 (gpu)", "exit status 1 on ..."."""
    how = ("ran" if part["passed"] else "timed out" if part["returncode"] is None
           else f"exit status {part['returncode']}")
    return f"{how} on {part['device']}" if part["device"] else f"{how}, no device reported"


def summary_lines(record: dict) -> list[str]:
    """The table: one row per self-test, dispatch path and benchmark, with its verdict."""
    verdict = {True: "ok", False: "FAILED"}
    rows = [("self-test", f"{t['chapter']}.py", t["seconds"], verdict[t["passed"]],
             ran(t)) for t in record["self_tests"]]
    # The equality check's seconds and settings go on its first row; then one row per path.
    equality = record["dispatch_equality"]
    rows.append(("equality", "05's paths vs loop", equality["seconds"], verdict[equality["passed"]],
                 f"f32, E={equality['num_experts']}, {equality['fraction_dropped']:.0%} dropped, "
                 f"tolerance {TOLERANCE:g} of the largest value"))
    rows += [("", f"  {name}", None, verdict[row["passed"]],
              f"max |diff| output {row['output_max_abs_diff']:.1e}, gradients "
              f"{row['grad_max_abs_diff']:.1e} (relative {row['output_gap']:.1e}, "
              f"{row['grad_gap']:.1e})") for name, row in equality["paths"].items()]
    rows += [("benchmark", b["script"], b["seconds"], verdict[b["passed"]],
              headline(b["result"]) if b["passed"] else ran(b))
             for b in record["benchmarks"]]
    device = record["device"]
    return [f"{device['count']} x {device['kind']} ({device['platform']}), jax "
            f"{record['jax_version']}{', --quick' if record['quick'] else ''}",
            f"{'check':10}{'what':22}{'seconds':>8}  {'result':7}detail",
            *(f"{check:10}{what:22}{'' if seconds is None else f'{seconds:.1f}':>8}  "
              f"{result:7}{detail}" for check, what, seconds, result, detail in rows),
            f"{'all passed' if record['passed'] else 'FAILED'} in {record['total_seconds']:.0f} s"]


def main(argv=None) -> int:
    """Run the three parts, write the JSON file, print the table and the JSON; 1 if any failed."""
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, so that the whole check takes minutes on a 2-core CPU")
    parser.add_argument("--out", default="accelerator_check.json", help="the JSON file to write")
    parser.add_argument("--timeout", type=cli.at_least_one, default=300,
                        help="seconds each self-test or benchmark may run, else it has failed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # Subprocesses first: until this process starts a backend, the device is theirs alone.
    record = {"benchmark": "accelerator_check", "quick": args.quick,
              "self_tests": self_tests(args.timeout),
              "benchmarks": benchmarks(args.quick, args.timeout)}
    cli.progress("dispatch equality ...")
    record["dispatch_equality"] = dispatch_equality(
        **EQUALITY_SIZES["quick" if args.quick else "full"])
    devices = jax.devices()
    record.update(device={"platform": devices[0].platform, "kind": devices[0].device_kind,
                          "count": len(devices)}, jax_version=jax.__version__)
    parts = record["self_tests"] + record["benchmarks"] + [record["dispatch_equality"]]
    record.update(passed=all(part["passed"] for part in parts),
                  total_seconds=round(time.perf_counter() - start, 1))
    with cli.user_errors():
        pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(summary_lines(record)))
    print(json.dumps(record))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
