"""Draw chapter 11's figures from the analysis.json it wrote: the README's docs/figures/*.png.

11_routing_analysis.py measures; this script only draws what it measured, with matplotlib:
  specialization.png         finding 1: the routing distribution of the most frequent token ids
                             (nearly one-hot rows) and of position bins (nearly flat rows)
  early_routing.png          finding 2 (a 09 run or a --series): how much of the final token →
                             expert map each checkpoint already has
  drop_towards_the_end.png   finding 3: the drop rate along the sequence, one panel per capacity
and chapter 12's comparison, from the analysis.json 12_routing_lab.py writes in its root:
  lab_drops.png              drop rate by position on validation text, one line per variant
  lab_moe_vs_dense.png       training loss against step and against seconds, MoE and dense

    pip install -r requirements-plots.txt
    python 11_routing_analysis.py                 # writes runs/laptop/routing_analysis/
    python docs/make_figures.py                   # draws there
    python docs/make_figures.py runs/laptop/routing_analysis --out docs/figures   # the README's
    python docs/make_figures.py runs/lab --out docs/figures                       # chapter 12's
"""

import argparse
import json
import pathlib

import numpy as np


def specialization_figure(plt, spec: dict):
    """Two heat maps, [rows, E] shares of assignments: by token id, and by position bin, on ONE
    colour scale, so that a flat panel (position) looks flat beside a one-hot one (token id)."""
    maps = {title: np.asarray(shares) for title, (_, shares) in spec["heat_maps"].items()}
    top = max(float(shares.max()) for shares in maps.values())
    figure, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    for axis, (title, (labels, _)) in zip(axes, spec["heat_maps"].items()):
        image = axis.imshow(maps[title], aspect="auto", cmap="viridis", vmin=0, vmax=top)
        axis.set(title=title, xlabel="expert", xticks=range(maps[title].shape[1]),
                 ylabel="token (most frequent first)" if "token" in title
                 else "position in the sequence (bins)")
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the row's assignments")
    figure.suptitle(f"Routing distribution, MoE layer {spec['layer']} (one colour scale)")
    return figure


def early_routing_figure(plt, early: dict):
    """Per MoE layer, the share of frequent token ids whose favourite expert is already final."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for layer, curve in early["agreement"].items():
        axis.plot(early["steps"], curve, marker="o", label=f"MoE layer {layer}")
    axis.axhline(early["chance"], color="grey", linestyle=":", label="chance")
    axis.set_xticks(early["steps"], [pathlib.Path(label).name for label in early["labels"]],
                    fontsize=7)
    axis.set(xlabel={"step": "training step", "checkpoint": "checkpoint, in training order"}[
                 early["step_name"]], ylabel="favourite expert = final one", ylim=(0, 1.05),
             title="Early routing learning")
    axis.legend()
    return figure


def binned(values, bins: int):
    """(centres, means) of `values` over `bins` equal stretches: a readable curve of a noisy one."""
    values = np.array([np.nan if v is None else v for v in values], float)
    stretches = np.array_split(np.arange(len(values)), bins)
    return [s.mean() for s in stretches], [np.nanmean(values[s]) for s in stretches]


def drops_figure(plt, drops: dict, bins: int = 16):
    """The drop rate by position per source, averaged over `bins` stretches of the sequence."""
    settings = len(drops["curves"])
    figure, axes = plt.subplots(1, settings, figsize=(5 * settings, 4), sharey=True)
    axes = np.atleast_1d(axes)
    for axis, (setting, curves) in zip(axes, drops["curves"].items()):
        for source, curve in curves.items():
            axis.plot(*binned(curve, bins), label=source)
        axis.set(title=setting, xlabel="position in the sequence")
    axes[0].set_ylabel("share of assignments dropped")
    axes[0].legend()
    figure.suptitle(f"Drop-towards-the-end, MoE layer {drops['layer']}")
    return figure


def lab_drops_figure(plt, results: dict, bins: int = 16):
    """Chapter 12: the share of top-k choices dropped along the sequence, one line per variant."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        if "routing" in result:
            axis.plot(*binned(result["routing"]["text"]["dropped_by_position"], bins), label=name)
    axis.set(xlabel="position in the sequence", ylabel="share of top-k choices dropped",
             title="Drops by position on validation text, training capacity")
    axis.legend(fontsize=8)
    return figure


def lab_moe_vs_dense_figure(plt, results: dict, bins: int = 48):
    """Chapter 12: training loss of the MoE run and the active-matched dense run, against the
    step and against training time (steps × the step time the lab measured side by side, so
    both curves are on one machine's clock; the paper's cost-effectiveness claim)."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name in ("openmoe", "dense"):
        curves = results[name]
        seconds = np.asarray(curves["steps"]) * curves["step_s"]
        for axis, x in zip(axes, (curves["steps"], seconds)):
            axis.plot(binned(x, bins)[1], binned(curves["loss"], bins)[1], label=name)
    axes[0].set(xlabel="step", ylabel="training loss (mean over a stretch of steps)")
    axes[1].set(xlabel="seconds of training (side-by-side step time)")
    axes[0].legend()
    figure.suptitle("MoE against a dense model with the same active parameters")
    return figure


def lab_figures(plt, lab: dict) -> dict:
    results = lab["results"]
    figures = {"lab_drops": lab_drops_figure(plt, results)}
    if {"openmoe", "dense"} <= results.keys():
        figures["lab_moe_vs_dense"] = lab_moe_vs_dense_figure(plt, results)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Draw the PNG figures of an analysis.json "
                                                 "written by 11_routing_analysis.py or "
                                                 "12_routing_lab.py.",
                                     allow_abbrev=False)
    parser.add_argument("analysis_dir", nargs="?", default="runs/laptop/routing_analysis",
                        help="where 11 wrote analysis.json (default: the default run's)")
    parser.add_argument("--out", help="where the PNGs go (default: ANALYSIS_DIR)")
    args = parser.parse_args(argv)
    source = pathlib.Path(args.analysis_dir) / "analysis.json"
    if not source.is_file():
        parser.error(f"{source} does not exist: run 11_routing_analysis.py first (--out DIR "
                     "keeps a --quick run's)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        parser.error("matplotlib is not installed: pip install -r requirements-plots.txt")
    results = json.loads(source.read_text())
    if "variants" in results:  # chapter 12's lab
        figures = lab_figures(plt, results)
    else:
        figures = {"specialization": specialization_figure(plt, results["specialization"]),
                   "drop_towards_the_end": drops_figure(plt, results["drops"])}
        if results["early_routing"] is not None:
            figures["early_routing"] = early_routing_figure(plt, results["early_routing"])
    out = pathlib.Path(args.out or args.analysis_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        if not figure.get_layout_engine():
            figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=120)
        print(f"wrote {out / name}.png")


if __name__ == "__main__":
    main()
