"""Run `train.py` for several seeds and report each split's results as mean ± sd, never one lucky run.

    python -m medblip_eval.seeds --seeds 0 1 2 --out outputs/seeds -- --max_steps 600   # extra train.py flags

Each seed trains in its own process into `OUT/seed-<n>` (the seed sets model initialisation, data order, dropout and
augmentation draws; the cohort and its subject split stay fixed). The summary goes to `OUT/summary.json`,
`OUT/summary.md` (one table per split: every input mode and decoder, beside the logistic-regression references)
and `OUT/summary.png` (balanced accuracy with its spread over seeds). A finished seed is not trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

from .predict import DECODERS, MODES


REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = "eval_results_all_splits.json"


def run_seed(seed: int, out: Path, train_args: list[str]) -> dict:
    """Train one seed (unless its results exist) and return its `eval_results_all_splits.json`."""
    folder = out / f"seed-{seed}"
    if not (folder / RESULTS_FILE).is_file():
        command = [sys.executable, str(REPO_ROOT / "train.py"), *train_args, "--seed", str(seed),
                   "--output_dir", str(folder)]
        subprocess.run(command, cwd=REPO_ROOT, check=True)
    return json.loads((folder / RESULTS_FILE).read_text())


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(runs: dict[int, dict]) -> dict:
    """`{split: {"model": {decoder: {mode: mean_sd}}, "baselines": {name: mean_sd}, "image_adds": {...}}}` of the
    balanced accuracy over seeds. `image_adds` compares image + text with text only, seed by seed."""
    summary = {}
    first = next(iter(runs.values()))["results"]  # in the order the runs evaluated them
    splits = [split for split in first if all(split in run["results"] for run in runs.values())]
    for split in splits:
        model = {decoder: {mode: mean_sd([run["results"][split][decoder][mode]["all"]["balanced_accuracy"]
                                          for run in runs.values()]) for mode in MODES} for decoder in DECODERS}
        names = set.intersection(*(set(run.get("baselines", {}).get(split, {})) for run in runs.values()))
        baselines = {name: mean_sd([run["baselines"][split][name]["balanced_accuracy"] for run in runs.values()])
                     for name in sorted(names)}
        likelihood = model["likelihood"]
        gains = [a - b for a, b in zip(likelihood["image_text"]["values"], likelihood["text_only"]["values"])]
        summary[split] = {"model": model, "baselines": baselines,
                          "image_adds": {**mean_sd(gains), "every_seed": all(gain > 0 for gain in gains)}}
    return summary


def _cell(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"


def markdown(summary: dict, seeds: list[int]) -> str:
    lines = [f"Balanced accuracy, mean ± sd over seeds {seeds}.", ""]
    for split, entry in summary.items():
        lines += [f"### {split}", "", "| input | likelihood | generate |", "|---|---|---|"]
        model = entry["model"]
        lines += [f"| {mode} | {_cell(model['likelihood'][mode])} | {_cell(model['generate'][mode])} |"
                  for mode in MODES]
        if entry["baselines"]:
            lines += ["", "| logistic-regression reference | balanced acc |", "|---|---|"]
            lines += [f"| {name} | {_cell(value)} |" for name, value in entry["baselines"].items()]
        adds = entry["image_adds"]
        verdict = "adds to" if adds["mean"] > 0 and adds["every_seed"] else "does not add reliably to"
        lines += ["", f"The image {verdict} the record on {split}: image + text minus text only = "
                      f"{adds['mean']:+.3f} ± {adds['sd']:.3f} (likelihood decoder; positive in "
                      f"{sum(v > 0 for v in adds['values'])} of {len(adds['values'])} seeds).", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Balanced accuracy (likelihood decoder) per split and input mode, bars at the mean, every seed as a dot."""
    figure = Figure(figsize=(3.2 * len(summary) + 1, 3.6))
    axes = figure.subplots(1, len(summary), squeeze=False)[0]
    for axis, (split, entry) in zip(axes, summary.items()):
        results = entry["model"]["likelihood"]
        for index, mode in enumerate(MODES):
            axis.bar(index, results[mode]["mean"], yerr=results[mode]["sd"], color=f"C{index}", alpha=0.7, capsize=4)
            axis.plot([index] * len(results[mode]["values"]), results[mode]["values"], "k.", markersize=5)
        for name, style in (("text_floor", ":"), ("image_and_text", "--")):
            if name in entry["baselines"]:
                axis.axhline(entry["baselines"][name]["mean"], color="grey", linestyle=style, label=f"LR {name}")
        axis.axhline(1 / 3, color="lightgrey", linewidth=0.8)
        axis.set(xticks=range(len(MODES)), xticklabels=[m.replace("_", "\n") for m in MODES], ylim=(0.2, 1.0),
                 title=split, ylabel="balanced accuracy")
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (at least 2)")
    parser.add_argument("--out", default="outputs/seeds", help="one sub-folder per seed, and the summary")
    args = parser.parse_args(own)
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: one run has no spread")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {seed: run_seed(seed, out, train_args) for seed in args.seeds}
    summary = summarize(runs)
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "train_args": train_args, **summary},
                                                 indent=2))
    text = markdown(summary, args.seeds)
    (out / "summary.md").write_text(text)
    plot(summary, out / "summary.png")
    print(text)
    return summary


if __name__ == "__main__":
    main()
