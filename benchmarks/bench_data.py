"""Data path vs model step on the `small` preset: time to fetch and collate a batch from the patch cache, as a share
of the training step it feeds (target below 10%).

    python benchmarks/bench_data.py [--batches 20] [--batch_size 16] [--threads 2]

Uses the cohort and cache of `python train.py` (built on first use, as train.py would).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches (after 3 warm-up ones)")
    parser.add_argument("--batch_size", type=int, default=16, help="volumes per batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--train_args", nargs="*", default=[], help="extra train.py flags (e.g. a smaller cohort)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_args, data_args, train_args = train.parse_arguments(args.train_args)
    torch.manual_seed(0)
    model, processor = train.build_model(model_args)
    accelerator = train.Accelerator(cpu=True)
    cached = train.build_data(data_args, processor.image_processor, accelerator)[-1]
    loader = train.training_loader(cached["train"], processor, args.batch_size, train_args.seed,
                                   model_args.record_dropout, model_args.image_dropout,
                                   train.VolumeAugmentation.of(processor.image_processor, model_args.scanner_augment)
                                   if model_args.augment else None)
    optimizer = torch.optim.AdamW(train.optimizer_groups(model, 1e-4, 1e-4, 1e-4))
    candidates = processor.candidate_inputs(train.class_labels(model.config))
    keep = int(candidates["candidate_attention_mask"].sum(-1).max()) + 1
    model.train()
    load_times, step_times = [], []
    iterator = iter(loader)
    for index in range(args.batches + 3):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        loaded = time.perf_counter()
        model(**batch, logits_to_keep=keep).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        done = time.perf_counter()
        if index >= 3:
            load_times.append(loaded - start)
            step_times.append(done - loaded)
    load_ms, step_ms = 1000 * statistics.median(load_times), 1000 * statistics.median(step_times)
    print(f"train_step_ms: {step_ms:.1f} (1.00x reference; batch {args.batch_size}, small preset)")
    print(f"data_loader_ms_per_batch: {load_ms:.1f} ({load_ms / step_ms:.3f}x the step; target < 0.10x)")
    return {"load_ms": load_ms, "step_ms": step_ms}


if __name__ == "__main__":
    main()
