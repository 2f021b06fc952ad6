"""Offline rollouts: the files a user gets, and replaying recorded actions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import WorldEngine
from engine.rollout import FrameRecorder, load_actions, random_actions, run_rollout, save_actions


def _frames(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((folder / "frames").glob("*.png"))]


def test_rollout_writes_frames_sheet_gif_and_stats(tiny_engine: WorldEngine, tmp_path: Path) -> None:
    stats = run_rollout(tiny_engine, random_actions(12, seed=3), tmp_path, seed=3, prompt="icy cave")
    assert len(_frames(tmp_path)) == 12
    assert Image.open(tmp_path / "contact_sheet.png").size == (8 * 16 * 2, 2 * 16 * 2)
    gif = Image.open(tmp_path / "rollout.gif")
    assert gif.n_frames == 12 and gif.size == (64, 64)
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    frames = on_disk["frames"]
    assert [f["frame"] for f in frames] == list(range(12))
    # tiny config: dense, 2 layers; after a step its chunk waits for the next step to be written
    assert frames[-1]["cache_tokens"] == [11 * 16, 11 * 16]
    assert on_disk["summary"]["cache_stats"]["slots"] == [12 * 16, 12 * 16]
    assert frames[-1]["cache_bytes"] >= frames[0]["cache_bytes"] > 0
    assert all(f["step_ms"] > 0 and f["peak_rss_bytes"] > 0 for f in frames)
    assert on_disk["summary"]["policy"] == "dense" and on_disk["summary"]["frames"] == 12


def test_replaying_recorded_actions_reproduces_the_frames(tiny_engine: WorldEngine, tmp_path: Path) -> None:
    run_rollout(tiny_engine, random_actions(8, seed=1), tmp_path / "a", seed=5)
    replayed = load_actions(tmp_path / "a" / "actions.json")
    assert replayed == random_actions(8, seed=1)
    run_rollout(tiny_engine, replayed, tmp_path / "b", seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(_frames(tmp_path / "a"), _frames(tmp_path / "b")))


def test_frame_recorder_copies_frames_into_one_array() -> None:
    recorder = FrameRecorder(3, 4, 5)
    assert len(recorder) == 0 and recorder.frames.shape == (0, 4, 5, 3)
    first = [np.full((4, 5, 3), 7, np.uint8), np.full((4, 5, 3), 9, np.uint8)]
    recorder.extend(first)
    first[0][:] = 0  # the engine's arrays may be reused or freed: the recorder holds copies
    recorder.extend([np.full((4, 5, 3), 11, np.uint8)])
    assert recorder.frames.dtype == np.uint8 and [int(f.max()) for f in recorder.frames] == [7, 9, 11]
    with pytest.raises(ValueError, match="4 frames do not fit a recorder of 3"):
        recorder.extend([first[1]])
    assert len(recorder) == 3


def test_random_actions_are_seeded_and_sticky() -> None:
    actions = random_actions(200, seed=0)
    assert actions == random_actions(200, seed=0) != random_actions(200, seed=1)
    changes = sum(a != b for a, b in zip(actions, actions[1:]))
    assert changes < 200 / 3, "intents are held for several frames"


def test_bad_action_files(tmp_path: Path) -> None:
    cases = {
        "notjson.json": ("{", "not valid JSON"),
        "format.json": ('{"format": "other", "actions": []}', "expected format"),
        "scalar.json": ("3", "expected a list"),
        "item.json": ("[1]", "action 0 is not an object"),
        "field.json": ('[{"keys": ["KeyW"], "mouse_dx": "fast"}]', "action 0: mouse_dx"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load_actions(tmp_path / name)
    with pytest.raises(ValueError, match="cannot read"):
        load_actions(tmp_path / "missing.json")
    save_actions(tmp_path / "ok.json", random_actions(3, seed=0))
    assert len(load_actions(tmp_path / "ok.json")) == 3


class _FakeMeter:
    def summary(self) -> dict:
        return {"annsa": {"density": 0.25, "recall": 0.9, "per_layer": []}}


def test_benchmark_outputs_npy_cache_stats_and_attention(
    tiny_engine: WorldEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_rollout(tiny_engine, random_actions(4, seed=2), tmp_path / "png", seed=2)
    monkeypatch.setattr(tiny_engine, "meter", _FakeMeter(), raising=False)
    out = tmp_path / "npy"
    stats = run_rollout(
        tiny_engine, random_actions(4, seed=2), out, seed=2, write_frames=False, write_npy=True, write_gif=False
    )
    frames = np.load(out / "frames.npy")
    assert frames.dtype == np.uint8 and frames.shape == (4, 16, 16, 3)
    assert all(np.array_equal(x, y) for x, y in zip(frames, _frames(tmp_path / "png")))
    assert not (out / "frames").exists() and not (out / "rollout.gif").exists()
    summary = stats["summary"]
    assert summary["cache_stats"]["slots"] == [4 * 16, 4 * 16] and summary["cache_stats"]["mean_count"] == [1.0, 1.0]
    assert summary["attention"] == _FakeMeter().summary()
    assert "attention" not in json.loads((tmp_path / "png" / "stats.json").read_text())["summary"]


def test_running_out_of_memory_can_end_a_rollout_early(
    tiny_engine: WorldEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = tiny_engine.step
    calls = []

    def failing_step(worlds, actions):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(worlds, actions)

    monkeypatch.setattr(tiny_engine, "step", failing_step)
    with pytest.raises(torch.OutOfMemoryError):
        run_rollout(tiny_engine, random_actions(6, seed=0), tmp_path / "strict", write_frames=False)
    calls.clear()
    stats = run_rollout(tiny_engine, random_actions(6, seed=0), tmp_path / "lenient", write_npy=True, stop_on_oom=True)
    assert len(stats["frames"]) == 3 and np.load(tmp_path / "lenient" / "frames.npy").shape[0] == 3
    assert stats["summary"]["stopped_early"] == {
        "frame": 3,
        "reason": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
    }
    assert len(load_actions(tmp_path / "lenient" / "actions.json")) == 3
