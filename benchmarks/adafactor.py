"""Is Adafactor from scratch as fast as optax's? One update step on a preset's parameters.

08_adafactor.py in both modes (optax mode: same semantics as `optax.adafactor`; T5X mode:
OpenMoE's `openmoe_adafactor`, per-expert RMS and f32 statistics) and `optax.adafactor`, all with
OpenMoE's schedule, run `update(grads, state, params)` compiled with `jax.jit` on the same random
f32 parameters and gradients. The three take turns round by round, and we report median times
and the ratio ours / optax, so a noisy machine slows all of them alike; beside them the bytes
one step moves by XLA's cost model (exact, unlike time) and the bytes of each optimizer state.
Target: ratio ≤ 1.1 and state bytes ≤ optax's.

    python benchmarks/adafactor.py                         # presets small and openmoe-base
    python benchmarks/adafactor.py --presets small --rounds 20
"""

import argparse
import importlib
import json
import pathlib
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
model_lib = importlib.import_module("06_model")
ada = importlib.import_module("08_adafactor")


def random_like(abstract, seed: int, scale: float):
    """A tree of normal(0, scale²) f32 arrays shaped like `abstract` (a State of nnx.Param)."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


def compiled_update(tx, params, grads):
    """tx.update compiled once: a call that blocks until the step is done, the state, and the
    bytes XLA's cost model says one step reads and writes (a noise-free companion to time)."""
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update).lower(grads, state, params).compile()
    cost = update.cost_analysis()
    moved = (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
    return (lambda: jax.block_until_ready(update(grads, state, params))), state, moved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "openmoe-base"],
                        choices=list(model_lib.PRESETS))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    args = parser.parse_args()

    results = {}
    for name in args.presets:
        abstract = ada.abstract_params(model_lib.PRESETS[name])
        params, grads = random_like(abstract, 0, 0.05), random_like(abstract, 1, 1e-3)
        schedule = ada.openmoe_schedule()
        steps = {}
        for label, tx in [("optax.adafactor", optax.adafactor(schedule)),
                          ("ours, optax mode", ada.adafactor(schedule)),
                          ("ours, T5X mode", ada.openmoe_adafactor(abstract))]:
            run, state, moved = compiled_update(tx, params, grads)
            run()  # warm-up: first-call allocations
            steps[label] = (run, ada.tree_bytes(state), moved)
        times = {label: [] for label in steps}
        for round_ in range(args.rounds):
            # Rotate the order each round so no optimizer always runs right after another.
            labels = list(steps)[round_ % len(steps):] + list(steps)[:round_ % len(steps)]
            for label in labels:
                start = time.perf_counter()
                steps[label][0]()
                times[label].append(time.perf_counter() - start)
        base = float(np.median(times["optax.adafactor"]))
        results[name] = {
            label: {"median_ms": 1e3 * float(np.median(t)),
                    "ratio_vs_optax": float(np.median(t)) / base,
                    "state_bytes": steps[label][1], "bytes_moved": steps[label][2]}
            for label, t in times.items()}
        results[name]["param_bytes"] = ada.tree_bytes(abstract)
        del params, grads, steps

    print(f"\nAdafactor update step, median of {args.rounds} interleaved rounds, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"{'preset':14}{'optimizer':18}{'median ms':>11}{'ours/optax':>12}{'GiB moved':>11}"
          f"{'state MiB':>11}{'params MiB':>12}")
    for name, rows in results.items():
        for label, row in rows.items():
            if label != "param_bytes":
                print(f"{name:14}{label:18}{row['median_ms']:>11.1f}{row['ratio_vs_optax']:>12.3f}"
                      f"{row['bytes_moved'] / 2**30:>11.2f}{row['state_bytes'] / 2**20:>11.2f}"
                      f"{rows['param_bytes'] / 2**20:>12.1f}")
    print(json.dumps({"benchmark": "adafactor_update", "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
