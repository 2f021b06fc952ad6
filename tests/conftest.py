"""Shared fixtures: tiny configs that run in milliseconds on a CPU."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; the variable must be set before any kernel is defined,
# i.e. before engine modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread for the whole test process. The tiny models gain nothing from more, and here torch runs on many
# threads (pytest's, each test server's engine thread): each thread that runs a parallel CPU op gets its own OpenMP
# pool, and two pools on 2 cores made a test server's engine thread step about 3x slower (measured; the server itself
# runs every torch call on its one engine thread, see server/app.py).
torch.set_num_threads(1)

import yaml  # noqa: E402

from engine import WorldConfig, WorldEngine, parse_config  # noqa: E402

# 16x16 frames -> 4x4 latents (two autoencoder stages) -> 16 tokens per frame; 2 blocks of width 32, 2 heads.
TINY: dict[str, Any] = {
    "model": {
        "frame_height": 16,
        "frame_width": 16,
        "patch_size": 1,
        "dim": 32,
        "depth": 2,
        "heads": 2,
        "autoencoder": {"channels": [8, 8], "latent_channels": 4},
        "prompt": {"vocab_size": 64, "max_tokens": 4, "dim": 16},
    },
    "sampler": {"steps": 2, "guidance": 1.0, "action_guidance": 0.0},  # one DiT pass per step (guidance tests set it)
    "cache": {"policy": "dense", "sink_frames": 1, "window_frames": 3, "grow_frames": 4, "exact_frames": 1},
    "runtime": {"device": "cpu", "dtype": "float32"},
}


def tiny_config(**sections: dict[str, Any]) -> WorldConfig:
    """TINY with some keys replaced, e.g. tiny_config(cache={"policy": "window"})."""
    data = copy.deepcopy(TINY)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data, "<tiny>")


def write_config(path: Path, config: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump(config if config is not None else TINY))
    return path


@pytest.fixture
def tiny() -> WorldConfig:
    return tiny_config()


@pytest.fixture
def tiny_engine(tiny: WorldConfig) -> WorldEngine:
    return WorldEngine.from_config(tiny)


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
