"""Benchmark paper-scale MedBLIP training on one GPU: volumes/s, model FLOPs utilisation and peak memory.

Run on a CUDA machine: `python benchmarks/bench_gpu.py [--lm t5|biomedlm] [--batch-sizes 1,2,4,8,16]`.
Anywhere: `python benchmarks/bench_gpu.py --dry-run` builds the model on the meta device and prints the parameter
counts and the analytic FLOPs per volume. Without CUDA (and no `--dry-run` / `--device cpu`) it exits with code 2.

The `paper` preset (EVA ViT-g 39 x 1408 at 224^3, patch 32: 343 + 1 tokens; BERT-base Q-Former, 32 queries;
FLAN-T5-XL, or BioMedLM 2.7B with `--lm biomedlm`), random weights; frozen ViT blocks and LM stored in bf16, the
trainable bridge in fp32, bf16 autocast, activation checkpointing through the frozen ViT, AdamW, all three loss
terms (`--lm-loss-only` drops the two Q-Former text passes). Each batch size: warm-up steps, then the median of timed
steps (forward + backward + optimizer step, synchronised); peak memory = `torch.cuda.max_memory_allocated`.

Model FLOPs (recomputation by checkpointing not counted; causal attention counted in full) are summed per matmul:
  each weight matrix W seeing T tokens: forward 2*|W|*T; backward 2*|W|*T for the input gradient when gradients
  flow into its input (frozen ViT and LM included) + 2*|W|*T for the weight gradient when W is trainable;
  each attention layer (Tq queries, Tk keys, width d): forward 4*Tq*Tk*d (QK^T and AV), backward 2x forward when
  gradients flow through it. The patch embedding's input needs no gradient; neither do the first T5 decoder
  self-attention and cross-attention query (their input is the frozen decoder token embedding).
  Checked against torch.utils.flop_counter on tiny configs (tests/test_benchmarks.py).
MFU = FLOPs per volume * volumes/s / peak FLOP/s (`--peak-tflops`, H200 dense bf16 = 989).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from configuration_medblip import MedBlipConfig  # noqa: E402
from modeling_medblip import MedBlipForConditionalGeneration  # noqa: E402


# -----------------------------------------------------------------------------------------------------------------
# defaults
lm = "t5"  # "t5" = preset `paper` (FLAN-T5-XL), "biomedlm" = preset `paper-biomedlm`
batch_sizes = "1,2,4,8,16"
warmup = 3  # untimed steps per batch size
steps = 10  # timed steps per batch size (median reported)
prompt_length = 64  # LM prompt text tokens besides the image tokens (health record + question)
answer_length = 8  # answer tokens + end token (T5 decoder length; appended to the row for decoder-only LMs)
qformer_text_length = 64  # Q-Former record text (image-text contrastive loss)
qformer_answer_length = 16  # Q-Former "question answer" text (image-answer contrastive loss)
peak_tflops = 989.0  # H200 SXM dense bf16 peak
checkpointing = "vision"  # "vision": ViT blocks only; "all": model.activation_checkpointing_enable(); "none"
time_budget_s = 420.0  # stop starting new batch sizes after this many seconds (whole run must fit 8 minutes)
memory_target_gb, memory_target_batch, mfu_target = 60.0, 8, 0.35


# ----------------------------------------------------------------------------------------------- analytic FLOPs
def token_counts(config, args) -> dict:
    """Tokens per volume seen by each part."""
    vision = config.vision_config
    query = config.num_query_tokens
    decoder_only = config.use_decoder_only_language_model
    text = 0 if args.lm_loss_only else args.qformer_text_length + args.qformer_answer_length
    return {
        "patches": vision.num_patches,
        "vision": vision.num_patches + 1,  # + CLS
        "query": query,
        "qformer_text": text,
        "qformer_texts": [] if args.lm_loss_only else [args.qformer_text_length, args.qformer_answer_length],
        "itc_passes": 0 if args.lm_loss_only else 2,
        "lm_encoder": query + args.prompt_length + (args.answer_length if decoder_only else 0),
        "lm_decoder": 0 if decoder_only else args.answer_length,
        "lm_head": args.answer_length + 1 if decoder_only else args.answer_length,  # logits_to_keep for GPT-2
    }


def linear_tokens(name: str, tokens: dict) -> tuple[str, int, bool]:
    """(group, tokens per volume, does gradient flow into its input) of the weight matrix `name`."""
    generic = re.sub(r"\.\d+\.", ".N.", name)
    if name == "vision_model.embeddings.patch_embedding":
        return "vision patch embedding", tokens["patches"], False
    if name.startswith("vision_model.encoder."):
        return "vision blocks", tokens["vision"], True
    if name.startswith("qformer."):
        if ".crossattention.attention.key" in generic or ".crossattention.attention.value" in generic:
            return "qformer cross-attn k/v (on vision tokens)", tokens["vision"], True
        if ".crossattention." in generic or "_query." in generic:
            return "qformer query path", tokens["query"], True
        if ".intermediate." in generic or (".output.dense" in generic and ".attention." not in generic):
            return "qformer text passes (itc)", tokens["qformer_text"], True
        return "qformer self-attn (queries + itc texts)", tokens["query"] + tokens["qformer_text"], True
    if name == "vision_projection":
        # the queries are projected once per step, shared by both contrastive terms
        return "projections", tokens["query"] * min(tokens["itc_passes"], 1), True
    if name == "text_projection":
        return "projections", tokens["itc_passes"], True  # the CLS token of each text pass
    if name == "language_projection":
        return "projections", tokens["query"], True
    if name == "language_model.lm_head":
        return "lm head", tokens["lm_head"], True
    if name.startswith("language_model.decoder."):
        if ".EncDecAttention.k" in generic or ".EncDecAttention.v" in generic:
            return "lm decoder cross-attn k/v (on encoder tokens)", tokens["lm_encoder"], True
        # first block: self-attention and cross-attention query see only the frozen decoder token embeddings
        first = name.startswith("language_model.decoder.block.0.layer.0.") or name.startswith(
            "language_model.decoder.block.0.layer.1.EncDecAttention.q"
        )
        return "lm decoder", tokens["lm_decoder"], not first
    if name.startswith("language_model."):
        return "lm encoder" if tokens["lm_decoder"] else "lm blocks", tokens["lm_encoder"], True
    raise ValueError(f"no token count for weight matrix {name}")


def attention_terms(config, tokens: dict) -> list[tuple[str, int, int, int, int, float]]:
    """(group, layers, Tq, Tk, width, train-step multiple of the forward FLOPs) of every attention layer."""
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    cross_layers = len(range(0, qformer.num_hidden_layers, qformer.cross_attention_frequency))
    terms = [
        ("vision attention", vision.num_hidden_layers, tokens["vision"], tokens["vision"], vision.hidden_size, 3),
        ("qformer self-attention", qformer.num_hidden_layers, tokens["query"], tokens["query"], qformer.hidden_size,
         3),
        ("qformer cross-attention", cross_layers, tokens["query"], tokens["vision"], qformer.hidden_size, 3),
    ]
    for length in tokens["qformer_texts"]:
        terms.append(("qformer text attention", qformer.num_hidden_layers, length, length, qformer.hidden_size, 3))
    if config.use_decoder_only_language_model:
        length = tokens["lm_encoder"]
        terms.append(("lm attention", text.num_hidden_layers, length, length, text.hidden_size, 3))
    else:
        inner = text.num_heads * text.d_kv
        enc, dec = tokens["lm_encoder"], tokens["lm_decoder"]
        terms += [
            ("lm encoder attention", text.num_layers, enc, enc, inner, 3),
            ("lm decoder self-attention", text.num_decoder_layers - 1, dec, dec, inner, 3),
            ("lm decoder self-attention", 1, dec, dec, inner, 1),  # first layer: no gradient reaches it
            ("lm decoder cross-attention", text.num_decoder_layers - 1, dec, enc, inner, 3),
            # first layer: its queries need no gradient, so QK^T backward gives dK only: (2 + 1 + 2) / 2
            ("lm decoder cross-attention", 1, dec, enc, inner, 2.5),
        ]
    return terms


def analytic_flops(model: nn.Module, config, args, batch_size: int = 1) -> tuple[float, dict]:
    """Model FLOPs of one training step per volume at `batch_size`; {group: [params, forward, total]} breakdown."""
    from transformers.pytorch_utils import Conv1D

    tokens = token_counts(config, args)
    groups: dict = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        group, count, input_grad = linear_tokens(name, tokens)
        weight = module.weight
        forward = 2 * weight.numel() * count
        total = forward * (1 + int(input_grad) + int(weight.requires_grad))
        row = groups.setdefault(group, [0, 0, 0])
        row[0] += weight.numel()
        row[1] += forward
        row[2] += total
    for group, layers, queries, keys, width, multiple in attention_terms(config, tokens):
        forward = 4 * layers * queries * keys * width
        row = groups.setdefault(group, [0, 0, 0])
        row[1] += forward
        row[2] += forward * multiple
    # contrastive similarity of each volume's queries with the batch's texts: 2*Q*B*D per pass, gradients to both
    forward = 2 * tokens["itc_passes"] * tokens["query"] * batch_size * config.image_text_hidden_size
    row = groups.setdefault("itc similarity", [0, 0, 0])
    row[1] += forward
    row[2] += 3 * forward
    return float(sum(row[2] for row in groups.values())), groups


# ----------------------------------------------------------------------------------------------- model and data
def build_model(config, device: str) -> MedBlipForConditionalGeneration:
    """Random weights on `device`; weight matrices of the frozen parts in bf16 (on meta: left as built)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MedBlipForConditionalGeneration(config)
    if device == "meta":
        return model
    from transformers.pytorch_utils import Conv1D

    frozen = [model.vision_model.encoder] if config.freeze_vision_encoder else []
    frozen += [model.language_model] if config.freeze_language_model else []
    for part in frozen:  # weight matrices only; norms stay fp32 (CPU autocast does not cast layer_norm inputs)
        for module in part.modules():
            if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
                module.to(torch.bfloat16)
    return model


def make_batch(config, args, batch: int, device: str) -> dict:
    """Synthetic inputs shaped as MedBlipProcessor builds them (random ids, random patches)."""
    vision, text = config.vision_config, config.text_config
    image = torch.full((batch, config.num_query_tokens), config.image_token_index)
    vocab = min(text.vocab_size, config.image_token_index) - 1
    answer = torch.randint(2, vocab, (batch, args.answer_length))
    prompt = torch.randint(2, vocab, (batch, args.prompt_length))
    inputs = {"pixel_values": torch.rand(batch, vision.num_patches, vision.patch_dim)}
    if config.use_decoder_only_language_model:
        inputs["input_ids"] = torch.cat([image, prompt, answer], dim=1)
        keep = inputs["input_ids"].shape[1] - args.answer_length
        inputs["labels"] = inputs["input_ids"].masked_fill(torch.arange(inputs["input_ids"].shape[1]) < keep, -100)
        inputs["logits_to_keep"] = args.answer_length + 1
    else:
        inputs["input_ids"] = torch.cat([image, prompt], dim=1)
        inputs["labels"] = answer
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if not args.lm_loss_only:
        answers = torch.randint(1000, 30000, (3, args.qformer_answer_length))[torch.arange(batch) % 3]
        inputs["qformer_input_ids"] = torch.randint(1000, 30000, (batch, args.qformer_text_length))
        inputs["qformer_answer_input_ids"] = answers
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def time_batch(model, optimizer, config, args, batch: int, device: str) -> tuple[float, float | None, float]:
    """(median seconds per training step, peak memory GB or None on CPU, last loss)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    inputs = make_batch(config, args, batch, device)
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return statistics.median(times), peak, float(loss)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", choices=("t5", "biomedlm"), default=lm, help=f"language model (default {lm})")
    parser.add_argument("--preset", default=None, help="any MedBLIP preset instead of --lm (e.g. tiny for smoke)")
    parser.add_argument("--batch-sizes", default=batch_sizes, help=f"comma-separated (default {batch_sizes})")
    parser.add_argument("--dry-run", action="store_true", help="meta device: parameter counts and FLOPs only")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only for smoke tests of this script")
    parser.add_argument("--checkpointing", choices=("vision", "all", "none"), default=checkpointing,
                        help=f"activation checkpointing scope (default {checkpointing})")
    parser.add_argument("--lm-loss-only", action="store_true", help="skip the two contrastive Q-Former text passes")
    parser.add_argument("--peak-tflops", type=float, default=peak_tflops, help=f"bf16 peak (default {peak_tflops})")
    parser.add_argument("--time-budget-s", type=float, default=time_budget_s,
                        help=f"start no batch size after this (default {time_budget_s})")
    for name, value in [("warmup", warmup), ("steps", steps), ("prompt-length", prompt_length),
                        ("answer-length", answer_length), ("qformer-text-length", qformer_text_length),
                        ("qformer-answer-length", qformer_answer_length)]:
        parser.add_argument(f"--{name}", type=int, default=value, help=f"default {value}")
    return parser.parse_args(argv)


def print_flops(model, config, args) -> float:
    flops, groups = analytic_flops(model, config, args)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = token_counts(config, args)
    print(f"parameters: {parameters / 1e9:.3f} B total, {trainable / 1e6:.1f} M trainable; tokens per volume: "
          f"vision {tokens['vision']}, queries {tokens['query']}, lm {tokens['lm_encoder']}"
          f"{'' if not tokens['lm_decoder'] else ' enc + ' + str(tokens['lm_decoder']) + ' dec'}, "
          f"qformer texts {tokens['qformer_texts']}")
    print("FLOPs per volume = sum over weight matrices W of 2*|W|*T*(1 fwd + 1 if input grad + 1 if W trainable)"
          " + sum over attention layers of 4*Tq*Tk*d*(3 if grad flows, 2.5 first T5 cross-attention,"
          " 1 if none) + 2 itc similarities 2*Q*B*D*3")
    for group, (count, forward, total) in groups.items():
        print(f"  {group:48s} params {count / 1e6:9.2f} M  fwd {forward / 1e9:9.2f} GFLOP  "
              f"train step {total / 1e9:9.2f} GFLOP")
    print(f"train_step_model_tflop_per_volume: {flops / 1e12:.3f} "
          f"(the crude 6 x all params x {tokens['vision']} vision tokens would give "
          f"{6 * parameters * tokens['vision'] / 1e12:.2f}; frozen parts cost 2x forward, not 3x, and the LM sees "
          f"fewer tokens)")
    return flops


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    preset = args.preset or {"t5": "paper", "biomedlm": "paper-biomedlm"}[args.lm]
    device = "meta" if args.dry_run else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (none found); use --dry-run for the FLOPs count on CPU", file=sys.stderr)
        return 2
    config = MedBlipConfig.from_preset(preset)
    model = build_model(config, device)
    print(f"preset: {preset}  device: {device}  checkpointing: {args.checkpointing}  "
          f"loss: {'lm' if args.lm_loss_only else 'lm + 2 itc'}")
    print_flops(model, config, args)
    if args.dry_run:
        return 0
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"gpu: {torch.cuda.get_device_name()}  peak: {args.peak_tflops:g} TFLOPS bf16 dense")
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    model.train()
    if args.checkpointing == "all":
        model.activation_checkpointing_enable()
    elif args.checkpointing == "vision":
        model.vision_model.activation_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.startswith("cuda") or None)
    start = time.perf_counter()
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if time.perf_counter() - start > args.time_budget_s:
            print(f"{preset}_bs{batch}: skipped (time budget {args.time_budget_s:g} s spent)")
            continue
        try:
            seconds, peak, loss = time_batch(model, optimizer, config, args, batch, device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(f"{preset}_bs{batch}_volumes_per_s: OOM")
            continue
        flops = analytic_flops(model, config, args, batch)[0]
        mfu = flops * batch / seconds / (args.peak_tflops * 1e12)
        print(f"{preset}_bs{batch}_volumes_per_s: {batch / seconds:.2f} (MFU {100 * mfu:.1f}% of "
              f"{args.peak_tflops:g} TFLOPS; target >= {100 * mfu_target:.0f}%; step {1e3 * seconds:.0f} ms, "
              f"loss {loss:.2f})")
        if peak is not None:
            target = f"; target < {memory_target_gb:g} GB at batch {memory_target_batch}"
            print(f"{preset}_bs{batch}_peak_memory_gb: {peak:.1f} ({peak / memory_target_gb:.2f}x "
                  f"{memory_target_gb:g} GB{target if batch == memory_target_batch else ''})")
    print(f"total time: {time.perf_counter() - start:.0f} s after model build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
