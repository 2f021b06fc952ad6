"""Checkpoints: a `WorldModel` state dict in safetensors, with the `model` config section embedded as metadata.

A checkpoint loads only into a model built from an equal `model` section; any difference is reported field by
field. Unreadable files, missing or extra tensors and shape mismatches are reported as `CheckpointError` too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.model import WorldModel

FORMAT = "worldserve-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and why."""


def save_checkpoint(path: str | Path, model: WorldModel, extra: dict[str, str] | None = None) -> None:
    """Write the model's weights and its `model` config section; `extra` adds string metadata (e.g. training)."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"format": FORMAT, "model_config": model.config.model.model_dump_json(), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_model_config(path: str | Path) -> ModelConfig:
    """The `model` section embedded in a checkpoint."""
    return _parse_config(Path(path), _read_metadata(Path(path)))


# Inputs a model may add to a checkpoint trained without them (`load_checkpoint(adding=True)`): the config key that
# adds one, and the prefix of its tensors. They keep the values the model holds (zero after `zero_init_`).
ADDABLE_INPUTS = {"previous_frame_input": "dit.previous_embed."}


def load_checkpoint(path: str | Path, model: WorldModel, adding: bool = False) -> dict[str, str]:
    """Load weights into `model` after checking its config against the checkpoint's; returns the metadata. With
    `adding`, the model may have inputs (ADDABLE_INPUTS) that the checkpoint's model lacks; their tensors are kept."""
    path = Path(path)
    metadata = _read_metadata(path)
    saved = _parse_config(path, metadata).model_dump()
    added = [key for key in ADDABLE_INPUTS if adding and not saved[key] and getattr(model.config.model, key)]
    for key in added:
        saved[key] = True
    differences = _differences(saved, model.config.model.model_dump())
    if differences:
        raise CheckpointError(
            f"{path}: checkpoint was made for a different model; differing 'model' keys "
            "(checkpoint vs config):\n  " + "\n  ".join(differences)
        )
    current = model.state_dict()
    kept = {name: t for name, t in current.items() if name.startswith(tuple(ADDABLE_INPUTS[k] for k in added))}
    expected = {name: t for name, t in current.items() if name not in kept}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing, unexpected = sorted(expected.keys() - names), sorted(names - expected.keys())
        if missing or unexpected:
            raise CheckpointError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
        state = {}
        for name in sorted(names):
            tensor = f.get_tensor(name)
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, model expects "
                    f"{tuple(expected[name].shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path}: tensor '{name}' holds NaN or infinite values")
            state[name] = tensor
    model.load_state_dict({**state, **kept})
    return metadata


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise CheckpointError(f"{path}: not a worldserve checkpoint (metadata format {metadata.get('format')!r})")
    return metadata


def _parse_config(path: Path, metadata: dict[str, str]) -> ModelConfig:
    try:
        return ModelConfig.model_validate(json.loads(metadata["model_config"]))
    except (json.JSONDecodeError, ValidationError) as error:
        raise CheckpointError(f"{path}: embedded model config is invalid: {error}") from None


def _differences(saved: Any, current: Any, prefix: str = "model") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(saved.keys() | current.keys()):
            out += _differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} vs {current!r}"]
