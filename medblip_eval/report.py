"""Evaluation outputs a user looks at: confusion matrices, learning curves, prediction files and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from huggingface_hub import ModelCard, ModelCardData
from matplotlib.figure import Figure  # no pyplot: no backend and no global figure state

from medblip_data.records import SourceReport

from .predict import DECODERS, MODES


def plot_confusion_matrices(results: dict, labels: list[str], title: str, path: Path) -> None:
    """One confusion matrix per input mode (likelihood decoder), with the balanced accuracy in each title."""
    figure = Figure(figsize=(4 * len(MODES), 3.6))
    axes = figure.subplots(1, len(MODES))
    for axis, mode in zip(axes, MODES):
        entry = results["likelihood"][mode]["all"]
        matrix = np.array(entry["confusion_matrix"])
        axis.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            color = "black" if count < matrix.max() / 2 else "white"
            axis.text(j, i, str(count), ha="center", va="center", color=color)
        ticks = range(len(labels))
        axis.set(xticks=ticks, yticks=ticks, xticklabels=labels, yticklabels=labels, xlabel="predicted",
                 ylabel="true", title=f"{mode}\nbalanced acc {entry['balanced_accuracy']:.2f}")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_learning_curves(history: list[dict], path: Path) -> None:
    """Training loss terms (log scale) and the validation balanced accuracy against the step."""
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_balanced_accuracy" in h]
    figure = Figure(figsize=(10, 3.8))
    left, right = figure.subplots(1, 2)
    for key in ("loss", "loss_lm", "loss_itc_text", "loss_itc_answer"):
        points = [(h["step"], h[key]) for h in train if h.get(key) is not None]
        if points:
            left.plot(*zip(*points), label=key)
    left.set(xlabel="step", ylabel="training loss", yscale="log", title="training losses")
    left.legend()
    if val:
        right.plot([h["step"] for h in val], [h["val_balanced_accuracy"] for h in val], marker="o",
                   label="balanced accuracy")
    nll = [(h["step"], h["val_nll"]) for h in val if h.get("val_nll") is not None]
    if nll:
        twin = right.twinx()
        twin.plot(*zip(*nll), color="C3", marker="s", linestyle=":", label="nll (right axis)")
        twin.set_ylabel("negative log-likelihood of the true answer")
        twin.legend(loc="lower right")
    right.axhline(1 / 3, color="grey", linestyle="--", label="chance")
    right.set(xlabel="step", ylabel="balanced accuracy", ylim=(0, 1), title="validation (likelihood, image+text)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_evaluation(results: dict, predictions: list[dict], labels: list[str], title: str, confusion_path: Path,
                     predictions_path: Path | None = None) -> None:
    """The confusion matrices as PNG and, given `predictions_path`, one JSON line per volume and mode."""
    plot_confusion_matrices(results, labels, title, confusion_path)
    if predictions_path is not None:
        predictions_path.write_text("".join(json.dumps(p) + "\n" for p in predictions))


def _results_table(results: dict) -> str:
    rows = ["| input | decoder | balanced acc | accuracy | macro-F1 | AUROC (OvR) | n | unmappable |",
            "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        for decoder in DECODERS:
            entry = results[decoder][mode]["all"]
            auroc = "n/a" if entry["auroc"] is None else f"{entry['auroc']:.3f}"
            rows.append(f"| {mode} | {decoder} | {entry['balanced_accuracy']:.3f} | {entry['accuracy']:.3f} | "
                        f"{entry['macro_f1']:.3f} | {auroc} | {entry['n']} | {entry['unmappable']} |")
    return "\n".join(rows)


def _baselines_table(baselines: dict | None) -> str:
    rows = ["| baseline | balanced acc | accuracy | macro-F1 |", "|---|---|---|---|"]
    rows += [f"| {name} | {v['balanced_accuracy']:.3f} | {v['accuracy']:.3f} | {v['macro_f1']:.3f} |"
             for name, v in (baselines or {}).items()]
    return "\n".join(rows if baselines else rows + ["| (not computed) | | | |"])


def _image_adds(results: dict) -> float:
    likelihood = results["likelihood"]
    return likelihood["image_text"]["all"]["balanced_accuracy"] - likelihood["text_only"]["all"]["balanced_accuracy"]


def _targets_line(results_by_split: dict, baselines: dict) -> str:
    """The built-in default's targets (issue 16), met or missed; empty without the synthetic cohort's baselines."""
    if "text_floor" not in baselines.get("zeroshot", {}):
        return ""
    checks = [("held-out image + text", results_by_split["zeroshot"]["likelihood"]["image_text"]["all"]
               ["balanced_accuracy"], 0.75, False),
              ("held-out image + text minus text only", _image_adds(results_by_split["zeroshot"]), 0.03, True)]
    if "external" in results_by_split:
        external = results_by_split["external"]
        checks += [("external image + text minus text only", _image_adds(external), 0.03, True),
                   ("external image only", external["likelihood"]["image_only"]["all"]["balanced_accuracy"], 0.55,
                    False)]
    lines = [f"{name} {value:+.3f} (target >= +{target:.2f}" if relative else f"{name} {value:.3f} (target >= "
             f"{target:.2f}" for name, value, target, relative in checks]
    verdicts = ["met" if value >= target else "missed" for _, value, target, _ in checks]
    return ("\nTargets of the built-in synthetic default (likelihood decoder, balanced accuracy, this run): "
            + "; ".join(f"{line}: {verdict})" for line, verdict in zip(lines, verdicts))
            + ". README reports them as mean ± sd over seeds.\n")


def _other_splits(results_by_split: dict, baselines: dict, main_split: str) -> str:
    """A short table per other split: each input mode by both decoders, then the logistic-regression references."""
    sections = []
    for split, results in results_by_split.items():
        if split == main_split:
            continue
        rows = [f"### {split} split ({results['likelihood']['image_text']['all']['n']} volumes)", "",
                "| input | likelihood balanced acc | generate balanced acc |", "|---|---|---|"]
        rows += [f"| {mode} | {results['likelihood'][mode]['all']['balanced_accuracy']:.3f} | "
                 f"{results['generate'][mode]['all']['balanced_accuracy']:.3f} |" for mode in MODES]
        rows += ["", f"Image + text minus text only: {_image_adds(results):+.3f}.", ""]
        if baselines.get(split):
            rows += [_baselines_table(baselines[split]), ""]
        sections.append("\n".join(rows))
    return "\n".join(sections)


CARD_TEMPLATE = """---
{card_yaml}
---

# MedBLIP ({preset} preset)

A MedBLIP model (arXiv 2305.10799): 3D brain MRI patches -> ViT blocks -> Q-Former with
{num_query_tokens} learned queries -> image tokens of a language model, which answers
"What will this subject be diagnosed with?" with "Not demented", "mild cognitive impairment (MCI)" or "Dementia".

**Not for clinical use.** This is a research model. It has not been validated for diagnosis, screening or any
decision about a person, and it must not be used for them.

## Intended use
Research on 3D medical vision-language models: zero-shot CN/MCI/AD classification by answer likelihood or free
generation, and visual question answering on T1-weighted brain MRI with a short health record.

## Training data
Data sources (format, source, scans read and left out): {sources}.
Held-out cohorts (never trained on, used for the zero-shot table): {holdout}.
Splits are by subject. The built-in default is a *synthetic* cohort made by warping the MNI152 template
(`synthetic_cohort.py`), so the figures below say nothing about real patients.

## Training
{training}

## Preprocessing contract
`MedBlipProcessor` (saved beside the weights) reads NIfTI/MGZ/DICOM or arrays with an affine (or spacing and
orientation), runs the `{preprocessing}` preprocessing (`t1-linear`: bias-field correction, brain extraction,
affine registration to MNI152, crop to the brain box), reorients to RAS, resamples to {target_spacing} mm, crops
to the foreground, scales intensities robustly to [0, 1], fits the volume into {volume_size} voxels keeping the
aspect ratio, standardises it to [-1, 1] (`image_mean` = `image_std` = 0.5, background -1) and cuts {patch_size}
patches. Health-record fields given to the model: {record_fields} (saved as `record_fields` in
`processor_config.json`; inference renders only these).

## Evaluation ({split} split: {n} volumes)
{results_table}
{targets}
`image_only` withholds the health record, `text_only` withholds the image. Reference logistic regressions
on the same split (from `medblip_data.baselines`):

{baselines_table}

{other_splits}

## Use
```python
from transformers import pipeline
classify = pipeline("zero-shot-volume-classification", model="<user>/{folder_name}",
                    revision="<full commit hash>", trust_remote_code=True)
classify("scan.nii.gz", record={{"age": 74, "sex": "F", "mmse": 24}})
```
Always pin `revision` to a commit hash you have read: the repository's Python files run on your machine
(`pipeline_medblip.load_medblip_pipeline` refuses a Hub id without `revision=`). The prompt shows only the record
fields listed above; other fields given (e.g. CDR) are left out and logged.

## What you can rely on
- The processor is the training run's: `processor_config.json` holds the preprocessing, the grid, the intensity
  scaling and the `record_fields`; a prompt renders only those fields, checks their ranges (age 0-120, MMSE 0-30,
  APOE e4 0-2, CDR 0/0.5/1/2/3) and keeps special-token strings in free text as text.
- Arrays need an affine or an explicit orientation; a NIfTI without qform/sform is read with a warning naming it.
- Weights are safetensors only. The training run's checkpoints held no pickle and resumed bit-exactly on CPU; its
  preprocessing cache was keyed on every file read and checked by SHA-256 (see the repository's README).

## Limitations
Trained on a small cohort for a few hundred steps on CPU; MMSE in the record is a near-proxy of the label, so
compare with the text-only row. The `external` split (when present) comes from an independent generator with
another anatomy (Colin27 with skull) and other scanner models; real scanners and populations remain untested.
"""


def _training_line(snapshot: dict) -> str:
    """Steps, batch, seed and which step's weights these are (the selection criterion, or the last step)."""
    train = snapshot["train"]
    line = f"{train['max_steps']} optimizer steps of {train['batch_size']} volumes per process, seed {train['seed']}; "
    if snapshot.get("best_step") is not None:
        return line + (f"these are the weights of step {snapshot['best_step']}, the best validation "
                       f"`{train['select_on']}` of the validations every {train['eval_every']} steps.")
    return line + "these are the weights of the last step."


def write_model_card(folder: Path, results_by_split: dict, baselines: dict, snapshot: dict, split: str) -> None:
    """README.md of the Hub folder: intended use, data, preprocessing contract, results of `split` beside the
    baselines, the other splits (held-out sites, external cohort, test) in short, and the targets."""
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license="apache-2.0",
        tags=["medblip", "medical", "mri", "3d", "alzheimers", "vision-language", "trust_remote_code"],
    )
    results = results_by_split[split]
    content = CARD_TEMPLATE.format(
        card_yaml=card_data.to_yaml(), preset=snapshot["model"]["preset"],
        num_query_tokens=snapshot["num_query_tokens"],
        sources="; ".join(f"`{SourceReport(**source).describe()}`" for source in snapshot["data_sources"]),
        holdout=snapshot["data"]["holdout_datasets"], training=_training_line(snapshot),
        preprocessing=snapshot["model"].get("preprocessing", "none"),
        target_spacing=snapshot["model"]["target_spacing"], volume_size=snapshot["volume_size"],
        patch_size=snapshot["patch_size"], record_fields=snapshot["model"]["record_fields"], split=split,
        n=results["likelihood"]["image_text"]["all"]["n"], results_table=_results_table(results),
        targets=_targets_line(results_by_split, baselines), baselines_table=_baselines_table(baselines.get(split)),
        other_splits=_other_splits(results_by_split, baselines, split), folder_name=folder.name,
    )
    ModelCard(content).save(folder / "README.md")
