"""Checkpoints: round trip, and clear errors for mismatched, corrupted or foreign files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import (
    IDLE,
    CheckpointError,
    WorldEngine,
    WorldModel,
    load_checkpoint,
    load_config,
    read_model_config,
    save_checkpoint,
)
from tests.conftest import TINY, tiny_config, write_config


def test_round_trip_gives_identical_weights_and_frames(tmp_path: Path) -> None:
    config = tiny_config()
    source = WorldModel(config).init_random_(seed=5)
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, source, extra={"trained_steps": "0"})
    assert read_model_config(path) == config.model

    loaded = WorldModel(config)
    metadata = load_checkpoint(path, loaded)
    assert metadata["trained_steps"] == "0"
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    data = dict(TINY, runtime={"device": "cpu", "dtype": "float32", "checkpoint": "w.safetensors"})
    engine = WorldEngine.from_config(load_config(write_config(tmp_path / "c.yaml", data)))
    reference = WorldEngine(config, source.eval().requires_grad_(False), torch.device("cpu"), torch.float32)
    a, b = engine.new_world(seed=1), reference.new_world(seed=1)
    assert np.array_equal(engine.step([a], [IDLE])[0][0], reference.step([b], [IDLE])[0][0])


def test_mismatched_config_names_the_differences(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, WorldModel(tiny_config()))
    other = WorldModel(tiny_config(model={"dim": 48, "heads": 2, "rope_theta": 500.0}))
    with pytest.raises(CheckpointError, match="different model") as error:
        load_checkpoint(path, other)
    assert "model.dim: 32 vs 48" in str(error.value)
    assert "model.rope_theta: 10000.0 vs 500.0" in str(error.value)


def test_a_model_with_the_previous_frame_input_starts_from_a_checkpoint_without_it(tmp_path: Path) -> None:
    """Only with `adding`; the new input starts at zero, so the model makes the checkpoint's frames."""
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, WorldModel(tiny_config()).init_random_(seed=2))
    config = tiny_config(model={"previous_frame_input": True})
    with pytest.raises(CheckpointError, match="model.previous_frame_input: False vs True"):
        load_checkpoint(path, WorldModel(config))
    grown = WorldModel(config)
    grown.dit.zero_init_()
    load_checkpoint(path, grown, adding=True)
    assert not grown.dit.previous_embed.weight.any() and not grown.dit.previous_embed.bias.any()
    with pytest.raises(CheckpointError, match="model.dim"):
        load_checkpoint(path, WorldModel(tiny_config(model={"previous_frame_input": True, "dim": 48})), adding=True)

    data = dict(TINY, runtime={"device": "cpu", "dtype": "float32", "checkpoint": "w.safetensors"})
    engine = WorldEngine.from_config(load_config(write_config(tmp_path / "c.yaml", data)))
    with_input = WorldEngine(config, grown.eval().requires_grad_(False), torch.device("cpu"), torch.float32)
    a, b = engine.new_world(seed=1), with_input.new_world(seed=1)
    for _ in range(3):
        assert np.array_equal(engine.step([a], [IDLE])[0][0], with_input.step([b], [IDLE])[0][0])


def test_broken_and_foreign_files(tmp_path: Path) -> None:
    model = WorldModel(tiny_config())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors", model)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(garbage, model)

    good = tmp_path / "good.safetensors"
    save_checkpoint(good, model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated, model)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a worldserve checkpoint"):
        load_checkpoint(foreign, model)


def test_missing_tensors_and_bad_values(tmp_path: Path) -> None:
    model = WorldModel(tiny_config())
    metadata = {"format": "worldserve-checkpoint/1", "model_config": model.config.model.model_dump_json()}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    partial = dict(state)
    partial.pop("dit.final.weight")
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="missing \\['dit.final.weight'\\]"):
        load_checkpoint(tmp_path / "partial.safetensors", model)

    reshaped = dict(state)
    reshaped["dit.final.bias"] = torch.zeros(3)
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="'dit.final.bias' has shape \\(3,\\)"):
        load_checkpoint(tmp_path / "reshaped.safetensors", model)

    nan = dict(state)
    nan["dit.final.bias"] = torch.full_like(state["dit.final.bias"], float("nan"))
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(tmp_path / "nan.safetensors", model)
