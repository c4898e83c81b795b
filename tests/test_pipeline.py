"""MedBLIP pipelines on a tiny saved folder: remote code, scores, batching, inputs, generation, missing files."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, pipeline

import pipeline_medblip
from configuration_medblip import MedBlipConfig
from convert_medblip import build_gpt2_tokenizer
from image_processing_medblip import MedBlipImageProcessor
from modeling_medblip import MedBlipForConditionalGeneration
from pipeline_medblip import (
    VQA_TASK,
    ZERO_SHOT_TASK,
    ZeroShotVolumeClassificationPipeline,
    check_medblip_folder,
    load_medblip_pipeline,
    save_medblip_for_hub,
)
from processing_medblip import MedBlipProcessor


RECORDS = [{"age": 74, "sex": "F", "mmse": 24}, {"age": 81.5, "sex": "M", "education": 12, "mmse": 19, "apoe4": 2}]


def build_tiny_folder(folder: Path, minilm_path: str) -> Path:
    """The tiny preset (random weights) + a 32^3 / 8^3-patch processor, saved as a pipeline-ready Hub folder."""
    torch.manual_seed(0)
    model = MedBlipForConditionalGeneration(MedBlipConfig.from_preset("tiny"))
    processor = MedBlipProcessor(
        MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(8, 8, 8)),
        build_gpt2_tokenizer(),
        AutoTokenizer.from_pretrained(minilm_path),
        num_query_tokens=4,
    )
    return save_medblip_for_hub(model, processor, folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, minilm_path) -> Path:
    return build_tiny_folder(tmp_path_factory.mktemp("medblip-tiny"), minilm_path)


@pytest.fixture(scope="module")
def classifier(tiny_folder):
    return pipeline(ZERO_SHOT_TASK, model=str(tiny_folder), trust_remote_code=True, device="cpu")


@pytest.fixture(scope="module")
def vqa(tiny_folder):
    return pipeline(VQA_TASK, model=str(tiny_folder), trust_remote_code=True, device="cpu")


def test_folder_registers_both_pipelines_and_ships_their_code(tiny_folder):
    custom = json.loads((tiny_folder / "config.json").read_text())["custom_pipelines"]
    assert custom[ZERO_SHOT_TASK]["impl"] == "pipeline_medblip.ZeroShotVolumeClassificationPipeline"
    assert custom[VQA_TASK]["impl"] == "pipeline_medblip.VolumeQuestionAnsweringPipeline"
    assert [task for task, entry in custom.items() if entry["default_task"]] == [ZERO_SHOT_TASK]
    assert (tiny_folder / "pipeline_medblip.py").is_file() and (tiny_folder / "plotting_medblip.py").is_file()
    assert check_medblip_folder(tiny_folder) == custom


def test_pipelines_load_offline_from_a_fresh_process(tiny_folder, anatomical_nii, tmp_path):
    script = textwrap.dedent(f"""
        from transformers import pipeline
        folder, scan = {str(tiny_folder)!r}, {anatomical_nii!r}
        classifier = pipeline("zero-shot-volume-classification", model=folder, trust_remote_code=True)
        scores = classifier(scan, record={{"age": 70, "mmse": 29}})
        assert sorted(s["label"] for s in scores) == ["AD", "CN", "MCI"], scores
        try:  # transformers cannot infer a task when a config registers two custom pipelines
            pipeline(model=folder, trust_remote_code=True)
        except RuntimeError as error:
            assert "volume-question-answering, zero-shot-volume-classification" in str(error), error
        else:
            raise AssertionError("transformers now infers a task among several custom pipelines: revisit the docs")
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        load = get_class_from_dynamic_module("pipeline_medblip.load_medblip_pipeline", folder)
        assert load(folder).task == "zero-shot-volume-classification"
        assert len(classifier.plot_attention(scan, path="view.png").axes) == 4  # plotting came with the pipeline
        classifier.save_pretrained("resaved")  # from the Hub loader's module cache
        check = get_class_from_dynamic_module("pipeline_medblip.check_medblip_folder", folder)
        assert set(check("resaved")) == {{"volume-question-answering", "zero-shot-volume-classification"}}
        print("ok", type(classifier).__module__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok transformers_modules." in result.stdout  # the folder's copy of the code ran, not the repository's


def test_scores_are_a_sorted_distribution_over_the_default_labels(classifier, anatomical_nii):
    scores = classifier(anatomical_nii, record=RECORDS[0])
    assert sorted(s["label"] for s in scores) == ["AD", "CN", "MCI"]
    values = [s["score"] for s in scores]
    assert values == sorted(values, reverse=True)
    assert sum(values) == pytest.approx(1.0, abs=1e-5)
    assert classifier(anatomical_nii, record=RECORDS[0], top_k=1) == scores[:1]


def test_scores_are_the_softmax_of_the_model_candidate_log_likelihoods(classifier, anatomical_nii):
    processor, model = classifier.processor, classifier.model
    inputs = processor(images=anatomical_nii, records=RECORDS[1])
    log_likelihoods = model.score_candidates(
        inputs["input_ids"], **processor.candidate_inputs(["CN", "MCI", "AD"]), pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask"], patch_grid=inputs["patch_grid"],
    )[0].softmax(-1)
    scores = {s["label"]: s["score"] for s in classifier(anatomical_nii, record=RECORDS[1])}
    assert [scores[label] for label in ("CN", "MCI", "AD")] == pytest.approx(log_likelihoods.tolist(), abs=1e-6)


def test_list_in_list_out_and_batched_equals_single(classifier, anatomical_nii):
    items = [{"volume": anatomical_nii, "record": record} for record in RECORDS]  # prompts of different lengths
    singles = [classifier(item) for item in items]
    for batch_size in (1, 2):
        batched = classifier(items, batch_size=batch_size)
        assert len(batched) == 2
        for got, want in zip(batched, singles):
            assert [s["label"] for s in got] == [s["label"] for s in want]
            assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-5)


def test_answer_strings_and_free_text_as_candidate_labels(classifier, anatomical_nii):
    by_class = {s["label"]: s["score"] for s in classifier(anatomical_nii)}
    answers = ["Dementia", "Not demented", "mild cognitive impairment (MCI)"]
    by_answer = {s["label"]: s["score"] for s in classifier(anatomical_nii, candidate_labels=answers)}
    assert set(by_answer) == set(answers)
    for answer, label in zip(answers, ("AD", "CN", "MCI")):
        assert by_answer[answer] == pytest.approx(by_class[label], abs=1e-6)
    free = classifier(anatomical_nii, candidate_labels=["AD", "Parkinson's disease"])
    assert {s["label"] for s in free} == {"AD", "Parkinson's disease"}
    assert sum(s["score"] for s in free) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="candidate_labels"):
        classifier(anatomical_nii, candidate_labels=["AD", " "])


def test_path_image_array_and_dict_inputs_agree(classifier, anatomical_nii):
    image = nibabel.load(anatomical_nii)
    array = np.asarray(image.dataobj, dtype=np.float32)
    reference = classifier(anatomical_nii)
    for item in (image, {"array": array, "affine": image.affine}, {"image": anatomical_nii}):
        got = classifier(item)
        assert [s["score"] for s in got] == pytest.approx([s["score"] for s in reference], abs=1e-5)
    # the file stores LAS: spacing with that orientation is the same input, however it is passed
    for item in ((array, (2.0, 2.0, 2.0), "LAS"), {"array": array, "spacing": (2.0, 2.0, 2.0), "orientation": "LAS"}):
        assert [s["score"] for s in classifier(item)] == pytest.approx([s["score"] for s in reference], abs=1e-5)
    assert classifier(array, spacing=(2.0, 2.0, 2.0), orientation="LAS") == classifier((array, (2.0, 2.0, 2.0)),
                                                                                         orientation="LAS")
    with pytest.raises(ValueError, match="exactly one of"):
        classifier({"volume": anatomical_nii, "diagnosis": "AD"})
    with pytest.raises(ValueError, match="needs affine="):
        classifier(array)


def test_question_answering_passes_generation_arguments(vqa, anatomical_nii, monkeypatch):
    calls = []
    generate = vqa.model.generate

    def spy(**kwargs):
        calls.append((kwargs, generate(**kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(vqa.model, "generate", spy)
    answer = vqa(anatomical_nii, question="What will this subject be diagnosed with?", record=RECORDS[0],
                 max_new_tokens=3, num_beams=2)
    assert len(answer) == 1 and set(answer[0]) == {"answer"} and isinstance(answer[0]["answer"], str)
    kwargs, generated = calls[-1]
    prompt_length = kwargs["input_ids"].shape[1]  # generate returns the prompt, then the answer
    assert kwargs["max_new_tokens"] == 3 and kwargs["num_beams"] == 2 and generated.shape[1] - prompt_length <= 3
    assert torch.equal(generated[:, :prompt_length], kwargs["input_ids"])
    answer_ids = generated[0, prompt_length:]
    assert answer[0]["answer"] == vqa.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    vqa(anatomical_nii, generate_kwargs={"max_new_tokens": 1})
    assert calls[-1][0]["max_new_tokens"] == 1 and calls[-1][1].shape[1] - prompt_length <= 1
    items = [{"volume": anatomical_nii, "record": record} for record in RECORDS]
    singles = [vqa(item, max_new_tokens=3) for item in items]
    assert vqa(items, max_new_tokens=3, batch_size=2) == singles


def test_device_argument_and_query_attention(classifier, anatomical_nii):
    assert classifier.device == torch.device("cpu") and classifier.model.device == torch.device("cpu")
    volume, attention = classifier.query_attention(anatomical_nii)
    assert tuple(volume.shape) == (1, 32, 32, 32) and tuple(attention.shape) == (4, 4, 4)
    assert bool((attention >= 0).all()) and 0.0 < float(attention.sum()) <= 1.0 + 1e-5


def test_default_task_is_picked_by_load_medblip_pipeline(tiny_folder, anatomical_nii):
    classifier = load_medblip_pipeline(tiny_folder, device="cpu")
    assert classifier.task == ZERO_SHOT_TASK and isinstance(classifier(anatomical_nii), list)
    vqa = load_medblip_pipeline(tiny_folder, task=VQA_TASK, device="cpu", local_files_only=True, revision=None)
    assert vqa.task == VQA_TASK and isinstance(vqa(anatomical_nii, max_new_tokens=1)[0]["answer"], str)


@pytest.mark.parametrize(
    "remove, message",
    [
        (["processor_config.json"], "processor_config.json \\(processor\\)"),
        (["pipeline_medblip.py"], "pipeline_medblip.py \\(pipeline code\\)"),
        (["model.safetensors", "plotting_medblip.py"], "model weights.*plotting_medblip.py"),
    ],
)
def test_incomplete_folder_names_what_is_missing(tiny_folder, tmp_path, remove, message):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "copy"))
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        load_medblip_pipeline(folder)


def test_folder_without_registered_pipelines_is_refused(tiny_folder, tmp_path):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "copy"))
    config = json.loads((folder / "config.json").read_text())
    del config["custom_pipelines"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="make_pipeline_ready"):
        check_medblip_folder(folder)


def test_pipeline_without_processor_is_refused(classifier):
    with pytest.raises(ValueError, match="needs the MedBlipProcessor"):
        ZeroShotVolumeClassificationPipeline(model=classifier.model, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# issue 12: label leakage at inference (case 8), errors naming the item (case 12), Hub ids without revision (13)


def test_label_leakage_pipeline_prompt_never_holds_cdr(classifier, vqa, anatomical_nii, monkeypatch, caplog):
    assert classifier.processor.record_fields == ["age", "sex", "education", "mmse", "apoe4"]
    prompts = []
    score = classifier.model.score_candidates

    def spy(input_ids, *args, **kwargs):
        prompts.append(classifier.processor.tokenizer.decode(input_ids[0], skip_special_tokens=True))
        return score(input_ids, *args, **kwargs)

    monkeypatch.setattr(classifier.model, "score_candidates", spy)
    with caplog.at_level(logging.WARNING, logger="processing_medblip"):
        with_cdr = classifier(anatomical_nii, record={**RECORDS[0], "CDR": 1, "notes": "Diagnosed with AD."})
    assert with_cdr == classifier(anatomical_nii, record=RECORDS[0])
    assert prompts[0] == prompts[1] == "A 74-year-old female. MMSE 24. Question: What will this subject be diagnosed " \
                                       "with? Answer:"
    assert "record fields ['cdr', 'notes'] are ignored" in caplog.text
    answer = vqa(anatomical_nii, record={**RECORDS[0], "cdr": 1}, max_new_tokens=2)
    assert answer == vqa(anatomical_nii, record=RECORDS[0], max_new_tokens=2)


def test_pipeline_errors_name_the_item_index(classifier, anatomical_nii):
    constant = np.ones((8, 8, 8), dtype=np.float32)
    array = np.asarray(nibabel.load(anatomical_nii).dataobj, dtype=np.float32)
    for batch_size in (1, 2):
        with pytest.raises(ValueError, match=r"^item 1 of the inputs: array: constant volume"):
            classifier([anatomical_nii, {"array": constant, "affine": np.eye(4)}], batch_size=batch_size)
    with pytest.raises(ValueError, match=r"^item 2 of the inputs: array: array input needs affine="):
        classifier([anatomical_nii, anatomical_nii, {"array": array, "spacing": (2.0, 2.0, 2.0)}])
    with pytest.raises(ValueError, match=r"^item 0 of the inputs: record field 'mmse' must lie in 0-30, got 99$"):
        classifier([{"volume": anatomical_nii, "record": {"mmse": 99}}, anatomical_nii])
    with pytest.raises(ValueError, match=r"^item 1 of the inputs: an input dict needs exactly one of"):
        list(classifier(item for item in [anatomical_nii, {"volume": anatomical_nii, "label": "AD"}]))  # lazy
    with pytest.raises(ValueError, match=r"^'.*missing\.nii\.gz': file not found"):
        classifier(str(Path(anatomical_nii).parent / "missing.nii.gz"))  # a single input: no index to give
    note = classifier(anatomical_nii, record="Wrote <image> and <|endoftext|> in the form.")  # text, not tokens
    assert sum(s["score"] for s in note) == pytest.approx(1.0, abs=1e-5)


def test_hub_id_without_revision_is_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline_medblip, "transformers_pipeline", lambda task, **kwargs: calls.append((task, kwargs)))
    with pytest.raises(ValueError, match=r"'user/medblip' is not a local folder: .* pin the commit you have read: "
                                         r"load_medblip_pipeline\('user/medblip', revision='<full commit hash>'\)"):
        load_medblip_pipeline("user/medblip")
    assert calls == []  # nothing was loaded, no remote code trusted
    sha = "0123456789abcdef0123456789abcdef01234567"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_medblip_pipeline("user/medblip", revision=sha)
    assert calls[-1] == (ZERO_SHOT_TASK, {"model": "user/medblip", "revision": sha, "trust_remote_code": True})
    with pytest.warns(UserWarning, match=r"revision='main' for 'user/medblip' is not a commit hash"):
        load_medblip_pipeline("user/medblip", task=VQA_TASK, revision="main")
    assert calls[-1][0] == VQA_TASK


def test_model_card_snippet_pins_a_revision(tmp_path):
    from medblip_eval.report import CARD_TEMPLATE

    snippet = CARD_TEMPLATE.split("## Use")[1].split("## Limitations")[0]
    assert 'revision="<full commit hash>", trust_remote_code=True' in snippet
    assert 'model="<user>/{folder_name}"' in snippet
