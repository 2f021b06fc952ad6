"""engine/dataset.py and `worldserve data`: the split, alignment of frames and actions, shards, manifest, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import dataset as ds
from engine.actions import IDLE, Action, ActionSpace
from engine.config import DEFAULT_KEYS, ActionConfig
from engine.dataset import (
    HELDOUT_SEEDS,
    THEME_NAMES,
    Dataset,
    DatasetError,
    TrainingEpisodes,
    action_array,
    episode_actions,
    heldout_spec,
    is_heldout,
    load_shard,
    prompt_for,
    record,
    record_episode,
    replay,
    shard_bytes,
    train_spec,
    workers_start_deaf_to_stops,
    write_dataset,
)
from engine.game import Game, HumanPolicy, theme_for_prompt
from engine.rollout import load_actions, save_actions
from server.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
SIZE = (16, 16)
TINY = {"frames": 6, "size": SIZE, "shard_episodes": 4}


def _write(out: Path, **overrides) -> ds.DatasetSummary:
    return write_dataset(out, **{"train_episodes": 7, "heldout_episodes": 6, **TINY, **overrides})


# ---- the split ----------------------------------------------------------------------------------------------------


def test_heldout_seeds_are_a_reserved_range_taken_mod_2_64() -> None:
    assert not is_heldout(10**9 - 1) and is_heldout(10**9) and is_heldout(10**9 + 10**6 - 1)
    assert not is_heldout(10**9 + 10**6) and not is_heldout(0) and not is_heldout(-1)
    assert is_heldout(10**9 + 2**64)  # the game takes seeds mod 2**64: the same maze as seed 10**9


def test_the_training_stream_never_draws_a_heldout_seed() -> None:
    for seed in (0, 1, 10**9, -5):
        for index in range(300):
            spec = train_spec(seed, index)
            assert spec.split == "train" and spec.seed in ds.TRAIN_SEEDS and not is_heldout(spec.seed)
    heldout = [heldout_spec(j) for j in range(50)]
    assert [spec.seed for spec in heldout] == list(HELDOUT_SEEDS[:50])
    assert all(is_heldout(spec.seed) and spec.split == "heldout" for spec in heldout)


def test_training_episodes_refuse_a_heldout_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "TRAIN_SEEDS", range(10**9, 10**9 + 5))  # a broken rule: training would draw held-out
    with pytest.raises(AssertionError, match="held-out"):
        next(iter(TrainingEpisodes(seed=0, frames=2, size=SIZE)))


def test_themes_are_covered_evenly_in_both_splits() -> None:
    n = len(THEME_NAMES)
    for specs in ([train_spec(3, i) for i in range(2 * n)], [heldout_spec(j) for j in range(2 * n)]):
        assert Counter(spec.theme for spec in specs) == {name: 2 for name in THEME_NAMES}
        assert all(theme_for_prompt(spec.prompt).name == spec.theme for spec in specs)
    arrows = [train_spec(0, i).arrows for i in range(200)]
    assert 20 < sum(arrows) < 80  # about a quarter of the players walk with the arrow keys


def test_prompts_vary_in_wording_and_always_name_their_theme() -> None:
    rng = np.random.default_rng(0)
    for theme in THEME_NAMES:
        prompts = [prompt_for(theme, rng) for _ in range(200)]
        assert all(theme_for_prompt(p).name == theme for p in prompts)
        assert theme in prompts and len(set(prompts)) > 10
    assert "" in [prompt_for(ds._DEFAULT_THEME, rng) for _ in range(200)]


# ---- recording: alignment and actions -----------------------------------------------------------------------------


def test_frame_t_is_the_view_after_action_t_and_action_0_is_idle() -> None:
    episode = record_episode(seed=3, prompt="icy cave", frames=40, policy_seed=5, size=SIZE)
    assert episode.frames.shape == (40, *SIZE, 3) and episode.frames.dtype == np.uint8
    assert episode.keys.shape == (40, len(DEFAULT_KEYS)) and episode.mouse.shape == (40, 2)
    assert (episode.theme, episode.split, len(episode)) == ("icy cave", "train", 40)
    assert not episode.keys[0].any() and not episode.mouse[0].any()
    assert np.array_equal(episode.frames[0], Game(3, "icy cave", *SIZE).render())  # frame 0: the first view
    assert np.array_equal(replay(episode), episode.frames)
    game = Game(3, "icy cave", *SIZE)
    for t, action in enumerate(episode_actions(episode)):
        frame = game.step(action)
        assert np.array_equal(frame, episode.frames[t])
        assert episode.poses[t].tolist() == pytest.approx([game.x, game.y, game.heading, game.eye], abs=1e-5)


def test_the_policys_actions_are_recorded_exactly_in_the_given_key_order() -> None:
    keys = tuple(reversed(DEFAULT_KEYS))
    episode = record_episode(seed=8, prompt="neon grid", frames=120, policy_seed=2, size=SIZE, key_names=keys)
    game, policy = Game(8, "neon grid", *SIZE), HumanPolicy(2)
    game.step(IDLE)
    for t in range(1, 120):
        action = policy.act(game)
        assert [keys[i] for i in np.flatnonzero(episode.keys[t])] == [k for k in keys if k in action.keys]
        assert episode.mouse[t].tolist() == [np.float32(action.mouse_dx), np.float32(action.mouse_dy)]
        game.step(Action(action.keys, float(np.float32(action.mouse_dx)), 0.0))
    assert episode.keys.any(axis=0).sum() >= 4 and episode.mouse[:, 0].any()  # bursts of several kinds


def test_keys_outside_the_key_list_never_reach_the_game() -> None:
    full = record_episode(seed=1, prompt="", frames=200, policy_seed=11, size=SIZE)
    assert full.keys[:, DEFAULT_KEYS.index("Space")].any() and full.keys[:, DEFAULT_KEYS.index("ShiftLeft")].any()
    keys = tuple(k for k in DEFAULT_KEYS if k not in ("ShiftLeft", "Space"))
    episode = record_episode(seed=1, prompt="", frames=200, policy_seed=11, size=SIZE, key_names=keys)
    assert episode.keys.shape[1] == len(keys) and not np.array_equal(episode.frames, full.frames)
    assert np.array_equal(replay(episode), episode.frames)


def test_arrow_keys_and_vertical_mouse_change_no_frame() -> None:
    plain = record_episode(seed=6, prompt="wooden cabin", frames=150, policy_seed=3, size=SIZE)
    aliased = record_episode(
        seed=6, prompt="wooden cabin", frames=150, policy_seed=3, size=SIZE, arrows=True, mouse_dy=2.0
    )
    assert np.array_equal(aliased.frames, plain.frames) and np.array_equal(replay(aliased), plain.frames)
    w, s, up, down = (DEFAULT_KEYS.index(k) for k in ("KeyW", "KeyS", "ArrowUp", "ArrowDown"))
    assert plain.keys[:, w].any() and not plain.keys[:, up].any()
    assert np.array_equal(aliased.keys[:, up], plain.keys[:, w]) and not aliased.keys[:, w].any()
    assert np.array_equal(aliased.keys[:, down], plain.keys[:, s]) and not aliased.keys[:, s].any()
    moving = plain.mouse[:, 0] != 0
    assert moving.any() and aliased.mouse[moving, 1].any() and not aliased.mouse[~moving, 1].any()
    assert np.array_equal(aliased.mouse[:, 0], plain.mouse[:, 0]) and not plain.mouse[:, 1].any()
    wasd = tuple(k for k in DEFAULT_KEYS if k not in ("ArrowUp", "ArrowDown"))  # nothing to alias to
    kept = record_episode(
        seed=6, prompt="wooden cabin", frames=150, policy_seed=3, size=SIZE, key_names=wasd, arrows=True
    )
    assert np.array_equal(kept.frames, plain.frames)


def test_actions_round_trip_through_the_actions_file_and_encode_like_the_action_space(tmp_path: Path) -> None:
    episode = record_episode(seed=2, prompt="sandstone temple", frames=80, policy_seed=9, size=SIZE)
    actions = episode_actions(episode)
    save_actions(tmp_path / "actions.json", actions)  # what `worldserve rollout --actions` replays
    assert load_actions(tmp_path / "actions.json") == actions
    space = ActionSpace(ActionConfig(keys=DEFAULT_KEYS, mouse_scale=20.0))
    encoded, unknown = space.encode(actions)
    assert unknown == 0 and torch.equal(torch.from_numpy(action_array(episode, 20.0)), encoded)


def test_training_episodes_split_across_dataloader_workers() -> None:
    stream = TrainingEpisodes(seed=4, frames=3, size=SIZE, start=2, stop=6)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = sorted((e.seed, e.prompt) for e in loader)
    assert got == sorted((train_spec(4, i).seed, train_spec(4, i).prompt) for i in range(2, 6))


# ---- shards and the dataset folder --------------------------------------------------------------------------------


def test_write_then_read_gives_the_recorded_episodes(tmp_path: Path) -> None:
    summary = _write(tmp_path / "a", seed=3)
    data = Dataset(tmp_path / "a")
    assert (data.count("train"), data.count("heldout")) == (7, 6)
    assert summary.frames == 13 * 6 and summary.bytes == sum(s.bytes for s in data.shards)
    assert [s.file for s in data.shards] == [f"{split}-0000{k}.npz" for split in ("train", "heldout") for k in (0, 1)]
    for split, spec in (("train", lambda i: train_spec(3, i)), ("heldout", heldout_spec)):
        for i, episode in enumerate(data.episodes(split)):
            expected = record(spec(i), 6, SIZE, DEFAULT_KEYS)
            assert episode.split == split
            assert (episode.seed, episode.policy_seed, episode.prompt, episode.theme) == (
                expected.seed,
                expected.policy_seed,
                expected.prompt,
                expected.theme,
            )
            assert all(np.array_equal(getattr(episode, a), getattr(expected, a)) for a in ("frames", "keys", "mouse"))
    streamed = next(iter(TrainingEpisodes(seed=3, frames=6, size=SIZE)))  # the train split is the stream's start
    assert np.array_equal(streamed.frames, next(data.episodes("train")).frames)
    data.verify()


def test_same_arguments_give_identical_files_whatever_the_workers(tmp_path: Path) -> None:
    _write(tmp_path / "a")
    _write(tmp_path / "b", workers=2)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in "ab"]
    assert manifests[0] == manifests[1]
    for shard in manifests[0]["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    _write(tmp_path / "c", seed=1)  # another training stream, the same held-out episodes
    other = {s["file"]: s["sha256"] for s in json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]}
    for shard in manifests[0]["shards"]:
        assert (other[shard["file"]] == shard["sha256"]) == (shard["split"] == "heldout")


def test_bad_files_give_errors_that_name_them(tmp_path: Path) -> None:
    _write(tmp_path / "d")
    root = tmp_path / "d"
    shard = root / "train-00000.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="train-00000.npz: sha256"):
        list(Dataset(root).episodes("train"))
    with pytest.raises(DatasetError, match="train-00000.npz: not a readable dataset shard"):
        load_shard(shard)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(DatasetError, match="train-00000.npz: 100 bytes"):
        Dataset(root)
    np.savez(shard, meta=np.frombuffer(b'{"format": "other/1"}', np.uint8), **{a: np.zeros(1) for a in ds._ARRAYS})
    with pytest.raises(DatasetError, match="shard format 'other/1'"):
        load_shard(shard)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": "worldserve-dataset/0"}))
    with pytest.raises(DatasetError, match="manifest.json: format 'worldserve-dataset/0'"):
        Dataset(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        Dataset(root)
    with pytest.raises(DatasetError, match="cannot read the manifest"):
        Dataset(tmp_path / "nowhere")


def test_a_shard_that_breaks_the_split_is_refused(tmp_path: Path) -> None:
    spec = heldout_spec(0)
    smuggled = ds.EpisodeSpec("train", 0, spec.seed, spec.policy_seed, spec.prompt, spec.theme)
    (tmp_path / "bad.npz").write_bytes(shard_bytes([smuggled], [record(spec, 2, SIZE, DEFAULT_KEYS)]))
    with pytest.raises(DatasetError, match="bad.npz: seed 1000000000 is a heldout seed, listed as train"):
        load_shard(tmp_path / "bad.npz")


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for overrides, message in (
        ({"frames": 0}, "frames must be >= 1"),
        ({"train_episodes": 0, "heldout_episodes": 0}, "nothing to record"),
        ({"size": (4, 4)}, "at least 8x8"),
        ({"heldout_episodes": 10**6 + 1}, "heldout_episodes must be <="),
    ):
        with pytest.raises(ValueError, match=message):
            _write(tmp_path / "new", **overrides)
    for existing in (tmp_path / "full", tmp_path / "full" / "x"):
        with pytest.raises(ValueError, match="not an empty folder"):
            _write(existing)


def test_an_interrupted_recording_resumes_to_the_files_of_an_uninterrupted_one(tmp_path: Path) -> None:
    _write(tmp_path / "straight")

    def stop_after_two(shard: ds.ShardInfo, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "resumed", progress=stop_after_two)
    root = tmp_path / "resumed"
    assert not (root / "manifest.json").exists() and (root / ds.RECIPE_FILE).exists()
    assert sorted(p.name for p in root.glob("*.npz")) == ["train-00000.npz", "train-00001.npz"]
    with pytest.raises(ValueError, match=r"other arguments \(seed, frames differ\)"):
        _write(root, seed=1, frames=7)
    (root / "train-00001.npz").write_bytes((root / "train-00001.npz").read_bytes()[:-10])  # damaged: recorded again
    (root / "heldout-00000.partial").write_bytes(b"half a shard")  # one being written when the run stopped
    recorded = []
    summary = _write(root, progress=lambda shard, done, total: recorded.append(shard.file))
    assert recorded == ["train-00001.npz", "heldout-00000.npz", "heldout-00001.npz"]
    assert (summary.kept_shards, summary.kept_frames) == (1, 4 * 6)
    for name in ("manifest.json", "train-00000.npz", "train-00001.npz", "heldout-00000.npz", "heldout-00001.npz"):
        assert (root / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())
    with pytest.raises(ValueError, match="already holds a complete dataset"):
        _write(root)


# ---- the CLI ------------------------------------------------------------------------------------------------------


def test_data_command_writes_what_it_says(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    args = ["data", "--out", str(out), "--train-episodes", "5", "--heldout-episodes", "6", "--frames", "4"]
    assert main([*args, "--size", "16", "--shard-episodes", "3", "--workers", "1", "--config", str(CONFIG)]) == 0
    printed = capsys.readouterr().out.splitlines()
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sum(p.stat().st_size for p in out.glob("*.npz"))
    assert len(printed) == 4 + 1 and printed[0].startswith("[1/4] train-00000.npz: 3 episodes, 12 frames")
    assert f"wrote 11 episodes (5 train, 6 held-out) of 4 frames at 16x16 to {out} | 44 frames" in printed[-1]
    assert f"{on_disk / 1e6:.1f} MB on disk, {on_disk / 44:.0f} bytes/frame" in printed[-1]
    assert manifest["totals"] == {"episodes": 11, "frames": 44, "bytes": on_disk}
    assert manifest["game"]["key_names"] == list(DEFAULT_KEYS) and manifest["game"]["mouse_scale"] == 20.0
    assert manifest["command"].startswith(f"worldserve data --out {out} --train-episodes 5")
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["file"] for s in manifest["shards"])])
    assert Counter(e["theme"] for e in manifest["episodes"] if e["split"] == "heldout") == dict.fromkeys(THEME_NAMES, 1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_the_data_command_at_once_and_the_same_command_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C in a terminal signals the whole process group, the recording workers included: the command ends with
    one line and status 130, leaves no worker behind, and run again it ends with the files of an uninterrupted run."""
    out = tmp_path / "data"
    args = ["--train-episodes", "150", "--heldout-episodes", "6", "--frames", "8", "--size", "16"]
    args += ["--shard-episodes", "2", "--config", str(CONFIG)]  # 78 shards
    command = [sys.executable, "-m", "server.cli", "data", "--out", str(out), *args, "--workers", "2"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.npz"))) < 3:  # some shards written, most still to come
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"worldserve data: interrupted; the shards finished so far stay in {out}: run the same command to resume"
    )
    deadline = time.monotonic() + 10  # nothing of the group is left soon after, workers included
    while _group_alive(process.pid):
        assert time.monotonic() < deadline, "a process of the stopped command's group is still running"
        time.sleep(0.1)
    kept = len(list(out.glob("*.npz")))
    assert 3 <= kept < 78 and not (out / "manifest.json").exists()
    assert main(["data", "--out", str(out), *args, "--workers", "1"]) == 0  # the files do not depend on workers
    assert f"| resumed: kept {kept} shard(s) ({kept * 2 * 8} frames) of the interrupted run" in capsys.readouterr().out
    assert main(["data", "--out", str(tmp_path / "straight"), *args, "--workers", "1"]) == 0
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "straight" / shard["file"]).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())


def test_data_command_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "--out", str(tmp_path / "x"), "--train-episodes", "-1", "--config", str(CONFIG)]) == 2
    assert capsys.readouterr().err == "worldserve data: error: train_episodes must be >= 0, got -1\n"


STOPS = {signal.SIGINT, signal.SIGTERM}


def _report_blocked_stops(queue, label: str) -> None:
    queue.put((label, STOPS & signal.pthread_sigmask(signal.SIG_BLOCK, [])))


def test_workers_started_in_the_block_begin_with_the_stops_blocked() -> None:
    """A worker spawned inside `workers_start_deaf_to_stops` starts its interpreter with SIGINT and SIGTERM blocked
    (kept through fork and exec), before any initializer of its pool runs; one spawned outside does not, and the
    parent's mask is back after the block."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with workers_start_deaf_to_stops():
        inside = context.Process(target=_report_blocked_stops, args=(queue, "inside"))
        inside.start()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    outside = context.Process(target=_report_blocked_stops, args=(queue, "outside"))
    outside.start()
    reports = dict(queue.get(timeout=60) for _ in range(2))
    for process in (inside, outside):
        process.join(60)
    assert reports == {"inside": STOPS, "outside": set()}


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=lambda stop: stop.name)
def test_a_stop_that_arrives_in_the_block_is_handled_when_it_ends(stop: signal.Signals) -> None:
    """A Ctrl-C or SIGTERM that reaches the parent while it submits to its workers is held, then handled as the
    block ends: never dropped (training would otherwise go on past a Ctrl-C)."""
    received = []
    previous = signal.signal(stop, lambda number, _: received.append(number))
    try:
        with workers_start_deaf_to_stops():
            os.kill(os.getpid(), stop)
            held = list(received)
        assert received == [stop]
    finally:
        signal.signal(stop, previous)
    assert held in ([], [stop])  # another thread of the process may take it in the block; it is never lost
