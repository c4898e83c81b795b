"""train.py end to end on the tiny preset and a tiny synthetic cohort: outputs, metrics, resume, DDP, reloading."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from safetensors import safe_open
from sklearn import metrics as skm

import train
from configuration_medblip import MedBlipConfig
from medblip_data.collate import make_collate
from medblip_data.manifest import read_manifest
from medblip_train.checkpoints import BEST_WEIGHTS_FILE, STATE_FILE, CheckpointError


LABELS = ["CN", "MCI", "AD"]


def tiny_args(cohort: Path, work: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--manifests", str(cohort / "manifest.csv"), "--cache_dir", str(work / "cache"),
        "--output_dir", str(output), "--target_spacing", "6", "6", "6", "--batch_size", "4", "--max_steps", "6",
        "--log_every", "1", "--eval_every", "3", "--save_every", "3", "--keep_last", "2", "--report_to", "none",
        "--num_proc", "1", "--eval_batch_size", "8", "--max_new_tokens", "4", "--learning_rate", "1e-3",
        "--preprocessing", "none", "--num_threads", "1", *extra,
    ]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from synthetic_cohort import generate_cohort

    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, n_per_class=6, size=32, seed=0, num_workers=1)
    return folder


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("run")
    output = work / "out"
    results = train.main(tiny_args(cohort, work, output, "--log_predictions", "true"))
    return output, results


def test_training_run_writes_hub_folder_plots_and_card(trained, cohort):
    output, results = trained
    for name in ("config.json", "model.safetensors", "modeling_medblip.py", "configuration_medblip.py",
                 "processing_medblip.py", "processor_config.json", "eval_results.json", "learning_curves.png",
                 "confusion_zeroshot.png", "README.md", "training_config.json"):
        assert (output / name).exists(), name
    card = (output / "README.md").read_text()
    assert "Not for clinical use" in card and "library_name: transformers" in card
    assert "| image_only | likelihood |" in card and "text_floor" in card
    manifest = cohort / "manifest.csv"  # the data source: format, resolved path and counts (issue 14)
    assert f"`manifest {manifest.resolve()}: scans 18, subjects 18`" in card
    image_text = results["zeroshot"]["likelihood"]["image_text"]["all"]["balanced_accuracy"]
    verdict = "met" if image_text >= 0.75 else "missed"
    assert f"held-out image + text {image_text:.3f} (target >= 0.75: {verdict})" in card
    text_only = results["zeroshot"]["likelihood"]["text_only"]["all"]["balanced_accuracy"]
    verdict = "met" if image_text - text_only >= 0.03 else "missed"
    assert f"held-out image + text minus text only {image_text - text_only:+.3f} (target >= +0.03: {verdict})" in card
    assert "### test split" in card
    assert set(results) == {"zeroshot", "test"}
    best_step = json.loads((output / "training_config.json").read_text())["best_step"]
    assert (f"6 optimizer steps of 4 volumes per process, seed 0; these are the weights of step {best_step}, the "
            "best validation `nll` of the validations every 3 steps.") in card


def test_eval_results_schema(trained):
    output, _ = trained
    results = json.loads((output / "eval_results.json").read_text())
    assert set(results) == {"likelihood", "generate", "data_sources"}
    assert [source["format"] for source in results.pop("data_sources")] == ["manifest"]
    for decoder in results:
        assert set(results[decoder]) == {"image_text", "image_only", "text_only"}
        for mode, groups in results[decoder].items():
            assert "all" in groups and {"site_D", "site_E"} <= set(groups)
            entry = groups["all"]
            for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece", "nll", "n", "confusion_matrix"):
                assert key in entry
            assert np.array(entry["confusion_matrix"]).shape == (3, 3)
            assert entry["n"] == groups["site_D"]["n"] + groups["site_E"]["n"]
    assert results["likelihood"]["image_text"]["all"]["ece"] is not None


def test_eval_numbers_match_sklearn_on_the_same_predictions(trained):
    output, _ = trained
    results = json.loads((output / "eval_results.json").read_text())
    rows = [json.loads(line) for line in (output / "predictions_zeroshot.jsonl").read_text().splitlines()]
    for mode in ("image_text", "image_only", "text_only"):
        selected = [row for row in rows if row["mode"] == mode]
        truth = [LABELS.index(row["truth"]) for row in selected]
        predicted = [LABELS.index(row["likelihood"]) for row in selected]
        probabilities = np.array([row["probabilities"] for row in selected])
        entry = results["likelihood"][mode]["all"]
        assert entry["accuracy"] == pytest.approx(skm.accuracy_score(truth, predicted), abs=1e-9)
        assert entry["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(truth, predicted), abs=1e-9)
        assert entry["macro_f1"] == pytest.approx(
            skm.f1_score(truth, predicted, labels=[0, 1, 2], average="macro", zero_division=0), abs=1e-9
        )
        auroc = skm.roc_auc_score(truth, probabilities, multi_class="ovr", labels=[0, 1, 2])
        assert entry["auroc"] == pytest.approx(auroc, abs=1e-9)
        assert entry["nll"] == pytest.approx(skm.log_loss(truth, probabilities, labels=[0, 1, 2]), abs=1e-6)
        assert entry["confusion_matrix"] == skm.confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()


def test_intermediate_checkpoints_hold_trainable_weights_only(trained):
    output, _ = trained
    checkpoints = sorted((output / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-0000003", "checkpoint-0000006"]
    assert not list((output / "checkpoints").glob(".tmp-*"))
    with safe_open(str(checkpoints[-1] / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert "vision_model.embeddings.patch_embedding.weight" in keys and "query_tokens" in keys
    assert not any(k.startswith(("language_model.", "vision_model.encoder.")) for k in keys)  # frozen in `tiny`


def test_resume_reproduces_the_uninterrupted_loss_sequence(trained, cohort, tmp_path):
    output, _ = trained
    uninterrupted = json.loads((output / "training_config.json").read_text())
    history = {h["step"]: h["loss"] for h in train_history(output)}
    resumed_output = tmp_path / "resumed"
    train.main(tiny_args(cohort, tmp_path, resumed_output, "--resume_from_checkpoint",
                         str(output / "checkpoints" / "checkpoint-0000003"), "--eval_splits", "zeroshot",
                         "--keep_last", "3", "--max_new_tokens", "3"))  # settings that may change on resume
    resumed = {h["step"]: h["loss"] for h in train_history(resumed_output)}
    assert uninterrupted["train"]["max_steps"] == 6
    assert [resumed[s] for s in (4, 5, 6)] == [history[s] for s in (4, 5, 6)]  # exact, on CPU
    # the best validation step may lie before the interruption: its weights travel in the checkpoint
    with safe_open(str(output / "checkpoints" / "checkpoint-0000003" / BEST_WEIGHTS_FILE), "pt") as best:
        assert "query_tokens" in best.keys() and not any(k.startswith("language_model.") for k in best.keys())
    resumed_config = json.loads((resumed_output / "training_config.json").read_text())
    assert resumed_config["best_step"] == uninterrupted["best_step"]
    with (safe_open(str(output / "model.safetensors"), "pt") as a,
          safe_open(str(resumed_output / "model.safetensors"), "pt") as b):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def train_history(output: Path) -> list[dict]:
    """The logged training steps, read back from the JSON train state of the last checkpoint."""
    checkpoint = sorted((output / "checkpoints").glob("checkpoint-*"))[-1]
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return [h for h in state["history"] if "loss" in h]


def test_fresh_run_in_a_used_output_dir_exits_non_zero_and_names_it(trained, cohort, tmp_path):
    output, _ = trained
    before = sorted(p.name for p in (output / "checkpoints").iterdir())
    command = [sys.executable, str(REPO_ROOT / "train.py"), *tiny_args(cohort, tmp_path, output)]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert (f"FileExistsError: output folder {output} already holds checkpoints of an earlier run "
            "(checkpoint-0000003, checkpoint-0000006): continue it with --resume_from_checkpoint latest, choose "
            "another --output_dir, or pass --overwrite_output_dir to delete them and start again") in result.stderr
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == before


def test_resume_refuses_a_changed_seed_learning_rate_or_record_fields(trained, cohort, tmp_path):
    """--seed rebuilds other frozen weights, a new learning rate would be logged but not used (the restored
    optimizer keeps its rates), other record fields change the data: all refused, listed; safe changes are not."""
    output, _ = trained
    shutil.copytree(output / "checkpoints", tmp_path / "out" / "checkpoints")
    argv = tiny_args(cohort, output.parent, tmp_path / "out", "--seed", "1", "--learning_rate", "5e-4",
                     "--record_fields", "age", "sex", "--max_steps", "8", "--log_every", "2",
                     "--resume_from_checkpoint", "latest")
    with pytest.raises(CheckpointError) as refused:
        train.main(argv)
    message = str(refused.value)
    assert message.startswith(f"checkpoint {tmp_path / 'out' / 'checkpoints' / 'checkpoint-0000006'} was written "
                              "by a different run; these settings change the model or the data")
    differences = [line.strip() for line in message.splitlines()[1:-1]]
    assert [line.split(":")[0] for line in differences] == [
        "frozen_weights_sha256", "model.record_fields", "processor.record_fields", "train.learning_rate", "train.seed"]
    assert differences[1:] == [
        "model.record_fields: ['age', 'sex', 'education', 'mmse', 'apoe4'] in the checkpoint, ['age', 'sex'] now",
        "processor.record_fields: ['age', 'sex', 'education', 'mmse', 'apoe4'] in the checkpoint, ['age', 'sex'] now",
        "train.learning_rate: 0.001 in the checkpoint, 0.0005 now", "train.seed: 0 in the checkpoint, 1 now"]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
        "checkpoint-0000003", "checkpoint-0000006"]


def test_saved_folder_loads_in_a_fresh_process(trained, tmp_path):
    output, _ = trained
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(output)!r}, trust_remote_code=True)
        assert type(model).__name__ == "MedBlipForConditionalGeneration"
        assert type(processor).__name__ == "MedBlipProcessor"
        inputs = processor(records=[{{"age": 70, "mmse": 29}}], image_slots=False)
        candidates = processor.candidate_inputs()
        scores = model.score_candidates(inputs["input_ids"], candidates["candidate_input_ids"],
            attention_mask=inputs["attention_mask"], candidate_attention_mask=candidates["candidate_attention_mask"])
        assert scores.shape == (1, 3) and torch.isfinite(scores).all()
        print("LOADED OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "LOADED OK" in result.stdout, result.stderr[-3000:]


def test_eval_only_on_a_manifest_records_and_prints_dropped_scans(trained, cohort, tmp_path, caplog):
    output, _ = trained
    out, manifest = tmp_path / "eval", read_manifest(cohort / "manifest.csv")
    truncated = tmp_path / "truncated.nii.gz"  # a real scan of the cohort, cut in half
    raw = Path(manifest["image_path"][0]).read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    manifest.loc[len(manifest)] = {**manifest.iloc[0].to_dict(), "subject_id": "cut", "image_path": str(truncated)}
    manifest.to_csv(tmp_path / "eval.csv", index=False)
    with caplog.at_level(logging.WARNING):
        results = train.main([
            "--eval_only", "--model_name_or_path", str(output), "--eval_manifest", str(tmp_path / "eval.csv"),
            "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--num_proc", "1", "--report_to",
            "none", "--max_new_tokens", "3",
        ])
    saved = json.loads((out / "eval_results.json").read_text())
    [dropped] = saved["dropped_scans"]
    assert (dropped["image_path"], dropped["subject_id"]) == (str(truncated), "cut") and dropped["reason"]
    assert f"not evaluated: {truncated} ({dropped['reason']})" in caplog.text
    assert saved["likelihood"]["image_text"]["all"]["n"] == 18
    assert results["generate"]["text_only"]["all"]["n"] == 18
    assert (out / "confusion_matrices.png").stat().st_size > 1000


def test_label_leakage_training_saves_its_record_fields_with_the_processor(trained):
    """Issue 12, case 8: the fields a model was trained on travel with it (inference renders only those)."""
    output, _ = trained
    saved = json.loads((output / "processor_config.json").read_text())
    assert saved["record_fields"] == ["age", "sex", "education", "mmse", "apoe4"]  # --record_fields default
    model_args, _, _ = train.parse_arguments(["--preset", "tiny", "--record_fields", "age", "MMSE", "notes"])
    processor = train.build_processor(MedBlipConfig.from_preset("tiny"), model_args)
    assert processor.record_fields == ["age", "mmse", "notes"]  # the collate and evaluation read these
    model_args.init_from = str(output)  # fine-tuning a folder: the run's fields replace the saved ones
    assert train.build_model(model_args)[1].record_fields == ["age", "mmse", "notes"]
    model_args, _, _ = train.parse_arguments(["--record_fields", "age", "diagnosis"])
    with pytest.raises(ValueError, match=r"record_fields must name distinct fields .* got \['age', 'diagnosis'\]"):
        train.build_processor(MedBlipConfig.from_preset("tiny"), model_args)  # before any data is read


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no_such_flag"):
        train.parse_arguments(["--no_such_flag", "1"])
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        train.parse_arguments(["--push_to_hub", "true"])
    with pytest.raises(ValueError, match="--eval_only needs"):
        train.parse_arguments(["--eval_only", "true"])
    config = tmp_path / "run.yaml"
    config.write_text("preset: tiny\nmax_steps: 5\n")
    model_args, _, train_args = train.parse_arguments([str(config), "--max_steps", "7"])
    assert (model_args.preset, train_args.max_steps) == ("tiny", 7)
    config.write_text("preset: tiny\nno_such_key: 1\n")
    with pytest.raises(ValueError, match="no_such_key"):
        train.parse_arguments([str(config)])


def test_two_process_training_writes_one_checkpoint(cohort, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO_ROOT / "train.py"),
               *tiny_args(cohort, tmp_path, output), "--max_steps", "2", "--save_every", "2", "--batch_size", "2",
               "--eval_splits", "zeroshot"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [c.name for c in (output / "checkpoints").glob("checkpoint-*")] == ["checkpoint-0000002"]
    assert (output / "eval_results.json").exists()


def test_optimizer_groups_split_learning_rates_and_weight_decay():
    from configuration_medblip import MedBlipConfig
    from modeling_medblip import MedBlipForConditionalGeneration

    model = MedBlipForConditionalGeneration(MedBlipConfig.from_preset("tiny"))
    groups = train.optimizer_groups(model, weight_decay=0.1, learning_rate=1e-3, image_path_learning_rate=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    for group in groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            assert group["lr"] == (1e-3 if name.startswith("language_model.") else 1e-4), name
            no_decay = parameter.dim() < 2 or "embedding" in name or name in ("query_tokens", "temperature")
            assert group["weight_decay"] == (0.0 if no_decay or name.endswith("wte.weight") else 0.1), name


def test_record_and_image_dropout_are_exclusive_and_reproducible(minilm_path):
    from transformers import AutoTokenizer

    from convert_medblip import build_gpt2_tokenizer
    from image_processing_medblip import MedBlipImageProcessor
    from processing_medblip import MedBlipProcessor

    processor = MedBlipProcessor(MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8)),
                                 build_gpt2_tokenizer(), AutoTokenizer.from_pretrained(minilm_path), num_query_tokens=4)
    rows = [{"image_path": f"images/sub-{i:03d}.nii.gz", "diagnosis": "CN", "age": 70 + i % 9, "mmse": 28,
             "pixel_values": np.zeros((8, 512), np.float16), "patch_grid": [2, 2, 2]} for i in range(400)]
    collate = make_collate(processor, ["age", "mmse"], record_dropout=0.3, image_dropout=0.2, seed=0)
    batch = collate(rows)
    image_slots = (batch["input_ids"] == processor.image_token_id).sum(1)
    has_record = batch["input_ids"].eq(processor.tokenizer.convert_tokens_to_ids("ĠMM")).any(1)
    assert set(image_slots.tolist()) == {0, 4}
    assert bool((has_record | (image_slots > 0)).all())  # never both withheld
    # the Q-Former's contrastive text keeps every record, withheld from the prompt or not
    mmse_id = processor.qformer_tokenizer.convert_tokens_to_ids("mm")
    assert bool(batch["qformer_input_ids"].eq(mmse_id).any(1).all())
    assert 0.2 < float((~has_record).float().mean()) < 0.4 and 0.12 < float((image_slots == 0).float().mean()) < 0.28
    assert torch.equal(collate(rows)["input_ids"], batch["input_ids"])  # a function of (seed, epoch, scan)
    moved = [{**row, "image_path": "/elsewhere/" + row["image_path"]} for row in rows]  # another checkout
    assert torch.equal(collate(moved)["input_ids"], batch["input_ids"])
    collate.epoch = 1
    assert not torch.equal(collate(rows)["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="record_dropout \\+ image_dropout must be <= 1"):
        make_collate(processor, ["age"], record_dropout=0.6, image_dropout=0.5)


def test_seed_summary_reports_mean_and_sd_over_seeds(trained, tmp_path):
    """medblip_eval.seeds summarises finished seed folders: per split, mode and decoder, mean ± sd of the balanced
    accuracy, the baselines, and whether image + text beat text only in every seed."""
    from medblip_eval import seeds

    output, results = trained
    for seed, shift in ((0, 0.0), (1, 0.1)):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        saved = json.loads((output / "eval_results_all_splits.json").read_text())
        for split in saved["results"].values():
            split["likelihood"]["image_text"]["all"]["balanced_accuracy"] += shift
        (folder / seeds.RESULTS_FILE).write_text(json.dumps(saved))
    summary = seeds.main(["--seeds", "0", "1", "--out", str(tmp_path)])
    base = results["zeroshot"]["likelihood"]["image_text"]["all"]["balanced_accuracy"]
    entry = summary["zeroshot"]["model"]["likelihood"]["image_text"]
    assert entry["values"] == pytest.approx([base, base + 0.1])
    assert entry["mean"] == pytest.approx(base + 0.05) and entry["sd"] == pytest.approx(0.1 / 2**0.5)
    text_only = results["zeroshot"]["likelihood"]["text_only"]["all"]["balanced_accuracy"]
    adds = summary["zeroshot"]["image_adds"]
    assert adds["values"] == pytest.approx([base - text_only, base + 0.1 - text_only])
    assert set(summary) == {"zeroshot", "test"} and "text_floor" in summary["zeroshot"]["baselines"]
    table = (tmp_path / "summary.md").read_text()
    assert f"| image_text | {base + 0.05:.3f} ± {0.1 / 2**0.5:.3f} |" in table and "### zeroshot" in table
    assert (tmp_path / "summary.png").stat().st_size > 5000
    with pytest.raises(SystemExit):
        seeds.main(["--seeds", "0", "--out", str(tmp_path)])


def test_external_cohort_is_evaluated_never_trained_on(cohort, tmp_path, monkeypatch):
    """--external_manifests become the 'external' split: all of their scans, none in train/validation/test; the
    same scans given as both training and external data are refused (a leak)."""
    import contextlib
    import types

    import pandas as pd

    from external import generate_external_cohort

    external = generate_external_cohort(tmp_path / "ext", n_per_class=1, size=32, seed=0, num_workers=1)
    monkeypatch.setattr(train, "build_cache", lambda dataset, *args, **kwargs: dataset)  # records, not patches
    accelerator = types.SimpleNamespace(main_process_first=contextlib.nullcontext)
    data_args = train.DataArguments(manifests=[str(cohort / "manifest.csv")], external_manifests=[str(external)])
    _, sources, corpus, cached = train.build_data(data_args, None, accelerator)
    rows = pd.read_csv(external)
    assert sources == [str(external)] and len(cached["external"]) == len(rows) == 3
    assert sorted(cached["external"]["subject_id"]) == sorted(rows["subject_id"].astype(str))
    assert set(cached["external"]["dataset"]) == {"external_colin27"}
    trained_on = {path for split in ("train", "validation", "test") for path in cached[split]["image_path"]}
    assert not trained_on & set(cached["external"]["image_path"])
    assert [report.source for report in corpus.source_reports][-1] == str(external.resolve())
    manifest = str(cohort / "manifest.csv")
    leak = train.DataArguments(manifests=[manifest], external_manifests=[manifest])
    with pytest.raises(ValueError, match="leak"):
        train.build_data(leak, None, accelerator)


def test_thread_policy_uses_the_cores_left_free(monkeypatch):
    """--num_threads 0: cores minus the cores other programs keep busy, shared by the local processes, at least 1."""
    from medblip_train import distributed

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for busy, processes, expected in ((0.2, 1, 8), (2.6, 1, 5), (7.9, 1, 1), (12.0, 1, 1), (0.0, 2, 4), (3.0, 2, 2)):
        monkeypatch.setattr(distributed, "busy_cores", lambda busy=busy: busy)
        assert distributed.torch_threads(0, processes) == expected, (busy, processes)
    assert distributed.torch_threads(3, 2) == 3  # an explicit count wins


def test_busy_cores_sees_a_busy_process():
    """/proc/stat sampled while one pure-Python loop runs: at least about half a core busy, at most every core."""
    from medblip_train.distributed import busy_cores

    if not Path("/proc/stat").exists():
        pytest.skip("Linux /proc/stat")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        hog.kill()
        hog.wait()
    assert 0.5 < busy <= (os.cpu_count() or 1) + 1e-6


@pytest.mark.parametrize("select_on", [None, "nll", "balanced_accuracy"])
def test_select_on_keeps_the_step_of_the_best_validation_score(cohort, tmp_path, select_on):
    """The final weights are those of the validation step with the lowest negative log-likelihood (the default) or
    the highest balanced accuracy (earliest on ties), and every validation step logs both criteria."""
    output = tmp_path / "out"
    chosen = [] if select_on is None else ["--select_on", select_on]
    train.main(tiny_args(cohort, tmp_path, output, *chosen, "--eval_every", "2", "--save_every", "0"))
    history = json.loads((output / "training_config.json").read_text())
    state = json.loads(max((output / "checkpoints").glob("checkpoint-*")).joinpath("trainer_state.json").read_text())
    validations = [h for h in state["history"] if "val_nll" in h]
    assert [h["step"] for h in validations] == [2, 4, 6]
    assert all(0 <= h["val_balanced_accuracy"] <= 1 and h["val_nll"] > 0 for h in validations)
    if select_on == "balanced_accuracy":
        best = min(validations, key=lambda h: (-h["val_balanced_accuracy"], h["step"]))
    else:
        best = min(validations, key=lambda h: (h["val_nll"], h["step"]))
    assert history["best_step"] == best["step"]


def test_selection_study_scores_every_checkpoint_and_applies_each_criterion(trained, tmp_path):
    """medblip_eval.selection rebuilds a finished run's splits, scores each kept checkpoint and reports the step each
    criterion picks with that step's held-out balanced accuracy."""
    from medblip_eval import selection

    output, _ = trained
    summary = selection.main([str(output), "--out", str(tmp_path / "selection.json")])
    saved = json.loads((tmp_path / "selection.json").read_text())
    steps = {int(step): scores for step, scores in saved["runs"][str(output)].items()}
    assert sorted(steps) == [3, 6]
    assert all(0 <= s["val_ba"] <= 1 and s["val_nll"] > 0 and 0 <= s["zeroshot"] <= 1 for s in steps.values())
    assert summary["last step"]["steps"] == [6]
    best_val = max(steps, key=lambda s: (steps[s]["val_ba"], -s))
    assert summary["best validation balanced accuracy"]["steps"] == [best_val]
    assert summary["best validation balanced accuracy"]["zeroshot"] == pytest.approx(steps[best_val]["zeroshot"])
    lowest_nll = min(steps, key=lambda s: (steps[s]["val_nll"], s))
    assert summary["lowest validation nll"]["steps"] == [lowest_nll]
    oracle = summary["oracle (best held-out)"]["zeroshot"]
    assert oracle == pytest.approx(max(s["zeroshot"] for s in steps.values()))
