"""The configuration a checkpoint was written with, and the check that a resumed run continues the same run.

Saved as `run_config.json` in every checkpoint: the model, data and training arguments, the number of processes,
a SHA-256 of the frozen weights (rebuilt from `--seed`/`--init_from` on resume, never saved), the processor
settings, a fingerprint of the training and validation rows, and a run id that tells this run's checkpoints from
any other's. On resume every field must be equal except `SAFE_TO_CHANGE` (where the run is written, how long it
runs, how often it logs, evaluates and saves, how it reports). The learning rates are compared like the rest: a
resumed optimizer keeps the rates it was saved with, so a new value would be logged but not used.
"""

import hashlib
import json
import uuid
from pathlib import Path

import torch


SAFE_TO_CHANGE: frozenset[str] = frozenset({
    "train.output_dir", "train.max_steps", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_last", "train.resume_from_checkpoint", "train.overwrite_output_dir", "train.report_to",
    "train.eval_batch_size", "train.eval_splits", "train.max_new_tokens", "train.log_predictions",
    "train.load_best_model_at_end", "train.push_to_hub", "train.hub_model_id", "train.eval_only",
    "train.model_name_or_path",
    # where things are: the rows themselves are compared through `data_fingerprint`
    "data.manifests", "data.synthetic_dir", "data.cache_dir", "data.num_proc", "data.fatal_bad_scans",
    "data.eval_manifest",
    "data.external_manifests", "data.external_dir", "data.external_n_per_class",  # evaluated only, never trained on
    "model.activation_checkpointing",  # recomputes the same activations
    "train.num_threads",  # how fast, not what
})
FINGERPRINTED_SPLITS = ("train", "validation")
NOT_FINGERPRINTED_COLUMNS = ("pixel_values", "patch_grid")


def frozen_weights_sha256(model) -> str:
    """SHA-256 of the frozen parameters (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            continue
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def data_fingerprint(splits: dict) -> dict[str, str]:
    """SHA-256 of the rows of the training and validation splits, in order (image paths by file name only, so a
    moved checkout is the same data)."""
    fingerprints = {}
    for split in FINGERPRINTED_SPLITS:
        if split not in splits:
            continue
        dataset, digest = splits[split], hashlib.sha256()
        for column in sorted(set(dataset.column_names) - set(NOT_FINGERPRINTED_COLUMNS)):
            values = list(dataset[column])
            if column == "image_path":
                values = [Path(value).name for value in values]
            digest.update(json.dumps([column, values], default=str).encode())
        fingerprints[split] = digest.hexdigest()
    return fingerprints


def run_configuration(arguments: dict, model, processor, splits: dict, num_processes: int) -> dict:
    """The configuration of a fresh run (`arguments`: {"model": ..., "data": ..., "train": ...} as dicts)."""
    return json.loads(json.dumps({
        "run_id": uuid.uuid4().hex,
        **{section: arguments[section] for section in ("model", "data", "train")},
        "num_processes": num_processes,
        "frozen_weights_sha256": frozen_weights_sha256(model),
        "processor": processor.to_dict(),
        "data_fingerprint": data_fingerprint(splits),
    }, default=str))


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's configuration and this run's, one line each."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    refused, allowed = [], []
    for key in sorted(set(saved_flat) | set(current_flat)):
        before, now = saved_flat.get(key, "<absent>"), current_flat.get(key, "<absent>")
        if key == "run_id" or before == now:
            continue
        line = f"{key}: {before!r} in the checkpoint, {now!r} now"
        (allowed if key in SAFE_TO_CHANGE else refused).append(line)
    return refused, allowed
