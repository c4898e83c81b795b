"""MedBLIP keeps the contracts of a transformers model, for both LM families (GPT-2 and T5): recorded hidden states
and attentions, tuple outputs, nested outputs, eager = SDPA, resizing the vocabulary, feature getters, generation
(greedy, sampling, beam search, with and without cache, assisted, from `inputs_embeds`), half-precision loading and
the attention backends it advertises."""

import pytest
import torch
import torch.nn.functional as F
from test_modeling import build, make_batch, tiny_config
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from modeling_medblip import MedBlipForConditionalGeneration, MedBlipVisionModel
from processing_medblip import MedBlipProcessor


LMS = ["gpt2", "t5"]


def tensors(value) -> list[torch.Tensor]:
    """Every tensor of a (nested) output: ModelOutputs, tuples and caches, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, ModelOutput):
        value = value.to_tuple()
    elif isinstance(value, Cache):
        value = list(value)
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in tensors(item)]
    return []


@pytest.fixture(scope="module")
def models() -> dict:
    """One eager-attention tiny model per LM family, in eval mode (shared by the tests that do not change it)."""
    built = {}
    for lm in LMS:
        model = build(tiny_config(lm)).eval()
        model.set_attn_implementation("eager")
        built[lm] = model
    return built


def prompt_of(model, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values, prompt ids, prompt mask) of `make_batch`: the answer cut off for decoder-only LMs."""
    batch = make_batch(model.config, batch_size=batch_size)
    keep = batch["input_ids"].shape[1] - (3 if model.config.use_decoder_only_language_model else 0)
    return batch["pixel_values"], batch["input_ids"][:, :keep], batch["attention_mask"][:, :keep]


# ---------------------------------------------------------------------------------------------------------------
# recorded outputs


def test_vision_model_records_hidden_states_and_attentions(models):
    vision = models["gpt2"].vision_model
    config = vision.config
    pixel_values = make_batch(models["gpt2"].config, batch_size=2)["pixel_values"]
    with torch.no_grad():
        plain = vision(pixel_values)
        out = vision(pixel_values, output_hidden_states=True, output_attentions=True)
        # reference: the blocks run one by one
        states = [vision.embeddings(pixel_values)]
        for layer in vision.encoder.layers:
            states.append(layer(states[-1]))
    assert plain.hidden_states is None and plain.attentions is None
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for got, want in zip(out.hidden_states, states):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.last_hidden_state, vision.post_layernorm(states[-1]))
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    sequence = 1 + config.num_patches
    assert len(out.attentions) == config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (2, config.num_attention_heads, sequence, sequence)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, config.num_attention_heads, sequence))
    as_tuple = vision(pixel_values, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # last_hidden_state, pooler_output, hidden_states
    for got, want in zip(tensors(as_tuple), tensors(out.to_tuple()[:3])):
        torch.testing.assert_close(got, want)


def test_vision_model_honours_its_config_flags():
    config = tiny_config().vision_config
    config.output_hidden_states = True
    torch.manual_seed(0)
    vision = MedBlipVisionModel(config).eval()
    with torch.no_grad():
        out = vision(torch.rand(1, config.num_patches, config.patch_dim))
    assert len(out.hidden_states) == config.num_hidden_layers + 1 and out.attentions is None


@pytest.mark.parametrize("lm", LMS)
def test_composite_output_holds_every_part(models, lm):
    model = models[lm]
    config = model.config
    batch = make_batch(config, batch_size=2)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    for name in ("loss", "loss_lm", "loss_itc_text", "loss_itc_answer", "logits", "logits_per_image", "image_tokens"):
        assert out[name] is not None, name
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    sequence = 1 + vision.num_patches
    assert len(out.vision_outputs.hidden_states) == vision.num_hidden_layers + 1
    assert len(out.vision_outputs.attentions) == vision.num_hidden_layers
    assert out.vision_outputs.last_hidden_state.shape == (2, sequence, vision.hidden_size)
    assert len(out.qformer_outputs.hidden_states) == qformer.num_hidden_layers + 1
    assert out.qformer_outputs.last_hidden_state.shape == (2, config.num_query_tokens, qformer.hidden_size)
    cross_layers = len(range(0, qformer.num_hidden_layers, qformer.cross_attention_frequency))
    assert len(out.qformer_outputs.cross_attentions) == cross_layers
    assert out.qformer_outputs.cross_attentions[0].shape == (2, qformer.num_attention_heads, config.num_query_tokens,
                                                             sequence)
    lm_out = out.language_model_outputs
    assert lm_out.logits is out.logits
    if lm == "gpt2":
        assert len(lm_out.hidden_states) == text.n_layer + 1 and len(lm_out.attentions) == text.n_layer
        assert lm_out.hidden_states[0].shape == (2, length, text.n_embd)
        assert lm_out.attentions[0].shape == (2, text.n_head, length, length)
        assert out.hidden_states is lm_out.hidden_states and out.attentions is lm_out.attentions
        assert out.cache is lm_out.cache and out.cache.get_seq_length() == length
    else:
        decoder_length = batch["labels"].shape[1]
        assert len(lm_out.encoder_hidden_states) == text.num_layers + 1
        assert lm_out.encoder_hidden_states[0].shape == (2, length, text.d_model)
        assert len(lm_out.decoder_hidden_states) == text.num_decoder_layers + 1
        assert lm_out.decoder_attentions[0].shape == (2, text.num_heads, decoder_length, decoder_length)
        assert lm_out.cross_attentions[0].shape == (2, text.num_heads, decoder_length, length)
    model.train()  # training keeps no cache: it would hold every layer's keys and values with the output
    try:
        with torch.no_grad():
            assert model(**batch).language_model_outputs.cache is None
    finally:
        model.eval()


@pytest.mark.parametrize("lm", LMS)
def test_output_flags_set_on_the_config_reach_every_part(models, lm):
    model = models[lm]
    batch = make_batch(model.config, batch_size=1)
    model.config.output_hidden_states = True
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        model.config.output_hidden_states = False
    hidden = out.language_model_outputs.get("hidden_states", out.language_model_outputs.get("decoder_hidden_states"))
    assert out.vision_outputs.hidden_states is not None and out.qformer_outputs.hidden_states is not None
    assert hidden is not None


@pytest.mark.parametrize("lm", LMS)
def test_tuple_output_equals_the_model_output(models, lm):
    model = models[lm]
    batch = make_batch(model.config, batch_size=2)
    with torch.no_grad():
        as_dict = model(**batch, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**batch, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.keys()) == 10
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    assert isinstance(as_tuple[-1], tuple)  # the nested outputs are tuples too
    got, want = tensors(as_tuple), tensors(as_dict)
    assert len(got) == len(want) > 20
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    model.config.return_dict = False  # the config default counts too
    try:
        with torch.no_grad():
            assert isinstance(model(**batch), tuple)
    finally:
        model.config.return_dict = True


@pytest.mark.parametrize("lm", LMS)
def test_sdpa_equals_eager_on_every_returned_tensor(lm):
    config = tiny_config(lm)
    batch = make_batch(config, batch_size=2)
    eager, sdpa = build(config).eval(), build(config).eval()
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    for part in (sdpa.vision_model, sdpa.qformer, sdpa.language_model):
        assert part.config._attn_implementation == "sdpa"
    with torch.no_grad():
        got = tensors(sdpa(**batch, output_hidden_states=True))
        want = tensors(eager(**batch, output_hidden_states=True))
    assert len(got) == len(want) > 20
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# vocabulary and features


@pytest.mark.parametrize("lm", LMS)
def test_resize_token_embeddings_gives_a_working_model(tmp_path, lm):
    config = tiny_config(lm)
    model = build(config).eval()
    old_size = config.text_config.vocab_size
    old_rows = model.get_input_embeddings().weight[:old_size].detach().clone()
    model.resize_token_embeddings(old_size + 1)
    new_token = old_size  # e.g. a new diagnosis word or special token
    assert model.config.text_config.vocab_size == model.language_model.config.vocab_size == old_size + 1
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == old_size + 1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    torch.testing.assert_close(model.get_input_embeddings().weight[:old_size], old_rows)
    batch = make_batch(model.config, batch_size=2)
    if lm == "gpt2":
        batch["input_ids"][:, -2] = batch["labels"][:, -2] = new_token
    else:
        batch["input_ids"][:, -1] = batch["labels"][:, 0] = new_token
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape[-1] == old_size + 1 and torch.isfinite(output.loss)
    pixel_values, prompt, mask = prompt_of(model)
    generated = model.generate(pixel_values=pixel_values, input_ids=prompt, attention_mask=mask, max_new_tokens=2)
    assert int(generated.max()) <= old_size
    model.save_pretrained(tmp_path)
    loaded = MedBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.text_config.vocab_size == old_size + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, output.logits)


def test_feature_getters_return_model_outputs(models):
    model = models["gpt2"]
    batch = make_batch(model.config, batch_size=2)
    with torch.no_grad():
        forward = model(**batch)
        image = model.get_image_features(batch["pixel_values"], output_hidden_states=True)
        text = model.get_text_features(batch["qformer_input_ids"], batch["qformer_attention_mask"],
                                       output_hidden_states=True)
        image_tuple = model.get_image_features(batch["pixel_values"], return_dict=False)
        text_tuple = model.get_text_features(batch["qformer_input_ids"], return_dict=False)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    torch.testing.assert_close(image.pooler_output, forward.image_tokens)  # the tokens the LM reads
    torch.testing.assert_close(image.last_hidden_state, forward.vision_outputs.last_hidden_state)
    torch.testing.assert_close(image.qformer_outputs.last_hidden_state, forward.qformer_outputs.last_hidden_state)
    assert len(image.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    projected = F.normalize(model.text_projection(text.last_hidden_state[:, 0]), dim=-1)
    torch.testing.assert_close(text.pooler_output, projected)
    torch.testing.assert_close(text.pooler_output.norm(dim=-1), torch.ones(2))
    assert len(text.hidden_states) == model.config.qformer_config.num_hidden_layers + 1
    assert isinstance(image_tuple, tuple) and isinstance(text_tuple, tuple)
    torch.testing.assert_close(image_tuple[1], image.pooler_output)


# ---------------------------------------------------------------------------------------------------------------
# generation


def greedy_by_hand(model, pixel_values, prompt, mask, steps: int) -> torch.Tensor:
    """Reference greedy decoding: full forward passes without cache, end token suppressed (`min_new_tokens`)."""
    eos = model.config.text_config.eos_token_id
    if model.config.use_decoder_only_language_model:
        ids = prompt
        for _ in range(steps):
            mask_now = torch.cat([mask, torch.ones(len(ids), ids.shape[1] - prompt.shape[1], dtype=mask.dtype)], 1)
            logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask_now).logits[:, -1]
            ids = torch.cat([ids, logits.index_fill(-1, torch.tensor([eos]), -torch.inf).argmax(-1, keepdim=True)], 1)
        return ids
    decoder = torch.full((len(prompt), 1), model.config.text_config.decoder_start_token_id)
    for _ in range(steps):
        logits = model(pixel_values=pixel_values, input_ids=prompt, attention_mask=mask,
                       decoder_input_ids=decoder).logits[:, -1]
        next_token = logits.index_fill(-1, torch.tensor([eos]), -torch.inf).argmax(-1, keepdim=True)
        decoder = torch.cat([decoder, next_token], 1)
    return decoder


@pytest.mark.parametrize("lm", LMS)
def test_greedy_sample_and_beam_search_with_and_without_cache(models, lm):
    model = models[lm]
    pixel_values, prompt, mask = prompt_of(model)  # GPT-2: row 1 is left-padded
    inputs = {"pixel_values": pixel_values, "input_ids": prompt, "attention_mask": mask}
    steps = {"max_new_tokens": 3, "min_new_tokens": 3}
    with torch.no_grad():
        reference = greedy_by_hand(model, pixel_values, prompt, mask, 3)
    for use_cache in (True, False):
        torch.testing.assert_close(model.generate(**inputs, **steps, use_cache=use_cache), reference, rtol=0, atol=0)
    start = prompt.shape[1] if lm == "gpt2" else 1
    assert torch.equal(reference[:, :start], prompt if lm == "gpt2" else reference[:, :1])
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        sampled.append(model.generate(**inputs, **steps, do_sample=True, top_k=0, num_return_sequences=2,
                                      use_cache=use_cache))
    assert sampled[0].shape == (4, start + 3) and torch.equal(sampled[0], sampled[1])
    beams = [model.generate(**inputs, **steps, num_beams=3, num_return_sequences=2, use_cache=use_cache,
                            output_scores=True, return_dict_in_generate=True) for use_cache in (True, False)]
    assert beams[0].sequences.shape == (4, start + 3) and torch.equal(beams[0].sequences, beams[1].sequences)
    torch.testing.assert_close(beams[0].sequences_scores, beams[1].sequences_scores)
    if lm == "gpt2":  # every returned row starts with its prompt
        assert torch.equal(beams[0].sequences[:, :start], prompt.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("lm", LMS)
def test_assisted_decoding_equals_greedy(models, lm):
    model = models[lm]
    pixel_values, prompt, mask = prompt_of(model, batch_size=1)  # assisted decoding takes one prompt at a time
    inputs = {"pixel_values": pixel_values, "input_ids": prompt, "attention_mask": mask, "max_new_tokens": 4,
              "min_new_tokens": 4}
    greedy = model.generate(**inputs)
    other = build(model.config, seed=1).eval()  # a different draft model: its drafts get rejected, not the answer
    for assistant in (model, other):
        assert torch.equal(model.generate(**inputs, assistant_model=assistant), greedy)
    assert torch.equal(model.generate(**inputs, prompt_lookup_num_tokens=2), greedy)


@pytest.mark.parametrize("lm", LMS)
def test_generate_from_inputs_embeds(models, lm):
    model = models[lm]
    pixel_values, prompt, mask = prompt_of(model)
    steps = {"max_new_tokens": 3, "min_new_tokens": 3}
    from_ids = model.generate(pixel_values=pixel_values, input_ids=prompt, attention_mask=mask, **steps)
    # the prompt's plain embeddings: the image tokens go into the `<image>` embeddings' slots
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(pixel_values=pixel_values, inputs_embeds=embeds, attention_mask=mask, **steps)
    # embeddings that already hold the image tokens, no volumes
    with torch.no_grad():
        image_tokens = model.get_image_features(pixel_values).pooler_output
    slots = (prompt == model.config.image_token_index).unsqueeze(-1)
    merged = embeds.masked_scatter(slots, image_tokens)
    from_merged = model.generate(inputs_embeds=merged, attention_mask=mask, **steps)
    if lm == "gpt2":  # without input_ids only the new tokens come back; with them, the prompt first
        new = from_ids[:, prompt.shape[1] :]
        assert torch.equal(from_embeds, new) and torch.equal(from_merged, new)
        both = model.generate(pixel_values=pixel_values, input_ids=prompt, inputs_embeds=embeds,
                              attention_mask=mask, **steps)
        assert torch.equal(both, from_ids)
    else:
        assert torch.equal(from_embeds, from_ids) and torch.equal(from_merged, from_ids)
    with pytest.raises(ValueError, match="input_ids \\(the prompt\\) or inputs_embeds is required"):
        model.generate(pixel_values=pixel_values)


# ---------------------------------------------------------------------------------------------------------------
# callers of generate: processor post-processing and evaluation


@pytest.fixture(scope="module")
def tiny_processor(minilm_path):
    from transformers import AutoTokenizer

    from convert_medblip import build_gpt2_tokenizer
    from image_processing_medblip import MedBlipImageProcessor

    return MedBlipProcessor(MedBlipImageProcessor(volume_size=(32, 32, 32), patch_size=(8, 8, 8)),
                            build_gpt2_tokenizer(), AutoTokenizer.from_pretrained(minilm_path), num_query_tokens=4)


RECORDS = [{"age": 70, "mmse": 29}, {"age": 81, "sex": "M", "education": 12, "mmse": 21}]  # prompts of two lengths


def test_processor_decodes_the_answers_without_the_prompt(models, tiny_processor):
    model, processor = models["gpt2"], tiny_processor
    batch = processor(records=RECORDS, image_slots=True)
    pixel_values = make_batch(model.config, batch_size=2)["pixel_values"]
    inputs = {"pixel_values": pixel_values, **{k: batch[k] for k in processor.model_input_names if k in batch}}
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    with torch.no_grad():
        reference = greedy_by_hand(model, pixel_values, batch["input_ids"], batch["attention_mask"], 3)
    length = batch["input_ids"].shape[1]
    answers = processor.tokenizer.batch_decode(reference[:, length:], skip_special_tokens=True)
    expected = [text.strip() for text in answers]
    assert processor.post_process_image_text_to_text(generated, input_ids=batch["input_ids"]) == expected
    assert all("Question:" in text for text in processor.post_process_image_text_to_text(generated))
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert len(processor.post_process_image_text_to_text(beams, input_ids=batch["input_ids"])) == 4
    with pytest.raises(ValueError, match=f"do not start with the {length}-token prompt given as input_ids"):
        processor.post_process_image_text_to_text(generated[:, length:], input_ids=batch["input_ids"])
    # an encoder-decoder LM returns decoder tokens only: nothing is dropped
    seq2seq = MedBlipProcessor(processor.image_processor, processor.tokenizer, processor.qformer_tokenizer,
                               num_query_tokens=4, is_encoder_decoder=True)
    assert seq2seq.post_process_image_text_to_text(reference[:, length:], input_ids=batch["input_ids"]) == expected


def test_evaluation_predictions_are_the_generated_answers(models, tiny_processor):
    from medblip_eval.predict import predict

    model, processor = models["gpt2"], tiny_processor
    pixel_values = make_batch(model.config, batch_size=2)["pixel_values"]
    grid = torch.tensor(model.config.vision_config.grid_size)
    rows = [{"pixel_values": pixel_values[i].numpy(), "patch_grid": grid.numpy(), "image_path": f"sub-{i}.nii.gz",
             "subject_id": f"sub-{i}", "dataset": "cohort", **record} for i, record in enumerate(RECORDS)]
    fields = ["age", "sex", "education", "mmse"]
    output = predict(model, processor, rows, fields, "image_text", batch_size=2, max_new_tokens=3, device="cpu")
    batch = processor(records=[{k: row.get(k) for k in fields} for row in rows], image_slots=True)
    with torch.no_grad():
        reference = greedy_by_hand(model, pixel_values, batch["input_ids"], batch["attention_mask"], 3)
    answers = processor.tokenizer.batch_decode(reference[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert output["generated"] == [text.strip() for text in answers]


# ---------------------------------------------------------------------------------------------------------------
# precision and attention backends


def test_half_precision_loading_keeps_the_qformer_in_fp32(tmp_path, models):
    models["gpt2"].save_pretrained(tmp_path)
    batch = make_batch(models["gpt2"].config, batch_size=1)
    for dtype in (torch.bfloat16, torch.float16):
        model = MedBlipForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
        assert model.query_tokens.dtype == torch.float32
        assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
        assert model.language_model.dtype == model.vision_model.embeddings.patch_embedding.weight.dtype == dtype
        if dtype == torch.bfloat16:
            with torch.no_grad():
                output = model(**batch)
            assert output.qformer_outputs.last_hidden_state.dtype == torch.float32  # computed in fp32
            assert output.image_tokens.dtype == dtype and torch.isfinite(output.logits).all()


@pytest.mark.parametrize("lm", LMS)
def test_flex_attention_is_refused_with_a_clear_error(models, lm):
    assert not MedBlipForConditionalGeneration._supports_flex_attn
    with pytest.raises(ValueError, match="flex"):
        models[lm].set_attn_implementation("flex_attention")
    assert models[lm].language_model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_forward_cannot_compile_as_one_graph(models):
    """`_can_compile_fullgraph = False` is honest: the `<image>` count checks branch on data."""
    assert not MedBlipForConditionalGeneration._can_compile_fullgraph
    batch = make_batch(models["gpt2"].config, batch_size=1)
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported, match="Data-dependent branching"):
        torch.compile(models["gpt2"], fullgraph=True, backend="eager")(**batch)
