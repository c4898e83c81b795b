"""Rows of the preprocessing cache -> model inputs: health records, input modes, dropout and augmentation draws.

The processor is passed in (this module never imports transformers).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .augment import VolumeAugmentation


INPUT_MODES = ("image_text", "image_only", "text_only")


def record_of(row: dict, fields: Sequence[str]) -> dict:
    """The health record shown to the model: the chosen manifest fields of one scan."""
    return {key: row.get(key) for key in fields}


def scan_key(row: dict) -> str:
    """A scan's identity that does not depend on where the data lies (image paths are absolute): the same seed
    then draws the same dropout and augmentation in any checkout."""
    return f"{row.get('dataset', '')}:{row.get('subject_id', '')}:{row.get('visit', '')}:{Path(row['image_path']).name}"


def make_collate(
    processor: Any,
    record_fields: Sequence[str],
    mode: str = "image_text",
    labels: bool = True,
    record_dropout: float = 0.0,
    image_dropout: float = 0.0,
    seed: int = 0,
    augmentation: VolumeAugmentation | None = None,
) -> Callable[[list[dict]], dict]:
    """Rows of the patch cache -> model inputs. `mode` withholds the record (image_only) or the image (text_only).

    Training prompts withhold the record with probability `record_dropout` and, otherwise, the image with
    probability `image_dropout` (never both), so the LM also learns to answer from either input alone; the
    Q-Former still sees both for the contrastive losses. Each draw is a function of (seed, epoch, scan) (`scan_key`),
    never of a global RNG state: the loader collates one batch ahead, so a checkpoint's RNG state would already
    include the next batch's draws and a resumed run would drop other records. The training loop sets
    `collate.epoch`. `augmentation` (a `VolumeAugmentation`) draws each volume's flip/gamma/noise the same way.
    """
    if mode not in INPUT_MODES:
        raise ValueError(f"mode must be one of {INPUT_MODES}, got {mode!r}")
    if record_dropout + image_dropout > 1:
        raise ValueError(f"record_dropout + image_dropout must be <= 1, got {record_dropout} + {image_dropout}")

    def collate(rows: list[dict]) -> dict:
        records = [None if mode == "image_only" else record_of(row, record_fields) for row in rows]
        diagnoses = [row["diagnosis"] for row in rows] if labels else None
        keys = [f"{seed}:{collate.epoch}:{scan_key(row)}" for row in rows]  # every random draw of a row
        draws = [random.Random(key).random() for key in keys]
        prompt_records = [None if draw < record_dropout else record for draw, record in zip(draws, records)]
        slots = [mode != "text_only" and not record_dropout <= draw < record_dropout + image_dropout for draw in draws]
        batch = dict(processor(records=prompt_records, diagnoses=diagnoses, image_slots=slots, qformer_records=records))
        if mode != "text_only":
            patches = [torch.as_tensor(np.asarray(row["pixel_values"])) for row in rows]
            if augmentation is not None:
                patches = [augmentation(p, row["patch_grid"], key) for p, row, key in zip(patches, rows, keys)]
            batch["pixel_values"] = torch.stack(patches)
            batch["patch_grid"] = torch.as_tensor(np.stack([row["patch_grid"] for row in rows]), dtype=torch.long)
        return batch

    collate.epoch = 0
    return collate


def training_loader(dataset: Any, processor: Any, batch_size: int, seed: int, record_dropout: float = 0.0,
                    image_dropout: float = 0.0, augmentation: VolumeAugmentation | None = None) -> DataLoader:
    """Shuffled batches of `batch_size` training rows (the last partial batch dropped) through `make_collate`.

    The shuffle has its own generator, seeded with `seed`, so resuming leaves the dropout and augmentation draws
    (keyed by seed, epoch and scan) intact.

    Raises:
        ValueError: the dataset cannot fill one batch.
    """
    collate = make_collate(processor, processor.record_fields, record_dropout=record_dropout,
                           image_dropout=image_dropout, seed=seed, augmentation=augmentation)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training volumes cannot fill one batch of {batch_size}")
    return loader


__all__ = ["INPUT_MODES", "make_collate", "record_of", "scan_key", "training_loader"]
