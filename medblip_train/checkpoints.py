"""Training checkpoints: written atomically by the main process, checked file by file, restored without unpickling.

A checkpoint folder `OUTPUT_DIR/checkpoints/checkpoint-<step>` holds:

==================================  =================================================================================
file                                content
==================================  =================================================================================
model.safetensors                   the trainable weights (frozen ones are rebuilt from `--seed`/`--init_from`)
optimizer.safetensors               optimizer tensors, keyed by parameter name; parameter groups as JSON metadata
best_trainable_weights.safetensors  the best validation step's trainable weights (once there was a validation)
rng_state_<process>.safetensors     each process's torch/CUDA generator states; Python's and NumPy's as metadata
trainer_state.json                  step, log history, best step and score, scheduler, gradient scaler
run_config.json                     the run's configuration (`run_config.py`), compared on resume
checkpoint.json                     size and SHA-256 of every file above (written last)
==================================  =================================================================================

Nothing is unpickled: tensors come from safetensors, the rest from JSON, and files a checkpoint did not list (such
as the `*.pkl`/`*.bin` files Accelerate's `save_state` writes) are never opened. On resume each checkpoint's files
are checked against `checkpoint.json`; `latest` skips broken ones with a warning naming them.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .run_config import config_differences
from .serialization import (
    load_tensors_and_json,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_rng,
    rng_to_tensors,
    save_tensors_and_json,
    sha256_of_file,
)


logger = logging.getLogger("medblip.train")
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_WEIGHTS_FILE = "best_trainable_weights.safetensors"
STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
MANIFEST_FILE = "checkpoint.json"
REQUIRED_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, RUN_CONFIG_FILE)
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is broken, or resuming from it would continue a different run; the message says which."""


def rng_file(process_index: int) -> str:
    return f"rng_state_{process_index}.safetensors"


class TrainState:
    """Step counter, log history and best validation step, saved as JSON with every checkpoint."""

    def __init__(self):
        self.step = 0
        self.history: list[dict] = []
        self.best_score, self.best_step = -1.0, -1  # -1: no validation yet

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "best_score": self.best_score,
                "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])
        self.best_score, self.best_step = float(state["best_score"]), int(state["best_step"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """`checkpoint-<step>` folders of `output_dir`, oldest step first."""
    root = checkpoint_root(output_dir)
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def refuse_used_output_dir(output_dir: str, resume_from: str | None, overwrite: bool, accelerator: Accelerator) -> None:
    """A fresh run never writes beside another run's checkpoints: it stops, naming the folder, unless `overwrite`
    (then the old checkpoints are deleted first)."""
    if overwrite and resume_from:
        raise ValueError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint continues: pick one")
    existing = checkpoint_folders(output_dir)
    if resume_from or not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in existing)}): continue it with --resume_from_checkpoint latest, "
            f"choose another --output_dir, or pass --overwrite_output_dir to delete them and start again")
    if accelerator.is_main_process:
        logger.warning("--overwrite_output_dir: deleting %d checkpoint(s) in %s", len(existing),
                       checkpoint_root(output_dir))
        shutil.rmtree(checkpoint_root(output_dir))
    accelerator.wait_for_everyone()


def verify_checkpoint(folder: Path) -> list[str]:
    """What makes `folder` unusable (an empty list: complete), checked against its `checkpoint.json`."""
    try:
        listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST_FILE} is missing (an incomplete checkpoint, or one written by an older train.py)"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"{MANIFEST_FILE} is unreadable ({error})"]
    problems = [f"{name} is not listed in {MANIFEST_FILE}" for name in REQUIRED_FILES if name not in listed]
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected['size']} were written (truncated?)")
        elif sha256_of_file(path) != expected["sha256"]:
            problems.append(f"{name} is not the file that was written (SHA-256 differs)")
    return problems


def select_checkpoint(output_dir: str, resume_from: str) -> Path:
    """The checkpoint to resume from: the named folder (which must be complete), or for 'latest' the newest
    complete checkpoint of `output_dir`, skipping broken ones with a warning."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
        if problems := verify_checkpoint(path):
            raise CheckpointError(f"checkpoint {path} is broken: {'; '.join(problems)}")
        return path
    candidates = checkpoint_folders(output_dir)[::-1]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint to resume from in {checkpoint_root(output_dir)}")
    broken = []
    for path in candidates:
        if not (problems := verify_checkpoint(path)):
            return path
        logger.warning("skipping broken checkpoint %s: %s", path, "; ".join(problems))
        broken.append(f"{path.name}: {'; '.join(problems)}")
    raise CheckpointError(f"no complete checkpoint in {checkpoint_root(output_dir)}: {' | '.join(broken)}")


def _run_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / RUN_CONFIG_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_checkpoints(output_dir: str, run_id: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints of run `run_id` (0: keep all); other runs' checkpoints and
    folders whose run cannot be read are never touched."""
    mine = [path for path in checkpoint_folders(output_dir) if _run_id(path) == run_id]
    for old in mine[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)


def parameter_name(name: str) -> str:
    """A parameter's name as `torch.distributed.checkpoint` writes it: without the wrappers FSDP (v1), activation
    checkpointing and `torch.compile` insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


class Checkpoints:
    """This run's checkpoints: `save()` every `--save_every` steps, `resume()` once at the start.

    The model and optimizer states go through `torch.distributed.checkpoint.state_dict` (full, name-keyed states, on
    one process as under DDP or FSDP); only the main process writes, each process adds its RNG state.
    """

    def __init__(self, accelerator: Accelerator, model, optimizer, scheduler, state: TrainState, run_config: dict,
                 output_dir: str, keep_last: int):
        self.accelerator, self.model, self.scheduler, self.state = accelerator, model, scheduler, state
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's
        self.run_config, self.output_dir, self.keep_last = run_config, output_dir, keep_last
        self.trainable = {parameter_name(name) for name, parameter in accelerator.unwrap_model(model).named_parameters()
                          if parameter.requires_grad}

    def _trainer_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {**self.state.state_dict(), "accelerator_step": self.accelerator.step,
                "scheduler": self.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None}

    def save(self, best_weights: dict | None = None) -> Path:
        """Write `checkpoint-<step>` into a temporary folder, list its files in `checkpoint.json`, rename it into
        place (a killed run never leaves a half-written checkpoint), and prune this run's older ones."""
        accelerator, root = self.accelerator, checkpoint_root(self.output_dir)
        final, temporary = root / f"checkpoint-{self.state.step:07d}", root / f".tmp-checkpoint-{self.state.step:07d}"
        if final.exists() and _run_id(final) != self.run_config["run_id"]:
            raise CheckpointError(f"{final} belongs to another run: not overwritten; choose another --output_dir")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(self.model, options=options)  # collective under FSDP: every process
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_tensors_and_json(temporary / rng_file(accelerator.process_index), *rng_to_tensors())
        if accelerator.is_main_process:
            save_file({n: w.contiguous() for n, w in weights.items() if n in self.trainable}, temporary / WEIGHTS_FILE)
            save_tensors_and_json(temporary / OPTIMIZER_FILE, *optimizer_to_tensors(optimizer_state))
            if best_weights is not None:
                save_file({n: w.contiguous() for n, w in best_weights.items()}, temporary / BEST_WEIGHTS_FILE)
            (temporary / STATE_FILE).write_text(json.dumps(self._trainer_state()))
            (temporary / RUN_CONFIG_FILE).write_text(json.dumps(self.run_config, indent=2))
        accelerator.wait_for_everyone()  # every process's RNG file is in
        if accelerator.is_main_process:
            files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of_file(p)} for p in temporary.iterdir()}
            (temporary / MANIFEST_FILE).write_text(json.dumps({"step": self.state.step, "files": files}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            prune_checkpoints(self.output_dir, self.run_config["run_id"], self.keep_last)
        accelerator.wait_for_everyone()
        return final

    def resume(self, resume_from: str) -> dict | None:
        """Restore the state of `resume_from` ('latest' or a checkpoint folder) after checking its files and that
        it was written by the same run configuration; returns the best step's trainable weights saved with it."""
        path = select_checkpoint(self.output_dir, resume_from)
        self._check_same_run(path)
        weights = load_file(path / WEIGHTS_FILE)
        if set(weights) != self.trainable:
            raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} does not hold this model's trainable weights "
                                  f"(missing {sorted(self.trainable - set(weights))[:5]}, "
                                  f"unexpected {sorted(set(weights) - self.trainable)[:5]})")
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, weights, options=options)
        optimizer_state = optimizer_from_tensors(*load_tensors_and_json(path / OPTIMIZER_FILE))
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        trainer_state = json.loads((path / STATE_FILE).read_text())
        self.state.load_state_dict(trainer_state)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.accelerator.scaler is not None and trainer_state["scaler"]:
            self.accelerator.scaler.load_state_dict(trainer_state["scaler"])
        self.accelerator.step = int(trainer_state["accelerator_step"])
        restore_rng(*load_tensors_and_json(path / rng_file(self.accelerator.process_index)))
        self.run_config["run_id"] = json.loads((path / RUN_CONFIG_FILE).read_text())["run_id"]  # the same run
        logger.info("resumed from %s at step %d", path, self.state.step)
        return load_file(path / BEST_WEIGHTS_FILE) if (path / BEST_WEIGHTS_FILE).exists() else None

    def _check_same_run(self, path: Path) -> None:
        listed = set(json.loads((path / MANIFEST_FILE).read_text())["files"])
        unlisted = sorted(p.name for p in path.iterdir() if p.name not in listed | {MANIFEST_FILE})
        if unlisted:
            logger.warning("checkpoint %s: ignoring files it did not write (never opened): %s", path, unlisted)
        saved = json.loads((path / RUN_CONFIG_FILE).read_text())
        refused, allowed = config_differences(saved, self.run_config)
        if refused:
            raise CheckpointError(
                f"checkpoint {path} was written by a different run; these settings change the model or the data "
                f"and must equal the checkpoint's to resume:\n  " + "\n  ".join(refused)
                + "\n(to change them, start a new run, e.g. --init_from a saved MedBLIP folder)")
        for line in allowed:
            logger.info("resume: changed setting (allowed): %s", line)
