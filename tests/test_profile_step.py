"""scripts/profile_step.py, the GPU check's account of where a step's time goes: it profiles, times both ways of
attending for worlds of one length and of different ages, and reports a backend that cannot serve the step without
stopping the others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine import WorldEngine
from tests.conftest import tiny_config

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "profile_step.py"
_spec = importlib.util.spec_from_file_location("profile_step", _PATH)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def test_the_profile_counts_attention_calls_and_times_each_backend() -> None:
    engine = WorldEngine.from_config(tiny_config())
    summary, table = profile_step.profile_step(engine, warmup=2, profiled=2, timed=2, worlds=2)
    depth = engine.config.model.depth
    # every layer attends to its frames and to the prompt, at least once per frame
    assert summary["sdpa_calls_per_frame"] >= 2 * depth
    assert set(summary["step_ms_median_by_sdpa_backend"]) == {"default", "FLASH_ATTENTION", "MATH"}
    assert all(row["step_ms_median"] > 0 for row in summary["step_ms_median_by_sdpa_backend"].values())
    assert summary["busiest_operators"] and "scaled_dot_product" in table
    together = summary["dense_step_of_worlds_ms_median"]
    assert together["one_call_per_pass"] > 0 and together["one_call_per_world_and_pass"] > 0
    calls = summary["sdpa_call_us"]
    assert set(calls) == {"default", "engine", "FLASH_ATTENTION", "MATH"}
    assert all(c["same_shape"] > 0 and c["new_shape_each_call"] > 0 for c in calls.values())
    staggered = summary["step_of_staggered_worlds_ms_median"]
    assert staggered["frames_apart"] == 4 and staggered["one_call_per_pass"] > 0
    assert staggered["one_call_per_world_and_pass"] > 0


def test_staggered_worlds_are_their_frames_apart() -> None:
    engine = WorldEngine.from_config(tiny_config())
    worlds = profile_step._World(engine, warmup=2, count=3, apart=3).worlds
    assert [w.frame_index for w in worlds] == [8, 5, 2]


def test_a_backend_the_device_lacks_is_reported_and_the_next_still_timed(monkeypatch) -> None:
    monkeypatch.setitem(profile_step.BACKENDS, "cpu", ("EFFICIENT_ATTENTION", "MATH"))  # no such kernel on a CPU
    engine = WorldEngine.from_config(tiny_config())
    summary, _ = profile_step.profile_step(engine, warmup=1, profiled=1, timed=1, worlds=2)
    backends = summary["step_ms_median_by_sdpa_backend"]
    assert "error" in backends["EFFICIENT_ATTENTION"]
    assert backends["MATH"]["step_ms_median"] > 0
    assert "error" in summary["sdpa_call_us"]["EFFICIENT_ATTENTION"]
    assert summary["sdpa_call_us"]["MATH"]["same_shape"] > 0


def test_worlds_whose_caches_share_a_pool_add_a_fraction_of_the_work_of_worlds_alone() -> None:
    """The host's work per step, counted (not timed): a bounded policy's worlds are rows of one pool, so each world
    beyond the first adds a few operators (its noise, its row's views); the same worlds with caches of their own
    attend and commit world by world."""
    config = tiny_config(cache={"policy": "tempcache", "exact_frames": 1})
    pooled = WorldEngine.from_config(config)
    alone = WorldEngine.from_config(config)
    alone.pool = None  # every new world's cache in pools of its own
    shared = profile_step.work_per_step(pooled, warmup=6, worlds=4)
    separate = profile_step.work_per_step(alone, warmup=6, worlds=4)
    assert set(shared["per_step"]) == {"1", "4"} and shared["per_extra_world"]["operators"] > 0
    assert shared["per_extra_world"]["operators"] * 4 < separate["per_extra_world"]["operators"]
