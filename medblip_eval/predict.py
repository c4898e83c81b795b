"""Predictions of a MedBLIP model on a cached dataset, and their metrics per input mode, decoder and cohort."""

from __future__ import annotations

import logging
from pathlib import Path

import evaluate
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

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


def batches_of_this_process(num_rows: int, batch_size: int, distributed: bool, sharded: bool) -> list[tuple[int, bool]]:
    """`(first row, keep)` of each batch this process evaluates; `keep=False`: a batch run only to keep in step.

    Alone: every batch. Distributed: batches rank, rank + world, ... of the single-process batching, so that each
    batch holds the same rows and gives the same numbers. A sharded (FSDP) model gathers its parameters in every
    call, so there every process runs as many batches: one with fewer repeats batch 0 and discards the result.
    """
    starts = list(range(0, num_rows, batch_size))
    if not distributed:
        return [(start, True) for start in starts]
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [(start, True) for start in starts[rank::world]]
    padding = -(-len(starts) // world) - len(mine) if sharded else 0
    return mine + [(0, False)] * padding


def _gather_batches(batches: list[tuple], distributed: bool) -> list[tuple]:
    """Every process's `(first row, probabilities, generated)` batches, in row order."""
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, batches)
        batches = [batch for part in gathered for batch in part]
    return sorted(batches, key=lambda batch: batch[0])


@torch.no_grad()
def predict(model, processor, dataset, record_fields, mode, batch_size, max_new_tokens, device,
            generate: bool = True, distributed: bool = False) -> dict:
    """Per-volume predictions of one input mode: class probabilities (likelihood) and, with `generate`, generated
    answers (else an empty list).

    `distributed=True`: every process of the `torch.distributed` group calls this on the same dataset, evaluates
    its share of the batches and receives everyone's predictions, equal to those of a single-process run.
    """
    distributed = distributed and dist.is_initialized() and dist.get_world_size() > 1
    sharded = isinstance(model, FSDPModule)
    labels = class_labels(model.config)
    collate = make_collate(processor, record_fields, mode=mode, labels=False)
    candidates = processor.candidate_inputs(labels).to(device)
    batches = []
    for start, keep in batches_of_this_process(len(dataset), batch_size, distributed, sharded):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items() if k in processor.model_input_names}
        scores = model.score_candidates(
            batch["input_ids"], candidates["candidate_input_ids"], pixel_values=batch.get("pixel_values"),
            attention_mask=batch["attention_mask"], candidate_attention_mask=candidates["candidate_attention_mask"],
            patch_grid=batch.get("patch_grid"),
        )
        answers = []
        if generate:  # synced_gpus: a sharded LM needs every process in each decoding step until all have finished
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    synced_gpus=sharded and distributed)
            answers = processor.post_process_image_text_to_text(tokens, input_ids=batch["input_ids"])
        if keep:
            batches.append((start, torch.softmax(scores.float(), dim=-1).cpu().numpy(), answers))
    batches = _gather_batches(batches, distributed)
    return {"probabilities": np.concatenate([b[1] for b in batches]) if batches else np.zeros((0, len(labels))),
            "generated": [answer for b in batches for answer in b[2]]}


def evaluate_dataset(model, processor, dataset, record_fields, batch_size, max_new_tokens, device, metric,
                     modes: tuple[str, ...] = MODES, decoders: tuple[str, ...] = DECODERS, distributed: bool = False):
    """`{decoder: {mode: {"all" | dataset name: metrics}}}` and the per-volume predictions, for the given input
    modes and decoders (validation during training needs one of each); `distributed`: see `predict`."""
    labels = class_labels(model.config)
    truth = np.array([labels.index(normalize_diagnosis(d)) for d in dataset["diagnosis"]])
    cohorts = np.array(dataset["dataset"])
    subjects = dataset["subject_id"]  # one column read, not a row (with its patches) per volume and mode
    groups = {"all": np.ones(len(truth), dtype=bool)} | {name: cohorts == name for name in sorted(set(cohorts))}
    results = {decoder: {} for decoder in decoders}
    predictions = []
    for mode in modes:
        output = predict(model, processor, dataset, record_fields, mode, batch_size, max_new_tokens, device,
                         generate="generate" in decoders, distributed=distributed)
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
