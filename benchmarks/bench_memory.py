"""Benchmark peak CPU memory of training the `small` preset: a few full training steps in a fresh process.

Run: `python benchmarks/bench_memory.py [--batch-size 8] [--steps 3]`. Prints `small_train_peak_rss_gb: X (ratio vs
4 GB target)`: the child's peak resident set size (VmHWM, Linux), GB = 1e9 bytes. The child builds the preset with
its own freezing (nothing frozen in `small`), AdamW over the trainable parameters, and trains on synthetic batches
shaped as `train.py` feeds them: 64^3 volumes cut in 16^3 patches, LM rows of `--lm-length` tokens (image
placeholders included), Q-Former record and answer texts, all three loss terms, `logits_to_keep` as in train.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------------------------------------------
# defaults
preset = "small"
batch_size = 8  # volumes per step
steps = 3  # training steps (forward, backward, AdamW step)
threads = 1  # torch.set_num_threads in the child (2 threads stall on a shared 2-core machine; RSS barely changes)
lm_length = 128  # LM row length, image placeholders included (the processor's max_length)
answer_length = 9  # answer tokens + end token at the end of each row
qformer_length = 64  # Q-Former record text (the processor's qformer_max_length)
qformer_answer_length = 16  # Q-Former "question answer" text
target_gb = 4.0

CHILD = """
import sys
sys.path.insert(0, {repo!r})
import torch
from configuration_medblip import MedBlipConfig
from modeling_medblip import MedBlipForConditionalGeneration

torch.set_num_threads({threads})
torch.manual_seed(0)
config = MedBlipConfig.from_preset({preset!r})
model = MedBlipForConditionalGeneration(config).train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
vision, batch = config.vision_config, {batch_size}
image = torch.full((batch, config.num_query_tokens), config.image_token_index)
text = torch.randint(300, 30000, (batch, {lm_length} - config.num_query_tokens))
input_ids = torch.cat([image, text], dim=1)
labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < input_ids.shape[1] - {answer_length}, -100)
answers = torch.randint(1000, 30000, (3, {qformer_answer_length}))[torch.arange(batch) % 3]
inputs = dict(
    pixel_values=torch.rand(batch, vision.num_patches, vision.patch_dim), input_ids=input_ids,
    attention_mask=torch.ones_like(input_ids), labels=labels,
    qformer_input_ids=torch.randint(1000, 30000, (batch, {qformer_length})),
    qformer_attention_mask=torch.ones(batch, {qformer_length}, dtype=torch.long),
    qformer_answer_input_ids=answers, qformer_answer_attention_mask=torch.ones_like(answers),
)
for _ in range({steps}):
    loss = model(**inputs, logits_to_keep={answer_length} + 1).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(int(status["VmHWM"].split()[0]) * 1024, sum(p.numel() for p in model.parameters()), float(loss))
"""


def peak_rss(args) -> tuple[int, int, float, float]:
    """(peak RSS bytes, parameter count, last loss, seconds) of the training steps in a fresh Python process."""
    script = textwrap.dedent(CHILD).format(repo=str(REPO_ROOT), **vars(args))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"training child failed:\n{result.stderr[-3000:]}")
    peak, parameters, loss = result.stdout.strip().splitlines()[-1].split()
    return int(peak), int(parameters), float(loss), elapsed


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=preset, help=f"model preset (default {preset})")
    for name, value, help_text in [
        ("batch-size", batch_size, "volumes per step"), ("steps", steps, "training steps"),
        ("threads", threads, "torch threads in the child"), ("lm-length", lm_length, "LM row length"),
        ("answer-length", answer_length, "answer + end tokens"), ("qformer-length", qformer_length, "record text"),
        ("qformer-answer-length", qformer_answer_length, "Q-Former answer text"),
    ]:
        parser.add_argument(f"--{name}", type=int, default=value, help=f"{help_text} (default {value})")
    parser.add_argument("--target-gb", type=float, default=target_gb, help=f"target (default {target_gb})")
    args = parser.parse_args(argv)
    peak, parameters, loss, elapsed = peak_rss(args)
    gb = peak / 1e9
    print(f"preset: {args.preset}  parameters: {parameters / 1e6:.1f} M  batch: {args.batch_size}  steps: "
          f"{args.steps}  lm_length: {args.lm_length}  threads: {args.threads}  last loss: {loss:.3f}  "
          f"child wall time: {elapsed:.1f} s")
    print(f"{args.preset}_train_peak_rss_gb: {gb:.2f} ({gb / args.target_gb:.2f}x the {args.target_gb:g} GB target)")
    return gb


if __name__ == "__main__":
    main()
