"""Predictions of a MedBLIP model on a cached dataset, and their metrics per input mode, decoder and cohort."""

from __future__ import annotations

import logging
from pathlib import Path

import evaluate
import numpy as np
import torch

from labels_medblip import normalize_diagnosis
from medblip_data.baselines import reference_baselines as baselines_of
from medblip_data.cache import cache_folder_of, read_bad_scans
from medblip_data.collate import INPUT_MODES, make_collate


MODES = INPUT_MODES
DECODERS = ("likelihood", "generate")
METRIC_PATH = Path(__file__).resolve().parents[1] / "metrics" / "medblip_diagnosis"


logger = logging.getLogger(__name__)


def dropped_scans(cached_dataset) -> list[dict]:
    """The scans the preprocessing cache left out of `cached_dataset` (unreadable, truncated, ...), each as
    {"image_path", "subject_id", "reason"}, and logged: an evaluation says what it did not evaluate."""
    dropped = read_bad_scans(cache_folder_of(cached_dataset))
    for scan in dropped:
        logger.warning("not evaluated: %s (%s)", scan["image_path"], scan["reason"])
    return dropped


def load_metric():
    """The diagnosis metric module (`metrics/medblip_diagnosis`), loaded offline from its folder."""
    return evaluate.load(str(METRIC_PATH))


def class_labels(config) -> list[str]:
    """The model's classes in id order, from `config.id2label`."""
    return [config.id2label[index] for index in sorted(config.id2label)]


@torch.no_grad()
def predict(model, processor, dataset, record_fields, mode, batch_size, max_new_tokens, device,
            generate: bool = True) -> dict:
    """Per-volume predictions of one input mode: class probabilities (likelihood) and, with `generate`, generated
    answers (else an empty list)."""
    collate = make_collate(processor, record_fields, mode=mode, labels=False)
    candidates = processor.candidate_inputs(class_labels(model.config)).to(device)
    probabilities, generated = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items() if k in processor.model_input_names}
        scores = model.score_candidates(
            batch["input_ids"], candidates["candidate_input_ids"], pixel_values=batch.get("pixel_values"),
            attention_mask=batch["attention_mask"], candidate_attention_mask=candidates["candidate_attention_mask"],
            patch_grid=batch.get("patch_grid"),
        )
        probabilities.append(torch.softmax(scores.float(), dim=-1).cpu())
        if generate:
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            generated += processor.post_process_image_text_to_text(tokens, input_ids=batch["input_ids"])  # answers
    return {"probabilities": torch.cat(probabilities).numpy(), "generated": generated}


def evaluate_dataset(model, processor, dataset, record_fields, batch_size, max_new_tokens, device, metric,
                     modes: tuple[str, ...] = MODES, decoders: tuple[str, ...] = DECODERS):
    """`{decoder: {mode: {"all" | dataset name: metrics}}}` and the per-volume predictions, for the given input
    modes and decoders (validation during training needs one of each)."""
    labels = class_labels(model.config)
    truth = np.array([labels.index(normalize_diagnosis(d)) for d in dataset["diagnosis"]])
    cohorts = np.array(dataset["dataset"])
    subjects = dataset["subject_id"]  # one column read, not a row (with its patches) per volume and mode
    groups = {"all": np.ones(len(truth), dtype=bool)} | {name: cohorts == name for name in sorted(set(cohorts))}
    results = {decoder: {} for decoder in decoders}
    predictions = []
    for mode in modes:
        output = predict(model, processor, dataset, record_fields, mode, batch_size, max_new_tokens, device,
                         generate="generate" in decoders)
        per_decoder = {"likelihood": (output["probabilities"].argmax(1), output["probabilities"])}
        if "generate" in decoders:
            mapped = processor.post_process_generation(output["generated"])
            per_decoder["generate"] = (np.array([labels.index(label) if label else -1 for label in mapped]), None)
        for decoder, (predicted, scores) in per_decoder.items():
            results[decoder][mode] = {
                name: metric.compute(predictions=predicted[mask].tolist(), references=truth[mask].tolist(),
                                     scores=None if scores is None else scores[mask].tolist())
                for name, mask in groups.items()
            }
        for i in range(len(truth)):
            predictions.append({
                "subject_id": subjects[i], "dataset": cohorts[i], "mode": mode, "truth": labels[truth[i]],
                "likelihood": labels[int(per_decoder["likelihood"][0][i])],
                "probabilities": output["probabilities"][i].tolist(),
                **({"generated": output["generated"][i]} if output["generated"] else {}),
            })
    return results, predictions


def reference_baselines(corpus, splits: list[str]) -> dict:
    """Logistic-regression baselines (image oracle, text floor, both) per evaluation split; {} without the
    ground-truth structure volumes that only the synthetic cohorts carry."""
    if not {"ventricles_ml", "hippocampi_ml"} <= set(corpus["train"].column_names):
        return {}
    train_rows = corpus["train"].to_list()
    return {split: baselines_of(train_rows, corpus[split].to_list())
            for split in splits if split in corpus and len(corpus[split])}
