"""Benchmark the MedBLIP model step against transformers' BLIP-2 of equal size, and candidate scoring.

Run: `python benchmarks/bench_model.py [--batch-size 4] [--repeats 7]`. Prints lines `name: value (ratio vs
reference)`, each the median of interleaved timed runs after warm-up, both models built and timed in this run.

1. Forward + backward (LM loss only) of `MedBlipForConditionalGeneration` vs `Blip2ForConditionalGeneration` with
   the same ViT, Q-Former, GPT-2 LM, number of vision tokens (3D grid 4x4x4 = 2D grid 8x8 = 64 patches, patch
   vectors of 4096 vs 3*37*37 = 4107 values) and trainable set (ViT blocks and LM frozen in both). Target <= 1.10.
2. Scoring 3 candidate answers with `score_candidates` (volume encoded once, one LM pass over B*3 rows) vs 3 full
   forwards, one per candidate (prompt + candidate, log-probs summed from the logits). Target >= 2x faster.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from configuration_medblip import GPT2_IMAGE_TOKEN_ID, MedBlipConfig  # noqa: E402
from modeling_medblip import MedBlipForConditionalGeneration  # noqa: E402


# -----------------------------------------------------------------------------------------------------------------
# defaults: between the `tiny` and `small` presets, so that CPU timings mean something
batch_size = 4  # volumes per step
repeats = 7  # timed runs per method (after warm-up runs), interleaved; the median is reported
warmup = 2  # untimed runs per method
threads = 1  # torch.set_num_threads: 1, because 2 OpenMP threads spin at barriers whenever another
# process holds one of the 2 cores, which made 2-thread timings swing up to 10x on the shared benchmark machine
vision_width, vision_layers, vision_heads = 192, 3, 3  # ViT (MLP = 4x width)
grid = 4  # 3D patch grid per side (grid^3 vision tokens); BLIP-2 gets a 2D grid with as many patches
patch = 16  # 3D patch side (patch^3 values per patch)
qformer_width, qformer_layers, qformer_heads = 384, 6, 12  # Q-Former, cross-attention every 2nd layer
num_query_tokens = 32
lm_width, lm_layers, lm_heads = 256, 4, 4  # GPT-2 with the padded GPT-2 BPE vocabulary (50304)
prompt_length = 40  # text tokens of the prompt after the image tokens
answer_length = 8  # answer + end token (the supervised part)
qformer_text_length, qformer_answer_length = 64, 12  # Q-Former texts of the contrastive losses (full-loss line)
candidate_lengths = (4, 9, 3)  # token counts of the 3 candidate answers (with end token), right-padded


def sizes(args) -> dict:
    """Shared sub-configs of both models."""
    vision = {"hidden_size": args.vision_width, "intermediate_size": 4 * args.vision_width,
              "num_hidden_layers": args.vision_layers, "num_attention_heads": args.vision_heads}
    qformer = {"hidden_size": args.qformer_width, "num_hidden_layers": args.qformer_layers,
               "num_attention_heads": args.qformer_heads, "intermediate_size": 4 * args.qformer_width,
               "max_position_embeddings": 512, "cross_attention_frequency": 2}
    text = {"model_type": "gpt2", "n_embd": args.lm_width, "n_layer": args.lm_layers, "n_head": args.lm_heads,
            "n_positions": 512, "vocab_size": 50304, "bos_token_id": 50256, "eos_token_id": 50256,
            "pad_token_id": 50258}
    return {"vision": vision, "qformer": qformer, "text": text}


def build_medblip(args) -> MedBlipForConditionalGeneration:
    parts = sizes(args)
    vision = {**parts["vision"], "volume_size": [args.grid * args.patch] * 3, "patch_size": [args.patch] * 3}
    config = MedBlipConfig(
        vision_config=vision, qformer_config=parts["qformer"], text_config=parts["text"],
        num_query_tokens=args.num_query_tokens, image_token_index=GPT2_IMAGE_TOKEN_ID,
        freeze_vision_encoder=True, freeze_language_model=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return MedBlipForConditionalGeneration(config)


def build_blip2(args):
    """BLIP-2 with the same parts; 2D patch side chosen so that 3*p*p ~ the 3D patch vector and grid^1.5 per side."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    side = round((args.grid**3) ** 0.5)
    if side * side != args.grid**3:
        raise ValueError(f"grid^3 = {args.grid**3} vision tokens is not a square number of 2D patches")
    patch_2d = round((args.patch**3 / 3) ** 0.5)
    parts = sizes(args)
    config = Blip2Config(
        vision_config={**parts["vision"], "image_size": side * patch_2d, "patch_size": patch_2d,
                       "layer_norm_eps": 1e-6, "qkv_bias": True},
        qformer_config=parts["qformer"], text_config=parts["text"], num_query_tokens=args.num_query_tokens,
        image_token_index=GPT2_IMAGE_TOKEN_ID, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    model.vision_model.encoder.requires_grad_(False)  # the same trainable set as MedBLIP's defaults
    model.language_model.requires_grad_(False)
    return model, side * patch_2d


def make_inputs(args, image_size: int) -> dict:
    """Synthetic batch: 3D patches, a 2D image with as many patches, prompt + answer ids, labels, Q-Former texts."""
    generator = torch.Generator().manual_seed(0)
    batch, patches = args.batch_size, args.grid**3
    image = torch.full((batch, args.num_query_tokens), GPT2_IMAGE_TOKEN_ID)
    text = torch.randint(300, 30000, (batch, args.prompt_length + args.answer_length), generator=generator)
    input_ids = torch.cat([image, text], dim=1)
    labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < input_ids.shape[1] - args.answer_length, -100)
    candidates = torch.full((len(candidate_lengths), max(candidate_lengths)), 50258)
    for row, length in enumerate(candidate_lengths):
        candidates[row, :length] = torch.randint(300, 30000, (length,), generator=generator)
    return {
        "pixel_values_3d": torch.rand(batch, patches, args.patch**3, generator=generator),
        "pixel_values_2d": torch.rand(batch, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "prompt_ids": input_ids[:, : args.num_query_tokens + args.prompt_length],
        "candidate_input_ids": candidates,
        "candidate_attention_mask": (candidates != 50258).long(),
        "qformer_input_ids": torch.randint(1000, 30000, (batch, qformer_text_length), generator=generator),
        "qformer_answer_input_ids": torch.randint(1000, 30000, (batch, qformer_answer_length), generator=generator),
    }


def seconds_per_call(functions: dict, repeats: int, warmup: int) -> tuple[dict, dict]:
    """Median wall-clock and process-CPU seconds per call of each function, runs interleaved so that machine load
    hits all alike. CPU time (all threads of this process) is the cross-check on a machine shared with others."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    wall: dict = {name: [] for name in functions}
    cpu: dict = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            function()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median = lambda times: {name: float(np.median(values)) for name, values in times.items()}  # noqa: E731
    return median(wall), median(cpu)


def train_step(model, **inputs):
    """Forward + backward; gradients are dropped (set to None) so that no run accumulates into another."""

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    return step


def separate_forwards(model, x: dict):
    """The naive scorer: one full forward (volume encoder included) per candidate, log-probs summed from logits."""
    prompt_length = x["prompt_ids"].shape[1]
    batch = x["prompt_ids"].shape[0]

    @torch.no_grad()
    def score():
        columns = []
        for candidate, mask in zip(x["candidate_input_ids"], x["candidate_attention_mask"]):
            ids = torch.cat([x["prompt_ids"], candidate.expand(batch, -1)], dim=1)
            attention = torch.cat([torch.ones_like(x["prompt_ids"]), mask.expand(batch, -1)], dim=1)
            logits = model(pixel_values=x["pixel_values_3d"], input_ids=ids, attention_mask=attention).logits
            log_probs = torch.log_softmax(logits[:, prompt_length - 1 : -1].float(), dim=-1)
            token_log_probs = log_probs.gather(-1, candidate.expand(batch, -1).unsqueeze(-1)).squeeze(-1)
            columns.append((token_log_probs * mask).sum(-1))
        return torch.stack(columns, dim=1)

    return score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value, help_text in [
        ("batch-size", batch_size, "volumes per step"), ("repeats", repeats, "timed runs per method"),
        ("warmup", warmup, "untimed runs per method"), ("threads", threads, "torch.set_num_threads"),
        ("vision-width", vision_width, "ViT width"), ("vision-layers", vision_layers, "ViT blocks"),
        ("vision-heads", vision_heads, "ViT heads"), ("grid", grid, "3D patch grid per side"),
        ("patch", patch, "3D patch side"), ("qformer-width", qformer_width, "Q-Former width"),
        ("qformer-layers", qformer_layers, "Q-Former layers"), ("qformer-heads", qformer_heads, "Q-Former heads"),
        ("num-query-tokens", num_query_tokens, "learned queries = image tokens"),
        ("lm-width", lm_width, "GPT-2 width"), ("lm-layers", lm_layers, "GPT-2 layers"),
        ("lm-heads", lm_heads, "GPT-2 heads"), ("prompt-length", prompt_length, "prompt text tokens"),
        ("answer-length", answer_length, "supervised answer tokens"),
    ]:
        parser.add_argument(f"--{name}", type=int, default=value, help=f"{help_text} (default {value})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    medblip = build_medblip(args).train()
    blip2, image_size = build_blip2(args)
    blip2.train()
    x = make_inputs(args, image_size)
    lm_inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "labels": x["labels"]}
    qformer_texts = {
        "qformer_input_ids": x["qformer_input_ids"], "qformer_attention_mask": torch.ones_like(x["qformer_input_ids"]),
        "qformer_answer_input_ids": x["qformer_answer_input_ids"],
        "qformer_answer_attention_mask": torch.ones_like(x["qformer_answer_input_ids"]),
    }
    trainable = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, model in (("medblip", medblip), ("blip2", blip2))
    }
    step, step_cpu = seconds_per_call(
        {
            "blip2": train_step(blip2, pixel_values=x["pixel_values_2d"], **lm_inputs),
            "medblip": train_step(medblip, pixel_values=x["pixel_values_3d"], **lm_inputs),
            "medblip_full": train_step(medblip, pixel_values=x["pixel_values_3d"], **lm_inputs, **qformer_texts),
            "medblip_keep": train_step(
                medblip, pixel_values=x["pixel_values_3d"], **lm_inputs, logits_to_keep=args.answer_length + 1
            ),
        },
        args.repeats,
        args.warmup,
    )
    medblip.eval()
    naive = separate_forwards(medblip, x)
    fused = lambda: medblip.score_candidates(  # noqa: E731
        x["prompt_ids"], x["candidate_input_ids"], pixel_values=x["pixel_values_3d"],
        candidate_attention_mask=x["candidate_attention_mask"],
    )
    max_diff = float((naive() - fused()).abs().max())
    score, score_cpu = seconds_per_call({"separate": naive, "score_candidates": fused}, args.repeats, args.warmup)

    batch = args.batch_size
    lm_length = x["input_ids"].shape[1]
    print(f"threads: {torch.get_num_threads()}  batch: {batch}  vision: {args.vision_width}x{args.vision_layers}, "
          f"{args.grid ** 3} tokens (3D {args.grid}^3 of {args.patch}^3 vs 2D {image_size}^2 px, patch "
          f"{image_size // round(args.grid ** 1.5)})  qformer: {args.qformer_width}x{args.qformer_layers}, "
          f"{args.num_query_tokens} queries  gpt2: {args.lm_width}x{args.lm_layers}, {lm_length} tokens  "
          f"trainable params: medblip {trainable['medblip'] / 1e6:.2f} M (incl. unused Q-Former text path), "
          f"blip2 {trainable['blip2'] / 1e6:.2f} M")
    ratio = step["medblip"] / step["blip2"]
    cpu_ratio = lambda name: step_cpu[name] / step_cpu["blip2"]  # noqa: E731
    print(f"blip2_fwd_bwd_lm_loss_ms: {1e3 * step['blip2']:.1f} (1.00x reference; cpu time "
          f"{1e3 * step_cpu['blip2']:.1f})")
    print(f"medblip_fwd_bwd_lm_loss_ms: {1e3 * step['medblip']:.1f} ({ratio:.2f}x blip2, {cpu_ratio('medblip'):.2f}x "
          f"in cpu time; target <= 1.10x)")
    print(f"medblip_fwd_bwd_lm_loss_logits_to_keep_ms: {1e3 * step['medblip_keep']:.1f} "
          f"({step['medblip_keep'] / step['blip2']:.2f}x blip2, {cpu_ratio('medblip_keep'):.2f}x in cpu time; logits "
          f"of the last {args.answer_length + 1} positions as train.py does)")
    full = step["medblip_full"]
    print(f"medblip_fwd_bwd_full_loss_ms: {1e3 * full:.1f} ({full / step['blip2']:.2f}x blip2, "
          f"{cpu_ratio('medblip_full'):.2f}x in cpu time; + 2 Q-Former text passes for the contrastive losses)")
    speedup = score["separate"] / score["score_candidates"]
    speedup_cpu = score_cpu["separate"] / score_cpu["score_candidates"]
    print(f"separate_forwards_3_candidates_ms: {1e3 * score['separate']:.1f} (1.00x reference; cpu time "
          f"{1e3 * score_cpu['separate']:.1f})")
    print(f"score_candidates_3_candidates_ms: {1e3 * score['score_candidates']:.1f} ({speedup:.2f}x faster, "
          f"{speedup_cpu:.2f}x in cpu time; target >= 2.00x; max |score difference| {max_diff:.1e})")
    return {"fwd_bwd_ratio": ratio, "score_speedup": speedup, "max_score_diff": max_diff, **step, **score}


if __name__ == "__main__":
    main()
