"""Smoke tests of the benchmark scripts: tiny sizes, printed line format, analytic FLOPs vs torch's counter."""

import re
import sys

import pytest
import torch
from conftest import REPO_ROOT
from torch.utils.flop_counter import FlopCounterMode


sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_gpu  # noqa: E402
import bench_model  # noqa: E402
import memory_plan  # noqa: E402

from configuration_medblip import MedBlipConfig  # noqa: E402


LINE = re.compile(r"^[a-z0-9_]+: [0-9.]+(e[+-]\d+)? \(.+\)$")
TINY_T5 = {
    "model_type": "t5", "vocab_size": 512, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
    "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
}


def metric_lines(text: str) -> dict:
    lines = [line for line in text.splitlines() if LINE.match(line)]
    return {line.split(":")[0]: float(line.split()[1]) for line in lines}


@pytest.mark.parametrize("lm, lm_loss_only", [("gpt2", True), ("t5", False)])
def test_analytic_flops_equal_torch_flop_counter(lm, lm_loss_only):
    """The printed formula counts exactly the matmul FLOPs that forward + backward execute (eager attention)."""
    overrides = {"attn_implementation": "eager"}
    if lm == "t5":
        overrides.update(text_config=TINY_T5, image_token_index=511)
    config = MedBlipConfig.from_preset("tiny", **overrides)
    argv = ["--preset", "tiny", "--prompt-length", "5", "--answer-length", "3", "--qformer-text-length", "7",
            "--qformer-answer-length", "4"] + ["--lm-loss-only"] * lm_loss_only
    args = bench_gpu.parse_args(argv)
    model = bench_gpu.build_model(config, "cpu").float().train()
    model.config.vision_config.hidden_dropout_prob = 0.0
    expected, _ = bench_gpu.analytic_flops(model, config, args, batch_size=2)
    batch = bench_gpu.make_batch(config, args, 2, "cpu")
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert counter.get_total_flops() == 2 * expected


def test_bench_gpu_dry_run_counts_paper_preset(capsys):
    assert bench_gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 4.003 B total" in out
    flops = metric_lines(out)["train_step_model_tflop_per_volume"]
    assert 1.5 < flops < 3.0  # ~2 forward passes of a 4 B model over ~100-350 tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_gpu_refuses_without_cuda(capsys):
    assert bench_gpu.main(["--batch-sizes", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_gpu_cpu_smoke(capsys):
    """The training loop (bf16 autocast, checkpointing, AdamW) runs; on CPU only to exercise the code."""
    argv = ["--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "--warmup", "0", "--steps", "1",
            "--checkpointing", "all", "--lm-loss-only"]
    assert bench_gpu.main(argv) == 0
    assert "tiny_bs1_volumes_per_s" in metric_lines(capsys.readouterr().out)


def test_bench_model_prints_ratio_lines(capsys):
    argv = ["--batch-size", "2", "--repeats", "1", "--warmup", "0", "--vision-width", "32", "--vision-layers", "1",
            "--vision-heads", "2", "--grid", "4", "--patch", "4", "--qformer-width", "32", "--qformer-layers", "2",
            "--qformer-heads", "2", "--num-query-tokens", "4", "--lm-width", "32", "--lm-layers", "1",
            "--lm-heads", "2", "--prompt-length", "4", "--answer-length", "3"]
    result = bench_model.main(argv)
    lines = metric_lines(capsys.readouterr().out)
    for name in ("blip2_fwd_bwd_lm_loss_ms", "medblip_fwd_bwd_lm_loss_ms", "medblip_fwd_bwd_full_loss_ms",
                 "separate_forwards_3_candidates_ms", "score_candidates_3_candidates_ms"):
        assert name in lines
    assert result["max_score_diff"] < 1e-3  # both scorers compute the same log-likelihoods


# ----------------------------------------------------------------------------------------------- memory plan
def _linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _vision_counts(vision) -> tuple[int, int]:
    """(patch/position embeddings + post-LayerNorm, the ViT blocks) from the figures alone."""
    h, i = vision.hidden_size, vision.intermediate_size
    embeddings = _linear(vision.patch_dim, h) + h + (vision.num_patches + 1) * h
    # Blip2Attention stores one (3h,) qkv bias: EVA's q and v biases around a zero k bias
    block = _linear(h, 3 * h) + _linear(h, h) + _linear(h, i) + _linear(i, h) + 2 * 2 * h
    return embeddings + 2 * h, vision.num_hidden_layers * block


def _bridge_count(config) -> int:
    """Queries, Q-Former (query and text FFNs, cross-attention every `cross_attention_frequency` layers), its text
    embeddings, the three projections and the temperature."""
    q = config.qformer_config
    h, i, e = q.hidden_size, q.intermediate_size, q.encoder_hidden_size
    self_attention = 4 * _linear(h, h) + 2 * h
    cross_attention = 2 * _linear(h, h) + 2 * _linear(e, h) + 2 * h
    ffn = _linear(h, i) + _linear(i, h) + 2 * h
    layers = sum(self_attention + 2 * ffn + (cross_attention if n % q.cross_attention_frequency == 0 else 0)
                 for n in range(q.num_hidden_layers))
    text_embeddings = (q.vocab_size + q.max_position_embeddings) * h
    projections = 2 * _linear(h, config.image_text_hidden_size) + _linear(h, config.text_config.hidden_size)
    return config.num_query_tokens * h + 2 * h + layers + text_embeddings + projections + 1


def _language_model_count(text) -> int:
    if text.model_type == "gpt2":  # lm_head tied to wte
        d = text.n_embd
        block = 2 * 2 * d + _linear(d, 3 * d) + _linear(d, d) + _linear(d, 4 * d) + _linear(4 * d, d)
        return (text.vocab_size + text.n_positions) * d + text.n_layer * block + 2 * d
    if text.model_type == "opt":  # lm_head tied; learned positions carry an offset of 2
        d, f = text.hidden_size, text.ffn_dim
        block = 4 * _linear(d, d) + 2 * d + _linear(d, f) + _linear(f, d) + 2 * d
        return (text.vocab_size + text.max_position_embeddings + 2) * d + text.num_hidden_layers * block + 2 * d
    d, inner, f, buckets = text.d_model, text.num_heads * text.d_kv, text.d_ff, text.relative_attention_num_buckets
    attention = 4 * d * inner + d  # q, k, v, o without bias + T5's scale-only layer norm
    ffn = 3 * d * f + d  # gated: wi_0, wi_1, wo
    encoder = text.num_layers * (attention + ffn) + buckets * text.num_heads + d
    decoder = text.num_decoder_layers * (2 * attention + ffn) + buckets * text.num_heads + d
    return text.vocab_size * d * (1 if text.tie_word_embeddings else 2) + encoder + decoder


@pytest.mark.parametrize("name", ["tiny", "small", "paper", "paper-biomedlm", "blip2:Salesforce/blip2-opt-2.7b",
                                  "blip2:Salesforce/blip2-flan-t5-xl"])
def test_memory_plan_matches_an_independent_count(name):
    """Parameter counts from the public figures by formula (not from modules) give the plan's counts and bytes."""
    config = memory_plan.config_of(name)
    embeddings, blocks = _vision_counts(config.vision_config)
    language_model = _language_model_count(config.text_config)
    parameters = embeddings + blocks + _bridge_count(config) + language_model
    frozen = blocks * config.freeze_vision_encoder + language_model * config.freeze_language_model
    plan = memory_plan.memory_plan(memory_plan.meta_model(name), num_gpus=4)
    assert (plan["parameters"], plan["trainable"]) == (parameters, parameters - frozen)
    trainable = parameters - frozen
    assert plan["total_fp32"] == 4 * parameters + 4 * trainable + 8 * trainable
    assert plan["total_bf16"] == 2 * parameters + 2 * trainable + 4 * trainable
    assert plan["fsdp_per_gpu_fp32"] == plan["total_fp32"] / 4


def test_memory_plan_prints_the_table(capsys):
    plans = memory_plan.main(["--presets", "paper", "--gpus", "8"])
    out = capsys.readouterr().out
    assert "| `paper` | 4.003 B | 234.3 M | 16.01 / 8.01 | 0.94 / 0.47 | 1.87 / 0.94 | 18.82 / 9.41 | 2.35 |" in out
    assert metric_lines(out)["paper_train_fp32_gb"] == round(plans["paper"]["total_fp32"] / 1e9, 2)
