"""OpenMoE's cost-effectiveness claim at laptop scale: the small MoE preset against a dense model
with the same active parameters, trained one after the other in one run on the same data for the
same steps with 09_train.py's default recipe.

The dense model is "small" with every block dense and d_ff widened so that a token touches as many
FFN parameters: each MoE block activates top_k experts + the extra FFN (3 FFNs), each dense block 1,
so 4 blocks of "small" hold 8 FFNs' worth, i.e. d_ff 512 → 1024 (the router's 4K are the only
difference; 12_routing_lab.py's `active_matched_dense`). Reports each model's parameters, validation
loss (text and code) and the ratio of their median step times. Last line: one JSON object. Run:
`python benchmarks/moe_vs_dense.py`. The routing lab trains the same pair as its "openmoe" and
"dense" variants and draws loss against step and against seconds (docs/make_figures.py).
"""

import argparse
import dataclasses
import importlib
import json
import pathlib
import statistics
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
train_lib = importlib.import_module("09_train")
lab = importlib.import_module("12_routing_lab")
from support import host  # noqa: E402


def run(name: str, model, steps: int, root: str) -> dict:
    cfg = dataclasses.replace(train_lib.CONFIGS["laptop"], model=model, steps=steps,
                              warmup_steps=max(1, steps // 10), eval_every=0,
                              checkpoint_every=steps, sample_tokens=0, run_dir=f"{root}/{name}")
    summary = train_lib.train(cfg, progress=False)
    records = [json.loads(line) for line in open(f"{cfg.run_dir}/metrics.jsonl")]
    step_s = statistics.median(r["step_s"] for r in records[2:])  # skip compile steps
    counts = train_lib.model_lib.parameter_counts(train_lib.model_config(cfg))
    return {"preset": name, "active_params": counts["active_non_embedding"],
            "total_params": counts["total"], "val_text_loss": summary["eval"]["eval/text/loss"],
            "val_code_loss": summary["eval"]["eval/code/loss"], "median_step_s": step_s,
            "final_train_loss": summary["losses"][steps]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=train_lib.CONFIGS["laptop"].steps,
                        help="training steps for each model (default: the default run's)")
    args = parser.parse_args()
    host.keep_freed_memory_mapped()  # as 09 runs on a CPU (OPENMOE_MALLOC=default: off)
    with tempfile.TemporaryDirectory() as root:
        small = train_lib.model_lib.PRESETS["small"]
        rows = [run("small", small, args.steps, root),
                run("small-active-dense", lab.active_matched_dense(small), args.steps, root)]
    print(f"on {jax.device_count()} × {jax.devices()[0].device_kind}")
    print(f"{'preset':20}{'active':>9}{'total':>9}{'val text':>10}{'val code':>10}{'step s':>9}")
    for row in rows:
        print(f"{row['preset']:20}{row['active_params'] / 1e6:>8.1f}M{row['total_params'] / 1e6:>8.1f}M"
              f"{row['val_text_loss']:>10.3f}{row['val_code_loss']:>10.3f}{row['median_step_s']:>9.3f}")
    ratio = rows[0]["median_step_s"] / rows[1]["median_step_s"]
    print(f"MoE / dense step time: {ratio:.2f}")
    print(json.dumps({"device": jax.devices()[0].device_kind, "steps": args.steps, "results": rows,
                      "moe_over_dense_step_time": ratio}))
