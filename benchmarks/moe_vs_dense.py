"""OpenMoE's cost-effectiveness claim at laptop scale: the small MoE preset against its dense
counterpart (06's "small-dense": every MoE block's experts replaced by one dense FFN, so it has
fewer active parameters per token than the MoE's top-2 experts + extra FFN; the table prints both
counts), trained one after the other in one run on the same data for the same steps with
09_train.py's default recipe.

Reports each model's validation loss (text and code) and the ratio of their median step times.
Last line: one JSON object. Run: `python benchmarks/moe_vs_dense.py [--steps 120]`.
"""

import argparse
import dataclasses
import importlib
import json
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
train_lib = importlib.import_module("09_train")


def run(preset: str, steps: int, root: str) -> dict:
    cfg = dataclasses.replace(train_lib.CONFIGS["laptop"], preset=preset, steps=steps,
                              warmup_steps=max(1, steps // 10), eval_every=0,
                              checkpoint_every=steps, sample_tokens=0, run_dir=f"{root}/{preset}")
    summary = train_lib.train(cfg, progress=False)
    records = [json.loads(line) for line in open(f"{cfg.run_dir}/metrics.jsonl")]
    step_s = statistics.median(r["step_s"] for r in records[2:])  # skip compile steps
    counts = train_lib.model_lib.parameter_counts(train_lib.model_config(cfg))
    return {"preset": preset, "active_params": counts["active"], "total_params": counts["total"], "val_text_loss": summary["eval"]["eval/text/loss"],
            "val_code_loss": summary["eval"]["eval/code/loss"], "median_step_s": step_s,
            "final_train_loss": summary["losses"][steps]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps for each model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rows = [run(p, args.steps, root) for p in ("small", "small-dense")]
    print(f"{'preset':14}{'active':>9}{'total':>9}{'val text':>10}{'val code':>10}{'step s':>9}")
    for row in rows:
        print(f"{row['preset']:14}{row['active_params'] / 1e6:>8.1f}M{row['total_params'] / 1e6:>8.1f}M"
              f"{row['val_text_loss']:>10.3f}{row['val_code_loss']:>10.3f}{row['median_step_s']:>9.3f}")
    ratio = rows[0]["median_step_s"] / rows[1]["median_step_s"]
    print(f"MoE / dense step time: {ratio:.2f}")
    print(json.dumps({"steps": args.steps, "results": rows, "moe_over_dense_step_time": ratio}))
