"""Which validation criterion picks the step that generalises? A study over finished runs' checkpoints.

    python -m medblip_eval.selection RUN_DIR [RUN_DIR ...] [--out selection.json]

Each run must have been trained with every checkpoint kept (`--save_every 100 --keep_last 0`). For each
checkpoint, the trainable weights are loaded into the run's final model and scored with the likelihood decoder on
image + text: validation balanced accuracy and negative log-likelihood (what selection may look at), and the
balanced accuracy on the held-out sites (`zeroshot`) and the `external` cohort (what it should predict, and is
never shown to training). Printed per criterion (last step, best validation balanced accuracy, lowest validation
NLL) and for the oracle (the best held-out step): the held-out and external balanced accuracy of the step each one
picks, averaged over runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import types
from pathlib import Path

from safetensors.torch import load_file

from medblip_train.checkpoints import CHECKPOINT_NAME, WEIGHTS_FILE
from modeling_medblip import MedBlipForConditionalGeneration
from processing_medblip import MedBlipProcessor

from .predict import evaluate_dataset, load_metric


SPLITS = ("validation", "zeroshot", "external")
CRITERIA = {
    "last step": lambda steps: max(steps),
    "best validation balanced accuracy": lambda steps: max(steps, key=lambda s: (steps[s]["val_ba"], -s)),
    "lowest validation nll": lambda steps: min(steps, key=lambda s: (steps[s]["val_nll"], s)),
    "oracle (best held-out)": lambda steps: max(steps, key=lambda s: (steps[s]["zeroshot"], -s)),
}


def split_datasets(run: Path, processor: MedBlipProcessor) -> dict:
    """The run's validation / zeroshot / external splits, rebuilt from its `training_config.json` exactly as
    `train.build_data` built them (cohorts and preprocessing cache reused)."""
    import train  # imported here: train.py imports this package

    config = json.loads((run / "training_config.json").read_text())
    fields = {field.name for field in dataclasses.fields(train.DataArguments)}
    data_args = train.DataArguments(**{key: value for key, value in config["data"].items() if key in fields})
    accelerator = types.SimpleNamespace(main_process_first=contextlib.nullcontext)
    cached = train.build_data(data_args, processor.image_processor, accelerator)[-1]
    return {split: cached[split] for split in SPLITS if split in cached}


def score_checkpoints(run: Path) -> dict[int, dict]:
    model = MedBlipForConditionalGeneration.from_pretrained(run).eval()
    processor = MedBlipProcessor.from_pretrained(run)
    cached, metric, scores = split_datasets(run, processor), load_metric(), {}
    for checkpoint in sorted((run / "checkpoints").glob("checkpoint-*")):
        step = int(CHECKPOINT_NAME.fullmatch(checkpoint.name).group(1))
        model.load_state_dict(load_file(checkpoint / WEIGHTS_FILE), strict=False)
        entry = {}
        for split, dataset in cached.items():
            results, _ = evaluate_dataset(model, processor, dataset, processor.record_fields, 32, 1, "cpu", metric,
                                          modes=("image_text",), decoders=("likelihood",))
            metrics = results["likelihood"]["image_text"]["all"]
            if split == "validation":
                entry.update(val_ba=metrics["balanced_accuracy"], val_nll=metrics["nll"])
            else:
                entry[split] = metrics["balanced_accuracy"]
        scores[step] = entry
        print(run.name, step, {k: round(v, 4) for k, v in entry.items()}, flush=True)
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output folders of runs trained with every checkpoint kept")
    parser.add_argument("--out", default=None, help="write every checkpoint's scores and the summary here (JSON)")
    args = parser.parse_args(argv)
    runs = {run: score_checkpoints(Path(run)) for run in args.runs}
    summary = {}
    for name, pick in CRITERIA.items():
        picked = {run: pick(steps) for run, steps in runs.items()}
        scored = [split for split in ("zeroshot", "external") if all(split in runs[r][s] for r, s in picked.items())]
        summary[name] = {split: statistics.fmean(runs[r][s][split] for r, s in picked.items()) for split in scored}
        summary[name]["steps"] = list(picked.values())
        print(f"{name}: steps {summary[name]['steps']}, " + ", ".join(
            f"{split} {value:.3f}" for split, value in summary[name].items() if split != "steps"))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
