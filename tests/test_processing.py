"""MedBlipProcessor: records, prompts, label masking, candidates, diagnosis tables, tokenizer, save/load."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from convert_medblip import build_gpt2_tokenizer
from image_processing_medblip import MedBlipImageProcessor
from labels_medblip import DEFAULT_ANSWER_TEXTS, DEFAULT_RECORD_FIELDS, RECORD_FIELDS, render_record
from processing_medblip import MedBlipProcessor


NUM_QUERY = 4
RECORD = {"age": 74, "sex": "F", "education": 16, "mmse": 27, "apoe4": 1}


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return build_gpt2_tokenizer()


@pytest.fixture(scope="module")
def processor(gpt2_tokenizer, minilm_path):
    image_processor = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8))
    qformer_tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return MedBlipProcessor(image_processor, gpt2_tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY,
                            max_length=96, record_fields=RECORD_FIELDS)


def _volume():
    return np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


# ---------------------------------------------------------------------------------------------------------------
# records


# ---------------------------------------------------------------------------------------------------------------
# prompts and labels


def test_inference_prompt_has_image_tokens_and_no_diagnosis(processor, gpt2_tokenizer):
    record = {**RECORD, "diagnosis": "AD", "label": "Dementia"}
    batch = processor(images=[_volume()], affine=np.eye(4), records=[record])
    assert "labels" not in batch and "qformer_answer_input_ids" not in batch
    ids = batch["input_ids"][0]
    assert int((ids == 50257).sum()) == NUM_QUERY
    text = gpt2_tokenizer.decode(ids)
    assert text == "<image>" * NUM_QUERY + render_record(RECORD) + (
        " Question: What will this subject be diagnosed with? Answer:"
    )
    for answer in DEFAULT_ANSWER_TEXTS.values():
        assert answer.lower() not in text.lower()
    assert batch["pixel_values"].shape == (1, 8, 512) and batch["patch_grid"].tolist() == [[2, 2, 2]]


def test_text_only_mode_has_no_image_tokens(processor):
    batch = processor(records=[RECORD, None])
    assert int((batch["input_ids"] == 50257).sum()) == 0 and "pixel_values" not in batch
    # placeholders without images, for pixel values cached elsewhere
    cached = processor(records=[RECORD, None], image_slots=True)
    assert ((cached["input_ids"] == 50257).sum(1) == NUM_QUERY).all() and "pixel_values" not in cached
    # per item: the second prompt withholds its image (image dropout) and is the text-only prompt, left-padded
    mixed = processor(records=[RECORD, RECORD], image_slots=[True, False])
    assert (mixed["input_ids"] == 50257).sum(1).tolist() == [NUM_QUERY, 0]
    alone = processor(records=[RECORD])["input_ids"][0]
    assert mixed["input_ids"][1, -len(alone):].tolist() == alone.tolist()
    with pytest.raises(ValueError, match="image_slots has 3 entries for a batch of 2"):
        processor(records=[RECORD, RECORD], image_slots=[True, False, True])


def test_qformer_records_feed_the_qformer_text_and_records_the_prompt(processor, gpt2_tokenizer):
    batch = processor(records=[None, RECORD], qformer_records=[RECORD, RECORD], diagnoses=["CN", "AD"])
    both = processor(records=[RECORD, RECORD], diagnoses=["CN", "AD"])
    assert torch.equal(batch["qformer_input_ids"], both["qformer_input_ids"])
    assert torch.equal(batch["qformer_answer_input_ids"], both["qformer_answer_input_ids"])
    prompts = gpt2_tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert "MMSE" not in prompts[0] and "MMSE" in prompts[1]
    with pytest.raises(ValueError, match="qformer_records has 1 entries for a batch of 2"):
        processor(records=[RECORD, RECORD], qformer_records=[RECORD])


def test_training_labels_supervise_only_answer_and_eos(processor, gpt2_tokenizer):
    records = [RECORD, None, {"age": 60, "notes": "Long notes. " * 5}]
    batch = processor(images=[_volume()] * 3, affine=np.eye(4), records=records, diagnoses=["AD", "NC", "EMCI"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    assert (mask[:, -1] == 1).all() and (mask[1, 0] == 0)  # left padding
    assert (labels[mask == 0] == -100).all() and (labels[ids == 50257] == -100).all()
    assert ((ids == 50257).sum(1) == NUM_QUERY).all()
    for row, expected in enumerate(["Dementia", "Not demented", "mild cognitive impairment (MCI)"]):
        supervised = labels[row][labels[row] != -100]
        assert gpt2_tokenizer.decode(supervised) == f" {expected}<|endoftext|>"
        assert torch.equal(ids[row, -len(supervised):], supervised)  # answer + eos end the sequence
    candidates = processor.candidate_inputs(["AD"])
    answer = candidates["candidate_input_ids"][0][candidates["candidate_attention_mask"][0] == 1]
    assert torch.equal(answer, labels[0][labels[0] != -100])
    qa = processor.qformer_tokenizer.batch_decode(batch["qformer_answer_input_ids"], skip_special_tokens=True)
    assert qa[0] == "what will this subject be diagnosed with? dementia"
    record_ids = processor.qformer_tokenizer(render_record(RECORD))["input_ids"]
    assert batch["qformer_input_ids"][0][: len(record_ids)].tolist() == record_ids
    assert batch["qformer_attention_mask"][1].sum() == 2  # [CLS] [SEP] for a missing record


def test_max_length_truncates_the_record_only(gpt2_tokenizer, minilm_path):
    qformer_tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    image_processor = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8))
    short = MedBlipProcessor(image_processor, gpt2_tokenizer, qformer_tokenizer, num_query_tokens=8, max_length=40,
                             record_fields=["notes"])
    batch = short(images=_volume(), affine=np.eye(4), records={"notes": "word " * 200}, diagnoses="AD")
    assert batch["input_ids"].shape[1] == 40 and int((batch["input_ids"] == 50257).sum()) == 8
    text = gpt2_tokenizer.decode(batch["input_ids"][0])
    assert text.endswith(" Question: What will this subject be diagnosed with? Answer: Dementia<|endoftext|>")
    tiny = MedBlipProcessor(image_processor, gpt2_tokenizer, qformer_tokenizer, num_query_tokens=8, max_length=12)
    with pytest.raises(ValueError, match="max_length=12 cannot hold the prompt"):
        tiny(records=None, images=_volume(), affine=np.eye(4))


def test_encoder_decoder_labels_are_the_answer(gpt2_tokenizer, minilm_path):
    qformer_tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    image_processor = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8))
    seq2seq = MedBlipProcessor(
        image_processor, gpt2_tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY, is_encoder_decoder=True
    )
    batch = seq2seq(records=[RECORD, None], diagnoses=["CN", "MCI"])
    assert batch["attention_mask"][1, 0] == 1  # right padding
    assert not (batch["input_ids"] == gpt2_tokenizer.eos_token_id).any()  # prompt only, no answer
    labels = batch["labels"]
    assert gpt2_tokenizer.decode(labels[0][labels[0] != -100]) == " Not demented<|endoftext|>"
    assert labels[0, -1] == -100 and labels[1, -1] == gpt2_tokenizer.eos_token_id


def test_candidate_inputs(processor, gpt2_tokenizer):
    out = processor.candidate_inputs()
    ids, mask = out["candidate_input_ids"], out["candidate_attention_mask"]
    assert ids.shape[0] == 3 and ids.shape == mask.shape
    for row, label in enumerate(("CN", "MCI", "AD")):
        expected = gpt2_tokenizer.encode(" " + DEFAULT_ANSWER_TEXTS[label]) + [gpt2_tokenizer.eos_token_id]
        assert ids[row][mask[row] == 1].tolist() == expected
        assert (ids[row][mask[row] == 0] == gpt2_tokenizer.pad_token_id).all()


def test_batch_size_mismatch_and_model_input_names(processor):
    with pytest.raises(ValueError, match="records has 1 entries for a batch of 2"):
        processor(images=[_volume(), _volume()], affine=np.eye(4), records=[RECORD])
    with pytest.raises(ValueError, match="unknown diagnosis label 'Converted'"):
        processor(records=[RECORD], diagnoses=["Converted"])
    batch = processor(images=[_volume()], affine=np.eye(4), records=[RECORD], diagnoses=["AD"])
    # what inference passes; the training-only outputs for the losses are left out
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "patch_grid"]
    assert set(batch) - set(processor.model_input_names) == {
        "labels", "qformer_input_ids", "qformer_attention_mask", "qformer_answer_input_ids",
        "qformer_answer_attention_mask",
    }


# ---------------------------------------------------------------------------------------------------------------
# diagnosis tables


def test_answers_and_post_processing(processor):
    assert processor.label_to_answer("LMCI") == "mild cognitive impairment (MCI)"
    texts = ["Dementia", " not demented. ", "Mild cognitive impairment (MCI)", "Dementia due to AD", "", "AD"]
    assert processor.post_process_generation(texts) == ["AD", "CN", "MCI", None, None, None]
    assert processor.post_process_generation("Not demented") == ["CN"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_query_tokens=0), "num_query_tokens"),
        (dict(prompt_template="{record} Question: {question}"), r"\{image\} exactly once"),
        (dict(answer_texts={"CN": "no", "AD": "yes"}), "exactly the keys"),
        (dict(answer_texts={"CN": "same", "MCI": "Same.", "AD": "x"}), "distinct"),
        (dict(max_length=4), "must exceed num_query_tokens"),
        (dict(image_token="<img>"), "one token"),
        (dict(record_fields=["age", "diagnosis"]), "record_fields must name distinct fields"),
    ],
)
def test_invalid_processor_arguments(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedBlipProcessor(processor.image_processor, processor.tokenizer, processor.qformer_tokenizer, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# save / load


def test_save_and_auto_load_offline_in_fresh_process(processor, tmp_path):
    folder = tmp_path / "saved"
    processor.save_pretrained(str(folder))
    assert (folder / "processing_medblip.py").exists()
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["num_query_tokens"] == NUM_QUERY and config["answer_texts"] == DEFAULT_ANSWER_TEXTS
    expected = processor(records=[RECORD], diagnoses=["MCI"])
    np.save(tmp_path / "expected.npy", expected["labels"].numpy())
    script = textwrap.dedent(
        f"""
        import numpy as np
        from transformers import AutoImageProcessor, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "MedBlipProcessor", type(processor)
        assert processor.num_query_tokens == {NUM_QUERY} and processor.image_token_id == 50257
        assert processor.image_processor.volume_size == [16, 16, 16]
        batch = processor(records=[{RECORD!r}], diagnoses=["MCI"])
        assert np.array_equal(batch["labels"].numpy(), np.load({str(tmp_path / "expected.npy")!r}))
        image_processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(image_processor).__name__ == "MedBlipImageProcessor"
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    reloaded = MedBlipProcessor.from_pretrained(str(folder))  # in-process: no trust_remote_code needed
    assert torch.equal(reloaded(records=[RECORD], diagnoses=["MCI"])["labels"], expected["labels"])
    assert type(reloaded.image_processor) is MedBlipImageProcessor
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()


def test_loading_from_a_model_folder_never_asks_about_remote_code(processor, tmp_path, monkeypatch):
    # A model folder's config.json names remote code; loading the processor class directly must not reach
    # transformers' trust_remote_code question (an interactive prompt, 15 s, then a fallback).
    from configuration_medblip import MedBlipConfig

    folder = tmp_path / "model"
    processor.save_pretrained(str(folder))
    MedBlipConfig().save_pretrained(str(folder))
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    import transformers.models.auto.configuration_auto as configuration_auto

    def asked(*args, **kwargs):
        raise AssertionError("trust_remote_code was asked for")

    monkeypatch.setattr(configuration_auto, "resolve_trust_remote_code", asked)
    reloaded = MedBlipProcessor.from_pretrained(str(folder))
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert reloaded.qformer_tokenizer.get_vocab() == processor.qformer_tokenizer.get_vocab()
    assert type(reloaded.tokenizer) is type(processor.tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# issue 12, case 8: label leakage through record_fields at inference


def _with_fields(processor, fields=DEFAULT_RECORD_FIELDS):
    return MedBlipProcessor(processor.image_processor, processor.tokenizer, processor.qformer_tokenizer,
                            num_query_tokens=NUM_QUERY, record_fields=fields)


def _prompt(processor, record):
    return processor.tokenizer.decode(processor(records=[record])["input_ids"][0], skip_special_tokens=True)


def test_label_leakage_record_fields_are_saved_and_cdr_is_never_rendered(processor, tmp_path, caplog):
    default = _with_fields(processor)
    assert default.record_fields == ["age", "sex", "education", "mmse", "apoe4"]
    leaky = {**RECORD, "cdr": 1, "notes": "Daughter reports getting lost."}
    with caplog.at_level(logging.WARNING, logger="processing_medblip"):
        prompt = _prompt(default, leaky)
    assert prompt == _prompt(default, RECORD) and "CDR" not in prompt and "lost" not in prompt
    assert "record fields ['cdr', 'notes'] are ignored: this model was trained on ['age', 'sex', 'education', " \
           "'mmse', 'apoe4']" in caplog.text
    qformer = default(records=[leaky])["qformer_input_ids"][0]
    assert torch.equal(qformer, default(records=[RECORD])["qformer_input_ids"][0])
    default.save_pretrained(str(tmp_path / "default"))
    assert json.loads((tmp_path / "default" / "processor_config.json").read_text())["record_fields"] == list(
        DEFAULT_RECORD_FIELDS)
    with_cdr = _with_fields(processor, ["age", "cdr"])
    with_cdr.save_pretrained(str(tmp_path / "with_cdr"))
    reloaded = MedBlipProcessor.from_pretrained(str(tmp_path / "with_cdr"))
    assert reloaded.record_fields == ["age", "cdr"]
    assert _prompt(reloaded, leaky).startswith("A 74-year-old subject. CDR 1.")


def test_label_leakage_folder_saved_without_record_fields_loads_the_default(processor, tmp_path):
    processor.save_pretrained(str(tmp_path))  # the fixture shows every field
    config_path = tmp_path / "processor_config.json"
    config = json.loads(config_path.read_text())
    assert config.pop("record_fields") == list(RECORD_FIELDS)
    config_path.write_text(json.dumps(config))  # as written before record_fields existed
    old = MedBlipProcessor.from_pretrained(str(tmp_path))
    assert old.record_fields == list(DEFAULT_RECORD_FIELDS)
    assert "CDR" not in _prompt(old, {**RECORD, "cdr": 2})


# ---------------------------------------------------------------------------------------------------------------
# issue 12, case 9: records altered silently


def test_records_altered_silently_keys_any_case_and_unknown_keys_logged_once(processor, caplog):
    with caplog.at_level(logging.WARNING, logger="processing_medblip"):
        shouting = _prompt(processor, {"AGE": 74, "Sex": "F", "EDUCATION": 16, "Mmse": 27, "APOE4": 1, "dx": "AD"})
        again = _prompt(processor, {"age": 74, "sex": "F", "education": 16, "mmse": 27, "apoe4": 1, "dx": "AD"})
    assert shouting == again == _prompt(processor, RECORD)
    assert caplog.text.count("unknown record keys ['dx'] are ignored") == 1  # one line per distinct report
    with pytest.raises(ValueError, match="record field 'mmse' must lie in 0-30, got 99"):
        processor(records=[{"mmse": 99}])


def test_records_altered_silently_special_tokens_in_user_text_stay_text(processor):
    tokenizer = processor.tokenizer
    note = "Wrote <image> twice <image> then <|endoftext|> and <pad>."
    question = "Is <image> a <|endoftext|> question?"
    batch = processor(records=[{"notes": note}], question=question, image_slots=True, diagnoses=["CN"])
    ids = batch["input_ids"][0].tolist()
    controls = {processor.image_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert ids[:NUM_QUERY] == [processor.image_token_id] * NUM_QUERY
    assert not controls & set(ids[NUM_QUERY:-1]) and ids[-1] == tokenizer.eos_token_id  # only the answer's eos
    assert tokenizer.decode(ids[NUM_QUERY:]) == f"{note} Question: {question} Answer: Not demented<|endoftext|>"
    bert = processor.qformer_tokenizer
    qformer = processor(records=[{"notes": "a [SEP] b [CLS] [PAD] [MASK]"}])["qformer_input_ids"][0].tolist()
    assert qformer.count(bert.sep_token_id) == 1 and qformer.count(bert.cls_token_id) == 1
    assert not {bert.pad_token_id, bert.mask_token_id} & set(qformer)
    candidate = processor.candidate_inputs(["<|endoftext|>"], free_text=True)["candidate_input_ids"][0].tolist()
    assert candidate.count(tokenizer.eos_token_id) == 1 and candidate[-1] == tokenizer.eos_token_id
    string_record = processor(records=["free text <image>"], image_slots=True)["input_ids"][0]
    assert int((string_record == processor.image_token_id).sum()) == NUM_QUERY
