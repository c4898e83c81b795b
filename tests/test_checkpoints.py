"""Checkpoints on a small torch model: exact save/resume, no unpickling, broken checkpoints, used output folders,
pruning, and the run-configuration check."""

import json
import logging
import pickle
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from medblip_train.checkpoints import (
    CheckpointError,
    Checkpoints,
    TrainState,
    checkpoint_folders,
    refuse_used_output_dir,
    select_checkpoint,
)
from medblip_train.run_config import config_differences


# every file name Accelerate's save_state used in checkpoints of earlier versions (all pickles but the weights)
ACCELERATE_FILE_NAMES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
                         "random_states_1.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin", "scaler.pt",
                         "pytorch_model.bin", "dl_state_dict.bin")


def small_run(output_dir, run_id="run-a", keep_last=5, wrap=lambda layer: layer) -> Checkpoints:
    """A frozen layer, dropout (so the RNG matters), AdamW and a cosine schedule, prepared by Accelerate."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), wrap(torch.nn.Linear(8, 2)))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Checkpoints(accelerator, model, optimizer, scheduler, TrainState(), {"run_id": run_id, "seed": 0},
                       str(output_dir), keep_last)


def train_steps(run: Checkpoints, steps: int, save: bool = False) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = run.model(torch.randn(5, 4)).pow(2).mean()
        run.accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
        run.scheduler.step()
        run.state.step += 1
        run.state.history.append({"step": run.state.step, "loss": loss.item()})
        losses.append(loss.item())
        if save:
            run.save()
    return losses


def parameters(run: Checkpoints) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]


class Payload:
    """Unpickling this creates the marker file: what a planted checkpoint file would do to `torch.load`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_restores_weights_optimizer_scheduler_and_rng_exactly(tmp_path):
    run = small_run(tmp_path / "out")
    train_steps(run, 2, save=True)
    saved_scheduler = json.loads(json.dumps(run.scheduler.state_dict()))
    expected_losses, expected = train_steps(run, 3), parameters(run)
    resumed = small_run(tmp_path / "out")
    assert resumed.resume("latest") is None and resumed.state.step == 2
    assert [h["step"] for h in resumed.state.history] == [1, 2]
    assert resumed.scheduler.state_dict() == saved_scheduler
    assert train_steps(resumed, 3) == expected_losses  # dropout masks and AdamW moments: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(parameters(resumed), expected))


def test_wrapped_layers_are_saved_under_their_plain_names(tmp_path):
    """Activation-checkpointing (and FSDP v1) wrappers rename parameters; checkpoints use the plain names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    run = small_run(tmp_path / "out", wrap=checkpoint_wrapper)
    assert "2._checkpoint_wrapped_module.weight" in dict(run.model.named_parameters())
    train_steps(run, 1, save=True)
    checkpoint = checkpoint_folders(tmp_path / "out")[0]
    assert sorted(load_file(checkpoint / "model.safetensors")) == ["0.bias", "2.bias", "2.weight"]
    expected_losses = train_steps(run, 2)
    resumed = small_run(tmp_path / "out")  # the same model, unwrapped
    resumed.resume("latest")
    assert train_steps(resumed, 2) == expected_losses


def test_planted_pickles_in_a_checkpoint_never_run(tmp_path, caplog):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    run = small_run(tmp_path / "out")
    train_steps(run, 2, save=True)
    expected_losses = train_steps(run, 2)
    checkpoint = checkpoint_folders(tmp_path / "out")[-1]
    for name in ACCELERATE_FILE_NAMES:
        (checkpoint / name).write_bytes(payload)
    torch.save(Payload(marker), checkpoint / "torch_saved_payload.pt")
    resumed = small_run(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="medblip.train"):
        resumed.resume("latest")
    assert not marker.exists()
    assert train_steps(resumed, 2) == expected_losses
    ignored = sorted([*ACCELERATE_FILE_NAMES, "torch_saved_payload.pt"])
    assert f"checkpoint {checkpoint}: ignoring files it did not write (never opened): {ignored}" in caplog.text
    # a payload in place of a file the checkpoint does read is caught before anything is parsed
    (checkpoint / "optimizer.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="optimizer.safetensors has"):
        small_run(tmp_path / "out").resume(str(checkpoint))
    assert not marker.exists()


def test_resume_skips_a_checkpoint_with_a_truncated_optimizer_file(tmp_path, caplog):
    run = small_run(tmp_path / "out")
    train_steps(run, 2, save=True)
    first, second = checkpoint_folders(tmp_path / "out")
    optimizer_file = second / "optimizer.safetensors"
    size = optimizer_file.stat().st_size
    optimizer_file.write_bytes(optimizer_file.read_bytes()[: size // 2])
    with caplog.at_level(logging.WARNING, logger="medblip.train"):
        assert select_checkpoint(str(tmp_path / "out"), "latest") == first
    assert (f"skipping broken checkpoint {second}: optimizer.safetensors has {size // 2} bytes, {size} were written "
            "(truncated?)") in caplog.text
    resumed = small_run(tmp_path / "out")
    resumed.resume("latest")
    assert resumed.state.step == 1


def test_resume_skips_a_checkpoint_missing_its_weights_file(tmp_path, caplog):
    run = small_run(tmp_path / "out")
    train_steps(run, 2, save=True)
    first, second = checkpoint_folders(tmp_path / "out")
    (second / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="medblip.train"):
        assert select_checkpoint(str(tmp_path / "out"), "latest") == first
    assert f"skipping broken checkpoint {second}: model.safetensors is missing" in caplog.text
    with pytest.raises(CheckpointError, match=f"^checkpoint {second} is broken: model.safetensors is missing$"):
        select_checkpoint(str(tmp_path / "out"), str(second))
    (first / "checkpoint.json").unlink()  # e.g. a checkpoint written by Accelerate's save_state
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*checkpoint-0000002: model.safetensors "
                                              "is missing | checkpoint-0000001: checkpoint.json is missing"):
        select_checkpoint(str(tmp_path / "out"), "latest")


def test_fresh_run_refuses_a_used_output_dir(tmp_path):
    run = small_run(tmp_path / "out")
    train_steps(run, 2, save=True)
    accelerator = run.accelerator
    with pytest.raises(FileExistsError, match=f"^output folder {tmp_path / 'out'} already holds checkpoints of an "
                                              "earlier run \\(checkpoint-0000001, checkpoint-0000002\\)"):
        refuse_used_output_dir(str(tmp_path / "out"), None, False, accelerator)
    refuse_used_output_dir(str(tmp_path / "out"), "latest", False, accelerator)  # resuming: allowed
    refuse_used_output_dir(str(tmp_path / "empty"), None, False, accelerator)  # nothing there
    assert [p.name for p in checkpoint_folders(tmp_path / "out")] == ["checkpoint-0000001", "checkpoint-0000002"]


def test_overwrite_output_dir_deletes_the_old_checkpoints_first(tmp_path):
    run = small_run(tmp_path / "out")
    train_steps(run, 2, save=True)
    (tmp_path / "out" / "eval_results.json").write_text("{}")
    refuse_used_output_dir(str(tmp_path / "out"), None, True, run.accelerator)
    assert checkpoint_folders(tmp_path / "out") == [] and not (tmp_path / "out" / "checkpoints").exists()
    assert (tmp_path / "out" / "eval_results.json").exists()  # only checkpoints are deleted
    with pytest.raises(ValueError, match="^--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint "
                                         "continues: pick one$"):
        refuse_used_output_dir(str(tmp_path / "out"), "latest", True, run.accelerator)


def test_pruning_only_touches_the_current_runs_checkpoints(tmp_path):
    other = small_run(tmp_path / "other", run_id="run-b")
    train_steps(other, 1, save=True)
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint_folders(tmp_path / "other")[0], tmp_path / "out" / "checkpoints" / "checkpoint-0000004")
    old_format = tmp_path / "out" / "checkpoints" / "checkpoint-0000000"  # no run configuration: never pruned
    old_format.mkdir()
    (old_format / "custom_checkpoint_0.pkl").write_bytes(b"")
    run = small_run(tmp_path / "out", keep_last=1)
    train_steps(run, 3, save=True)
    assert [p.name for p in checkpoint_folders(tmp_path / "out")] == [
        "checkpoint-0000000", "checkpoint-0000003", "checkpoint-0000004"]
    with pytest.raises(CheckpointError, match="checkpoint-0000004 belongs to another run: not overwritten"):
        train_steps(run, 1, save=True)
    assert json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-0000004" / "run_config.json").read_text())[
        "run_id"] == "run-b"


def test_resume_refuses_changed_model_or_data_settings_and_lists_them():
    saved = {"run_id": "a", "model": {"preset": "small", "record_fields": ["age"]},
             "train": {"seed": 0, "learning_rate": 1e-3, "max_steps": 6, "log_every": 1, "keep_last": 2},
             "data": {"split_seed": 0, "cache_dir": "x"}, "frozen_weights_sha256": "f0"}
    current = {"run_id": "b", "model": {"preset": "small", "record_fields": ["age", "mmse"]},
               "train": {"seed": 1, "learning_rate": 5e-4, "max_steps": 10, "log_every": 5, "keep_last": 3},
               "data": {"split_seed": 0, "cache_dir": "y"}, "frozen_weights_sha256": "f1"}
    refused, allowed = config_differences(saved, current)
    assert refused == [
        "frozen_weights_sha256: 'f0' in the checkpoint, 'f1' now",
        "model.record_fields: ['age'] in the checkpoint, ['age', 'mmse'] now",
        "train.learning_rate: 0.001 in the checkpoint, 0.0005 now",  # refused, never logged and ignored
        "train.seed: 0 in the checkpoint, 1 now",
    ]
    assert allowed == ["data.cache_dir: 'x' in the checkpoint, 'y' now", "train.keep_last: 2 in the checkpoint, 3 now",
                       "train.log_every: 1 in the checkpoint, 5 now", "train.max_steps: 6 in the checkpoint, 10 now"]
    assert config_differences(saved, {**saved, "run_id": "other"}) == ([], [])
