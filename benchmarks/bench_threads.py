"""How the `small`-preset training step degrades when another process holds a core: 1 vs 2 torch threads, with
OpenMP's default wait (spin 300k iterations, then sleep), `OMP_WAIT_POLICY=PASSIVE` (sleep at once) and
`GOMP_SPINCOUNT=10000` (spin briefly: what `train.py` sets).

    python benchmarks/bench_threads.py [--steps 4]

Each configuration runs in a fresh process (the wait policy is read when OpenMP loads), alone and beside a busy
process (a pure-Python loop on one core). Prints the median step time per configuration and its ratio to 1 thread
alone. Run it on an otherwise quiet machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = """
import json, sys, time
sys.path.insert(0, {repo!r})
import numpy as np, torch
import train
torch.set_num_threads({threads})
torch.manual_seed(0)
model_args, _, train_args = train.parse_arguments(["--preset", "small"])
model, processor = train.build_model(model_args)
optimizer = train.build_optimizer(train.optimizer_groups(model, 1e-4, 1e-3, 1e-4))
records = [{{"age": 70 + i, "sex": "F", "education": 16, "mmse": 25, "apoe4": 1}} for i in range(16)]
batch = dict(processor(records=records, diagnoses=[("CN", "MCI", "AD")[i % 3] for i in range(16)], image_slots=True))
vision = model.config.vision_config
batch["pixel_values"] = torch.rand(16, vision.num_patches, vision.patch_dim) * 2 - 1
batch["patch_grid"] = torch.tensor([vision.grid_size] * 16)
model.train()
def step():
    model(**batch, logits_to_keep=9).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
step()
times = []
for _ in range({steps}):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10000": {"GOMP_SPINCOUNT": "10000"}}


def run(threads: int, policy: str, busy: bool, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", WORKER.format(repo=str(REPO_ROOT), threads=threads, steps=steps)],
                             env=env, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    args = parser.parse_args(argv)
    results = {}
    for busy in (False, True):
        for threads, policy in ((1, "default"), (2, "default"), (2, "passive"), (2, "spin10000")):
            start = time.perf_counter()
            results[(busy, threads, policy)] = run(threads, policy, busy, args.steps)
            print(f"# {'busy' if busy else 'quiet'} {threads} thread(s) {policy}: "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    reference = results[(False, 1, "default")]
    for (busy, threads, policy), seconds in results.items():
        name = f"step_ms_{'busy' if busy else 'quiet'}_{threads}_threads_{policy}"
        print(f"{name}: {1000 * seconds:.1f} ({seconds / reference:.2f}x 1 thread alone)")
    return {f"{b}-{t}-{p}": s for (b, t, p), s in results.items()}


if __name__ == "__main__":
    main()
