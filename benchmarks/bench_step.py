"""The `small`-preset training step of this checkout against the same step at an earlier commit, side by side.

    python benchmarks/bench_step.py [--baseline 32780e8] [--repeats 7] [--steps 3] [--threads 2]

Each checkout runs in its own worker process (the two cannot share one interpreter: they define the same modules).
Both build `python train.py`'s default model with `train.build_model` and a batch shaped as its loader makes them
(batch 16, 32^3 volumes as 64 patches of 8^3, records, answers), seeded identically; then the parent asks them in
turn for `--steps` timed optimizer steps (forward, backward, gradient clipping, optimizer step), `--repeats` times,
and prints the median per step with the ratio. The baseline checkout is made with `git worktree add --detach` in a
temporary folder and removed afterwards. Run on a quiet machine: the ratio is the figure, not the milliseconds.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 16


def worker(repo: str, threads: int) -> None:
    """Build the model and a batch from the checkout at `repo`; answer `run K` with K step times (JSON)."""
    sys.path.insert(0, repo)
    import numpy as np
    import torch

    import train

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_args, _, train_args = train.parse_arguments(["--preset", "small"])
    model, processor = train.build_model(model_args)
    groups = train.optimizer_groups(model, train_args.weight_decay, train_args.learning_rate,
                                    train_args.image_path_learning_rate)
    build_optimizer = getattr(train, "build_optimizer", None)  # newer checkouts choose the optimizer there
    optimizer = build_optimizer(groups) if build_optimizer else torch.optim.AdamW(groups)
    rng = np.random.default_rng(0)
    records = [{"age": int(rng.integers(60, 90)), "sex": "FM"[i % 2], "education": 16,
                "mmse": int(rng.integers(18, 30)), "apoe4": i % 3} for i in range(BATCH_SIZE)]
    batch = dict(processor(records=records, diagnoses=[("CN", "MCI", "AD")[i % 3] for i in range(BATCH_SIZE)],
                           image_slots=True))
    vision = model.config.vision_config
    batch["pixel_values"] = torch.from_numpy(rng.uniform(-1, 1, (BATCH_SIZE, vision.num_patches, vision.patch_dim))
                                             .astype(np.float32))
    batch["patch_grid"] = torch.tensor([vision.grid_size] * BATCH_SIZE)
    candidates = processor.candidate_inputs(("CN", "MCI", "AD"))
    keep = int(candidates["candidate_attention_mask"].sum(-1).max()) + 1
    model.train()

    def step() -> float:
        output = model(**batch, logits_to_keep=keep)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return float(output.loss)

    first_loss = step()
    print(json.dumps({"ready": True, "first_loss": first_loss,
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}), flush=True)
    for line in sys.stdin:
        count = int(line.split()[1])
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)


def start_worker(repo: Path, threads: int) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen([sys.executable, __file__, "--worker", str(repo), "--threads", str(threads)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo)
    return process, json.loads(process.stdout.readline())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="32780e8", help="commit whose step is the reference")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (after one warm-up round)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per worker and round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads)
        return {}
    with tempfile.TemporaryDirectory() as folder:
        baseline = Path(folder) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO_ROOT,
                       check=True, capture_output=True)
        try:
            workers = {name: start_worker(path, args.threads)
                       for name, path in (("baseline", baseline), ("current", REPO_ROOT))}
            times = {name: [] for name in workers}
            for round_index in range(args.repeats + 1):
                for name, (process, _) in workers.items():  # one worker at a time: they never compete for cores
                    process.stdin.write(f"run {args.steps}\n")
                    process.stdin.flush()
                    measured = json.loads(process.stdout.readline())["times"]
                    if round_index:
                        times[name] += measured
            for process, _ in workers.values():
                process.stdin.close()
                process.wait()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO_ROOT, check=False)
    base, current = (1000 * statistics.median(times[name]) for name in ("baseline", "current"))
    info = {name: meta for name, (_, meta) in workers.items()}
    for name in ("baseline", "current"):
        print(f"{name}: first-step loss {info[name]['first_loss']:.6f}, {info[name]['trainable']} trainable parameters")
    print(f"threads: {args.threads}  batch: {BATCH_SIZE}")
    print(f"small_train_step_ms_{args.baseline}: {base:.1f} (1.00x reference)")
    print(f"small_train_step_ms_current: {current:.1f} ({base / current:.2f}x faster; target >= 1.50x)")
    return {"baseline_ms": base, "current_ms": current, "speedup": base / current}


if __name__ == "__main__":
    main()
