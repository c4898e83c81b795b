"""MedBlipForConditionalGeneration on tiny configurations: losses, freezing, save/load, remote code, equivalences."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT

from configuration_medblip import PRESETS, MedBlipConfig
from modeling_medblip import MedBlipForConditionalGeneration


TINY_T5 = {
    "model_type": "t5", "vocab_size": 512, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
    "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
}
T5_IMAGE_TOKEN = 511


def tiny_config(lm: str = "gpt2", **overrides) -> MedBlipConfig:
    if lm == "t5":
        overrides = {"text_config": TINY_T5, "image_token_index": T5_IMAGE_TOKEN, **overrides}
    return MedBlipConfig.from_preset("tiny", **overrides)


def make_batch(config: MedBlipConfig, batch_size: int = 3, seed: int = 0) -> dict:
    """A training batch shaped as MedBlipProcessor builds it (left-padded prompt + answer for decoder-only LMs)."""
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    image = [config.image_token_index] * config.num_query_tokens
    eos = config.text_config.eos_token_id
    if config.use_decoder_only_language_model:
        pad = config.text_config.pad_token_id
        rows = [
            [pad] * (i % 2) + image + [464, 3280 + i % 2] + [318] * (1 - i % 2) + [20 + i % 3, 21, eos]
            for i in range(batch_size)
        ]
        input_ids = torch.tensor(rows)
        attention_mask = (input_ids != pad).long()
        labels = input_ids.masked_fill(torch.arange(input_ids.shape[1]) < input_ids.shape[1] - 3, -100)
    else:
        input_ids = torch.tensor([image + [40, 41 + i % 2, 42] for i in range(batch_size)])
        attention_mask = torch.ones_like(input_ids)
        labels = torch.tensor([[20 + i % 3, 21, eos] for i in range(batch_size)])
    answers = torch.tensor([[101, 2054, 3000 + i % 2, 102] for i in range(batch_size)])  # 2 distinct answers
    return {
        "pixel_values": torch.rand(batch_size, vision.num_patches, vision.patch_dim, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "qformer_input_ids": torch.randint(1000, 5000, (batch_size, 9), generator=generator),
        "qformer_attention_mask": torch.ones(batch_size, 9, dtype=torch.long),
        "qformer_answer_input_ids": answers,
        "qformer_answer_attention_mask": torch.ones_like(answers),
    }


def build(config: MedBlipConfig, seed: int = 0) -> MedBlipForConditionalGeneration:
    torch.manual_seed(seed)
    return MedBlipForConditionalGeneration(config)


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_loss_terms_finite_and_falling_when_overfitting(lm):
    config = tiny_config(lm, freeze_language_model=False)
    model = build(config).train()
    batch = make_batch(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        output = model(**batch)
        for term in (output.loss_lm, output.loss_itc_text, output.loss_itc_answer):
            assert term is not None and torch.isfinite(term)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.6 * losses[0]
    expected = output.loss_lm + output.loss_itc_text + output.loss_itc_answer
    torch.testing.assert_close(output.loss, expected)


def test_logits_to_keep_gives_the_same_lm_loss():
    config = tiny_config()
    model = build(config).eval()
    batch = make_batch(config)
    with torch.no_grad():
        full = model(**batch)
        kept = model(**batch, logits_to_keep=4)  # 3 answer tokens + the position before them
    assert kept.logits.shape[1] == 4
    torch.testing.assert_close(kept.loss_lm, full.loss_lm)
    torch.testing.assert_close(kept.logits, full.logits[:, -4:])


def test_contrastive_terms_with_zero_weight_are_not_computed():
    config = tiny_config(loss_weight_itc_text=0.0)
    model = build(config).eval()
    with torch.no_grad():
        output = model(**make_batch(config))
    assert output.loss_itc_text is None and output.logits_per_image is None
    torch.testing.assert_close(output.loss, output.loss_lm + output.loss_itc_answer)


def test_gradients_reach_trainable_parts_and_never_frozen_ones():
    config = tiny_config()
    model = build(config).train()
    model(**make_batch(config)).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("vision_model.encoder.") or name.startswith("language_model."):
            assert not parameter.requires_grad and parameter.grad is None, name
    for name in (
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding",
        "vision_model.post_layernorm.weight",
        "query_tokens",
        "qformer.encoder.layer.0.crossattention.attention.query.weight",
        "embeddings.word_embeddings.weight",
        "language_projection.weight",
        "vision_projection.weight",
        "text_projection.weight",
        "temperature",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_activation_checkpointing_keeps_gradient_to_patch_embedding():
    config = tiny_config()
    model = build(config).train()
    batch = make_batch(config)
    torch.manual_seed(1)  # same dropout masks in both passes
    model(**batch).loss.backward()
    reference = model.vision_model.embeddings.patch_embedding.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.vision_model.encoder.gradient_checkpointing
    torch.manual_seed(1)
    model(**batch).loss.backward()
    torch.testing.assert_close(model.vision_model.embeddings.patch_embedding.weight.grad, reference)


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_save_load_equal_logits_and_freezing_survives(tmp_path, lm):
    config = tiny_config(lm)
    model = build(config).eval()
    batch = make_batch(config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_medblip.py").exists()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForImageTextToText"]
    assert auto_map["AutoConfig"] == "configuration_medblip.MedBlipConfig"
    loaded = MedBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("language_model.") for n in frozen)
    assert any(n.startswith("vision_model.encoder.") for n in frozen)


def test_remote_code_round_trip_in_fresh_process(tmp_path):
    config = tiny_config()
    model = build(config).eval()
    batch = make_batch(config)
    folder = tmp_path / "medblip-tiny"
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoConfig, AutoModel
        folder = {str(folder)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__name__ == "MedBlipConfig", type(config)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__name__ == "MedBlipForConditionalGeneration", type(model)
        assert not any(p.requires_grad for p in model.language_model.parameters())
        batch = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, expected)
        print("ROUND TRIP OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert "ROUND TRIP OK" in result.stdout, result.stderr[-3000:]


def test_meta_device_init_then_init_weights_is_finite():
    config = tiny_config()
    with torch.device("meta"):
        model = MedBlipForConditionalGeneration(config)
    model.to_empty(device="cpu")
    model.init_weights()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    torch.testing.assert_close(model.temperature.detach(), torch.tensor([config.itc_temperature_init]))
    positions = model.embeddings.position_ids
    torch.testing.assert_close(positions, torch.arange(positions.shape[-1]).expand(1, -1))
    assert model.query_tokens.std() > 0


def test_sdpa_equals_eager():
    config = tiny_config()
    batch = make_batch(config)
    eager = build(config)
    eager.set_attn_implementation("eager")
    sdpa = build(config)
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(sdpa.eval()(**batch).logits, eager.eval()(**batch).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_batch_of_two_equals_two_batches_of_one(lm):
    config = tiny_config(lm)
    model = build(config).eval()
    batch = make_batch(config, batch_size=2)
    keys = ("pixel_values", "input_ids", "attention_mask", "labels")
    with torch.no_grad():
        joint = model(**{k: batch[k] for k in keys})
        for i in range(2):
            single = model(**{k: batch[k][i : i + 1] for k in keys})
            mask = batch["attention_mask"][i].bool() if lm == "gpt2" else slice(None)
            torch.testing.assert_close(single.logits[0][mask], joint.logits[i][mask], atol=1e-5, rtol=1e-4)


def test_placeholder_count_mismatch_raises():
    config = tiny_config()
    model = build(config).eval()
    batch = make_batch(config, batch_size=2)
    first_slots = (batch["input_ids"][0] == config.image_token_index).nonzero()[:2, 0]
    batch["input_ids"][0, first_slots] = 464
    with pytest.raises(ValueError, match=r"exactly 4 <image> tokens .*or 0 to withhold it, got \[2, 4\]"):
        model(**batch)
    text_only = make_batch(config, batch_size=1)
    text_only.pop("pixel_values")
    with pytest.raises(ValueError, match=r"exactly 0 <image> tokens \(id 50257\) when no volume is given, got \[4\]"):
        model(**text_only)


@pytest.fixture(scope="module")
def tiny_processor(minilm_path):
    from transformers import AutoTokenizer

    from convert_medblip import build_gpt2_tokenizer
    from image_processing_medblip import MedBlipImageProcessor
    from processing_medblip import MedBlipProcessor

    return MedBlipProcessor(MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(8, 8, 8)),
                            build_gpt2_tokenizer(), AutoTokenizer.from_pretrained(minilm_path), num_query_tokens=4)


def test_a_row_without_image_slots_is_answered_from_its_text_alone(tiny_processor):
    """Image dropout: in a batch with volumes, a prompt without `<image>` slots gives the text-only logits."""
    config = tiny_config()
    model = build(config).eval()
    records = [{"age": 70, "mmse": 29}, {"age": 81, "mmse": 21}]
    batch = tiny_processor(records=records, diagnoses=["CN", "AD"], image_slots=[False, True])
    pixel_values = torch.rand(2, config.vision_config.num_patches, config.vision_config.patch_dim)
    keys = ("input_ids", "attention_mask", "labels")
    with torch.no_grad():
        mixed = model(pixel_values=pixel_values, **{k: batch[k] for k in keys}).logits
        text_only = tiny_processor(records=records[:1], diagnoses=["CN"], image_slots=False)
        alone = model(**{k: text_only[k] for k in keys}).logits
        with_image = tiny_processor(records=records[1:], diagnoses=["AD"], image_slots=True)
        imaged = model(pixel_values=pixel_values[1:], **{k: with_image[k] for k in keys}).logits
    length = int(text_only["attention_mask"].sum())
    torch.testing.assert_close(mixed[0, -length:], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], imaged[0], atol=1e-5, rtol=1e-4)


def test_query_cross_attentions_cover_the_patch_grid():
    config = tiny_config()
    model = build(config).eval()
    with torch.no_grad():
        attention = model.get_query_cross_attentions(make_batch(config, batch_size=2)["pixel_values"])
    assert attention.shape == (2, config.num_query_tokens, config.vision_config.num_patches)
    assert (attention >= 0).all() and (attention.sum(-1) < 1).all()  # the CLS share is dropped
    assert model.qformer.config._attn_implementation == "sdpa"


def test_text_only_mode_runs_without_image_tokens():
    config = tiny_config()
    model = build(config).eval()
    input_ids = torch.tensor([[464, 3280, 318, 20, 21]])
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=input_ids)
    assert output.loss_itc_text is None and torch.isfinite(output.loss)


def test_linear_patch_embedding_equals_conv3d():
    config = tiny_config()
    embeddings = build(config).vision_model.embeddings
    vision = config.vision_config
    volume = torch.rand(2, 1, *vision.volume_size)
    pd, ph, pw = vision.patch_size
    # reference cut: (B, C, gd, pd, gh, ph, gw, pw) -> (B, gd, gh, gw, C, pd, ph, pw)
    b, c, d, h, w = volume.shape
    patches = volume.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    patches = patches.reshape(b, -1, c * pd * ph * pw)
    conv = torch.nn.Conv3d(1, vision.hidden_size, kernel_size=vision.patch_size, stride=vision.patch_size)
    with torch.no_grad():
        conv.weight.copy_(embeddings.patch_embedding.weight.view_as(conv.weight))
        conv.bias.copy_(embeddings.patch_embedding.bias)
        expected = conv(volume).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embeddings.patch_embedding(patches), expected, atol=1e-5, rtol=1e-5)


def test_position_embedding_resizes_to_another_grid():
    config = tiny_config()
    model = build(config).eval()
    vision = config.vision_config
    embeddings = model.vision_model.embeddings
    same = embeddings.interpolate_pos_encoding(vision.grid_size)
    assert same is embeddings.position_embedding
    bigger = embeddings.interpolate_pos_encoding([4, 6, 5])
    assert bigger.shape == (1, 1 + 4 * 6 * 5, vision.hidden_size)
    torch.testing.assert_close(bigger[:, 0], embeddings.position_embedding[:, 0])
    pixel_values = torch.rand(2, 120, vision.patch_dim)
    with torch.no_grad():
        out = model.vision_model(pixel_values, patch_grid=torch.tensor([[4, 6, 5], [4, 6, 5]]))
    assert out.last_hidden_state.shape == (2, 121, vision.hidden_size)
    with pytest.raises(ValueError, match="pass patch_grid"):
        model.vision_model(pixel_values)


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_candidate_scores_equal_token_log_probs_summed_by_hand(lm):
    config = tiny_config(lm)
    model = build(config).eval()
    batch = make_batch(config, batch_size=2)
    eos = config.text_config.eos_token_id
    if lm == "gpt2":
        prompt = batch["input_ids"][:, :-3]
        prompt_mask = batch["attention_mask"][:, :-3]
    else:
        prompt, prompt_mask = batch["input_ids"], batch["attention_mask"]
    pad = config.text_config.pad_token_id
    candidates = torch.tensor([[30, 31, eos], [32, eos, pad], [33, 34, eos]])
    candidate_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        scores = model.score_candidates(
            prompt, candidates, pixel_values=batch["pixel_values"], attention_mask=prompt_mask,
            candidate_attention_mask=candidate_mask,
        )
        assert scores.shape == (2, 3)
        for i in range(2):
            for k in range(3):
                answer = candidates[k][candidate_mask[k].bool()]
                if lm == "gpt2":
                    ids = torch.cat([prompt[i], answer])[None]
                    mask = torch.cat([prompt_mask[i], torch.ones_like(answer)])[None]
                    pixels = batch["pixel_values"][i : i + 1]
                    logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
                    log_probs = F.log_softmax(logits[0, prompt.shape[1] - 1 : -1], dim=-1)
                else:
                    output = model(
                        pixel_values=batch["pixel_values"][i : i + 1], input_ids=prompt[i : i + 1],
                        attention_mask=prompt_mask[i : i + 1], labels=answer[None],
                    )
                    log_probs = F.log_softmax(output.logits[0], dim=-1)
                expected = sum(log_probs[t, token].item() for t, token in enumerate(answer.tolist()))
                assert scores[i, k].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_generate_honours_generation_config(lm):
    config = tiny_config(lm)
    model = build(config).eval()
    batch = make_batch(config, batch_size=2)
    prompt = batch["input_ids"][:, :-3] if lm == "gpt2" else batch["input_ids"]
    mask = batch["attention_mask"][:, : prompt.shape[1]]
    model.generation_config.max_new_tokens = 2
    model.generation_config.min_new_tokens = 2
    generated = model.generate(pixel_values=batch["pixel_values"], input_ids=prompt, attention_mask=mask)
    # decoder-only output starts with the prompt, seq2seq output with the decoder start token
    offset = prompt.shape[1] if lm == "gpt2" else 1
    assert generated.shape == (2, offset + 2)
    longer = model.generate(pixel_values=batch["pixel_values"], input_ids=prompt, attention_mask=mask,
                            max_new_tokens=4, min_new_tokens=4)
    assert longer.shape == (2, offset + 4)
    assert model.generation_config.max_new_tokens == 2  # call arguments never leak into the stored config


def test_answer_contrastive_loss_counts_same_answers_as_positives():
    config = tiny_config()
    model = build(config).eval()
    batch = make_batch(config, batch_size=4)
    with torch.no_grad():
        output = model(**batch)
        query_output = model.get_image_features(batch["pixel_values"]).qformer_outputs.last_hidden_state
        answer_features = model.get_text_features(batch["qformer_answer_input_ids"]).pooler_output
        similarity = model.contrastive_logits(model._image_features_for_contrast(query_output), answer_features)
    labels = batch["qformer_answer_input_ids"][:, 2]
    positives = (labels[:, None] == labels[None, :]).float()
    smoothing = config.itc_label_smoothing
    loss = 0.0
    for logits, target in ((similarity, positives), (similarity.t(), positives.t())):
        target = target / target.sum(1, keepdim=True) * (1 - smoothing) + smoothing / 4
        loss += -(target * logits.log_softmax(1)).sum(1).mean() / 2
    torch.testing.assert_close(output.loss_itc_answer, loss)
    assert positives.sum() > 4  # the batch really holds repeated answers


def test_temperature_is_clamped():
    config = tiny_config()
    model = build(config).eval()
    with torch.no_grad():
        model.temperature.fill_(1e-6)
        query_output = torch.randn(2, config.num_query_tokens, config.qformer_config.hidden_size)
        text = F.normalize(torch.randn(2, config.image_text_hidden_size), dim=-1)
        similarity = model.contrastive_logits(model._image_features_for_contrast(query_output), text)
    assert similarity.abs().max() <= 1 / config.itc_temperature_min + 1e-3


def test_lora_adapters_train_while_language_model_stays_frozen():
    pytest.importorskip("peft")
    config = tiny_config(lora_rank=4, lora_target_modules=["c_attn"])
    model = build(config).train()
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(dict(model.named_parameters())[n].requires_grad for n in lora)
    frozen = [n for n, p in model.language_model.named_parameters() if "lora_" not in n]
    assert all(not dict(model.language_model.named_parameters())[n].requires_grad for n in frozen)
    plain = build(tiny_config())
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    batch = make_batch(config)
    with torch.no_grad():  # lora_B starts at zero: the adapters start as the identity
        torch.testing.assert_close(model.eval()(**batch).logits, plain.eval()(**batch).logits)


def test_lora_model_save_load_round_trip(tmp_path):
    pytest.importorskip("peft")
    config = tiny_config(lora_rank=4, lora_target_modules=["c_attn"])
    model = build(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: not the identity any more
    model.save_pretrained(tmp_path)
    loaded = MedBlipForConditionalGeneration.from_pretrained(tmp_path)
    batch = make_batch(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model.eval()(**batch).logits)
    assert all(p.requires_grad == ("lora_" in n) for n, p in loaded.language_model.named_parameters())


def test_contrastive_losses_see_the_global_batch_under_two_processes(tmp_path):
    """Under torch.distributed each process gathers every process's image and text rows: the contrastive losses
    and the DDP-averaged gradients equal those of one process on the whole batch, answers shared across processes
    being positives and padded to a common length."""
    from safetensors.torch import load_file, save_file

    # no dropout: the reference and the two workers all run in training mode
    config = tiny_config(loss_weight_itc_text=1.0, loss_weight_itc_answer=1.0, qformer_config={
        **PRESETS["tiny"]["qformer_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = build(config)
    batch = make_batch(config, batch_size=4)
    # answers A, B | A, C: A is shared across the two halves; rows 0-1 are one token shorter (padding)
    answer_a, answer_b, answer_c = [101, 2054, 3000, 102, 0], [101, 2054, 3001, 102, 0], [101, 2054, 3002, 3003, 102]
    batch["qformer_answer_input_ids"] = torch.tensor([answer_a, answer_b, answer_a, answer_c])
    batch["qformer_answer_attention_mask"] = (batch["qformer_answer_input_ids"] != 0).long()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    model.train()
    output = model(**batch)
    (output.loss_itc_text + output.loss_itc_answer).backward()
    checked = ("query_tokens", "temperature", "vision_projection.weight",
               "vision_model.embeddings.patch_embedding.weight",
               # the text path: each process's record texts are gathered like its images
               "text_projection.weight", "embeddings.word_embeddings.weight",
               "qformer.encoder.layer.0.intermediate.dense.weight")
    parameters = dict(model.named_parameters())
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from safetensors.torch import load_file, save_file
        from modeling_medblip import MedBlipForConditionalGeneration
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = MedBlipForConditionalGeneration.from_pretrained({str(folder)!r}).train()
        batch = {{k: v[2 * rank : 2 * rank + 2] for k, v in load_file({str(tmp_path / 'batch.safetensors')!r}).items()}}
        if rank == 0:  # this half's longest answer is 4 tokens: the processor would pad it to 4
            for key in ("qformer_answer_input_ids", "qformer_answer_attention_mask"):
                batch[key] = batch[key][:, :4]
        output = model(**batch)
        (output.loss_itc_text + output.loss_itc_answer).backward()
        parameters = dict(model.named_parameters())
        gradients = {{}}
        for name in {list(checked)!r}:
            gradient = parameters[name].grad.clone()
            dist.all_reduce(gradient)  # what DDP does: the mean over processes
            gradients[name] = gradient / world
        if rank == 0:
            gradients["loss_itc_text"] = output.loss_itc_text.detach().reshape(1)
            gradients["loss_itc_answer"] = output.loss_itc_answer.detach().reshape(1)
            save_file(gradients, {str(tmp_path / 'distributed.safetensors')!r})
        dist.destroy_process_group()
    """)
    (tmp_path / "worker.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(tmp_path / "worker.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = load_file(tmp_path / "distributed.safetensors")
    torch.testing.assert_close(distributed["loss_itc_text"][0], output.loss_itc_text.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distributed["loss_itc_answer"][0], output.loss_itc_answer.detach(), atol=1e-5, rtol=1e-5)
    for name in checked:
        torch.testing.assert_close(distributed[name], parameters[name].grad, atol=1e-5, rtol=1e-4, msg=name)
