"""Memory plan per preset: parameters, trainable parameters, and bytes of weights, gradients and AdamW state.

    python benchmarks/memory_plan.py [--gpus 8]

Every model is built on the meta device (no memory, no download): the MedBLIP presets, and MedBLIP started from the
two public BLIP-2 checkpoints as `train.py --init_from blip2:<id>` builds it (224^3 volumes, 14^3 patches, the
BLIP-2 language model), with the freezing each one trains with. With P parameters and T trainable ones:

    weights      4P bytes in fp32, 2P in bf16
    gradients    4T / 2T (frozen parameters have none)
    AdamW state  8T / 4T (two moments per trainable parameter)
    total        4P + 12T in fp32: what train.py holds, with or without --mixed_precision bf16 (autocast computes in
                 bf16 but stores fp32); 2P + 6T with every tensor in bf16
    FSDP         the fp32 total / N per GPU (FSDP2 shards weights, gradients and optimizer state evenly)

Activations come on top (they grow with the batch; `bench_gpu.py` measures them on a GPU). DDP keeps the whole
total on every GPU. Sizes are in GB (1e9 bytes).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from configuration_medblip import MedBlipConfig  # noqa: E402
from convert_medblip import BLIP2_PUBLIC_CONFIGS, blip2_public_config, medblip_config_from_blip2  # noqa: E402
from modeling_medblip import MedBlipForConditionalGeneration  # noqa: E402


PRESETS = ("tiny", "small", "paper", "paper-biomedlm", *(f"blip2:{name}" for name in BLIP2_PUBLIC_CONFIGS))
gpus = 8  # GPU count of the FSDP column


def config_of(name: str) -> MedBlipConfig:
    """The MedBLIP config of a preset, or of `blip2:<id>` as `convert_medblip.from_blip2_pretrained` builds it."""
    if name.startswith("blip2:"):
        return medblip_config_from_blip2(blip2_public_config(name[len("blip2:"):]))
    return MedBlipConfig.from_preset(name)


def meta_model(name: str) -> MedBlipForConditionalGeneration:
    with torch.device("meta"):
        return MedBlipForConditionalGeneration(config_of(name))


def memory_plan(model: torch.nn.Module, num_gpus: int = gpus) -> dict:
    """Parameter counts and bytes (see the module docstring) of one model."""
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = {"parameters": parameters, "trainable": trainable,
            "weights_fp32": 4 * parameters, "weights_bf16": 2 * parameters,
            "gradients_fp32": 4 * trainable, "gradients_bf16": 2 * trainable,
            "adamw_fp32": 8 * trainable, "adamw_bf16": 4 * trainable}
    plan["total_fp32"] = plan["weights_fp32"] + plan["gradients_fp32"] + plan["adamw_fp32"]
    plan["total_bf16"] = plan["weights_bf16"] + plan["gradients_bf16"] + plan["adamw_bf16"]
    plan["fsdp_per_gpu_fp32"] = plan["total_fp32"] / num_gpus
    return plan


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def table(plans: dict[str, dict], num_gpus: int) -> str:
    """A Markdown table of the plans, sizes in GB."""
    rows = ["| preset | parameters | trainable | weights fp32 / bf16 | gradients fp32 / bf16 | AdamW fp32 / bf16 | "
            f"total fp32 / bf16 | FSDP over {num_gpus} GPUs, fp32 per GPU |", "|---|---|---|---|---|---|---|---|"]
    for name, p in plans.items():
        pairs = [f"{p[f'{kind}_fp32'] / 1e9:.2f} / {p[f'{kind}_bf16'] / 1e9:.2f}"
                 for kind in ("weights", "gradients", "adamw", "total")]
        rows.append(f"| `{name}` | {_count(p['parameters'])} | {_count(p['trainable'])} | {' | '.join(pairs)} | "
                    f"{p['fsdp_per_gpu_fp32'] / 1e9:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=gpus, help=f"GPU count of the FSDP column (default {gpus})")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="presets or blip2:<id> (default: all)")
    args = parser.parse_args(argv)
    plans = {name: memory_plan(meta_model(name), args.gpus) for name in args.presets}
    print(table(plans, args.gpus))
    for name, p in plans.items():
        print(f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}_train_fp32_gb: "
              f"{p['total_fp32'] / 1e9:.2f} ({p['fsdp_per_gpu_fp32'] / 1e9:.2f} per GPU with FSDP over {args.gpus}; "
              f"{p['trainable'] / p['parameters']:.3f} of the parameters trainable)")
    return plans


if __name__ == "__main__":
    main()
