"""MedBLIP pipelines: zero-shot diagnosis and question answering on 3D brain MRI, and Hub-folder helpers."""

from __future__ import annotations

import json
import os
import re
import shutil
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, Pipeline
from transformers import pipeline as transformers_pipeline


ZERO_SHOT_TASK = "zero-shot-volume-classification"
VQA_TASK = "volume-question-answering"
DEFAULT_TASK = ZERO_SHOT_TASK
# Code files that `pipeline(...)` and the plots need beside the model; `save_medblip_for_hub` copies them.
PIPELINE_FILES = ("pipeline_medblip.py", "plotting_medblip.py")
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json")
MODEL_FILES = (
    "config.json", "configuration_medblip.py", "modeling_medblip.py", "losses_medblip.py", "processing_medblip.py",
    "image_processing_medblip.py", "volume_medblip.py", "labels_medblip.py",
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_VOLUME_KEYS = ("volume", "image", "array", "path")
_OPTIONAL_KEYS = ("spacing", "affine", "orientation", "record", "question")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def _split_input(item: Any) -> dict[str, Any]:
    """One pipeline input -> `{"image", "spacing", "affine", "orientation", "record", "question"}` (missing: None).

    Accepted: a path (NIfTI/MGZ file or DICOM folder), a nibabel image, an array/tensor (geometry given separately),
    a tuple `(array, spacing)` or `(array, spacing, orientation)`, or a dict with one of the keys
    "volume"/"image"/"array"/"path" plus optional "spacing", "affine", "orientation", "record" and "question".
    """
    fields: dict[str, Any] = dict.fromkeys(("image", *_OPTIONAL_KEYS))
    if isinstance(item, dict):
        unknown = set(item) - {*_VOLUME_KEYS, *_OPTIONAL_KEYS}
        volume_keys = [key for key in _VOLUME_KEYS if key in item]
        if unknown or len(volume_keys) != 1:
            raise ValueError(
                f"an input dict needs exactly one of {_VOLUME_KEYS} and optionally {_OPTIONAL_KEYS}; got keys "
                f"{sorted(item)}"
            )
        fields.update({key: value for key, value in item.items() if key not in _VOLUME_KEYS})
        fields["image"] = item[volume_keys[0]]
    elif isinstance(item, tuple):
        if len(item) not in (2, 3):
            raise ValueError(f"a tuple input must be (array, spacing[, orientation]), got {len(item)} entries")
        fields["image"], fields["spacing"], fields["orientation"] = (*item, None)[:3]
    else:
        fields["image"] = item
    return fields


def _image_kwargs(fields: dict[str, Any], **call_values: Any) -> dict[str, Any]:
    """Geometry of one input: its own entries first, the call's keyword arguments otherwise."""
    return {key: value if fields.get(key) is None else fields[key] for key, value in call_values.items()}


@dataclass
class _IndexedInput:
    """An item of a list (or generator) given to a pipeline, with its position, so that its errors can name it."""

    index: int
    item: Any


def _name_item(error: Exception, index: int) -> Exception:
    """`error` with "item <index> of the inputs: " in front of its message, of the same class where possible."""
    message = f"item {index} of the inputs: {error}"
    try:
        return type(error)(message)
    except Exception:  # an exception class with another constructor
        return (ValueError if isinstance(error, ValueError) else TypeError)(message)


class _MedBlipPipeline(Pipeline):
    """Shared parts: the MedBLIP processor is mandatory; one volume (+ record, question) per input."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        processor = kwargs.get("processor")
        if processor is None or not hasattr(processor, "candidate_inputs"):
            raise ValueError(
                f"{type(self).__name__} needs the MedBlipProcessor saved beside the model (processor_config.json, "
                f"tokenizer files, qformer_tokenizer/); got processor={type(processor).__name__}. Save the "
                "folder with pipeline_medblip.save_medblip_for_hub(model, processor, folder)."
            )
        kwargs.pop("local_files_only", None)  # `pipeline()` passes this loading option on to the pipeline class
        super().__init__(*args, **kwargs)
        # Pipeline batching pads `input_ids` on the tokenizer's side; it must be the side the processor pads on.
        self.tokenizer.padding_side = "right" if self.processor.is_encoder_decoder else "left"

    @property
    def class_labels(self) -> list[str]:
        """The model's classes in id order, from `config.id2label` (the default candidates)."""
        id2label = self.model.config.id2label
        return [id2label[index] for index in sorted(id2label)]

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """As `Pipeline.__call__`; an input of a list or generator that fails is named by its index (from 0)."""
        if isinstance(inputs, list):
            inputs = [_IndexedInput(index, item) for index, item in enumerate(inputs)]
        elif isinstance(inputs, types.GeneratorType):
            inputs = (_IndexedInput(index, item) for index, item in enumerate(inputs))
        return super().__call__(inputs, *args, **kwargs)

    def _model_inputs(self, item: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if not isinstance(item, _IndexedInput):
            return self._one_model_input(item, **kwargs)
        try:
            return self._one_model_input(item.item, **kwargs)
        except (ValueError, TypeError) as error:
            raise _name_item(error, item.index) from error

    def _one_model_input(
        self, item: Any, record: Any = None, question: str | None = None, spacing: Any = None, affine: Any = None,
        orientation: str | None = None, volume_index: int | None = None,
    ) -> dict[str, torch.Tensor]:
        fields = _split_input(item)
        inputs = self.processor(
            images=fields["image"],
            records=record if fields["record"] is None else fields["record"],
            question=question if fields["question"] is None else fields["question"],
            return_tensors="pt",
            volume_index=volume_index,
            **_image_kwargs(fields, spacing=spacing, affine=affine, orientation=orientation),
        )
        if inputs["pixel_values"].shape[0] != 1:
            raise ValueError("one input holds several volumes; pass a list of volumes instead (one result each)")
        return {key: inputs[key] for key in self.processor.model_input_names}

    def _cast(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model_inputs = dict(model_inputs)
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.model.dtype)
        return model_inputs

    def query_attention(
        self, volume: Any, spacing: Any = None, affine: Any = None, volume_index: int | None = None,
        orientation: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The processed volume and where the Q-Former queries look in it.

        Returns:
            `(volume, attention)`: the processed volume `(num_channels, D, H, W)` in RAS+ axis order (what the model
            sees) and the Q-Former cross-attention averaged over queries, layers and heads on the patch grid
            `(gd, gh, gw)` (the share the queries give the CLS token is left out); both on the CPU. Feed them to
            `plotting_medblip.plot_volume_slices`.
        """
        fields = _split_input(volume)
        features = self.processor.image_processor(
            fields["image"], return_volume=True, volume_index=volume_index,
            **_image_kwargs(fields, spacing=spacing, affine=affine, orientation=orientation),
        )
        if features["pixel_values"].shape[0] != 1:
            raise ValueError("query_attention takes one volume")
        with torch.no_grad():
            attention = self.model.get_query_cross_attentions(
                features["pixel_values"].to(self.device, self.model.dtype), features["patch_grid"].to(self.device)
            )  # (1, Q, N)
        grid = features["patch_grid"][0].tolist()
        return features["volumes"][0], attention[0].mean(dim=0).reshape(grid).float().cpu()

    def plot_attention(
        self, volume: Any, title: str | None = None, path: str | os.PathLike | None = None, spacing: Any = None,
        affine: Any = None, orientation: str | None = None, **plot_kwargs: Any,
    ) -> Any:
        """`query_attention` drawn by `plotting_medblip.plot_volume_slices` (axial/coronal/sagittal, radiological
        orientation, attention overlay); saved as PNG when `path` is given. Returns the matplotlib `Figure`."""
        try:  # the relative import also makes the Hub loader fetch plotting_medblip.py with this file
            from .plotting_medblip import plot_volume_slices
        except ImportError:
            from plotting_medblip import plot_volume_slices
        processed, attention = self.query_attention(volume, spacing=spacing, affine=affine, orientation=orientation)
        return plot_volume_slices(processed, attention, title=title, path=path, **plot_kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save a complete pipeline-ready folder (model, processor, pipeline code): `save_medblip_for_hub`."""
        save_medblip_for_hub(self.model, self.processor, save_directory, **kwargs)


class ZeroShotVolumeClassificationPipeline(_MedBlipPipeline):
    """Diagnosis of a 3D brain MRI (plus an optional health record) by ranking candidate answers.

    Each candidate's answer text is scored by the language model's summed log-likelihood after the prompt
    (`MedBlipForConditionalGeneration.score_candidates`); the scores are the softmax over the candidates, so they sum
    to 1. Candidates are class labels or raw cohort labels ("CN", "AD", "Dementia", "Not demented", "LMCI", ...:
    scored with the processor's answer text for the class) or any other answer string (scored verbatim). The output
    `label` is the candidate as given.

    Example:

    >>> # classifier = pipeline("zero-shot-volume-classification", model=folder, trust_remote_code=True)
    >>> # classifier("sub-01_T1w.nii.gz", record={"age": 74, "sex": "F", "mmse": 24})
    >>> # [{'label': 'MCI', 'score': 0.61}, {'label': 'AD', 'score': 0.27}, {'label': 'CN', 'score': 0.12}]
    """

    def _sanitize_parameters(
        self, candidate_labels: Sequence[str] | None = None, record: Any = None, question: str | None = None,
        spacing: Any = None, affine: Any = None, orientation: str | None = None, volume_index: int | None = None,
        top_k: int | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess = {"record": record, "question": question, "spacing": spacing, "affine": affine,
                      "orientation": orientation, "volume_index": volume_index}
        preprocess = {key: value for key, value in preprocess.items() if value is not None}
        forward, postprocess = {}, {}
        if candidate_labels is not None:
            if isinstance(candidate_labels, str):
                candidate_labels = [label.strip() for label in candidate_labels.split(",")]
            if not candidate_labels or not all(isinstance(label, str) and label.strip() for label in candidate_labels):
                raise ValueError(f"candidate_labels must be non-empty strings, got {candidate_labels!r}")
            forward["candidate_labels"] = postprocess["candidate_labels"] = list(candidate_labels)
        if top_k is not None:
            postprocess["top_k"] = top_k
        return preprocess, forward, postprocess

    def preprocess(self, item: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self._model_inputs(item, **kwargs)

    def _forward(
        self, model_inputs: dict[str, torch.Tensor], candidate_labels: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        candidate_labels = candidate_labels or self.class_labels
        candidates = self.processor.candidate_inputs(candidate_labels, free_text=True).to(self.device)
        log_likelihoods = self.model.score_candidates(**self._cast(model_inputs), **candidates)  # (B, K)
        return {"log_likelihoods": log_likelihoods}

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], candidate_labels: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        candidate_labels = candidate_labels or self.class_labels
        scores = model_outputs["log_likelihoods"].float().reshape(-1).softmax(dim=-1).tolist()
        ranked = sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
        return [{"label": label, "score": score} for score, label in ranked[:top_k]]


class VolumeQuestionAnsweringPipeline(_MedBlipPipeline):
    """Free-text answer to a question about a 3D brain MRI (plus an optional health record).

    Generation arguments (`max_new_tokens`, `num_beams`, `do_sample`, a `generation_config`, ...) are passed to
    `generate`, at construction or per call; the model's `generation_config.json` supplies the rest. Map an answer
    to a class with `pipe.processor.post_process_generation(answer)`.

    Example:

    >>> # vqa = pipeline("volume-question-answering", model=folder, trust_remote_code=True)
    >>> # vqa("sub-01_T1w.nii.gz", question="What will this subject be diagnosed with?", max_new_tokens=8)
    >>> # [{'answer': 'mild cognitive impairment (MCI)'}]
    """

    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=16)

    def _sanitize_parameters(
        self, question: str | None = None, record: Any = None, spacing: Any = None, affine: Any = None,
        orientation: str | None = None, volume_index: int | None = None, generate_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess = {"record": record, "question": question, "spacing": spacing, "affine": affine,
                      "orientation": orientation, "volume_index": volume_index}
        preprocess = {key: value for key, value in preprocess.items() if value is not None}
        generate_kwargs = {**(generate_kwargs or {}), **kwargs}  # the remaining keywords go to generate()
        return preprocess, {"generate_kwargs": generate_kwargs}, {}

    def preprocess(self, item: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self._model_inputs(item, **kwargs)

    def _forward(self, model_inputs: dict[str, torch.Tensor], generate_kwargs: dict | None = None) -> dict:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {})
        generated_ids = self.model.generate(**self._cast(model_inputs), **generate_kwargs)
        return {"generated_ids": generated_ids, "input_ids": model_inputs["input_ids"]}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        # a decoder-only LM's output starts with the prompt: the processor drops it
        texts = self.processor.post_process_image_text_to_text(
            model_outputs["generated_ids"], input_ids=model_outputs["input_ids"]
        )
        return [{"answer": text} for text in texts]


# ----------------------------------------------------------------------------------------------------------------
# Hub folders


def custom_pipelines_entry() -> dict[str, dict[str, Any]]:
    """`config.custom_pipelines` for both tasks; `"default_task": True` marks the one `load_medblip_pipeline` picks."""
    return {
        ZERO_SHOT_TASK: {"impl": "pipeline_medblip.ZeroShotVolumeClassificationPipeline", "pt": ["AutoModel"],
                         "type": "multimodal", "default_task": DEFAULT_TASK == ZERO_SHOT_TASK},
        VQA_TASK: {"impl": "pipeline_medblip.VolumeQuestionAnsweringPipeline", "pt": ["AutoModel"],
                   "type": "multimodal", "default_task": DEFAULT_TASK == VQA_TASK},
    }


def make_pipeline_ready(folder: str | os.PathLike) -> Path:
    """Register both pipelines in `folder/config.json` and copy the pipeline (and plotting) files into `folder`.

    Raises:
        FileNotFoundError: `folder` has no config.json (save the model first).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: save the model into {folder} first")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["custom_pipelines"] = custom_pipelines_entry()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    source = Path(__file__).resolve().parent  # the repository, or the Hub loader's module cache
    for name in PIPELINE_FILES:
        if (source / name).resolve() != (folder / name).resolve():
            shutil.copyfile(source / name, folder / name)
    return folder


def save_medblip_for_hub(model: Any, processor: Any, folder: str | os.PathLike, **save_kwargs: Any) -> Path:
    """`model.save_pretrained` + `processor.save_pretrained` + `make_pipeline_ready`: a folder that
    `pipeline(task, model=folder, trust_remote_code=True)` loads offline and that can be pushed to the Hub as is."""
    model.config.custom_pipelines = custom_pipelines_entry()  # kept by a later `model.push_to_hub` too
    model.save_pretrained(folder, **save_kwargs)
    processor.save_pretrained(folder)
    return make_pipeline_ready(folder)


def check_medblip_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check that a local folder holds a complete pipeline-ready MedBLIP; return its `custom_pipelines`.

    Raises:
        FileNotFoundError: the folder lacks files; the message lists every missing file and what it is for.
        ValueError: config.json does not register both MedBLIP pipelines.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    missing = [f"{name} (model)" for name in MODEL_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"one of {', '.join(WEIGHT_FILES)} (model weights)")
    missing += [f"{name} (processor)" for name in PROCESSOR_FILES if not (folder / name).is_file()]
    missing += [f"{name} (pipeline code)" for name in PIPELINE_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete MedBLIP folder; missing: {'; '.join(missing)}. Write it with "
            "pipeline_medblip.save_medblip_for_hub(model, processor, folder) (or make_pipeline_ready(folder) for "
            "the pipeline part)."
        )
    custom = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("custom_pipelines") or {}
    absent = [task for task in (ZERO_SHOT_TASK, VQA_TASK) if task not in custom]
    if absent:
        raise ValueError(
            f"{folder}/config.json does not register the pipeline tasks {absent} in custom_pipelines; run "
            "pipeline_medblip.make_pipeline_ready(folder)"
        )
    return custom


def load_medblip_pipeline(model: str | os.PathLike, task: str | None = None, **kwargs: Any) -> Pipeline:
    """`transformers.pipeline(task, model=model, trust_remote_code=True, **kwargs)` with the default task filled in.

    `transformers.pipeline(model=...)` cannot infer a task when a config registers two custom pipelines, so this
    picks the one marked `"default_task"` (zero-shot-volume-classification). A local folder is checked first
    (`check_medblip_folder`), so a missing processor or pipeline file is named instead of failing deep inside
    transformers. A Hub repository's Python files run on your machine, so a Hub id (anything that is not a local
    folder) needs `revision=`, the commit hash of the code you have read; a branch or tag name is accepted with a
    warning (what it points to can change).

    Raises:
        ValueError: a Hub id without `revision=`.
    """
    local = Path(model).is_dir()
    if not local:
        revision = kwargs.get("revision")
        if revision is None:
            raise ValueError(
                f"{str(model)!r} is not a local folder: as a Hub repository its code would run on this machine "
                "(trust_remote_code), so pin the commit you have read: "
                f"load_medblip_pipeline({str(model)!r}, revision='<full commit hash>')"
            )
        if not _COMMIT_HASH.fullmatch(str(revision)):
            warnings.warn(f"revision={revision!r} for {str(model)!r} is not a commit hash: the remote code it points "
                          "to can change between loads; pin a full 40-character commit hash", UserWarning,
                          stacklevel=2)
    custom = check_medblip_folder(model) if local else custom_pipelines_entry()
    if task is None:
        defaults = [name for name, entry in custom.items() if entry.get("default_task")]
        task = defaults[0] if len(defaults) == 1 else DEFAULT_TASK
    kwargs.setdefault("trust_remote_code", True)
    return transformers_pipeline(task, model=str(model), **kwargs)


__all__ = [
    "ZeroShotVolumeClassificationPipeline",
    "VolumeQuestionAnsweringPipeline",
    "check_medblip_folder",
    "load_medblip_pipeline",
    "make_pipeline_ready",
    "save_medblip_for_hub",
]
