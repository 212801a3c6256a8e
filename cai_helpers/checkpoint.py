"""Model and training-state checkpoints in safetensors + JSON (nothing is pickled).

A model folder holds ``model.safetensors`` (every tensor of the state dict) and
``config.json`` (``{"format": ..., "model_config": AstroMAEConfig fields, "extra": ...}``).
A training-state folder adds ``optimizer.safetensors`` and ``state.json`` so that a run
resumes at the next epoch with the same optimizer moments and learning-rate schedule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from cai_helpers.errors import CheckpointError
from cai_helpers.model import AstroMAE, AstroMAEConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT = "cai-astromae-v1"
FILE_MODE = 0o644
# Buffers are kept in float32 whatever the weight dtype, because the input-scaling
# statistics and BatchNorm variances lose precision in float16.
FLOAT32_BUFFERS = ("pixel_scale", "mag_mean", "mag_std", "running_mean", "running_var")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                  metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata=metadata)
    tmp.chmod(FILE_MODE)  # safetensors creates files readable by the owner only
    tmp.replace(path)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file; raise CheckpointError if it is not one.

    The file's header is parsed as JSON by the safetensors library; a pickled file or
    any other format fails that parse and is never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found; check the model folder")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a valid safetensors file (safetensors header invalid: {error}); "
            "a pickled .pt file must be converted with "
            "cai_helpers.authors_checkpoint.import_authors_checkpoint") from error


def save_model(model: AstroMAE, folder: str | Path, *, dtype: torch.dtype = torch.float16,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (floating weights in ``dtype``) and ``config.json``.

    ``extra`` is stored verbatim under the key "extra" of config.json (JSON types only).
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not name.endswith(FLOAT32_BUFFERS):
            tensor = tensor.to(dtype)
        tensors[name] = tensor
    _save_tensors(tensors, folder / MODEL_FILE, metadata={"format": FORMAT})
    _write_json(folder / CONFIG_FILE, {"format": FORMAT,
                                       "model_config": model.config.to_dict(),
                                       "weights_dtype": str(dtype).replace("torch.", ""),
                                       "extra": extra or {}})
    logger.info("saved model to %s (%d tensors, %s)", folder, len(tensors), dtype)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a model folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} not found; a model folder needs config.json") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if "model_config" not in data:
        raise CheckpointError(f"{path} has no 'model_config' entry; rewrite it with save_model")
    return data


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{name}: file {tuple(state[name].shape)}, model {tuple(expected[name].shape)}"
        for name in set(expected) & set(state) if state[name].shape != expected[name].shape)
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {missing}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {unexpected}")
    if misshaped:
        parts.append(f"mis-shaped {len(misshaped)}: {misshaped}")
    raise CheckpointError(
        f"{source} does not match the model config: " + "; ".join(parts)
        + ". Check that config.json belongs to these weights.")


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> AstroMAE:
    """Build AstroMAE from ``config.json`` and load ``model.safetensors`` as float32.

    Names and shapes are verified before loading; the model is returned in eval mode.
    """
    folder = Path(folder)
    config = AstroMAEConfig.from_dict(read_config(folder)["model_config"])
    model = AstroMAE(config)
    state = read_safetensors(folder / MODEL_FILE)
    check_state_dict(model, state, str(folder / MODEL_FILE))
    expected = model.state_dict()
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state)
    logger.info("loaded model from %s", folder)
    return model.to(map_location).eval()


def save_training_state(folder: str | Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        state: dict[str, Any]) -> None:
    """Write a resumable training checkpoint: model weights (float32), optimizer
    moments, scheduler position and ``state`` (epoch, best loss, history; JSON)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(model.state_dict(), folder / MODEL_FILE)

    optim_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in optim_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    _save_tensors(tensors, folder / OPTIMIZER_FILE)
    sched = scheduler.state_dict()  # LambdaLR stores None for plain functions
    _write_json(folder / STATE_FILE, {"format": FORMAT, "state": state,
                                      "optimizer_param_groups": optim_state["param_groups"],
                                      "optimizer_scalars": scalars, "scheduler": sched})


def load_training_state(folder: str | Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns the saved ``state``."""
    folder = Path(folder)
    weights = read_safetensors(folder / MODEL_FILE)
    check_state_dict(model, weights, str(folder / MODEL_FILE))
    model.load_state_dict(weights)
    try:
        saved = json.loads((folder / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / STATE_FILE} is missing or invalid: {error}; "
                              "start the run without resuming") from error

    optim_state: dict[str, Any] = {"state": {}, "param_groups": saved["optimizer_param_groups"]}
    for key, tensor in read_safetensors(folder / OPTIMIZER_FILE).items():
        index, name = key.split(".", 1)
        optim_state["state"].setdefault(int(index), {})[name] = tensor
    for key, value in saved["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        optim_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(saved["scheduler"])
    logger.info("resumed training state from %s at epoch %s", folder,
                saved["state"].get("epoch"))
    return saved["state"]
