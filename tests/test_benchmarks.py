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
