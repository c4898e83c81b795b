"""MedBLIP model configuration: a 3D ViT, a BLIP-2 Q-Former and any causal or seq2seq language model."""

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging


try:
    from .labels_medblip import ID2LABEL
except ImportError:
    from labels_medblip import ID2LABEL


logger = logging.get_logger(__name__)

# GPT-2 BPE (50257 tokens) + "<image>" (50257) + "<pad>" (50258), padded to a multiple of 64 for speed.
GPT2_IMAGE_TOKEN_ID = 50257
GPT2_VOCAB_SIZE = 50304


@strict
class MedBlipVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the 3D vision encoder: a linear 3D patch embedding with a CLS token and a learnable 3D
    position embedding, followed by ViT blocks named as in [`Blip2VisionModel`] (so EVA ViT-g weights load).

    Args:
        volume_size (`list[int]`, defaults to `[96, 96, 96]`): model input grid (D, H, W) in voxels, RAS axis order.
        patch_size (`list[int]`, defaults to `[16, 16, 16]`): 3D patch (pd, ph, pw); must divide `volume_size`.
        num_channels (`int`, defaults to 1): image channels (1 for a T1-weighted MRI).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, hidden_act, layer_norm_eps,
        attention_dropout, qkv_bias, initializer_range: the ViT fields of [`Blip2VisionConfig`].

    Example:

    ```python
    >>> from configuration_medblip import MedBlipVisionConfig
    >>> config = MedBlipVisionConfig(volume_size=[64, 64, 64], patch_size=[16, 16, 16])
    >>> config.grid_size, config.num_patches
    ([4, 4, 4], 64)
    ```"""

    model_type = "medblip_vision_model"
    base_config_key = "vision_config"

    volume_size: list[int] | tuple[int, ...] = (96, 96, 96)
    patch_size: list[int] | tuple[int, ...] = (16, 16, 16)
    num_channels: int = 1
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    qkv_bias: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.volume_size = [int(v) for v in self.volume_size]
        self.patch_size = [int(p) for p in self.patch_size]
        if len(self.volume_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"volume_size and patch_size need 3 values, got {self.volume_size}, {self.patch_size}")
        if any(v % p for v, p in zip(self.volume_size, self.patch_size)):
            raise ValueError(f"patch_size {self.patch_size} must divide volume_size {self.volume_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")

    @property
    def grid_size(self) -> list[int]:
        """Patch grid (gd, gh, gw) of the configured volume."""
        return [v // p for v, p in zip(self.volume_size, self.patch_size)]

    @property
    def num_patches(self) -> int:
        gd, gh, gw = self.grid_size
        return gd * gh * gw

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, `num_channels * pd * ph * pw`."""
        pd, ph, pw = self.patch_size
        return self.num_channels * pd * ph * pw


@strict
class MedBlipConfig(PreTrainedConfig):
    r"""
    Configuration of [`MedBlipForConditionalGeneration`].

    Args:
        vision_config (`dict` or [`MedBlipVisionConfig`]): the 3D vision encoder.
        qformer_config (`dict` or [`Blip2QFormerConfig`]): the Q-Former; its text input is always switched on (the
            contrastive losses encode text with it) and `encoder_hidden_size` follows the vision width.
        text_config (`dict` or [`PreTrainedConfig`]): any causal (GPT-2, BioMedLM, ...) or seq2seq (T5) LM, chosen
            by its `model_type`.
        num_query_tokens (`int`, defaults to 32): learned queries = image tokens given to the LM.
        image_token_index (`int`): id of the `<image>` placeholder token in the LM vocabulary.
        image_text_hidden_size (`int`, defaults to 256): width of the contrastive embedding space.
        itc_temperature_init / itc_temperature_min / itc_temperature_max (`float`): learnable contrastive
            temperature, its start value and its clamp range.
        itc_label_smoothing (`float`, defaults to 0.1): label smoothing of the image-text contrastive loss.
        loss_weight_lm / loss_weight_itc_text / loss_weight_itc_answer (`float`): weights of the three loss terms.
        freeze_vision_encoder (`bool`, defaults to True): freeze the ViT blocks (the patch/position embeddings and
            the post-LayerNorm stay trainable).
        freeze_language_model (`bool`, defaults to True): freeze the LM (LoRA adapters, if any, stay trainable).
        lora_rank (`int`, defaults to 0): rank of LoRA adapters on the LM (0 = no LoRA); needs `peft`.
        lora_alpha, lora_dropout, lora_target_modules: the usual LoRA settings.

    Example:

    ```python
    >>> from configuration_medblip import MedBlipConfig
    >>> config = MedBlipConfig.from_preset("tiny")
    >>> config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size
    True
    ```"""

    model_type = "medblip"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
        "vision_config": MedBlipVisionConfig,
        "qformer_config": Blip2QFormerConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_index: int | None = None
    image_text_hidden_size: int = 256
    itc_temperature_init: float = 0.07
    itc_temperature_min: float = 0.001
    itc_temperature_max: float = 0.5
    itc_label_smoothing: float = 0.1
    loss_weight_lm: float = 1.0
    loss_weight_itc_text: float = 1.0
    loss_weight_itc_answer: float = 1.0
    freeze_vision_encoder: bool = True
    freeze_language_model: bool = True
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.qformer_config.use_qformer_text_input = True
        self.is_encoder_decoder = self.text_config.is_encoder_decoder
        self.use_decoder_only_language_model = self.text_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if not (0 < self.itc_temperature_min <= self.itc_temperature_init <= self.itc_temperature_max):
            raise ValueError(
                "need 0 < itc_temperature_min <= itc_temperature_init <= itc_temperature_max, got "
                f"{self.itc_temperature_min}, {self.itc_temperature_init}, {self.itc_temperature_max}"
            )
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        # `register_for_auto_class` records one auto class per model; AutoModel must load the full model too
        self.auto_map = {"AutoModel": "modeling_medblip.MedBlipForConditionalGeneration",
                         **(getattr(self, "auto_map", None) or {})}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MedBlipConfig":
        """Build a named preset (`tiny`, `small`, `paper`, `paper-biomedlm`); keyword arguments override fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown MedBLIP preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


def _gpt2(n_embd: int, n_layer: int, n_head: int, n_positions: int = 512, vocab_size: int = GPT2_VOCAB_SIZE) -> dict:
    return {
        "model_type": "gpt2", "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "n_positions": n_positions,
        "vocab_size": vocab_size, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50258,
    }


# EVA ViT-g as in BLIP-2 / MedBLIP: 39 blocks, width 1408, 16 heads, MLP 6144; 224^3 volume, 32^3 patches.
_EVA_VIT_G = {
    "volume_size": [224, 224, 224], "patch_size": [32, 32, 32], "hidden_size": 1408, "intermediate_size": 6144,
    "num_hidden_layers": 39, "num_attention_heads": 16, "layer_norm_eps": 1e-6,
}
# BERT-base Q-Former with cross-attention every second layer.
_BERT_BASE_QFORMER = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "cross_attention_frequency": 2,
}

PRESETS: dict[str, dict] = {
    # Unit tests: a few thousand parameters per block, 4^3 patches, GPT-2 BPE vocabulary.
    "tiny": {
        "vision_config": {"volume_size": [32, 32, 32], "patch_size": [8, 8, 8], "hidden_size": 32,
                          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "max_position_embeddings": 128, "cross_attention_frequency": 1},
        "text_config": _gpt2(32, 2, 2, n_positions=256),
        "num_query_tokens": 4, "image_token_index": GPT2_IMAGE_TOKEN_ID, "image_text_hidden_size": 16,
        "id2label": ID2LABEL,
    },
    # The CPU default of `python train.py`: Q-Former shaped like all-MiniLM-L6-v2 (initialised from its real
    # weights by train.py), a ViT and a small GPT-2 trained from scratch since no pretrained 3D weights exist here.
    # Image-answer contrastive term on, image-text term off (docs/experiments.md says why).
    "small": {
        "vision_config": {"volume_size": [32, 32, 32], "patch_size": [8, 8, 8], "hidden_size": 192,
                          "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 3},
        # cross-attention in every layer and no dropout (docs/experiments.md)
        "qformer_config": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                           "intermediate_size": 1536, "max_position_embeddings": 512, "cross_attention_frequency": 1,
                           "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "text_config": _gpt2(256, 4, 4, n_positions=512),
        "num_query_tokens": 8, "image_token_index": GPT2_IMAGE_TOKEN_ID, "image_text_hidden_size": 128,
        "loss_weight_itc_text": 0.0, "loss_weight_itc_answer": 1.0,
        "freeze_vision_encoder": False, "freeze_language_model": False, "id2label": ID2LABEL,
    },
    # The paper: EVA ViT-g, BERT-base Q-Former, 32 queries, FLAN-T5-XL (image token appended after T5's 32100).
    "paper": {
        "vision_config": _EVA_VIT_G,
        "qformer_config": _BERT_BASE_QFORMER,
        "text_config": {
            "model_type": "t5", "vocab_size": 32128, "d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_layers": 24,
            "num_decoder_layers": 24, "num_heads": 32, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
            "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
        },
        "num_query_tokens": 32, "image_token_index": 32100, "id2label": ID2LABEL,
    },
    # The paper's decoder-only variant: BioMedLM (GPT-2 architecture, 2.7B, width 2560, 32 layers, 20 heads).
    "paper-biomedlm": {
        "vision_config": _EVA_VIT_G,
        "qformer_config": _BERT_BASE_QFORMER,
        "text_config": _gpt2(2560, 32, 20, n_positions=1024),
        "num_query_tokens": 32, "image_token_index": GPT2_IMAGE_TOKEN_ID, "id2label": ID2LABEL,
    },
}

MedBlipVisionConfig.register_for_auto_class()
MedBlipConfig.register_for_auto_class()

__all__ = ["MedBlipConfig", "MedBlipVisionConfig", "PRESETS"]
