"""Sharding: `_no_split_modules` from the parts built, the Accelerate FSDP2 config, and FSDP2 under 2 processes on
CPU (gloo): training, checkpoints, export and evaluation equal to a single process (`-m distributed`)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file, save_file
from test_modeling import T5_IMAGE_TOKEN, TINY_T5, make_batch

from configuration_medblip import PRESETS, MedBlipConfig
from modeling_medblip import MedBlipForConditionalGeneration


FSDP_CONFIG = REPO_ROOT / "configs" / "accelerate_fsdp.yaml"
MEDBLIP_BLOCKS = {"MedBlipVisionEmbeddings", "Blip2EncoderLayer", "Blip2TextEmbeddings", "Blip2QFormerLayer"}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0,
              "eos_token_id": 2, "bos_token_id": 1}
LANGUAGE_MODELS = {
    "gpt2": ({}, "GPT2Block"),
    "t5": ({"text_config": TINY_T5, "image_token_index": T5_IMAGE_TOKEN}, "T5Block"),
    "llama": ({"text_config": TINY_LLAMA, "image_token_index": 511}, "LlamaDecoderLayer"),
}


def free_port() -> int:
    """A free local port: other test runs on this machine may hold torchrun's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fsdp_environment() -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate_fsdp.yaml` gives each process, computed
    by Accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_CONFIG), "--num_processes", "2", "x.py"])
    args = _validate_launch_command(args)[0]
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize("lm", sorted(LANGUAGE_MODELS))
def test_fsdp_no_split_modules_name_the_blocks_built(lm):
    """MedBLIP's own blocks plus the language model's, and no class the model lacks (transformers' merge brings in
    BLIP-2's Blip2VisionEmbeddings, T5Block and OPTDecoderLayer, and nested attention modules)."""
    overrides, block = LANGUAGE_MODELS[lm]
    model = MedBlipForConditionalGeneration(MedBlipConfig.from_preset("tiny", **overrides))
    assert set(model._no_split_modules) == MEDBLIP_BLOCKS | {block}
    built = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= built
    assert set(model.vision_model._no_split_modules) == {"MedBlipVisionEmbeddings", "Blip2EncoderLayer"}


def test_fsdp_keep_in_fp32_modules_follow_the_language_model(tmp_path):
    """The fp32 lists are merged from the parts built: the Q-Former and queries always (strict: fp16 and bf16), plus
    T5's `wo` for a T5 LM (fp16 only: its feed-forward output overflows in fp16); a load in either dtype keeps exactly
    those in float32."""
    gpt2 = MedBlipForConditionalGeneration(MedBlipConfig.from_preset("tiny"))
    assert (gpt2._keep_in_fp32_modules, gpt2._keep_in_fp32_modules_strict) == (set(), {"query_tokens", "qformer"})
    model = MedBlipForConditionalGeneration(MedBlipConfig.from_preset("tiny", **LANGUAGE_MODELS["t5"][0]))
    assert (model._keep_in_fp32_modules, model._keep_in_fp32_modules_strict) == ({"wo"}, {"query_tokens", "qformer"})
    model.save_pretrained(tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        loaded = MedBlipForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
        dtypes = {name: parameter.dtype for name, parameter in loaded.named_parameters()}
        wo = torch.float32 if dtype == torch.float16 else dtype
        assert dtypes["language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight"] == wo
        assert dtypes["language_model.encoder.block.0.layer.1.DenseReluDense.wi.weight"] == dtype
        assert dtypes["qformer.encoder.layer.0.attention.attention.query.weight"] == torch.float32
        assert dtypes["query_tokens"] == torch.float32
        assert dtypes["vision_model.encoder.layers.0.mlp.fc1.weight"] == dtype


@pytest.mark.parametrize("preset, language_model_block, layers", [("paper", "T5Block", 24 + 24),
                                                                  ("paper-biomedlm", "GPT2Block", 32)])
def test_fsdp_config_file_gives_an_fsdp2_plugin_wrapping_every_block(monkeypatch, preset, language_model_block, layers):
    """configs/accelerate_fsdp.yaml, turned into the launcher's environment by Accelerate's own code, gives an FSDP2
    plugin whose transformer-based auto-wrap (from `_no_split_modules`) wraps each ViT, Q-Former and LM block of the
    paper preset (built on the meta device) and nothing else."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    environment = fsdp_environment()
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None  # the model's `_no_split_modules` decides
    assert plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading is True
    with torch.device("meta"):
        model = MedBlipForConditionalGeneration(MedBlipConfig.from_preset(preset))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(module).__name__ for module in model.modules() if policy(module)]
    assert {name: wrapped.count(name) for name in set(wrapped)} == {
        "MedBlipVisionEmbeddings": 1, "Blip2EncoderLayer": 39, "Blip2TextEmbeddings": 1, "Blip2QFormerLayer": 12,
        language_model_block: layers,
    }


# ----------------------------------------------------------------------------------------------- two processes
def _tiny_without_dropout(lm: str) -> MedBlipConfig:
    """The tiny preset with every dropout off: the single-process reference and the workers run in training mode."""
    overrides = dict(LANGUAGE_MODELS[lm][0])
    if lm == "gpt2":
        overrides["text_config"] = {**PRESETS["tiny"]["text_config"], "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                    "attn_pdrop": 0.0}
    else:
        overrides["text_config"] = {**overrides["text_config"], "dropout_rate": 0.0}
    qformer = {**PRESETS["tiny"]["qformer_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return MedBlipConfig.from_preset("tiny", qformer_config=qformer, **overrides)


def tiny_processor(minilm_path: str):
    """The processor of the tiny preset: 32^3 volumes in 8^3 patches, GPT-2 BPE, MiniLM for the Q-Former."""
    from transformers import AutoTokenizer

    from convert_medblip import build_gpt2_tokenizer
    from image_processing_medblip import MedBlipImageProcessor
    from processing_medblip import MedBlipProcessor

    return MedBlipProcessor(MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(8, 8, 8)),
                            build_gpt2_tokenizer(), AutoTokenizer.from_pretrained(minilm_path), num_query_tokens=4)


def _reference_training(folder: Path, batch: dict) -> tuple[list[float], dict, dict]:
    """Three steps of one process on the whole batch, as train.py takes them: losses, the first step's clipped
    gradients and the trainable weights after step 3."""
    import train

    model = MedBlipForConditionalGeneration.from_pretrained(folder).train()
    optimizer = train.build_optimizer(train.optimizer_groups(model, 1e-4, 1e-3, 1e-3))
    losses, first_gradients = [], None
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if first_gradients is None:
            first_gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_gradients, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.distributed
@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_fsdp_two_processes_train_checkpoint_export_and_evaluate_like_one(lm, tmp_path, minilm_path):
    """torchrun, 2 CPU processes, Accelerate's FSDP2 settings of configs/accelerate_fsdp.yaml:
    - every parameter, frozen ViT and LM included, is a DTensor split between the processes; the optimizer holds
      exactly the trainable ones;
    - score_candidates, generate, get_query_cross_attentions and a distributed predict (5 volumes in 3 batches: no
      process scores them all) give the single-process results;
    - losses and gradients of 3 training steps equal one process on the whole batch;
    - the checkpoint holds the full trainable weights (gathered from the shards, written by one process) and
      resumes to the same next step, bit for bit;
    - the exported folder holds full safetensors weights that AutoModel (remote code) loads."""
    import fsdp_worker
    from transformers import AutoModel

    from medblip_eval import predict

    config = _tiny_without_dropout(lm)
    torch.manual_seed(0)
    model = MedBlipForConditionalGeneration(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    batch = make_batch(config, batch_size=4)
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    eos = config.text_config.eos_token_id
    candidates = torch.tensor([[20, 21, eos], [22, 21, eos]])
    save_file({"ids": candidates}, tmp_path / "candidates.safetensors")
    if lm == "gpt2":
        processor = tiny_processor(minilm_path)
        processor.save_pretrained(tmp_path / "processor")

    env = {**os.environ, **fsdp_environment(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(Path(fsdp_worker.__file__)), str(folder), str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"report_{rank}.json").read_text()) for rank in range(2)]

    # sharding and the optimizer
    parameters = dict(model.named_parameters())
    trainable = sorted(n for n, p in parameters.items() if p.requires_grad)
    for report in reports:
        assert report["fsdp2"] and report["dtensors"] == sorted(parameters)
        assert report["optimizer"] == trainable and report["optimizer_size"] == len(trainable)
    for name, parameter in parameters.items():
        local = [report["local_numel"][name] for report in reports]
        assert sum(local) == parameter.numel(), name
        if parameter.shape[0] >= 2:  # dim 0 is split
            assert max(local) < parameter.numel(), name
    assert any(n.startswith("vision_model.encoder.") for n in parameters if n not in trainable)
    assert any(n.startswith("language_model.") for n in parameters if n not in trainable)

    # evaluation under FSDP
    model.eval()
    prompt_ids, prompt_mask = fsdp_worker.prompt_of(batch, config.use_decoder_only_language_model)
    with torch.no_grad():
        scores = model.score_candidates(prompt_ids, candidates, pixel_values=batch["pixel_values"],
                                        attention_mask=prompt_mask)
        tokens = model.generate(pixel_values=batch["pixel_values"], input_ids=prompt_ids, attention_mask=prompt_mask,
                                max_new_tokens=4, do_sample=False, num_beams=1)
        attention = model.get_query_cross_attentions(batch["pixel_values"])
    evaluation = reports[0]["eval"]
    torch.testing.assert_close(torch.tensor(sum(evaluation["scores"], [])), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(sum(evaluation["attention"], [])), attention, atol=1e-6, rtol=1e-5)
    assert sum(evaluation["tokens"], []) == tokens.tolist()
    if lm == "gpt2":
        expected = predict(model, processor, fsdp_worker.predict_rows(), fsdp_worker.RECORD_FIELDS, "image_text",
                           2, 3, "cpu")
        for report in reports:  # every process receives all 5 predictions
            torch.testing.assert_close(torch.tensor(report["eval"]["probabilities"]),
                                       torch.from_numpy(expected["probabilities"]), atol=1e-6, rtol=1e-5)
            assert report["eval"]["generated"] == expected["generated"]
        # rows scored: process 0 batches 0 and 2 (2 + 1 rows), process 1 batch 1 and batch 0 again to keep in step
        assert evaluation["scored_rows"] == [[2, 1], [2, 2]]

    # training, checkpoint and resume
    losses, gradients, weights = _reference_training(folder, batch)
    distributed_gradients = load_file(tmp_path / "gradients_step_1.safetensors")
    assert sorted(distributed_gradients) == sorted(gradients) == trainable
    for name, gradient in gradients.items():
        torch.testing.assert_close(distributed_gradients[name], gradient, atol=1e-6, rtol=1e-4, msg=name)
    assert reports[0]["losses"] == pytest.approx(losses, abs=1e-5)
    after_step_3 = load_file(tmp_path / "weights_step_3.safetensors")
    for name, weight in weights.items():
        torch.testing.assert_close(after_step_3[name], weight, atol=1e-5, rtol=1e-4, msg=name)
    checkpoint = Path(reports[0]["checkpoint"])
    saved = load_file(checkpoint / "model.safetensors")
    after_step_2 = load_file(tmp_path / "weights_step_2.safetensors")
    assert sorted(saved) == trainable and all(torch.equal(saved[n], after_step_2[n]) for n in trainable)
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.safetensors")) == ["rng_state_0.safetensors",
                                                                                  "rng_state_1.safetensors"]
    assert reports[0]["resumed_step"] == 2 and reports[0]["resumed_loss"] == reports[0]["losses"][2]
    resumed = load_file(tmp_path / "weights_step_3_resumed.safetensors")
    assert all(torch.equal(resumed[name], after_step_3[name]) for name in after_step_3)

    # the exported folder: full weights, loaded through remote code
    exported = AutoModel.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert type(exported).__name__ == "MedBlipForConditionalGeneration"
    exported_parameters = dict(exported.named_parameters())
    assert sorted(exported_parameters) == sorted(parameters)
    for name, parameter in parameters.items():
        expected_weight = resumed[name] if name in resumed else parameter.detach()  # frozen ones never move
        assert torch.equal(exported_parameters[name], expected_weight), name
    assert {n for n, p in exported_parameters.items() if p.requires_grad} == set(trainable)


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.distributed
def test_fsdp_train_py_and_distributed_evaluation_equal_one_process(tmp_path):
    """`accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2 train.py` on CPU trains the
    tiny preset with FSDP2, writes a checkpoint and a full Hub folder, and evaluates with the volumes split between
    the processes; `--eval_only` of that folder with 1 and with 2 processes (torchrun) gives the same
    numbers and the same per-volume predictions, bit for bit (3 batches of 2 volumes over 2 processes)."""
    import pandas as pd
    from test_train import tiny_args

    from synthetic_cohort import generate_cohort

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, n_per_class=6, size=32, seed=0, num_workers=1)
    manifest = pd.read_csv(cohort / "manifest.csv")
    held_out = manifest[manifest["dataset"].isin(["site_D", "site_E"])]  # the zeroshot split, in its order
    held_out.to_csv(cohort / "zeroshot.csv", index=False)
    output = tmp_path / "fsdp"
    common = ["--eval_batch_size", "2", "--max_new_tokens", "4", "--log_predictions", "true", "--num_proc", "1",
              "--report_to", "none", "--cache_dir", str(tmp_path / "cache")]
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes",
          "2", "--main_process_port", str(free_port()), str(REPO_ROOT / "train.py"),
          *tiny_args(cohort, tmp_path, output), "--max_steps", "2", "--save_every", "2", "--eval_every", "2",
          "--batch_size", "2", "--eval_splits", "zeroshot", *common], REPO_ROOT)
    checkpoint = output / "checkpoints" / "checkpoint-0000002"
    assert {"model.safetensors", "optimizer.safetensors", "checkpoint.json"} <= {p.name for p in checkpoint.iterdir()}
    assert (output / "model.safetensors").exists() and (output / "modeling_medblip.py").exists()

    evaluate = ["train.py", "--eval_only", "--model_name_or_path", str(output), "--eval_manifest",
                str(cohort / "zeroshot.csv"), *common]
    _run([sys.executable, *evaluate, "--output_dir", str(tmp_path / "one")], REPO_ROOT)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
          *evaluate, "--output_dir", str(tmp_path / "two")], REPO_ROOT)
    trained, one, two = [json.loads(path.read_text()) for path in (
        output / "eval_results.json", tmp_path / "one" / "eval_results.json", tmp_path / "two" / "eval_results.json")]
    assert one == two  # 1 and 2 processes: identical, to the last bit
    assert trained["likelihood"]["image_text"]["all"]["n"] == len(held_out) == 6
    # --eval_only reads the rows sorted, the training run in split order: sums (the NLL) differ in the last bits
    metrics = [{key: value for key, value in _leaves(results).items() if key.startswith(("likelihood/", "generate/"))}
               for results in (trained, one)]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-12)
    trained_rows, one_rows, two_rows = [[json.loads(line) for line in path.read_text().splitlines()] for path in (
        output / "predictions_zeroshot.jsonl", tmp_path / "one" / "predictions.jsonl",
        tmp_path / "two" / "predictions.jsonl")]
    assert len(trained_rows) == 3 * 6 and one_rows == two_rows
    by_volume = {(row["subject_id"], row["mode"]): row for row in one_rows}
    assert {(row["subject_id"], row["mode"]): row for row in trained_rows} == by_volume  # probabilities bit for bit


def _leaves(tree, prefix: str = "") -> dict:
    """`{"a/b/c": value}` for the non-dict values of a nested dict (lists kept whole)."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}/"))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves
