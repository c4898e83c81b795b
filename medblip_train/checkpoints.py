"""Training checkpoints: written atomically by the main process, pruned, and restored on resume.

A checkpoint folder `OUTPUT_DIR/checkpoints/checkpoint-<step>` holds Accelerate's state (the trainable weights,
optimizer, scheduler, RNG) plus `TrainState` (step, log history, best validation step) and the best step's
trainable weights.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file


logger = logging.getLogger("medblip.train")
BEST_WEIGHTS_FILE = "best_trainable_weights.safetensors"


class TrainState:
    """Step counter, log history and best validation step, saved with every checkpoint through
    `register_for_checkpointing`."""

    def __init__(self):
        self.step = 0
        self.history: list[dict] = []
        self.best_score, self.best_step = -1.0, -1  # -1: no validation yet

    def state_dict(self) -> dict:
        return {"step": self.step, "history": json.dumps(self.history), "best_score": self.best_score,
                "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), json.loads(state["history"])
        self.best_score, self.best_step = float(state.get("best_score", -1.0)), int(state.get("best_step", -1))


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str) -> Path | None:
    found = sorted(checkpoint_root(output_dir).glob("checkpoint-*"))
    return found[-1] if found else None


def keep_trainable_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate save hook: intermediate checkpoints hold trainable weights only; frozen ones are rebuilt from the
    seed or `--init_from` on resume (and the final Hub folder holds everything)."""
    for model, state in zip(models, weights):
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        for name in [name for name in state if name not in trainable]:
            del state[name]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, keep_last: int, best_weights: dict | None = None
) -> Path:
    """Accelerate state (trainable weights, optimizer, scheduler, RNG, step) written to a temporary folder, then
    renamed, so a killed run never leaves a half-written checkpoint; only the last `keep_last` are kept.
    `best_weights` (the best validation step's trainable weights so far) go in too: a resumed run can still end
    on a step from before the interruption."""
    root = checkpoint_root(output_dir)
    final, temporary = root / f"checkpoint-{step:07d}", root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best_weights is not None:
            save_file({name: w.contiguous() for name, w in best_weights.items()}, temporary / BEST_WEIGHTS_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in sorted(root.glob("checkpoint-*"))[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Accelerator, output_dir: str, resume_from: str, state: TrainState) -> dict | None:
    """Restore the state saved in `resume_from` ('latest' or a checkpoint folder); returns the best step's weights
    saved with it."""
    path = latest_checkpoint(output_dir) if resume_from == "latest" else Path(resume_from)
    if path is None or not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume from in {checkpoint_root(output_dir)}")
    accelerator.load_state(str(path), strict=False)
    logger.info("resumed from %s at step %d", path, state.step)
    return load_file(path / BEST_WEIGHTS_FILE) if (path / BEST_WEIGHTS_FILE).exists() else None
