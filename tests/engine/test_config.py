"""Config loading: defaults, clear errors that name the key and the file, derived sizes in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import ATTENTION_PRESETS, ConfigError, WorldConfig, load_config, with_overrides
from engine.config import describe_config
from engine.kv_cache import LayerCache
from tests.conftest import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_default_config_loads_and_equals_the_built_in_defaults() -> None:
    """Except what belongs to the shipped weights: their file, their autoencoder's latent scale and their
    previous-frame input (off by default: a config or checkpoint without the key is a model without it)."""
    config = load_config(ROOT / "configs" / "default.yaml")
    assert config.runtime.checkpoint == (ROOT / "models" / "default.safetensors").resolve()
    assert config.model.previous_frame_input and not WorldConfig().model.previous_frame_input
    defaults = WorldConfig().model_dump()
    shipped = config.model_dump()
    for data in (defaults, shipped):
        data["runtime"].pop("checkpoint")
        data["model"]["autoencoder"].pop("latent_scale")
        data["model"].pop("previous_frame_input")
    assert shipped == defaults


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", {"model": {"dimm": 64}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.dimm'"):
        load_config(path)


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", {"sampler": {"steps": "four"}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'sampler\.steps'"):
        load_config(path)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"frame_height": 60}, "frame_height=60 must be a multiple of"),
        ({"dim": 100, "heads": 3}, "dim=100 must be a multiple of heads=3"),
        ({"dim": 30, "heads": 6}, "head dim dim/heads=5 must be even"),
        ({"depth": 0}, "model.depth"),
    ],
)
def test_impossible_sizes_are_rejected(tmp_path: Path, model: dict, message: str) -> None:
    path = write_config(tmp_path / "bad.yaml", {"model": model})
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_tempcache_too_small_for_its_exact_frames_is_rejected(tmp_path: Path) -> None:
    tokens = WorldConfig().sizes().tokens_per_frame
    cache = {"policy": "tempcache", "sink_frames": 1, "exact_frames": 4, "max_slots": 6 * tokens}
    path = write_config(tmp_path / "small.yaml", {"cache": cache})
    with pytest.raises(ConfigError, match=r"the 4 exact frames \(cache.exact_frames\) and room to merge"):
        load_config(path)
    assert load_config(path, {"cache.max_slots": 7 * tokens}).cache.exact_frames == 4


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_overrides_and_relative_checkpoint(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", {"runtime": {"checkpoint": "weights/w.safetensors"}})
    config = load_config(path, {"cache.policy": "dense", "cache.window_frames": 7})
    assert config.cache.policy == "dense" and config.cache.window_frames == 7
    assert config.runtime.checkpoint == (tmp_path / "weights" / "w.safetensors").resolve()
    with pytest.raises(ConfigError, match="unknown key 'cache.polcy'"):
        load_config(path, {"cache.polcy": "dense"})


def test_checkpoint_override_is_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """`--config runs/x/config.yaml --set runtime.checkpoint=runs/x/model.safetensors` names the file the person
    typing it sees, not one below the config's folder."""
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    path = write_config(run / "config.yaml", {"runtime": {"checkpoint": None}})
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("runs/x/config.yaml"), {"runtime.checkpoint": "runs/x/model.safetensors"})
    assert config.runtime.checkpoint == (run / "model.safetensors").resolve()
    absolute = tmp_path / "elsewhere.safetensors"
    assert load_config(path, {"runtime.checkpoint": str(absolute)}).runtime.checkpoint == absolute
    assert load_config(path, {"runtime.checkpoint": None}).runtime.checkpoint is None


def test_derived_sizes() -> None:
    sizes = WorldConfig().sizes()
    assert sizes.latent_shape == (16, 8, 8)
    assert sizes.token_grid == (4, 4) and sizes.tokens_per_frame == 16
    assert sizes.action_dim == 12
    assert sizes.capacity_slots == (1 + 32) * 16
    assert sizes.slot_bytes == 2 * 5 * 32 * 4 + 24
    assert sizes.capacity_bytes == sizes.capacity_slots * sizes.slot_bytes * 6
    dense = WorldConfig(cache={"policy": "dense"}).sizes()
    assert dense.capacity_slots is None and dense.capacity_bytes is None
    bounded = WorldConfig(cache={"policy": "dense", "max_slots": 40 * 16}).sizes()
    assert bounded.capacity_slots == 40 * 16 and bounded.capacity_bytes == 40 * 16 * sizes.slot_bytes * 6


def test_a_dense_bound_that_cannot_hold_one_chunk_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path / "small.yaml", {"model": {"chunk_frames": 2}, "cache": {"policy": "dense"}})
    with pytest.raises(ConfigError, match=r"bounded at 16 slots \(cache.max_slots\) must hold one chunk"):
        load_config(path, {"cache.max_slots": 16})
    assert load_config(path, {"cache.max_slots": 32}).sizes().capacity_slots == 32
    # the "dense" preset is the paper's unbounded baseline whatever bound the base config sets
    bounded = load_config(path, {"cache.max_slots": 32})
    assert with_overrides(bounded, ATTENTION_PRESETS["dense"]).sizes().capacity_slots is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_bytes_match_the_cache_buffers(dtype: torch.dtype) -> None:
    config = tiny_config()
    m = config.model
    sizes = config.sizes(dtype_bytes=torch.empty(0, dtype=dtype).element_size())
    layer = LayerCache.alone(m.heads, m.head_dim, 10, dtype, torch.device("cpu"))
    assert layer.nbytes == 10 * sizes.slot_bytes


def test_every_field_is_documented_and_docs_are_current() -> None:
    text = describe_config()
    assert "| `cache.window_frames` | 32 |" in text
    hint = "regenerate with: worldserve config --describe > docs/config.md"
    assert (ROOT / "docs" / "config.md").read_text() == text, hint
