"""Starting MedBLIP from other checkpoints: real MiniLM into the Q-Former, a BLIP-2 checkpoint into the whole model."""

import re

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


# The public figures of the two BLIP-2 checkpoints (model cards, config.json), written out independently of
# convert_medblip.BLIP2_PUBLIC_CONFIGS: tensor name -> shape.
_EVA_VIT_G_SHAPES = {
    "vision_model.embeddings.patch_embedding.weight": (1408, 3, 14, 14),  # 14-pixel patches
    "vision_model.embeddings.position_embedding": (1, 1 + (224 // 14) ** 2, 1408),  # at 224 pixels
    "vision_model.encoder.layers.38.mlp.fc1.weight": (6144, 1408),  # 39 layers, MLP 6144
    "vision_model.encoder.layers.38.self_attn.qkv.weight": (3 * 1408, 1408),
    "query_tokens": (1, 32, 768),  # 32 queries, 768 wide
    "qformer.encoder.layer.11.attention.attention.query.weight": (768, 768),  # 12 layers
    "qformer.encoder.layer.10.crossattention.attention.key.weight": (768, 1408),  # every 2nd layer
}
_LANGUAGE_MODEL_SHAPES = {
    "Salesforce/blip2-flan-t5-xl": {
        "language_model.shared.weight": (32128, 2048),
        "language_model.encoder.block.23.layer.1.DenseReluDense.wi_0.weight": (5120, 2048),
        "language_model.decoder.block.23.layer.1.EncDecAttention.q.weight": (32 * 64, 2048),
        "language_model.lm_head.weight": (32128, 2048),
        "language_projection.weight": (2048, 768),
    },
    "Salesforce/blip2-opt-2.7b": {
        "language_model.model.decoder.embed_tokens.weight": (50304, 2560),
        "language_model.model.decoder.layers.31.fc1.weight": (10240, 2560),
        "language_model.model.decoder.layers.31.self_attn.q_proj.weight": (2560, 2560),
        "language_projection.weight": (2560, 768),
    },
}


def _meta(model_class, config):
    with torch.device("meta"):
        return model_class(config)


@pytest.mark.parametrize("blip2_name, preset, same_language_model", [
    ("Salesforce/blip2-flan-t5-xl", "paper", True),  # the paper preset's LM is FLAN-T5-XL
    ("Salesforce/blip2-opt-2.7b", "paper-biomedlm", False),  # BioMedLM is not OPT: the LM is not copied
])
def test_public_blip2_checkpoints_cover_the_paper_presets_at_real_shapes(blip2_name, preset, same_language_model):
    """On the meta device (no download, no memory): the public BLIP-2 configuration builds the published shapes, and
    convert_blip2_state_dict fills every ViT and Q-Former tensor of the MedBLIP paper preset (32^3 patches on a 7^3
    grid) and of MedBLIP as from_blip2_pretrained configures it (14^3 patches on 16^3) with the right shape, the 2D
    patch embedding and positions inflated; only the Q-Former's text FFN, which BLIP-2 lacks, is left (it starts from
    the query FFN)."""
    from transformers import Blip2ForConditionalGeneration

    from convert_medblip import blip2_public_config, convert_blip2_state_dict, medblip_config_from_blip2

    blip2_config = blip2_public_config(blip2_name)
    blip2 = _meta(Blip2ForConditionalGeneration, blip2_config).state_dict()
    for name, shape in {**_EVA_VIT_G_SHAPES, **_LANGUAGE_MODEL_SHAPES[blip2_name]}.items():
        assert tuple(blip2[name].shape) == shape, name
    assert not any(k.startswith(("vision_model.encoder.layers.39.", "qformer.encoder.layer.12.")) for k in blip2)
    assert not any(k.startswith("qformer.encoder.layer.1.crossattention") for k in blip2)
    for config, keep_language_model in [(MedBlipConfig.from_preset(preset), same_language_model),
                                        (medblip_config_from_blip2(blip2_config), True)]:
        target = _meta(MedBlipForConditionalGeneration, config).state_dict()
        vision = config.vision_config
        converted = convert_blip2_state_dict(blip2, target, vision.patch_size, vision.grid_size, keep_language_model)
        assert all(tuple(converted[n].shape) == tuple(target[n].shape) for n in converted)
        bridge = [n for n in target if n.startswith(("vision_model.", "qformer.", "query_tokens"))]
        text_ffn = [n for n in bridge if re.match(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", n)]
        assert sorted(set(bridge) - set(converted)) == sorted(text_ffn)
        assert len(text_ffn) == 12 * 6  # per layer: two dense weights and biases, a LayerNorm weight and bias
        side = vision.patch_size[0]
        assert tuple(converted["vision_model.embeddings.patch_embedding.weight"].shape) == (1408, side**3)
        assert tuple(converted["vision_model.embeddings.position_embedding"].shape) == (1, 1 + (224 // side) ** 3,
                                                                                         1408)
        language_model = {n for n in target if n.startswith(("language_model.", "language_projection."))}
        assert set(converted) & language_model == (language_model if keep_language_model else set())
