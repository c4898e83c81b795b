"""Training state as safetensors + JSON: a checkpoint holds no pickle, so reading one cannot run code.

Optimizer states are PyTorch's full, name-keyed form (`torch.distributed.checkpoint.state_dict`, the same for one
process, DDP and FSDP): each tensor is stored as `<parameter name>/<field>` (e.g. `query_tokens/exp_avg`), the
parameter groups and any non-tensor field as JSON in the file's metadata. RNG states: the torch (and CUDA)
generator states as tensors, Python's and NumPy's as JSON.
"""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


METADATA_KEY = "json"


def save_tensors_and_json(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path),
              metadata={METADATA_KEY: json.dumps(meta)})


def load_tensors_and_json(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as file:
        meta = json.loads((file.metadata() or {})[METADATA_KEY])
        return {name: file.get_tensor(name) for name in file.keys()}, meta


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict -> (tensors, JSON-able rest)."""
    tensors, other = {}, {}
    for name, fields in state_dict["state"].items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{field}"] = value
            else:
                other.setdefault(name, {})[field] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": other}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {name: dict(fields) for name, fields in meta["state"].items()}
    for key, tensor in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = tensor
    # JSON turned Adam's `betas` tuple into a list
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_to_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch, CUDA, Python and NumPy generator states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return tensors, {"python": random.getstate(), "numpy": numpy_state}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda/{i}"] for i in range(sum(k.startswith("cuda/") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = meta["numpy"]
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)


def sha256_of_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()
