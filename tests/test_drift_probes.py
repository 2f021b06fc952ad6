"""scripts/drift_probes.py, whose numbers the README quotes: it runs, and its position clamp is what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine import IDLE, WorldEngine
from tests.conftest import tiny_config

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "drift_probes.py"
_spec = importlib.util.spec_from_file_location("drift_probes", _PATH)
probes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probes)


def _engine() -> WorldEngine:
    # the game's frame size is the model's: 16 x 16 here
    return WorldEngine.from_config(tiny_config())


def test_a_clamp_beyond_the_rollout_changes_nothing_and_a_short_one_changes_the_frames() -> None:
    far = probes.positions(_engine(), "dense", 140, 1000)
    assert far["as configured"] == far["max_distance=1000"]
    near = probes.positions(_engine(), "dense", 140, 4)
    assert near["as configured"]["rolling_mean_every_100"] != near["max_distance=4"]["rolling_mean_every_100"]
    assert len(near["max_distance=4"]["strongest_periods_frames"]) == 3


def test_the_presented_positions_are_clamped_and_the_stored_ones_are_not() -> None:
    engine = _engine()
    engine.policy = probes.RecentPositions(engine.policy, 2)
    world = engine.new_world("icy cave", seed=0)
    for _ in range(5):
        engine.step([world], [IDLE])
    engine.flush([world])
    layer = world.cache.layers[0]
    view = engine.policy.view(layer)
    assert view.pos[:, 0].min() == 5 - 2 and layer.pos[: layer.length, 0].min() == 0


def test_the_annsa_probe_compares_predictions_from_one_cache() -> None:
    result = probes.annsa(_engine(), 60)
    assert [row["frame"] for row in result["dense_vs_annsa"]] == [11, 51]
    assert all(row["psnr_db"] > 0 for row in result["dense_vs_annsa"])


def test_the_starts_probe_scores_only_the_frames_each_start_generated() -> None:
    result = probes.starts(_engine(), 40, 8, None)["starts"]
    assert set(result) == {*probes.STARTS, "game"}
    for name, context in probes.STARTS.items():
        scored = [int(i) for i in result[name]["psnr_db_at_frame"]]
        assert scored and min(scored) == (8 if context == 8 else 1 if context == 1 else 0), name
    # the start view is the game's first view: the world that begins with it is not the one from the prompt alone
    assert result[probes.VIEW]["psnr_db_at_frame"] != result["prompt alone"]["psnr_db_at_frame"]


def test_the_autoencoder_probe_scores_a_lossless_autoencoder_as_the_game_itself(monkeypatch) -> None:
    real = probes.autoencoder(_engine(), 40)
    assert real["latent_channels"] == tiny_config().model.autoencoder.latent_channels
    assert set(real) == {"latent_channels", "frames", "stability_episode", "heldout_episodes"}
    assert 0 < real["heldout_episodes"]["psnr_db"] < 100 and real["stability_episode"]["detail_share"] > 0
    monkeypatch.setattr(probes, "through_autoencoder", lambda autoencoder, frames: frames.copy())
    lossless = probes.autoencoder(_engine(), 40)
    assert lossless["stability_episode"] == {"psnr_db": 100.0, "detail_share": 1.0, "view_drop_db": 0.0}
    assert lossless["heldout_episodes"] == {"psnr_db": 100.0, "detail_share": 1.0}
