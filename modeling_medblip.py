"""MedBLIP: 3D MRI patches -> frozen 2D-pretrained ViT blocks -> Q-Former -> image tokens of a (frozen) language model."""

import copy
import math
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
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder, Blip2TextEmbeddings
from transformers.utils import ModelOutput, logging


try:
    from .configuration_medblip import MedBlipConfig, MedBlipVisionConfig
except ImportError:
    from configuration_medblip import MedBlipConfig, MedBlipVisionConfig


logger = logging.get_logger(__name__)


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
    image_embeds (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, text_hidden_size)`): the image tokens.
    """

    loss: torch.FloatTensor | None = None
    loss_lm: torch.FloatTensor | None = None
    loss_itc_text: torch.FloatTensor | None = None
    loss_itc_answer: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


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
    _supports_flex_attn = True
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerLayer", "MedBlipVisionEmbeddings", "Blip2TextEmbeddings"]

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

    def __init__(self, config: MedBlipVisionConfig):
        super().__init__(config)
        self.embeddings = MedBlipVisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, patch_grid: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
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

    main_input_name = "pixel_values"
    _keep_in_fp32_modules = ["query_tokens", "qformer"]

    def __init__(self, config: MedBlipConfig):
        super().__init__(config)
        qformer_width = config.qformer_config.hidden_size
        self.vision_model = MedBlipVisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)  # Q-Former text path (contrastive losses)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.vision_projection = nn.Linear(qformer_width, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer_width, config.image_text_hidden_size)
        self.temperature = nn.Parameter(torch.tensor(config.itc_temperature_init))
        self.language_projection = nn.Linear(qformer_width, config.text_config.hidden_size)
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        if config.lora_rank > 0:
            self._add_lora_adapters()
        self.post_init()
        if config.lora_rank > 0:  # post_init re-drew every Linear; LoRA must start as the identity
            with torch.no_grad():
                for name, parameter in self.language_model.named_parameters():
                    if "lora_B" in name:
                        parameter.zero_()
        self.apply_freezing()

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

    def save_pretrained(self, save_directory, **kwargs):
        # `register_for_auto_class` records one auto class; AutoModel must resolve to this head too.
        module = self.__class__.__module__.split(".")[-1]
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{module}.{self.__class__.__name__}"}
        return super().save_pretrained(save_directory, **kwargs)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_encoder(self, modality=None):
        return self.language_model.get_encoder() if modality is None else super().get_encoder(modality=modality)

    # ------------------------------------------------------------------ features
    def get_image_features(
        self, pixel_values: torch.Tensor, patch_grid: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Volume patches -> (query outputs `(B, Q, qformer_hidden)`, image tokens `(B, Q, lm_hidden)`,
        Q-Former cross-attentions or None)."""
        image_embeds = self.vision_model(pixel_values, patch_grid).last_hidden_state  # (B, 1 + N, vision_hidden)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        qformer_outputs = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            output_attentions=output_attentions,
            return_dict=True,
        )
        query_output = qformer_outputs.last_hidden_state.to(image_embeds.dtype)  # the Q-Former runs in fp32
        image_tokens = self.language_projection(query_output.to(self.language_projection.weight.dtype))
        return query_output, image_tokens, (qformer_outputs.cross_attentions if output_attentions else None)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """BERT-tokenised text -> normalised contrastive embedding `(B, image_text_hidden_size)` from its CLS token."""
        text_embeds = self.embeddings(input_ids=input_ids)
        text_output = self.qformer(query_embeds=text_embeds, query_length=0, attention_mask=attention_mask)
        cls_state = text_output.last_hidden_state[:, 0, :]
        return F.normalize(self.text_projection(cls_state.to(self.text_projection.weight.dtype)), dim=-1)

    def get_query_cross_attentions(self, pixel_values: torch.Tensor, patch_grid: torch.Tensor | None = None):
        """Where the queries look: cross-attention averaged over layers and heads, CLS dropped, `(B, Q, N)`."""
        implementation = self.qformer.config._attn_implementation
        self.qformer.set_attn_implementation("eager")  # fused kernels do not return attention weights
        try:
            _, _, cross_attentions = self.get_image_features(pixel_values, patch_grid, output_attentions=True)
        finally:
            self.qformer.set_attn_implementation(implementation)
        attention = torch.stack([layer.mean(dim=1) for layer in cross_attentions]).mean(dim=0)  # (B, Q, 1 + N)
        return attention[:, :, 1:]

    def get_placeholder_mask(self, input_ids: torch.LongTensor, num_images: int) -> torch.Tensor:
        """Boolean mask `(B, L)` of `<image>` tokens.

        Without volumes no row may hold one. With volumes each row holds `num_query_tokens` of them, or none: that
        row's volume is withheld from the LM (training with `image_dropout`; the contrastive terms still use it).
        """
        mask = input_ids == self.config.image_token_index
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
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        patch_grid: torch.Tensor | None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM input embeddings with the image tokens written into the `<image>` placeholder slots."""
        if image_tokens is None and pixel_values is not None:
            image_tokens = self.get_image_features(pixel_values, patch_grid)[1]
        mask = self.get_placeholder_mask(input_ids, num_images=0 if image_tokens is None else len(image_tokens))
        safe_ids = input_ids.masked_fill(mask, 0)  # the placeholder id may lie outside a frozen vocabulary
        inputs_embeds = self.get_input_embeddings()(safe_ids)
        if image_tokens is not None:
            image_tokens = image_tokens.to(inputs_embeds.device, inputs_embeds.dtype)
            shown = mask.any(dim=1)  # rows whose volume is withheld take no image tokens
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_tokens[shown])
        return inputs_embeds

    def _decoder_only_lm(self, inputs_embeds, attention_mask, **kwargs):
        # Prompts are left-padded: positions count real tokens only, as generate() does.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    # ------------------------------------------------------------------ losses
    def _contrastive_loss(self, similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Symmetric soft-target cross-entropy: each row's target is uniform over its positives, then smoothed."""
        smoothing = self.config.itc_label_smoothing

        def one_direction(logits, positive_mask):
            target = positive_mask.float() / positive_mask.float().sum(dim=1, keepdim=True)
            target = (1 - smoothing) * target + smoothing / logits.shape[1]
            return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

        return (one_direction(similarity, positives) + one_direction(similarity.t(), positives.t())) / 2

    def _distributed(self) -> bool:
        """Training under torch.distributed with several processes: the contrastive losses use the global batch."""
        return (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)  # fmt: skip

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, concatenated in rank order, with gradients flowing back to each process's own
        rows (as BLIP-2 does); `tensor` itself outside distributed training. Per-process batches must be equal."""
        if not self._distributed():
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)

    def _gather_answers(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor) -> torch.Tensor:
        """`(global_batch, 2 * length)`: every process's answer ids and mask, right-padded to a common length."""
        rows = torch.cat([input_ids, attention_mask.to(input_ids)], 1)
        if not self._distributed():
            return rows
        length = torch.tensor(input_ids.shape[1], device=input_ids.device)
        torch.distributed.all_reduce(length, op=torch.distributed.ReduceOp.MAX)
        pad = int(length) - input_ids.shape[1]
        rows = torch.cat([F.pad(input_ids, (0, pad)), F.pad(attention_mask.to(input_ids), (0, pad))], 1)
        gathered = [torch.empty_like(rows) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, rows)
        return torch.cat(gathered, dim=0)

    def _image_text_similarity(self, query_output: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """`(B_img, B_txt)`: best-matching query per pair (as in BLIP-2), divided by the clamped temperature."""
        image_features = F.normalize(self.vision_projection(query_output.to(self.vision_projection.weight.dtype)), dim=-1)
        similarity = torch.einsum("iqd,td->itq", image_features, text_features).amax(dim=-1)
        temperature = self.temperature.clamp(self.config.itc_temperature_min, self.config.itc_temperature_max)
        return similarity / temperature

    # ------------------------------------------------------------------ forward
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
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MedBlipForConditionalGenerationModelOutput:
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
        logits_to_keep (`int`, defaults to 0 = all): decoder-only LMs compute logits (and the LM loss) on the last
            `logits_to_keep` positions only; answers sit at the end of left-padded rows, so training needs just
            `answer length + 1` of them, which spares the vocabulary projection of the whole prompt.
        """
        if input_ids is None:
            raise ValueError("input_ids (the LM prompt) is required; build it with MedBlipProcessor")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # step 1: volume -> queries -> image tokens
        query_output = image_tokens = None
        if pixel_values is not None:
            query_output, image_tokens, _ = self.get_image_features(pixel_values, patch_grid)
        # step 2: contrastive losses in the Q-Former space
        loss_itc_text = loss_itc_answer = logits_per_image = None
        # a term with weight 0 is not computed at all (the Q-Former text passes are a large share of a step);
        # in distributed training both terms compare every process's volumes with every process's texts
        all_queries = None
        if query_output is not None and qformer_input_ids is not None and self.config.loss_weight_itc_text > 0:
            all_queries = self._gather(query_output)
            logits_per_image = self._image_text_similarity(
                all_queries, self._gather(self.get_text_features(qformer_input_ids, qformer_attention_mask))
            )
            loss_itc_text = self._contrastive_loss(logits_per_image, torch.eye(len(all_queries), dtype=torch.bool,
                                                                                device=query_output.device))
        if query_output is not None and qformer_answer_input_ids is not None and self.config.loss_weight_itc_answer > 0:
            # a batch holds a few distinct answers: encode each once, then gather one row per volume
            answer_mask = qformer_answer_attention_mask
            if answer_mask is None:
                answer_mask = torch.ones_like(qformer_answer_input_ids)
            answers = self._gather_answers(qformer_answer_input_ids, answer_mask)
            distinct, answer_index = torch.unique(answers, dim=0, return_inverse=True)
            length = answers.shape[1] // 2
            answer_features = self.get_text_features(distinct[:, :length], distinct[:, length:])[answer_index]
            all_queries = self._gather(query_output) if all_queries is None else all_queries
            similarity = self._image_text_similarity(all_queries, answer_features)
            loss_itc_answer = self._contrastive_loss(similarity, answer_index[:, None] == answer_index[None, :])
        # step 3: the LM, with image tokens in the placeholder slots
        inputs_embeds = self._embed_prompt(input_ids, None, None, image_tokens=image_tokens)
        loss_lm = None
        if self.config.use_decoder_only_language_model:
            lm_outputs = self._decoder_only_lm(inputs_embeds, attention_mask, logits_to_keep=logits_to_keep, **kwargs)
            logits = lm_outputs.logits
            if labels is not None:
                labels = labels[:, -logits.shape[1] :]
                loss_lm = self.loss_function(
                    logits=logits, labels=labels.to(logits.device), vocab_size=logits.shape[-1], **kwargs
                )
        else:
            lm_outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
                return_dict=True,
                **kwargs,
            )
            logits, loss_lm = lm_outputs.logits, lm_outputs.loss
        weighted = [
            (loss_lm, self.config.loss_weight_lm),
            (loss_itc_text, self.config.loss_weight_itc_text),
            (loss_itc_answer, self.config.loss_weight_itc_answer),
        ]
        present = [weight * term for term, weight in weighted if term is not None]
        return MedBlipForConditionalGenerationModelOutput(
            loss=torch.stack(present).sum() if present else None,
            loss_lm=loss_lm,
            loss_itc_text=loss_itc_text,
            loss_itc_answer=loss_itc_answer,
            logits=logits,
            logits_per_image=logits_per_image,
            image_embeds=image_tokens,
        )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        patch_grid: torch.LongTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Answer tokens generated after the prompt, `(batch_size, new_tokens)` (the prompt is not repeated).

        Settings come from `self.generation_config`, overridden by `generate_kwargs`.
        """
        if input_ids is None:
            raise ValueError("input_ids (the prompt) is required; build it with MedBlipProcessor")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds = self._embed_prompt(input_ids, pixel_values, patch_grid)
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        generation_config.update(**{k: v for k, v in generate_kwargs.items() if hasattr(generation_config, k)})
        lm_kwargs = {k: v for k, v in generate_kwargs.items() if not hasattr(generation_config, k)}
        return self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=generation_config, **lm_kwargs
        )

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
        inputs_embeds = self._embed_prompt(input_ids, pixel_values, patch_grid)
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
            )  # fmt: skip
            # the prompt's last logit predicts candidate token 0, candidate position t predicts token t + 1
            first = prompt.logits[:, -1:].repeat_interleave(num_candidates, dim=0)
            logits = torch.cat([first, continuation.logits[:, :-1]], dim=1)
        else:
            encoder_outputs = self.language_model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
            hidden = encoder_outputs.last_hidden_state.repeat_interleave(num_candidates, dim=0)
            decoder_input_ids = self.language_model._shift_right(targets.masked_fill(target_mask == 0, -100))
            logits = self.language_model(
                encoder_outputs=(hidden,), attention_mask=expanded_mask, decoder_input_ids=decoder_input_ids
            ).logits
        token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (token_log_probs * target_mask).sum(dim=-1).view(batch_size, num_candidates)

    # ------------------------------------------------------------------ weight initialisation from checkpoints
    def init_qformer_from_bert(self, bert) -> list[str]:
        """Copy a BERT checkpoint (folder, Hub id or `BertModel`) into the Q-Former and its text embeddings.

        Self-attention and FFN weights go to both the query and the text FFN; cross-attention stays as initialised.
        BERT adds the token-type-0 embedding to every token, so it is folded into the position embeddings.
        Returns the names of the Q-Former parameters that were written.
        """
        from transformers import AutoModel

        bert_model = AutoModel.from_pretrained(bert) if isinstance(bert, str) else bert
        source = bert_model.state_dict()
        qformer_config = self.config.qformer_config
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
            if getattr(bert_model.config, key) != getattr(qformer_config, key):
                raise ValueError(
                    f"BERT {key}={getattr(bert_model.config, key)} differs from the Q-Former's "
                    f"{getattr(qformer_config, key)}"
                )
        prefix = "" if "embeddings.word_embeddings.weight" in source else "bert."
        mapping = {
            "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
            "qformer.layernorm.weight": "embeddings.LayerNorm.weight",
            "qformer.layernorm.bias": "embeddings.LayerNorm.bias",
        }
        layer_parts = {
            "attention.attention.query": "attention.self.query", "attention.attention.key": "attention.self.key",
            "attention.attention.value": "attention.self.value", "attention.output.dense": "attention.output.dense",
            "attention.output.LayerNorm": "attention.output.LayerNorm", "intermediate.dense": "intermediate.dense",
            "intermediate_query.dense": "intermediate.dense", "output.dense": "output.dense",
            "output.LayerNorm": "output.LayerNorm", "output_query.dense": "output.dense",
            "output_query.LayerNorm": "output.LayerNorm",
        }  # fmt: skip
        for layer in range(qformer_config.num_hidden_layers):
            for ours, theirs in layer_parts.items():
                for kind in ("weight", "bias"):
                    mapping[f"qformer.encoder.layer.{layer}.{ours}.{kind}"] = f"encoder.layer.{layer}.{theirs}.{kind}"
        targets = dict(self.named_parameters())
        with torch.no_grad():
            for ours, theirs in mapping.items():
                targets[ours].copy_(source[prefix + theirs])
            positions = source[prefix + "embeddings.position_embeddings.weight"]
            token_type = source[prefix + "embeddings.token_type_embeddings.weight"][0]
            length = self.embeddings.position_embeddings.weight.shape[0]
            self.embeddings.position_embeddings.weight.copy_((positions + token_type)[:length])
        return sorted(mapping) + ["embeddings.position_embeddings.weight"]

    @classmethod
    def from_blip2_pretrained(
        cls,
        name_or_path: str,
        text_model: str | None = None,
        volume_size: list[int] | tuple[int, ...] = (224, 224, 224),
        depth_patch_size: int | None = None,
        **config_overrides,
    ) -> "MedBlipForConditionalGeneration":
        """Start from a Hugging Face BLIP-2 checkpoint (`Blip2ForConditionalGeneration`).

        Copies the ViT blocks, post-LayerNorm, CLS token, Q-Former, queries, language projection and LM; inflates
        the 2D patch embedding to 3D (RGB averaged, kernel spread evenly over `depth_patch_size` slices, so a volume
        constant along depth gives the 2D response) and the 2D position embedding to the 3D grid (repeated over
        depth). `text_model` (folder or Hub id) swaps in another LM and re-initialises the language projection.
        """
        from transformers import AutoModel, Blip2ForConditionalGeneration

        blip2 = Blip2ForConditionalGeneration.from_pretrained(name_or_path)
        b2 = blip2.config
        patch = b2.vision_config.patch_size
        vision = {key: getattr(b2.vision_config, key) for key in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
            "layer_norm_eps", "qkv_bias")}  # fmt: skip
        vision.update(volume_size=list(volume_size), patch_size=[depth_patch_size or patch, patch, patch])
        language_model = AutoModel.from_pretrained(text_model) if text_model else None
        text_config = (language_model.config if language_model is not None else b2.text_config).to_dict()
        config = MedBlipConfig(
            vision_config=vision,
            qformer_config=b2.qformer_config.to_dict(),
            text_config=text_config,
            num_query_tokens=b2.num_query_tokens,
            image_token_index=b2.image_token_index,
            **config_overrides,
        )
        model = cls(config)
        source = blip2.state_dict()
        target = model.state_dict()
        copied = {}
        for name, tensor in source.items():
            if name.startswith("vision_model.embeddings."):
                continue
            if text_model and name.startswith(("language_model.", "language_projection.")):
                continue
            if name in target and target[name].shape == tensor.shape:
                copied[name] = tensor
            elif name.startswith(("qformer.", "query_tokens")):
                raise ValueError(f"BLIP-2 tensor {name} {tuple(tensor.shape)} does not fit MedBLIP")
        embeddings = model.vision_model.embeddings
        copied["vision_model.embeddings.class_embedding"] = source["vision_model.embeddings.class_embedding"]
        copied["vision_model.embeddings.patch_embedding.bias"] = source["vision_model.embeddings.patch_embedding.bias"]
        copied["vision_model.embeddings.patch_embedding.weight"] = inflate_patch_embedding(
            source["vision_model.embeddings.patch_embedding.weight"], embeddings.config.patch_size
        )
        copied["vision_model.embeddings.position_embedding"] = inflate_position_embedding(
            source["vision_model.embeddings.position_embedding"], embeddings.config.grid_size
        )
        model.load_state_dict(copied, strict=False)
        if language_model is not None:
            lm = model.language_model
            lm.load_state_dict(language_model.state_dict(), strict=False)
        # BLIP-2's Q-Former has no text FFN: start it from the query FFN
        with torch.no_grad():
            for layer in model.qformer.encoder.layer:
                layer.intermediate.load_state_dict(layer.intermediate_query.state_dict())
                layer.output.load_state_dict(layer.output_query.state_dict())
        return model.apply_freezing()


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


MedBlipVisionModel.register_for_auto_class("AutoModel")
MedBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "MedBlipForConditionalGeneration",
    "MedBlipForConditionalGenerationModelOutput",
    "MedBlipPreTrainedModel",
    "MedBlipVisionModel",
    "inflate_patch_embedding",
    "inflate_position_embedding",
]
