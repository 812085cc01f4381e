"""Fine-tuning's peak host memory (chapter 13) against what it must hold: parameters + optimizer state.

A synthetic base with OpenMoE-Base's tensors (06 preset "openmoe-base", 0.8 B parameters, 3.2 GB
in f32) is written once in the hub's layout by benchmarks/load.py's writer. Then, each in a fresh
process on one CPU device, chapter 13's `finetune` runs the real path a user runs: the base read
slice by slice onto the mesh (10), fingerprinted, 09's trainer and loop for `--steps` steps of
offline chat rows, and a checkpoint at the end. For each optimizer we report

  params + state         bytes of the f32 parameters and of the optimizer state (Adafactor's
                         factored moments are small; AdamW's two moments are 2x the parameters)
  peak RSS above base    the process's peak RSS (its own ru_maxrss, read as it exits) minus its
                         RSS just before fine-tuning (Python, JAX and the chapters imported)
  step temps             the train step's temporaries as XLA plans them (13's dry run of the same
                         step, compiled in a third process): the gradients, as many bytes as the
                         parameters, and the activations
  ratio                  peak RSS above baseline / (params + state); the goal is <= 1.2
  of floor               peak RSS above baseline / (params + state + step temps): 1.0 would mean
                         nothing is held beyond what the compiled step itself needs

A step that takes a whole gradient cannot meet the goal: Adafactor's gradients alone are 1.0x
params + state, AdamW's 0.33x, before any activation. What is left to find is the "of floor"
part above 1.0: copies of the parameters, the data pipeline, the runtime. One shortcut:
the embedded tokenizer (8,320 ids) stands in for umT5's (256,384), which a synthetic base does not
have; the model keeps Base's full vocabulary, so every tensor has Base's shape.

    python benchmarks/fine_tune_memory.py                     # ~3.2 GB written to a temp dir
    python benchmarks/fine_tune_memory.py --dir /data/ob      # write there once, reuse later
    python benchmarks/fine_tune_memory.py --preset small      # a quick try on small shapes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import pathlib
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

OPTIMIZERS = ("adafactor", "adamw")


def load_benchmark():
    """benchmarks/load.py as a module: its writer of a released-layout checkpoint."""
    spec = importlib.util.spec_from_file_location("load_benchmark", REPO_ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state_bytes(tree) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def finetune_config(directory: str, optimizer: str, steps: int, batch_size: int, seq_len: int):
    """(13_chat, its laptop recipe on the synthetic base in `directory`): the stand-in tokenizer
    (see the docstring) in place of the base's, which a synthetic base does not have."""
    import jax
    chat = importlib.import_module("13_chat")
    jax.devices()  # start the runtime now, so the baseline includes it
    base_cfg, tokenizer = chat.released.load_config(directory)[1], chat.tok.embedded_tokenizer()
    chat.open_base = lambda cfg: (base_cfg, tokenizer, pathlib.Path(directory))
    return chat, dataclasses.replace(
        chat.CONFIGS["laptop"], base=directory, run_dir=f"{directory}/chat-{optimizer}", optimizer=optimizer,
        seq_len=seq_len, batch_size=batch_size, steps=steps, eval_every=0, eval_batches=0,
        checkpoint_every=steps, keep_last=1)


def child(directory: str, optimizer: str, steps: int, batch_size: int, seq_len: int) -> None:
    """Runs in a fresh process: import everything, note the RSS, fine-tune, report as JSON."""
    import jax
    from flax import nnx
    chat, cfg = finetune_config(directory, optimizer, steps, batch_size, seq_len)
    resolved = chat.resolve(cfg, *chat.open_base(cfg))
    like = nnx.state(chat.shard.sharded_model(resolved.model, chat.shard.mesh_from_text("", jax.devices()[:1]),
                                              abstract=True), nnx.Param)
    param_bytes = state_bytes(like)
    opt_bytes = state_bytes(jax.eval_shape(resolved.make_optimizer(like).init, like))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    summary = chat.finetune(cfg, overwrite=True, progress=False)
    print(json.dumps({"optimizer": optimizer, "param_bytes": param_bytes, "opt_state_bytes": opt_bytes,
                      "baseline_rss": baseline, "seconds": time.perf_counter() - started,
                      "losses": list(summary["losses"].values()),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def plan(directory: str, optimizer: str, steps: int, batch_size: int, seq_len: int) -> None:
    """Runs in a fresh process: XLA's plan of the same train step (13's dry run, no weights
    read), whose temporaries (gradients, activations) the step needs beside its arguments."""
    chat, cfg = finetune_config(directory, optimizer, steps, batch_size, seq_len)
    print(json.dumps({"step_temp_bytes": chat.dry_run(cfg)["temp_gib"] * 2**30}))


def measure(directory: pathlib.Path, optimizer: str, args) -> dict:
    """`child`, then `plan`, each in a fresh Python on one CPU device (each its own peak RSS)."""
    row = {}
    for mode in ("--child", "--plan"):
        command = [sys.executable, __file__, mode, str(directory), optimizer,
                   str(args.steps), str(args.batch_size), str(args.seq_len)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"})
        if result.returncode:
            raise RuntimeError(f"{mode[2:]} with {optimizer} failed:\n{result.stderr[-3000:]}")
        row |= json.loads(result.stdout.strip().splitlines()[-1])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=2, help="fine-tuning steps (the first compiles)")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--preset", default="openmoe-base", help="the 06 preset whose shapes the base has")
    parser.add_argument("--dir", type=pathlib.Path, help="the base's directory, written there once "
                        "if empty (default: a temporary one, removed at the end)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--plan", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.plan:  # a measured process
        run, where = (child, args.child) if args.child else (plan, args.plan)
        return run(where[0], where[1], *map(int, where[2:]))

    # The base is written once (into --dir, kept; or a temporary directory, removed at the end).
    with (contextlib.nullcontext(args.dir) if args.dir else
          tempfile.TemporaryDirectory(prefix="openmoe-finetune-memory-")) as where:
        if not (pathlib.Path(where) / "pytorch_model.bin").is_file():
            load_benchmark().write_checkpoint(pathlib.Path(where), args.preset)
        rows = [measure(pathlib.Path(where), optimizer, args) for optimizer in args.optimizers]

    print(f"\n{args.preset}: fine-tuning {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
          "on one CPU device (13_chat.finetune)")
    print(f"{'optimizer':11}{'params GB':>11}{'state GB':>10}{'step temps GB':>15}{'above base GB':>15}"
          f"{'ratio':>8}{'goal':>7}{'of floor':>10}")
    summary = {"benchmark": "fine_tune_memory", "preset": args.preset, "steps": args.steps,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "results": {}}
    for row in rows:
        held = row["param_bytes"] + row["opt_state_bytes"]
        above = row["peak_rss"] - row["baseline_rss"]
        ratio, of_floor = above / held, above / (held + row["step_temp_bytes"])
        print(f"{row['optimizer']:11}{row['param_bytes'] / 1e9:11.2f}{row['opt_state_bytes'] / 1e9:10.2f}"
              f"{row['step_temp_bytes'] / 1e9:15.2f}{above / 1e9:15.2f}{ratio:8.2f}"
              f"{'ok' if ratio <= 1.2 else 'over':>7}{of_floor:10.2f}")
        summary["results"][row["optimizer"]] = {
            "param_bytes": row["param_bytes"], "opt_state_bytes": row["opt_state_bytes"],
            "peak_rss_bytes": row["peak_rss"], "baseline_rss_bytes": row["baseline_rss"],
            "step_temp_bytes": row["step_temp_bytes"], "peak_rss_above_baseline_over_held": ratio,
            "peak_rss_above_baseline_over_floor": of_floor, "seconds": row["seconds"], "losses": row["losses"]}
    print("goal: peak RSS above baseline <= 1.2 x (parameters + optimizer state); of floor: the same peak\n"
          "over parameters + state + the step's own temporaries as XLA plans them (gradients, activations)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
