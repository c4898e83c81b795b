"""One FSDP2 process of tests/test_fsdp.py, run as `torchrun --nproc_per_node 2 fsdp_worker.py FOLDER WORK` with
Accelerate's FSDP settings in the environment (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2, ...).

Loads the tiny model saved in FOLDER, prepares it with the optimizer through Accelerate (FSDP2 over gloo), and
writes to WORK what the test compares with a single-process run: the sharding and the optimizer's parameters,
`score_candidates` / `generate` / `medblip_eval.predict` under FSDP, three training steps on this process's half of
the batch (losses, gradients, weights), a checkpoint and the step after resuming from it, and the full model
exported by `exportable_model`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from medblip_eval import predict  # noqa: E402
from medblip_train.checkpoints import Checkpoints, TrainState  # noqa: E402
from medblip_train.distributed import (  # noqa: E402
    exportable_model,
    is_sharded,
    make_accelerator,
    prepare,
    trainable_weights,
)
from modeling_medblip import MedBlipForConditionalGeneration  # noqa: E402
from processing_medblip import MedBlipProcessor  # noqa: E402


RECORD_FIELDS = ["age", "mmse"]


def predict_rows(num_rows: int = 5) -> list[dict]:
    """Cached-dataset rows of the tiny preset (4^3 patches of 8^3 voxels), the same in the test and the workers."""
    generator = np.random.default_rng(0)
    return [{"image_path": f"sub-{i}.nii.gz", "subject_id": f"sub-{i}", "dataset": "site_A", "diagnosis": "CN",
             "age": 60.0 + 3 * i, "mmse": 30.0 - i, "pixel_values": generator.random((64, 512), dtype=np.float32),
             "patch_grid": [4, 4, 4]} for i in range(num_rows)]


def prompt_of(batch: dict, decoder_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part of a training batch: decoder-only rows end with the 3 answer tokens."""
    if decoder_only:
        return batch["input_ids"][:, :-3], batch["attention_mask"][:, :-3]
    return batch["input_ids"], batch["attention_mask"]


def gathered(value):
    """Every process's `value`, in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def evaluate(model, batch: dict, candidates: torch.Tensor, work: Path, rank: int) -> dict:
    """`score_candidates`, `generate` and `get_query_cross_attentions` on this process's rows, and (GPT-2 only) a
    distributed `predict` of 5 rows in batches of 2 (3 batches: this process's share, plus a repeated batch to keep
    in step)."""
    decoder_only = model.config.use_decoder_only_language_model
    model.eval()
    prompt_ids, prompt_mask = prompt_of(batch, decoder_only)
    with torch.no_grad():
        scores = model.score_candidates(prompt_ids, candidates, pixel_values=batch["pixel_values"],
                                        attention_mask=prompt_mask)
        tokens = model.generate(pixel_values=batch["pixel_values"], input_ids=prompt_ids, attention_mask=prompt_mask,
                                max_new_tokens=4, do_sample=False, num_beams=1, synced_gpus=True)
        attention = model.get_query_cross_attentions(batch["pixel_values"])
    report = {"scores": gathered(scores.tolist()), "tokens": gathered(tokens.tolist()),
              "attention": gathered(attention.tolist())}
    if decoder_only:
        processor = MedBlipProcessor.from_pretrained(work / "processor")
        scored, registered = [], model.score_candidates

        def counting(*args, **kwargs):
            scored.append(int(args[0].shape[0]))
            return registered(*args, **kwargs)

        model.score_candidates = counting
        output = predict(model, processor, predict_rows(), RECORD_FIELDS, "image_text", 2, 3, "cpu",
                         distributed=True)
        model.score_candidates = registered
        report.update(probabilities=output["probabilities"].tolist(), generated=output["generated"],
                      scored_rows=gathered(scored))
    return report


def train_step(accelerator, model, optimizer, batch: dict) -> tuple[float, dict]:
    """One step as train.py takes it; returns the mean loss over processes and the clipped full gradients."""
    model.train()
    output = model(**batch)
    accelerator.backward(output.loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    gradients = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad()
    loss = output.loss.detach().reshape(1)
    dist.all_reduce(loss)
    return float(loss) / accelerator.num_processes, gradients


def main(folder: str, work: str) -> None:
    work = Path(work)
    accelerator = make_accelerator()
    rank = accelerator.process_index
    model = MedBlipForConditionalGeneration.from_pretrained(folder)
    optimizer = train.build_optimizer(train.optimizer_groups(model, 1e-4, 1e-3, 1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = prepare(accelerator, model, optimizer)
    parameters = dict(model.named_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    report = {
        "fsdp2": accelerator.is_fsdp2 and is_sharded(model),
        "dtensors": sorted(n for n, p in parameters.items() if isinstance(p, DTensor)),
        "local_numel": {n: p.to_local().numel() for n, p in parameters.items()},
        "optimizer": sorted(n for n, p in parameters.items() if id(p) in in_optimizer),
        "optimizer_size": len(in_optimizer),
    }
    full_batch = load_file(work / "batch.safetensors")
    batch = {k: v[2 * rank: 2 * rank + 2] for k, v in full_batch.items()}
    report["eval"] = evaluate(model, batch, load_file(work / "candidates.safetensors")["ids"], work, rank)

    loss, first_gradients = train_step(accelerator, model, optimizer, batch)
    losses = [loss, train_step(accelerator, model, optimizer, batch)[0]]
    state = TrainState()
    state.step = 2
    checkpoints = Checkpoints(accelerator, model, optimizer, scheduler, state, {"run_id": "fsdp-test"},
                              str(work / "run"), keep_last=1)
    after_step_2 = trainable_weights(model)
    checkpoint = checkpoints.save()
    losses.append(train_step(accelerator, model, optimizer, batch)[0])
    after_step_3 = trainable_weights(model)
    state.step = 0
    checkpoints.resume("latest")
    report.update(losses=losses, resumed_step=state.step, checkpoint=str(checkpoint),
                  resumed_loss=train_step(accelerator, model, optimizer, batch)[0])
    resumed_step_3 = trainable_weights(model)
    export = exportable_model(accelerator, model)
    (work / f"report_{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        export.save_pretrained(work / "export")
        save_file({k: v.contiguous() for k, v in first_gradients.items()}, work / "gradients_step_1.safetensors")
        save_file(after_step_2, work / "weights_step_2.safetensors")
        save_file(after_step_3, work / "weights_step_3.safetensors")
        save_file(resumed_step_3, work / "weights_step_3_resumed.safetensors")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
