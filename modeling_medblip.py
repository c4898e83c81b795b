"""MedBLIP: 3D MRI patches -> frozen 2D-pretrained ViT blocks -> Q-Former -> image tokens of a (frozen) LM."""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2QFormerModel,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithPast,
    Seq2SeqLMOutput,
)
from transformers.models.blip_2.modeling_blip_2 import (
    BaseModelOutputWithVisionQformerOutputs,
    Blip2Attention,
    Blip2Encoder,
    Blip2EncoderLayer,
    Blip2TextEmbeddings,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs


try:
    from .configuration_medblip import MedBlipConfig, MedBlipVisionConfig
    from .losses_medblip import contrastive_loss, gather_token_rows, gather_with_grad, image_text_similarity
except ImportError:
    from configuration_medblip import MedBlipConfig, MedBlipVisionConfig
    from losses_medblip import contrastive_loss, gather_token_rows, gather_with_grad, image_text_similarity


logger = logging.get_logger(__name__)

# What the vision encoder and the Q-Former record on request; the other keywords of a forward call go to the LM only.
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")


@dataclass
class MedBlipForConditionalGenerationModelOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`): weighted sum of the loss terms present.
    loss_lm (`torch.FloatTensor` of shape `()`): language-modelling loss on the answer tokens and end token.
    loss_itc_text (`torch.FloatTensor` of shape `()`): image <-> health-record-text contrastive loss.
    loss_itc_answer (`torch.FloatTensor` of shape `()`): image <-> "question answer" contrastive loss, with
        same-answer pairs counted as positives.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): LM logits.
    logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`): image-to-text similarities / temperature
        (in distributed training, of every process's batch: `(global_batch_size, global_batch_size)`).
    image_tokens (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, text_hidden_size)`): the query outputs
        projected into the LM's embedding space, written into the `<image>` slots of the prompt.
    vision_outputs (`BaseModelOutputWithPooling`): outputs of the 3D vision encoder (hidden states and attentions when
        asked for with `output_hidden_states` / `output_attentions`).
    qformer_outputs (`BaseModelOutputWithPoolingAndCrossAttentions`): outputs of the Q-Former over the queries.
    language_model_outputs (`CausalLMOutputWithPast` or `Seq2SeqLMOutput`): outputs of the language model (its
        hidden states, attentions and cache).
    """

    loss: torch.FloatTensor | None = None
    loss_lm: torch.FloatTensor | None = None
    loss_itc_text: torch.FloatTensor | None = None
    loss_itc_answer: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    image_tokens: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    language_model_outputs: CausalLMOutputWithPast | Seq2SeqLMOutput | None = None

    def to_tuple(self) -> tuple:
        nested = ("vision_outputs", "qformer_outputs", "language_model_outputs")
        return tuple(getattr(self, key).to_tuple() if key in nested else self[key] for key in self.keys())

    # The language model's cache, hidden states and attentions, read where a causal LM output has them (generation
    # with GenerationMixin); they are stored once, in `language_model_outputs`.
    @property
    def cache(self):
        return getattr(self.language_model_outputs, "cache", None)

    @property
    def hidden_states(self) -> tuple[torch.FloatTensor, ...] | None:
        return getattr(self.language_model_outputs, "hidden_states", None)

    @property
    def attentions(self) -> tuple[torch.FloatTensor, ...] | None:
        return getattr(self.language_model_outputs, "attentions", None)


class MedBlipVisionEmbeddings(nn.Module):
    """Linear embedding of flattened 3D patches (= Conv3d with kernel = stride = patch), CLS token, 3D positions."""

    def __init__(self, config: MedBlipVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))

    def interpolate_pos_encoding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position embedding resized (trilinear) from the configured patch grid to `grid`: `(1, 1 + N, hidden)`."""
        if list(grid) == self.config.grid_size:
            return self.position_embedding
        class_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        gd, gh, gw = self.config.grid_size
        patch_pos = patch_pos.reshape(1, gd, gh, gw, -1).permute(0, 4, 1, 2, 3)  # (1, C, gd, gh, gw)
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="trilinear", align_corners=False)
        return torch.cat([class_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, pixel_values: torch.Tensor, patch_grid: torch.Tensor | None = None) -> torch.Tensor:
        """`pixel_values` `(B, N, C*pd*ph*pw)` -> `(B, 1 + N, hidden)`."""
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != self.config.patch_dim:
            raise ValueError(
                f"pixel_values must be (batch, num_patches, {self.config.patch_dim}) patches, got "
                f"{tuple(pixel_values.shape)}; cut volumes with MedBlipImageProcessor"
            )
        batch_size, num_patches, _ = pixel_values.shape
        if num_patches == self.config.num_patches:
            grid = self.config.grid_size
        elif patch_grid is None:
            raise ValueError(f"got {num_patches} patches, configured {self.config.num_patches}: pass patch_grid")
        else:
            grids = torch.unique(patch_grid, dim=0)
            if grids.shape[0] != 1 or int(grids[0].prod()) != num_patches:
                raise ValueError(f"patch_grid {patch_grid.tolist()} does not match {num_patches} patches per volume")
            grid = grids[0].tolist()
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        return embeddings + self.interpolate_pos_encoding(grid).to(target_dtype)


class MedBlipPreTrainedModel(PreTrainedModel):
    config: MedBlipConfig
    base_model_prefix = "medblip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _supports_sdpa = True
    _supports_flash_attn = False  # the Q-Former is kept in fp32, which blocks flash attention dispatch
    _supports_flex_attn = False  # GPT-2 refuses flex attention; on CPU it runs no backward pass
    # MedBLIP's own blocks; post_init adds the language model's (GPT2Block, T5Block, LlamaDecoderLayer, ...)
    _no_split_modules = ["MedBlipVisionEmbeddings", "Blip2EncoderLayer", "Blip2TextEmbeddings", "Blip2QFormerLayer"]

    def post_init(self):
        """transformers' `post_init`, then `_no_split_modules` narrowed to the blocks this model contains.

        transformers merges every child's list, BLIP-2's included (`Blip2VisionEmbeddings`, `T5Block`,
        `OPTDecoderLayer`, which MedBLIP may not build, and attention modules nested in the blocks). Accelerate's FSDP
        auto-wrap and `device_map="auto"` read this list; a class the model lacks makes older Accelerate raise.
        The `_keep_in_fp32_modules` lists need no narrowing: they are merged from the children actually built (a T5
        LM adds `wo`).
        """
        super().post_init()
        language_model = getattr(self, "language_model", None)
        wanted = {*type(self)._no_split_modules, *(getattr(language_model, "_no_split_modules", None) or ())}
        self._no_split_modules = sorted(wanted & {type(module).__name__ for module in self.modules()})

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MedBlipVisionEmbeddings):
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
        elif isinstance(module, MedBlipForConditionalGeneration):
            init.normal_(module.query_tokens, mean=0.0, std=std)
            init.constant_(module.temperature, module.config.itc_temperature_init)
        elif isinstance(module, Blip2TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))


class MedBlipVisionModel(MedBlipPreTrainedModel):
    """The 3D vision encoder; parameter names match [`Blip2VisionModel`] except the (linear) patch embedding.

    Example:

    ```python
    >>> import torch
    >>> from configuration_medblip import MedBlipConfig
    >>> from modeling_medblip import MedBlipVisionModel
    >>> config = MedBlipConfig.from_preset("tiny").vision_config
    >>> model = MedBlipVisionModel(config)
    >>> model(torch.rand(2, config.num_patches, config.patch_dim)).last_hidden_state.shape
    torch.Size([2, 65, 32])
    ```"""

    config: MedBlipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _can_record_outputs = {"hidden_states": Blip2EncoderLayer, "attentions": Blip2Attention}

    def __init__(self, config: MedBlipVisionConfig):
        super().__init__(config)
        self.embeddings = MedBlipVisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)  # hidden_states[-1] is the last block's, before post_layernorm
    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_grid: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        pixel_values (`(batch_size, num_patches, C*pd*ph*pw)`): volume patches from `MedBlipImageProcessor`.
        patch_grid (`(batch_size, 3)`): patch grid of each volume; needed when it differs from the configured one.

        `output_hidden_states=True` adds `hidden_states` (the embeddings and each block's output, `num_hidden_layers
        + 1` tensors `(batch_size, 1 + num_patches, hidden_size)`), `output_attentions=True` adds `attentions` (one
        `(batch_size, num_heads, 1 + num_patches, 1 + num_patches)` per block; eager attention only).
        """
        hidden_states = self.embeddings(pixel_values, patch_grid)  # (B, 1 + N, hidden)
        hidden_states = self.encoder(inputs_embeds=hidden_states, **kwargs).last_hidden_state
        last_hidden_state = self.post_layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=last_hidden_state[:, 0])

    def get_input_embeddings(self):
        return self.embeddings


class MedBlipForConditionalGeneration(MedBlipPreTrainedModel, GenerationMixin):
    """MedBLIP: a 3D vision encoder, a Q-Former with learned queries, and a language model fed with image tokens.

    Example:

    ```python
    >>> import torch
    >>> from configuration_medblip import MedBlipConfig
    >>> from modeling_medblip import MedBlipForConditionalGeneration
    >>> config = MedBlipConfig.from_preset("tiny")
    >>> model = MedBlipForConditionalGeneration(config)
    >>> vision = config.vision_config
    >>> prompt = torch.tensor([[config.image_token_index] * config.num_query_tokens + [464, 3280, 318]])
    >>> out = model(pixel_values=torch.rand(1, vision.num_patches, vision.patch_dim), input_ids=prompt)
    >>> out.logits.shape
    torch.Size([1, 7, 50304])
    ```"""

    # fp32 whatever dtype the model is loaded in (fp16 and bf16): the small trainable bridge keeps full precision
    _keep_in_fp32_modules_strict = ["query_tokens", "qformer"]
    # forward checks the `<image>` counts and de-duplicates answers (torch.unique): data-dependent, graph breaks
    _can_compile_fullgraph = False
    # entry points besides `forward` that read parameters: under FSDP2 each must gather them (see
    # `torch.distributed.fsdp.register_fsdp_forward_method`)
    _fsdp_forward_methods = ("generate", "score_candidates", "get_query_cross_attentions")

    def __init__(self, config: MedBlipConfig):
        super().__init__(config)
        qformer_width = config.qformer_config.hidden_size
        self.vision_model = MedBlipVisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)  # Q-Former text path (contrastive losses)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.vision_projection = nn.Linear(qformer_width, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer_width, config.image_text_hidden_size)
        # shape (1,), not (): FSDP2 (`fully_shard`) refuses scalar parameters
        self.temperature = nn.Parameter(torch.tensor([config.itc_temperature_init]))
        self.language_projection = nn.Linear(qformer_width, config.text_config.hidden_size)
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.post_init()
        if config.lora_rank > 0:  # after post_init: peft's own initialisation (lora_B = 0, the identity) stands
            self._add_lora_adapters()
        self.apply_freezing()

    @property
    def main_input_name(self) -> str:
        # Decoder-only LMs generate through GenerationMixin from the prompt ids (as LLaVA); encoder-decoder LMs
        # through the LM's own generate from the prompt embeddings, the volumes being the main input (as BLIP-2).
        return "input_ids" if self.config.use_decoder_only_language_model else "pixel_values"

    # ------------------------------------------------------------------ setup helpers
    def _add_lora_adapters(self):
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise ImportError("lora_rank > 0 needs the `peft` package: pip install peft") from error
        lora_config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=self.config.lora_target_modules,
        )
        if lora_config.target_modules is None:  # peft knows the usual attention projections per model type
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

            lora_config.target_modules = targets[self.config.text_config.model_type]
        inject_adapter_in_model(lora_config, self.language_model)

    def apply_freezing(self):
        """Freeze the ViT blocks and/or the LM as the config says; everything else trains. Idempotent.

        `from_pretrained` recreates parameters with gradients on, so it calls this again after loading.
        """
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        if self.config.freeze_vision_encoder:
            self.vision_model.encoder.requires_grad_(False)
        if self.config.freeze_language_model:
            for name, parameter in self.language_model.named_parameters():
                parameter.requires_grad_("lora_" in name)
        return self

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True returns a tuple
        loaded.apply_freezing()
        return model

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality=None):
        return self.language_model.get_encoder() if modality is None else super().get_encoder(modality=modality)

    # ------------------------------------------------------------------ features
    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, patch_grid: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple | BaseModelOutputWithVisionQformerOutputs:
        """Volume patches -> vision encoder -> Q-Former -> image tokens, as in BLIP-2.

        Returns `last_hidden_state` (vision encoder output `(B, 1 + N, vision_hidden)`), `pooler_output` (the image
        tokens written into the `<image>` slots, `(B, Q, lm_hidden)`), the vision encoder's `hidden_states` and
        `attentions` when asked for, `vision_outputs` and `qformer_outputs` (query outputs `(B, Q, qformer_hidden)`
        in its `last_hidden_state`). `output_attentions` / `output_hidden_states` reach both encoders.
        """
        vision_outputs = self.vision_model(pixel_values, patch_grid, return_dict=True, **kwargs)
        qformer_outputs = self._query_outputs(vision_outputs.last_hidden_state, **kwargs)
        query_output = qformer_outputs.last_hidden_state.to(vision_outputs.last_hidden_state.dtype)  # Q-Former: fp32
        return BaseModelOutputWithVisionQformerOutputs(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.language_projection(query_output.to(self.language_projection.weight.dtype)),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )

    def _image_tokens(self, pixel_values: torch.Tensor | None, patch_grid: torch.Tensor | None) -> torch.Tensor | None:
        """The image tokens `(B, Q, lm_hidden)` of the volumes, or None without volumes."""
        if pixel_values is None:
            return None
        return self.get_image_features(pixel_values, patch_grid, return_dict=True).pooler_output

    def _query_outputs(self, image_embeds: torch.Tensor, **kwargs) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """The learned queries read the vision encoder output `(B, 1 + N, vision_hidden)` through the Q-Former."""
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            return_dict=True,
            **kwargs,
        )

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple | BaseModelOutputWithPooling:
        """BERT-tokenised text through the Q-Former text path: `last_hidden_state` `(B, L, qformer_hidden)` and, as
        `pooler_output`, the normalized contrastive embedding of its CLS token `(B, image_text_hidden_size)`."""
        text_embeds = self.embeddings(input_ids=input_ids)
        text_outputs = self.qformer(
            query_embeds=text_embeds, query_length=0, attention_mask=attention_mask, return_dict=True, **kwargs
        )
        cls_state = text_outputs.last_hidden_state[:, 0, :]
        text_features = self.text_projection(cls_state.to(self.text_projection.weight.dtype))
        return BaseModelOutputWithPooling(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=F.normalize(text_features, dim=-1),
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
        )

    def get_query_cross_attentions(self, pixel_values: torch.Tensor, patch_grid: torch.Tensor | None = None):
        """Where the queries look: cross-attention averaged over layers and heads, CLS dropped, `(B, Q, N)`."""
        image_embeds = self.vision_model(pixel_values, patch_grid, return_dict=True).last_hidden_state
        implementation = self.qformer.config._attn_implementation
        self.qformer.set_attn_implementation("eager")  # fused kernels do not return attention weights
        try:
            cross_attentions = self._query_outputs(image_embeds, output_attentions=True).cross_attentions
        finally:
            self.qformer.set_attn_implementation(implementation)
        attention = torch.stack([layer.mean(dim=1) for layer in cross_attentions]).mean(dim=0)  # (B, Q, 1 + N)
        return attention[:, :, 1:]

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, num_images: int, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Boolean mask `(B, L)` of `<image>` tokens, found in `input_ids` or, without them, as the `<image>` token's
        embedding in `inputs_embeds`.

        Without volumes no row may hold one. With volumes each row holds `num_query_tokens` of them, or none: that
        row's volume is withheld from the LM (training with `image_dropout`; the contrastive terms still use it).
        """
        if input_ids is not None:
            mask = input_ids == self.config.image_token_index
        else:
            image_token = torch.tensor(self.config.image_token_index, device=inputs_embeds.device)
            mask = (inputs_embeds == self.get_input_embeddings()(image_token)).all(dim=-1)
        counts = mask.sum(dim=1)
        expected = self.config.num_query_tokens
        if num_images and ((counts != expected) & (counts != 0)).any():
            raise ValueError(
                f"each prompt needs exactly {expected} <image> tokens (id {self.config.image_token_index}) for its "
                f"volume, or 0 to withhold it, got {counts.tolist()}"
            )
        if not num_images and (counts != 0).any():
            raise ValueError(
                f"each prompt needs exactly 0 <image> tokens (id {self.config.image_token_index}) when no volume is "
                f"given, got {counts.tolist()}"
            )
        return mask

    def _embed_prompt(
        self,
        input_ids: torch.LongTensor | None,
        image_tokens: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM input embeddings (of `input_ids`, or `inputs_embeds` as given) with the image tokens `(B, Q, lm_hidden)`
        written into the `<image>` placeholder slots."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("input_ids (the LM prompt) or inputs_embeds is required; build it with MedBlipProcessor")
        num_images = 0 if image_tokens is None else len(image_tokens)
        mask = self.get_placeholder_mask(input_ids, num_images, inputs_embeds)
        if inputs_embeds is None:
            safe_ids = input_ids.masked_fill(mask, 0)  # the placeholder id may lie outside a frozen vocabulary
            inputs_embeds = self.get_input_embeddings()(safe_ids)
        if image_tokens is not None:
            image_tokens = image_tokens.to(inputs_embeds.device, inputs_embeds.dtype)
            shown = mask.any(dim=1)  # rows whose volume is withheld take no image tokens
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_tokens[shown])
        return inputs_embeds

    def _decoder_only_lm(self, inputs_embeds, attention_mask, **kwargs):
        if attention_mask is None:  # it covers the cached tokens too
            cache = kwargs.get("cache")
            length = inputs_embeds.shape[1] + (cache.get_seq_length() if cache is not None else 0)
            attention_mask = torch.ones(inputs_embeds.shape[0], length, dtype=torch.long, device=inputs_embeds.device)
        # Prompts are left-padded: positions count real tokens only, as generate() does; the new embeddings take the
        # last positions.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        kwargs.setdefault("position_ids", position_ids)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True,
                                   **kwargs)

    # ------------------------------------------------------------------ losses
    def _decoder_only_loss(self, logits: torch.Tensor, labels: torch.LongTensor, **kwargs) -> torch.Tensor:
        """LM loss on the answer: `labels` aligned with the prompt, cut to the positions that kept logits."""
        kept_labels = labels[:, -logits.shape[1] :].to(logits.device)
        return self.loss_function(logits=logits, labels=kept_labels, vocab_size=logits.shape[-1], **kwargs)

    def _image_features_for_contrast(self, query_output: torch.Tensor) -> torch.Tensor:
        """Normalized contrastive embedding of each query `(B, Q, image_text_hidden_size)`."""
        return F.normalize(self.vision_projection(query_output.to(self.vision_projection.weight.dtype)), dim=-1)

    def contrastive_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """`(B_img, B_txt)` similarities of normalized query embeddings `(B_img, Q, D)` (see
        `_image_features_for_contrast`) and text embeddings `(B_txt, D)`, over the clamped temperature."""
        temperature = self.temperature.clamp(self.config.itc_temperature_min, self.config.itc_temperature_max)
        return image_text_similarity(image_features, text_features, temperature)

    def contrastive_losses(
        self,
        query_output: torch.Tensor,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        qformer_answer_input_ids: torch.LongTensor | None = None,
        qformer_answer_attention_mask: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`(loss_itc_text, loss_itc_answer, logits_per_image)` from the query outputs `(B, Q, qformer_hidden)`.

        A term with weight 0 (or without its text) is not computed: the Q-Former text passes are a large share of a
        step. In distributed training both terms compare every process's volumes with every process's texts.
        """
        gather = gather_with_grad if self.training else (lambda tensor: tensor)
        smoothing = self.config.itc_label_smoothing
        loss_itc_text = loss_itc_answer = logits_per_image = None
        image_features = None
        if qformer_input_ids is not None and self.config.loss_weight_itc_text > 0:
            image_features = gather(self._image_features_for_contrast(query_output))
            text_outputs = self.get_text_features(qformer_input_ids, qformer_attention_mask, return_dict=True)
            text_features = gather(text_outputs.pooler_output)
            logits_per_image = self.contrastive_logits(image_features, text_features)
            positives = torch.eye(len(image_features), dtype=torch.bool, device=query_output.device)
            loss_itc_text = contrastive_loss(logits_per_image, positives, smoothing)
        if qformer_answer_input_ids is not None and self.config.loss_weight_itc_answer > 0:
            # a batch holds a few distinct answers: encode each once, then gather one row per volume
            answer_mask = qformer_answer_attention_mask
            if answer_mask is None:
                answer_mask = torch.ones_like(qformer_answer_input_ids)
            rows = gather_token_rows(qformer_answer_input_ids, answer_mask, gather=self.training)
            distinct, answer_index = torch.unique(rows, dim=0, return_inverse=True)
            length = rows.shape[1] // 2
            answer_features = self.get_text_features(distinct[:, :length], distinct[:, length:], return_dict=True)
            answer_features = answer_features.pooler_output[answer_index]
            if image_features is None:
                image_features = gather(self._image_features_for_contrast(query_output))
            similarity = self.contrastive_logits(image_features, answer_features)
            loss_itc_answer = contrastive_loss(similarity, answer_index[:, None] == answer_index[None, :], smoothing)
        return loss_itc_text, loss_itc_answer, logits_per_image

    # ------------------------------------------------------------------ forward
    def _forward_defaults(self, kwargs: dict) -> dict:
        """Output flags set on this config hold for every part (each part reads its own sub-config); no LM cache in
        training (a cache serves decoding; kept in the output it would hold every layer's keys and values)."""
        defaults = {flag: True for flag in _OUTPUT_FLAGS if getattr(self.config, flag, False)}
        if self.training:
            defaults["use_cache"] = False
        return {**defaults, **kwargs}

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        patch_grid: torch.LongTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.LongTensor | None = None,
        qformer_answer_input_ids: torch.LongTensor | None = None,
        qformer_answer_attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | MedBlipForConditionalGenerationModelOutput:
        r"""
        pixel_values (`(batch_size, num_patches, C*pd*ph*pw)`): volume patches from `MedBlipImageProcessor`;
            `None` for text-only input (the prompt then holds no `<image>` tokens).
        input_ids, attention_mask (`(batch_size, sequence_length)`): LM prompt with `num_query_tokens` `<image>`
            placeholders per volume (left-padded for decoder-only LMs); for decoder-only LMs it also holds the answer.
        labels (`(batch_size, label_length)`): answer tokens + end token, -100 elsewhere (decoder-only: aligned with
            `input_ids`; encoder-decoder: the decoder targets).
        patch_grid (`(batch_size, 3)`): patch grid of each volume; needed when it differs from the configured one.
        qformer_input_ids, qformer_attention_mask: BERT-tokenised health-record text (image-text contrastive loss).
        qformer_answer_input_ids, qformer_answer_attention_mask: BERT-tokenised "question answer" text
            (image-answer contrastive loss; identical rows are positives of each other).
        inputs_embeds (`(batch_size, sequence_length, text_hidden_size)`): the prompt's LM embeddings instead of
            `input_ids` (the `<image>` slots are found by the `<image>` token's embedding).
        logits_to_keep (`int`, defaults to 0 = all): decoder-only LMs compute logits (and the LM loss) on the last
            `logits_to_keep` positions only; answers sit at the end of left-padded rows, so training needs just
            `answer length + 1` of them, which spares the vocabulary projection of the whole prompt.
        kwargs: `output_attentions` and `output_hidden_states` reach the vision encoder, the Q-Former and the LM;
            anything else (`use_cache`, `cache`, ...) goes to the LM. `return_dict=False` returns a tuple.
        """
        kwargs = self._forward_defaults(kwargs)
        output_flags = {key: kwargs[key] for key in _OUTPUT_FLAGS if key in kwargs}
        # step 1: volume -> queries -> image tokens
        image_outputs = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, patch_grid, return_dict=True, **output_flags)
        # step 2: contrastive losses in the Q-Former space
        loss_itc_text = loss_itc_answer = logits_per_image = None
        if image_outputs is not None:
            loss_itc_text, loss_itc_answer, logits_per_image = self.contrastive_losses(
                image_outputs.qformer_outputs.last_hidden_state, qformer_input_ids, qformer_attention_mask,
                qformer_answer_input_ids, qformer_answer_attention_mask,
            )
        # step 3: the LM, with image tokens in the placeholder slots
        image_tokens = None if image_outputs is None else image_outputs.pooler_output
        inputs_embeds = self._embed_prompt(input_ids, image_tokens, inputs_embeds)
        if self.config.use_decoder_only_language_model:
            lm_outputs = self._decoder_only_lm(inputs_embeds, attention_mask, logits_to_keep=logits_to_keep, **kwargs)
            loss_lm = None if labels is None else self._decoder_only_loss(lm_outputs.logits, labels, **kwargs)
        else:
            lm_outputs = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, labels=labels, return_dict=True, **kwargs,
            )
            loss_lm = lm_outputs.loss
        weighted = [
            (loss_lm, self.config.loss_weight_lm),
            (loss_itc_text, self.config.loss_weight_itc_text),
            (loss_itc_answer, self.config.loss_weight_itc_answer),
        ]
        present = [weight * term for term, weight in weighted if term is not None]
        return MedBlipForConditionalGenerationModelOutput(
            loss=torch.stack(present).sum() if present else None,
            loss_lm=loss_lm, loss_itc_text=loss_itc_text, loss_itc_answer=loss_itc_answer,
            logits=lm_outputs.logits,
            logits_per_image=logits_per_image,
            image_tokens=image_tokens,
            vision_outputs=None if image_outputs is None else image_outputs.vision_outputs,
            qformer_outputs=None if image_outputs is None else image_outputs.qformer_outputs,
            language_model_outputs=lm_outputs,
        )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        patch_grid: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | ModelOutput:
        """Generate answers after the prompts, the volumes' image tokens in the `<image>` slots.

        Returns, as BLIP-2 and `GenerationMixin` do: for a decoder-only LM the prompt `input_ids` followed by the new
        tokens, `(batch_size, prompt_length + new_tokens)` (only the new tokens when the prompt comes as
        `inputs_embeds` alone); for an encoder-decoder LM the decoder tokens, starting with the decoder start token.
        `MedBlipProcessor.post_process_image_text_to_text(ids, input_ids=prompt)` decodes the answers alone. With
        `return_dict_in_generate=True`, a `GenerateOutput`.

        `inputs_embeds` (`(batch_size, sequence_length, text_hidden_size)`) replaces the embedding of `input_ids`;
        with `pixel_values`, the image tokens go into its `<image>` slots (found by the `<image>` token's
        embedding). Settings come from `self.generation_config`, overridden by `generate_kwargs`; greedy, sampling,
        beam search, with or without cache, and assisted decoding (`assistant_model`: another MedBLIP model of the
        same LM vocabulary) work as for any transformers model.
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("input_ids (the prompt) or inputs_embeds is required; build it with MedBlipProcessor")
        if self.config.use_decoder_only_language_model:
            # GenerationMixin drives this model: the prefill step gets the volumes (prepare_inputs_for_generation)
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                      "pixel_values": pixel_values, "patch_grid": patch_grid}
            return super().generate(**{k: v for k, v in inputs.items() if v is not None}, **generate_kwargs)
        # encoder-decoder: the LM's generate, from the prompt embeddings holding the image tokens
        image_tokens = self._image_tokens(pixel_values, patch_grid)
        if image_tokens is not None or inputs_embeds is None:
            inputs_embeds = self._embed_prompt(input_ids, image_tokens, inputs_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        generation_config.update(**{k: v for k, v in generate_kwargs.items() if hasattr(generation_config, k)})
        lm_kwargs = {k: v for k, v in generate_kwargs.items() if not hasattr(generation_config, k)}
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=generation_config, **lm_kwargs
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_grid: torch.LongTensor | None = None,
        **kwargs,
    ) -> dict:
        """GenerationMixin's inputs of one decoding step (decoder-only LMs); the volumes go only to a step that holds
        the prompt's `<image>` slots: the prefill (empty cache), or every step without a cache."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, inputs_embeds=inputs_embeds,
                                                             **kwargs)
        if cache is None or cache.get_seq_length() == 0:
            model_inputs.update(pixel_values=pixel_values, patch_grid=patch_grid)
        return model_inputs

    @torch.no_grad()
    def score_candidates(
        self,
        input_ids: torch.LongTensor,
        candidate_input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        candidate_attention_mask: torch.LongTensor | None = None,
        patch_grid: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Log-likelihood of each candidate answer after each prompt, `(batch_size, num_candidates)`.

        Each volume is encoded once and each prompt runs through the LM once: a decoder-only LM reuses the prompt's
        key/value cache for the K candidates (`(K, candidate_length)`, right-padded, ending with the end token), an
        encoder-decoder LM reuses the encoder output. Returns summed token log-probabilities.
        """
        batch_size, num_candidates = input_ids.shape[0], candidate_input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if candidate_attention_mask is None:
            candidate_attention_mask = torch.ones_like(candidate_input_ids)
        image_tokens = self._image_tokens(pixel_values, patch_grid)
        inputs_embeds = self._embed_prompt(input_ids, image_tokens)
        # rows (B*K, ...) are prompt-major: row b*K + k is prompt b with candidate k
        targets = candidate_input_ids.repeat(batch_size, 1)  # (B*K, Lc)
        target_mask = candidate_attention_mask.repeat(batch_size, 1)
        expanded_mask = attention_mask.repeat_interleave(num_candidates, dim=0)
        if self.config.use_decoder_only_language_model:
            prompt = self._decoder_only_lm(inputs_embeds, attention_mask, use_cache=True, logits_to_keep=1)
            cache = prompt.cache
            cache.batch_repeat_interleave(num_candidates)
            full_mask = torch.cat([expanded_mask, target_mask], dim=1)
            position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, input_ids.shape[1] :]
            continuation = self.language_model(
                inputs_embeds=self.get_input_embeddings()(targets), attention_mask=full_mask,
                position_ids=position_ids, cache=cache, use_cache=True,
            )
            # the prompt's last logit predicts candidate token 0, candidate position t predicts token t + 1
            first = prompt.logits[:, -1:].repeat_interleave(num_candidates, dim=0)
            logits = torch.cat([first, continuation.logits[:, :-1]], dim=1)
        else:
            encoder = self.language_model.get_encoder()
            hidden = encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            hidden = hidden.repeat_interleave(num_candidates, dim=0)
            decoder_input_ids = self.language_model._shift_right(targets.masked_fill(target_mask == 0, -100))
            logits = self.language_model(
                encoder_outputs=(hidden,), attention_mask=expanded_mask, decoder_input_ids=decoder_input_ids
            ).logits
        token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (token_log_probs * target_mask).sum(dim=-1).view(batch_size, num_candidates)


MedBlipVisionModel.register_for_auto_class("AutoModel")
MedBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MedBlipForConditionalGeneration",
    "MedBlipForConditionalGenerationModelOutput",
    "MedBlipPreTrainedModel",
    "MedBlipVisionModel",
]
