"""Starting MedBLIP from other checkpoints: real MiniLM into the Q-Former, a BLIP-2 checkpoint into the whole model."""

import pytest
import torch
from test_modeling import build, tiny_config

from configuration_medblip import MedBlipConfig
from convert_medblip import build_gpt2_tokenizer, from_blip2_pretrained, inflate_patch_embedding, init_qformer_from_bert
from modeling_medblip import MedBlipForConditionalGeneration


def test_init_qformer_from_real_minilm(minilm_path):
    from transformers import AutoModel

    config = MedBlipConfig.from_preset("small")
    config.vision_config.num_hidden_layers = 1
    config.text_config.n_layer = 1
    model = MedBlipForConditionalGeneration(config)
    bert = AutoModel.from_pretrained(minilm_path)
    source = bert.state_dict()
    cross_before = model.qformer.encoder.layer[0].crossattention.attention.query.weight.clone()
    written = init_qformer_from_bert(model, minilm_path)
    params = dict(model.named_parameters())
    assert len(written) == 3 + 6 * 22 + 1
    torch.testing.assert_close(params["embeddings.word_embeddings.weight"], source["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(
        params["qformer.encoder.layer.5.attention.attention.value.weight"],
        source["encoder.layer.5.attention.self.value.weight"],
    )
    for ours in ("intermediate", "intermediate_query"):
        torch.testing.assert_close(
            params[f"qformer.encoder.layer.3.{ours}.dense.weight"], source["encoder.layer.3.intermediate.dense.weight"]
        )
    torch.testing.assert_close(
        params["embeddings.position_embeddings.weight"],
        source["embeddings.position_embeddings.weight"] + source["embeddings.token_type_embeddings.weight"][0],
    )
    torch.testing.assert_close(params["qformer.encoder.layer.0.crossattention.attention.query.weight"], cross_before)
    # The copied text path computes what MiniLM computes: same [CLS] state before the projection.
    ids = torch.tensor([[101, 2026, 3899, 2003, 2757, 102]])
    model.eval()
    with torch.no_grad():
        ours = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0).last_hidden_state
        theirs = bert.eval()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_init_qformer_from_bert_rejects_other_shapes(minilm_path):
    model = build(tiny_config())
    with pytest.raises(ValueError, match="hidden_size=384 differs"):
        init_qformer_from_bert(model, minilm_path)


def test_from_blip2_pretrained_copies_every_tensor(tmp_path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    blip2_config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 64},
        text_config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 300},
        num_query_tokens=4, image_token_index=299,
    )
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration(blip2_config)
    blip2.save_pretrained(tmp_path)
    source = blip2.state_dict()
    model = from_blip2_pretrained(str(tmp_path), volume_size=(32, 32, 32))
    target = model.state_dict()
    copied = [n for n in source if not n.startswith("vision_model.embeddings.")]
    for name in copied:
        torch.testing.assert_close(target[name], source[name], msg=name)
    for name in ("class_embedding", "patch_embedding.bias"):
        key = f"vision_model.embeddings.{name}"
        torch.testing.assert_close(target[key], source[key])
    # inflation: a volume constant along depth gives the 2D patch response of the grey image
    weight_2d = source["vision_model.embeddings.patch_embedding.weight"]
    torch.testing.assert_close(target["vision_model.embeddings.patch_embedding.weight"],
                               inflate_patch_embedding(weight_2d, [8, 8, 8]))
    image = torch.rand(8, 8)
    response_2d = (weight_2d * image.expand(3, 8, 8)).sum(dim=(1, 2, 3)) / 3
    response_3d = target["vision_model.embeddings.patch_embedding.weight"] @ image.expand(8, 8, 8).reshape(-1)
    torch.testing.assert_close(response_3d, response_2d, atol=1e-5, rtol=1e-4)
    position_2d = source["vision_model.embeddings.position_embedding"]
    position_3d = target["vision_model.embeddings.position_embedding"]
    assert position_3d.shape == (1, 1 + 64, 32)
    torch.testing.assert_close(position_3d[0, 1:17], position_2d[0, 1:])  # depth slice 0 = the 2D grid
    torch.testing.assert_close(position_3d[0, 17:33], position_2d[0, 1:])
    # the text FFN, absent from BLIP-2, starts from the query FFN
    layer = model.qformer.encoder.layer[1]
    torch.testing.assert_close(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)
    assert not any(p.requires_grad for p in model.language_model.parameters())


def test_gpt2_tokenizer_is_the_real_bpe():
    gpt2_tokenizer = build_gpt2_tokenizer()
    ids = gpt2_tokenizer.encode("Dementia", add_special_tokens=False)
    assert len(ids) > 0 and gpt2_tokenizer.decode(ids) == "Dementia"
    assert gpt2_tokenizer.encode(" the", add_special_tokens=False) == [262]  # GPT-2's id for " the"
    text = "A 74-year-old female. MMSE 27. Answer: mild cognitive impairment (MCI)"
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode(text, add_special_tokens=False)) == text
    assert gpt2_tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [50257, 50258]
    assert gpt2_tokenizer.eos_token_id == 50256 and gpt2_tokenizer.pad_token_id == 50258
    assert len(gpt2_tokenizer) == 50259 and gpt2_tokenizer.padding_side == "left"
    assert gpt2_tokenizer.encode("<image><image>x", add_special_tokens=False)[:2] == [50257, 50257]
