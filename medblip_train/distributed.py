"""Several processes: the Accelerator (FSDP2 on CPU processes too), FSDP entry points, trainable weights that move
between sharded and full tensors, and the unsharded model to export.

    accelerate launch --config_file configs/accelerate_fsdp.yaml train.py ...          # GPUs
    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP \\
        torchrun --nproc_per_node 2 train.py ...                                       # CPU (gloo) or GPUs
"""

import os
import time

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor


def busy_cores(interval: float = 0.5) -> float:
    """Cores kept busy by other programs right now, from two reads of Linux's /proc/stat `interval` seconds apart
    (this process sleeps in between, so it does not count); the 1-minute load average elsewhere."""
    def counters() -> list[int]:
        with open("/proc/stat") as stat:
            return [int(value) for value in stat.readline().split()[1:]]

    try:
        before = counters()
        time.sleep(interval)
        after = counters()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    delta = [b - a for a, b in zip(before, after)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return (os.cpu_count() or 1) * (1 - idle / max(1, sum(delta)))


def torch_threads(requested: int, local_processes: int = 1) -> int:
    """Threads per process: `requested` when > 0, else this process's share of the cores that other programs leave
    free (`busy_cores`), at least 1. Another busy process on a 2-core machine makes 2 threads slower than 1
    (benchmarks/README.md, "Threads"), so a busy machine gets 1."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(busy_cores())) // max(1, local_processes))


def make_accelerator(**kwargs) -> Accelerator:
    """An `Accelerator` on the GPU if there is one, else on CPU; FSDP when Accelerate's settings ask for it
    (`accelerate launch --config_file ...` or the `ACCELERATE_USE_FSDP`/`FSDP_*` variables), CPU processes included.

    Accelerate 1.16 switches FSDP on only for accelerator devices and leaves CPU processes (gloo) in MULTI_CPU,
    although PyTorch's FSDP2 runs over gloo; this function switches those to FSDP with the plugin the same settings
    describe. `cpu=True` without a GPU also keeps `torchrun` on a CPU machine from starting N separate runs.

    Raises:
        ValueError: FSDP is asked for on CPU processes with FSDP version 1 (only FSDP2 runs on CPU).
    """
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as Accelerator does on GPUs
        if plugin.fsdp_version != 2:
            raise ValueError(f"FSDP on CPU processes needs FSDP2 (FSDP_VERSION=2 / fsdp_version: 2), got version "
                             f"{plugin.fsdp_version}")
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        # both shared states: every `AcceleratorState()` call copies the process state's fields over its own
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model whose parameters FSDP2 (`fully_shard`) has sharded."""
    return isinstance(model, FSDPModule)


def share_tied_embeddings(model: torch.nn.Module) -> None:
    """Replace every embedding module that shares the input embedding's weight by the input embedding module.

    T5 keeps three `nn.Embedding` modules on one weight (`shared`, `encoder.embed_tokens`, `decoder.embed_tokens`).
    FSDP2 refuses a parameter managed by two groups, and Accelerate gives `get_input_embeddings()` its own group: the
    other two would leave the weight in the root group as well. One module under three names computes the same.
    """
    embeddings = model.get_input_embeddings()
    for name, module in list(model.named_modules()):  # a tied output head (a Linear) stays: Accelerate groups it
        if type(module) is type(embeddings) and module is not embeddings and module.weight is embeddings.weight:
            model.set_submodule(name, embeddings)


def register_fsdp_entry_points(model: torch.nn.Module) -> None:
    """Let the model's other entry points (`generate`, `score_candidates`, ... listed in `_fsdp_forward_methods`)
    gather the sharded parameters as `forward` does; a no-op on an unsharded model."""
    for name in getattr(model, "_fsdp_forward_methods", ()):
        register_fsdp_forward_method(model, name)


def prepare(accelerator: Accelerator, model: torch.nn.Module, *objects):
    """`accelerator.prepare(model, *objects)`; under FSDP the tied embeddings are made one module first and the
    model's other entry points gather shards like `forward`."""
    if accelerator.distributed_type == DistributedType.FSDP:
        share_tied_embeddings(model)
    prepared = accelerator.prepare(model, *objects)
    register_fsdp_entry_points(prepared[0] if objects else prepared)
    return prepared


@torch.no_grad()
def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters. Under FSDP every process must call it: shards are gathered."""
    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            weights[name] = full.detach().to("cpu", copy=True)
    return weights


@torch.no_grad()
def load_trainable_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (from `trainable_weights` or a checkpoint) into the model, sharded or not; each process
    keeps its own shard, without communication."""
    parameters = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(parameters))
    if unknown:
        raise KeyError(f"weights for parameters the model does not have: {unknown[:5]} ({len(unknown)} in all)")
    for name, value in weights.items():
        parameter = parameters[name]
        if isinstance(parameter, DTensor):
            value = value.to(parameter.to_local().device, parameter.dtype)
            parameter.copy_(distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None))
        else:
            parameter.copy_(value.to(parameter.device, parameter.dtype))


def exportable_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """The model to `save_pretrained`: the unwrapped model itself, or under FSDP an unsharded copy holding the full
    weights on the main process (None on the others). Every process must call it: FSDP shards are gathered."""
    if not is_sharded(model):
        return accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # full tensors, on the main process's CPU only
    if not accelerator.is_main_process:
        return None
    model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses it
    with torch.device("meta"):
        unsharded = model_class(model.config)
    unsharded.load_state_dict(state_dict, assign=True)
    unsharded.tie_weights()
    return unsharded.eval()


__all__ = [
    "exportable_model",
    "is_sharded",
    "load_trainable_weights",
    "make_accelerator",
    "prepare",
    "register_fsdp_entry_points",
    "share_tied_embeddings",
    "trainable_weights",
]
