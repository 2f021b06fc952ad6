"""The long-rollout benchmark: every configuration in its own process, compared with dense."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import ATTENTION_PRESETS, ConfigError
from engine.bench_rollout import PSNR_CAP_DB, parse_configurations, run_benchmark
from engine.rollout import load_actions
from tests.conftest import TINY, write_config

SUMMARY_KEYS = {
    "frames",
    "step_ms_at_100",
    "step_ms_last",
    "speedup_vs_dense_last",
    "speedup_vs_dense_total",
    "psnr_vs_dense_mean",
    "psnr_vs_dense_mean_differing",
    "ssim_vs_dense_mean",
    "identical_frames",
    "cache_bytes_max",
    "cache_bytes_last",
    "peak_rss_bytes",
    "density",
    "recall",
    "annca_density",
    "annca_recall",
    "cache_stats",
}
RUN_KEYS = {"step_ms", "cache_slots", "cache_bytes", "peak_rss_bytes", "psnr_vs_dense", "ssim_vs_dense"}


def test_every_configuration_is_run_measured_and_compared_with_dense(tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "tiny.yaml"), tmp_path / "bench"
    report = run_benchmark(config, out, frames=12, seed=1, measure_frames=4, log=lambda line: None)
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert {"machine", "config", "summary", "runs"} <= report.keys()
    assert {"cpu", "logical_cores", "torch", "torch_threads", "device", "platform", "date"} <= report["machine"].keys()
    assert report["config"]["configurations"] == ATTENTION_PRESETS and report["config"]["frames"] == 12
    assert list(report["summary"]) == list(report["runs"]) == list(ATTENTION_PRESETS)
    actions = load_actions(out / "actions.json")
    for name, row in report["summary"].items():
        assert SUMMARY_KEYS <= row.keys(), name
        run = report["runs"][name]
        assert RUN_KEYS <= run.keys() and all(len(run[key]) == 12 for key in RUN_KEYS), name
        assert np.load(out / "runs" / name / "frames.npy").shape == (12, 16, 16, 3)
        assert load_actions(out / "runs" / name / "actions.json") == actions
        assert not (out / "runs" / name / "frames").exists(), "no per-frame PNGs in benchmark runs"
    dense = report["summary"]["dense"]
    assert dense["speedup_vs_dense_last"] == dense["speedup_vs_dense_total"] == 1.0
    assert report["runs"]["dense"]["psnr_vs_dense"] == [None] * 12  # identical: infinite PSNR stored as null
    assert dense["psnr_vs_dense_mean"] == PSNR_CAP_DB and dense["identical_frames"] == 12
    assert dense["psnr_vs_dense_mean_differing"] is None
    assert dense["ssim_vs_dense_mean"] == 1.0 and dense["density"] is None
    # the tiny window (1 sink + 3 frames) first forgets a frame when generating frame 5; bounded caches stay bounded
    assert report["runs"]["window"]["psnr_vs_dense"][5] is not None
    for name in ("window", "tempcache", "tempcache+annsa", "tempcache+annsa+annca"):
        assert report["summary"][name]["cache_bytes_max"] < dense["cache_bytes_max"], name
    for name in ("tempcache+annsa", "tempcache+annsa+annca"):
        row = report["summary"][name]
        assert 0 < row["density"] <= 1 and 0 < row["recall"] <= 1, name
    annca = report["summary"]["tempcache+annsa+annca"]
    assert 0 < annca["annca_density"] <= 1 and 0 < annca["annca_recall"] <= 1
    assert report["summary"]["tempcache+annsa"]["annca_density"] is None
    for name in ("fps_vs_frames.png", "memory_vs_frames.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    table = (out / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in ATTENTION_PRESETS)


def test_configuration_names() -> None:
    assert parse_configurations(None) == list(ATTENTION_PRESETS)
    assert parse_configurations("window, tempcache") == ["dense", "window", "tempcache"]  # dense always runs
    assert parse_configurations("window,dense,window") == ["dense", "window"]
    with pytest.raises(ValueError, match="unknown configuration 'sparse'; choose from dense, window"):
        parse_configurations("dense,sparse")


def test_bad_input_is_rejected_before_anything_runs(tmp_path: Path) -> None:
    config, out = write_config(tmp_path / "tiny.yaml"), tmp_path / "bench"
    with pytest.raises(ValueError, match="unknown configuration 'fast'"):
        run_benchmark(config, out, frames=4, names=["fast"])
    with pytest.raises(ValueError, match="must be positive"):
        run_benchmark(config, out, frames=0)
    with pytest.raises(ConfigError, match="unknown key 'cache.bogus'"):
        run_benchmark(config, out, frames=4, overrides={"cache.bogus": 1})
    chunks = {**TINY, "model": {**TINY["model"], "chunk_frames": 2}, "cache": {**TINY["cache"], "window_frames": 4}}
    chunked = write_config(tmp_path / "chunked.yaml", chunks)
    with pytest.raises(ValueError, match="frames=3 must be a multiple of model.chunk_frames=2"):
        run_benchmark(chunked, out, frames=3)
    assert not out.exists()


def test_a_reference_that_stopped_early_is_compared_over_the_frames_both_have(tmp_path: Path) -> None:
    from engine.bench_rollout import _compare, markdown

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)

    def run(name: str, count: int, step_ms: float, stopped: dict | None) -> dict:
        (tmp_path / "runs" / name).mkdir(parents=True)
        np.save(tmp_path / "runs" / name / "frames.npy", frames[:count])
        per_frame = [
            {
                "step_ms": step_ms * (1 + i / 10),
                "cache_tokens": [16],
                "cache_bytes": 100 * (i + 1),
                "peak_rss_bytes": 1000,
            }
            for i in range(count)
        ]
        summary = {"chunk_frames": 1, "wall_s": 1.0, "cache_stats": {}, "stopped_early": stopped}
        return {"frames": per_frame, "summary": summary}

    stopped = {"frame": 20, "reason": "out of memory: CUDA out of memory"}
    stats = {"dense": run("dense", 20, 10.0, stopped), "window": run("window", 30, 2.0, None)}
    result = _compare(tmp_path, ["dense", "window"], stats, {})
    window = result["summary"]["window"]
    assert window["frames"] == 30 and window["compared_frames"] == 20
    assert len(result["runs"]["window"]["psnr_vs_dense"]) == 20
    assert window["identical_frames"] == 20
    assert window["speedup_vs_dense_last"] == pytest.approx(5.0) and window["speedup_vs_dense_total"] == pytest.approx(
        5.0
    )
    assert result["summary"]["dense"]["stopped_early"] == stopped
    report = {
        "machine": {
            "cpu": "cpu",
            "logical_cores": 2,
            "torch_threads": 2,
            "gpu": None,
            "torch": "x",
            "dtype": "f",
            "date": "today",
        },
        "config": {"frames": 30, "seed": 0, "prompt": "", "file": "c.yaml", "measure_frames": 4},
        **result,
    }
    assert "dense stopped early at frame 20 (out of memory" in markdown(report)
