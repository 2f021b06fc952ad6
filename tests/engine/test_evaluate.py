"""Evaluation against the reference game: the metrics on known inputs, the loops with an oracle engine that returns
the game's own frames, and `worldserve eval` end to end on a tiny random-weight model."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import IDLE, Action, WorldConfig
from engine.bench_rollout import PSNR_CAP_DB
from engine.dataset import THEME_NAMES, Episode, episode_actions, heldout_spec, record, record_episode
from engine.evaluate import (
    HORIZONS,
    STABILITY_DETAIL,
    STABILITY_MOTION,
    STABILITY_VIEW_DROP_DB,
    STABILITY_WINDOW,
    EvalOptions,
    alternative_action,
    alternative_outcomes,
    autoencoder_baselines,
    classify_theme,
    controllability,
    differ,
    frame_statistics,
    nearest_view,
    open_loop,
    open_loop_starts,
    pooled_views,
    prompt_following,
    psnr,
    rolling_mean,
    share_of_game,
    ssim,
    stability,
    stability_check,
    stability_range,
    stability_verdict,
    teacher_forced,
    theme_clips,
    view_drop,
)
from engine.game import Game
from engine.model import WorldModel
from server.cli import main
from tests.conftest import TINY, tiny_config, write_config

KEYS = tiny_config().model.actions.keys
SIZE = (16, 16)


def _episodes(count: int, frames: int) -> list[Episode]:
    return [record(heldout_spec(i), frames, SIZE, KEYS) for i in range(count)]


# ---- metrics ---------------------------------------------------------------------------------------------------


def test_psnr_and_ssim_on_known_frames() -> None:
    black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
    assert psnr(black, white) == pytest.approx(0.0)
    assert psnr(black + 1, black) == pytest.approx(20 * np.log10(255.0))  # MSE 1: 48.13 dB
    assert psnr(black + 16, black) == pytest.approx(20 * np.log10(255.0 / 16))
    assert psnr(white, white) == PSNR_CAP_DB, "identical frames count as the cap, not infinity"
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert ssim(noise, noise) == pytest.approx(1.0)
    assert ssim(255 - noise, noise) < 0
    assert 0 < ssim(np.clip(noise.astype(int) + 8, 0, 255).astype(np.uint8), noise) < 1


def test_alternative_actions_move_the_view_differently() -> None:
    left, right = frozenset({"ArrowLeft"}), frozenset({"ArrowRight"})
    assert alternative_action(Action(left)) == Action(right)
    assert alternative_action(Action(frozenset({"KeyW", "ArrowLeft"}))) == Action(frozenset({"KeyW", "ArrowRight"}))
    assert alternative_action(Action(frozenset(), 12.5, 2.0)) == Action(frozenset(), -12.5, 2.0)
    assert alternative_action(Action(frozenset({"KeyW", "ShiftLeft"}))) == Action(frozenset({"KeyS", "ShiftLeft"}))
    assert alternative_action(Action(frozenset({"ArrowDown"}))) == Action(frozenset({"ArrowUp"}))
    assert alternative_action(Action(frozenset({"KeyW", "KeyA"}))) == Action(frozenset({"KeyS", "KeyA"}))
    assert alternative_action(Action(frozenset({"KeyD"}))) == Action(frozenset({"KeyA"}))
    assert alternative_action(IDLE) == Action(right)
    assert alternative_action(Action(frozenset({"Space"}))) == Action(frozenset({"Space", "ArrowRight"}))


def test_alternative_outcomes_branch_from_the_episodes_state() -> None:
    [episode] = _episodes(1, 24)
    alternatives, outcomes = alternative_outcomes(episode)
    actions = episode_actions(episode)
    assert len(outcomes) == len(alternatives) == 23 and outcomes[0].shape == (1, 16, 16, 3)
    for t in (1, 10, 23):
        game = Game(episode.seed, episode.prompt, *SIZE)
        for action in actions[:t]:
            game.step(action)
        assert alternatives[t - 1] == [alternative_action(actions[t])]
        assert np.array_equal(game.step(alternatives[t - 1][0]), outcomes[t - 1][0])
    differ = [np.abs(o[0].astype(int) - episode.frames[t + 1]).mean() > 1 for t, o in enumerate(outcomes)]
    assert sum(differ) >= 0.8 * len(differ), "most alternatives must change what the player sees"


def test_controllability_of_oracles() -> None:
    episodes = _episodes(2, 24)
    true, other = [], []
    for episode in episodes:
        _, outcomes = alternative_outcomes(episode)
        true += [episode.frames[t : t + 1] for t in range(1, len(episode))]
        other += outcomes
    score, steps = controllability(true, other, true, other)
    assert score == 1.0 and steps >= 0.8 * len(true)
    assert controllability(other, true, true, other) == (0.0, steps), "predicting the alternative scores 0"
    assert controllability(true, true, true, other) == (0.5, steps), "ignoring the action is chance"
    assert controllability(true, other, true, true) == (None, 0), "steps whose outcomes agree do not count"


def test_colour_signature_tells_the_themes_apart_across_mazes() -> None:
    references = theme_clips(heldout_spec(0).seed, episode_actions(_episodes(1, 16)[0]), *SIZE)
    other = _episodes(2, 16)[1]
    clips = theme_clips(other.seed, episode_actions(other), *SIZE)
    assert [classify_theme(clips[theme], references) for theme in THEME_NAMES] == list(THEME_NAMES)
    without = {name: clip for name, clip in references.items() if name != "icy cave"}
    assert classify_theme(clips["icy cave"], without) != "icy cave"


def test_stability_accepts_the_game_and_rejects_a_fade_to_grey() -> None:
    spec = heldout_spec(0)
    game = record_episode(spec.seed, spec.prompt, 120, spec.policy_seed, SIZE, KEYS).frames
    bounds = stability_range(frame_statistics(game[1:], game[0]))
    assert all(stability_check(frame_statistics(game[1:], game[0]), bounds).values())
    fade = np.clip(np.arange(1, len(game)) / 40.0, 0.0, 1.0)[:, None, None, None]  # grey from frame 40 on
    faded = ((1 - fade) * game[1:] + fade * 128.0).round().astype(np.uint8)
    checks = stability_check(frame_statistics(faded, game[0]), bounds)
    assert checks["contrast"] is False
    # one frame out of range is smoothed over STABILITY_WINDOW frames; a window of them is not
    glitch = game[1:].copy()
    glitch[50] = np.clip(glitch[50].astype(int) + 2 * (bounds["mean"][1] - bounds["mean"][0]), 0, 255)
    assert frame_statistics(glitch[50:51], glitch[49])["mean"][0] > bounds["mean"][1]
    assert stability_check(frame_statistics(glitch, game[0]), bounds)["mean"] is True
    glitch[50 : 50 + STABILITY_WINDOW] = glitch[50]
    assert stability_check(frame_statistics(glitch, game[0]), bounds)["mean"] is False


def test_a_world_that_freezes_stays_in_range_but_fails_on_motion() -> None:
    spec = heldout_spec(0)
    played = record_episode(spec.seed, spec.prompt, 120, spec.policy_seed, SIZE, KEYS).frames
    game = np.concatenate([played, np.repeat(played[-1:], 40, axis=0)])  # then the player stands still a while
    game_stats = frame_statistics(game[1:], game[0])
    assert share_of_game(game_stats["change"], game_stats["change"]) == pytest.approx(1.0)
    frozen = np.repeat(game[1:2], len(game) - 1, axis=0)  # the first view, held
    frozen_stats = frame_statistics(frozen, game[0])
    assert all(stability_check(frozen_stats, stability_range(game_stats)).values())
    share = share_of_game(frozen_stats["change"], game_stats["change"])
    assert share < STABILITY_MOTION
    assert share_of_game(frozen_stats["detail"], game_stats["detail"]) >= STABILITY_DETAIL  # the view itself is sharp
    run = {"ok_by_statistic": {"mean": True, "contrast": False, "change": True}, "motion": share, "detail": 1.0}
    run["view_drop_db"] = 0.0
    assert stability_verdict(run) == "OUT: contrast, motion"
    assert stability_verdict({**run, "ok_by_statistic": {"mean": True}, "motion": 0.8}) == "ok"
    assert stability_verdict({**run, "ok_by_statistic": {"mean": True}, "motion": 0.8, "detail": 0.3}) == "OUT: blur"
    assert stability_verdict({**run, "ok_by_statistic": {"mean": True}, "motion": 0.8, "view_drop_db": 3.5}) == (
        "OUT: layout"
    )


def test_detail_tells_a_smear_and_noise_from_the_game() -> None:
    spec = heldout_spec(0)
    game = record_episode(spec.seed, spec.prompt, 120, spec.policy_seed, SIZE, KEYS).frames
    game_stats = frame_statistics(game[1:], game[0])
    assert share_of_game(game_stats["detail"], game_stats["detail"]) == pytest.approx(1.0)
    # each frame blurred by a 5 x 5 box (wrapping at the borders): the same colours, the same mean, little detail
    x = game.astype(np.float64)
    for axis in (1, 2):
        x = sum(np.roll(x, shift, axis=axis) for shift in range(-2, 3)) / 5
    smeared = x.round().astype(np.uint8)
    smeared_stats = frame_statistics(smeared[1:], smeared[0])
    np.testing.assert_allclose(smeared_stats["mean"], game_stats["mean"], atol=0.1)
    assert share_of_game(smeared_stats["detail"], game_stats["detail"]) < STABILITY_DETAIL
    # noise has far more detail than the game: out of its range
    noise = np.random.default_rng(0).integers(0, 256, game.shape, dtype=np.uint8)
    assert stability_check(frame_statistics(noise[1:], noise[0]), stability_range(game_stats))["detail"] is False


def test_nearest_view_leaves_out_the_frames_own_moment() -> None:
    views = pooled_views(np.stack([np.full((16, 16, 3), v, np.uint8) for v in (0, 100, 110, 200)]))
    frame = np.full((1, 16, 16, 3), 100, np.uint8)
    assert nearest_view(frame, views, [0], exclude=0)[0] == PSNR_CAP_DB  # view 1 is the frame itself
    # left out with its neighbours: the nearest is then view 3 (100 grey levels off, 8.1 dB) ...
    assert nearest_view(frame, views, [1], exclude=1)[0] == pytest.approx(20 * np.log10(255 / 100), abs=1e-3)
    # ... or view 2 (10 levels off, 28.1 dB)
    assert nearest_view(frame, views, [0], exclude=1)[0] == pytest.approx(20 * np.log10(255 / 10), abs=1e-3)


def test_nearest_view_tells_the_games_layout_from_a_scrambled_one() -> None:
    spec = heldout_spec(0)
    game = record_episode(spec.seed, spec.prompt, 200, spec.policy_seed, SIZE, KEYS).frames
    views, indices = pooled_views(game), list(range(len(game)))
    own = nearest_view(game, views, indices)
    # the same colours, not where the game puts them: upside down (floor above ceiling), or flattened to the mean
    flipped = nearest_view(game[:, ::-1], views, indices)
    flat = nearest_view(
        np.broadcast_to(game.mean(axis=(1, 2), keepdims=True), game.shape).astype(np.uint8), views, indices
    )
    noise = nearest_view(np.random.default_rng(0).integers(0, 256, game.shape, dtype=np.uint8), views, indices)
    assert view_drop(own, own) == 0.0
    for scrambled in (flipped, flat, noise):
        assert view_drop(scrambled, own) > STABILITY_VIEW_DROP_DB
    # noise is also out of the range of the game's own frames; the others are not, hence the criterion on the mean
    assert stability_check({"view": noise}, stability_range({"view": own}))["view"] is False


def test_view_drop_averages_errors_not_decibels() -> None:
    # 10 and 30 dB are errors of 0.1 and 0.001: their mean error 0.0505 is 12.97 dB, not the 20 dB of the mean of dB
    game = np.array([10.0, 30.0])
    assert view_drop(np.array([20.0, 20.0]), game) == pytest.approx(10 * np.log10(0.01 / 0.0505))
    assert view_drop(game, np.array([20.0, 20.0])) == pytest.approx(10 * np.log10(0.0505 / 0.01))
    # an exact twin (the cap, 100 dB) counts as a near-zero error, not as 100 dB
    assert view_drop(np.array([30.0, 30.0]), np.array([30.0, 100.0])) == pytest.approx(10 * np.log10(2), abs=1e-6)


def test_statistics_and_rolling_mean_on_known_values() -> None:
    frames = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 30)])
    frames[1, :2] = 50  # half the second frame at 50, half at 30
    stats = frame_statistics(frames, np.zeros((4, 4, 3), np.uint8))
    np.testing.assert_allclose(stats["mean"], [10, 40])
    np.testing.assert_allclose(stats["contrast"], [0, 10])
    np.testing.assert_allclose(stats["change"], [10, 30])
    # detail: frame 0 is flat; in frame 1 only the 4 vertical neighbour pairs across the 50 | 30 edge differ, by 20
    np.testing.assert_allclose(stats["detail"], [0, (0 + 20 * 4 / 12) / 2])
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 2, 3, 4]), 2), [1.5, 2.5, 3.5])
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 2, 3]), 25), [2.0])
    assert stability_range({"x": np.array([10.0, 20.0])}, margin=0.1) == {"x": (9.0, 21.0)}


def test_differ_and_the_autoencoder_baselines() -> None:
    black = np.zeros((16, 16, 3), np.uint8)
    assert not differ(black, black) and not differ(black + 1, black) and differ(black + 2, black)
    config = tiny_config()
    autoencoder = WorldModel(config).init_random_(0).autoencoder.eval()
    episodes = _episodes(2, 12)
    found = autoencoder_baselines(autoencoder, episodes, first=1)
    with torch.no_grad():
        decoded = [autoencoder.decode(autoencoder.encode(torch.from_numpy(e.frames))).numpy() for e in episodes]
    # (target, its own decoded encoding, the decoded encoding of the frame before, did the view move)
    rows = [
        (e.frames[t], d[t], d[t - 1], differ(e.frames[t], e.frames[t - 1]))
        for e, d in zip(episodes, decoded)
        for t in range(1, 12)
    ]
    for name, index in (("ceiling", 1), ("copy_last", 2)):
        scores = [psnr(row[index], row[0]) for row in rows]
        assert found[name]["psnr"] == pytest.approx(np.mean(scores), abs=1e-4)
        moving = [score for score, row in zip(scores, rows) if row[3]]
        assert found[name]["moving"]["psnr"] == (pytest.approx(np.mean(moving), abs=1e-4) if moving else None)
    assert found["ceiling"]["psnr"] < 30, "random weights reconstruct nothing"


def test_open_loop_starts_and_bad_options() -> None:
    assert open_loop_starts(64, 8, 2) == [0, 24]
    assert open_loop_starts(40, 8, 3) == [0]
    with pytest.raises(ValueError, match="frames=39 must be >= context"):
        EvalOptions(frames=39).check(1)
    with pytest.raises(ValueError, match="unknown policy"):
        EvalOptions(policies=("dense", "sparse")).check(1)
    with pytest.raises(ValueError, match="multiple of chunk_frames=2"):
        EvalOptions(stability_frames=41).check(2)
    with pytest.raises(ValueError, match="stability_draws must be >= 1, got 0"):
        EvalOptions(stability_draws=0).check(1)


# ---- the loops, with an engine that knows the game ----------------------------------------------------------------


class _OracleWorld:
    def __init__(self, game: Game) -> None:
        self.game = game


class OracleEngine:
    """A fake engine whose worlds are games: world seed j plays held-out maze j under the world's prompt, observing
    steps the game with the actions given, predicting steps a copy. A perfect world model."""

    chunk_frames = 1

    def __init__(self, config: WorldConfig) -> None:
        self.config = config

    def sibling(self, config: WorldConfig) -> OracleEngine:
        return self

    def new_world(self, prompt: str = "", seed: int = 0) -> _OracleWorld:
        return _OracleWorld(Game(heldout_spec(seed).seed, prompt, *SIZE))

    def observe(self, world: _OracleWorld, frames: np.ndarray, actions: Sequence[Action]) -> None:
        for action, frame in zip(actions, frames, strict=True):
            assert np.array_equal(world.game.step(action), frame), "observed frames must follow the actions"

    def predict(self, worlds: Sequence[_OracleWorld], actions: Sequence[list[Action]]) -> list[list[np.ndarray]]:
        return [[copy.deepcopy(w.game).step(a)] for w, [a] in zip(worlds, actions, strict=True)]

    def step(self, worlds: Sequence[_OracleWorld], actions: Sequence[list[Action]]) -> list[list[np.ndarray]]:
        return [[w.game.step(a)] for w, [a] in zip(worlds, actions, strict=True)]


def test_a_perfect_model_scores_perfectly() -> None:
    engine = OracleEngine(tiny_config())
    episodes = _episodes(2, 40)
    forced = teacher_forced(engine, episodes, log=lambda line: None)
    assert forced["psnr"] == PSNR_CAP_DB and forced["ssim"] == pytest.approx(1.0)
    assert forced["baseline_psnr"] < 40 and forced["frames"] == 2 * 39
    assert forced["controllability"] == 1.0 and forced["controllability_steps"] >= 0.8 * 2 * 39
    # the split where the view moved: counted from the game's frames, the copy baseline meaned over those alone
    moves = [
        (e.frames[t - 1], e.frames[t]) for e in episodes for t in range(1, 40) if differ(e.frames[t], e.frames[t - 1])
    ]
    assert 0 < forced["moving"]["frames"] == len(moves) <= 2 * 39
    assert forced["moving"]["psnr"] == PSNR_CAP_DB
    assert forced["moving"]["base_psnr"] == pytest.approx(np.mean([psnr(a, b) for a, b in moves]), abs=1e-4)
    options = EvalOptions(episodes=2, frames=40, open_loop_starts=1, prompt_frames=8, stability_frames=60)
    loop = open_loop(engine, episodes, options)
    assert loop["psnr"] == {str(h): PSNR_CAP_DB for h in HORIZONS}
    assert all(loop["baseline_psnr"][str(h)] < 40 for h in HORIZONS)
    for h in HORIZONS:
        moved = sum(differ(e.frames[8 + h - 1], e.frames[7]) for e in episodes)
        assert loop["moving"]["windows"][str(h)] == moved
        assert loop["moving"]["psnr"][str(h)] == (PSNR_CAP_DB if moved else None)
    game, model = loop["strip"]
    assert np.array_equal(game, model) and np.array_equal(game, episodes[0].frames[8:40])
    prompts = prompt_following(engine, options, KEYS)
    assert prompts["accuracy"] == 1.0 and prompts["clips"] == 3 * len(THEME_NAMES)
    stable = stability(engine, options, KEYS, log=lambda line: None)
    assert stable["ok"] and set(stable["policies"]) == set(options.policies)
    assert stable["speed"]["frame"] == 1 and stable["speed"]["fps"] > 0


# ---- worldserve eval ------------------------------------------------------------------------------------------


def test_cli_writes_every_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out = write_config(tmp_path / "tiny.yaml", TINY), tmp_path / "eval"
    argv = ["eval", "--config", str(config), "--out", str(out), "--episodes", "2", "--frames", "40"]
    policies = ["--policies", "window,tempcache+annsa", "--stability-draws", "2"]
    code = main([*argv, "--stability-frames", "40", *policies, "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    for key in ("teacher_forced_psnr", "teacher_forced_ssim", "controllability", "prompt_following"):
        assert isinstance(report[key], float), key
    for key in ("open_loop_psnr", "open_loop_ssim", "open_loop_moving_psnr", "open_loop_moving_ssim"):
        assert list(report[key]) == ["1", "4", "8", "16", "32"]
        assert list(report["baselines"]["copy_last"][key]) == list(report[key])
    assert 0 <= report["teacher_forced_moving_frames"] <= report["teacher_forced_frames"] == 2 * 39
    for name in ("autoencoder", "autoencoder_copy_last"):
        decoded = report["baselines"][name]
        assert set(decoded) == {f"teacher_forced{m}_{k}" for m in ("", "_moving") for k in ("psnr", "ssim")}
        assert isinstance(decoded["teacher_forced_psnr"], float)
    assert "autoencoder (ceiling)" in (out / "eval.md").read_text()
    assert isinstance(report["stability_ok"], bool) and report["cpu_fps_at_1000"] > 0
    assert report["cpu_fps_frame"] == 1, "a rollout shorter than 1064 frames is timed over its last 64"
    assert report["heldout_seeds"] == [10**9, 10**9 + 1, 10**9 + 2]
    assert report["config"] == str(config) and report["checkpoint"] is None and report["device"] == "cpu"
    assert report["torch_threads"] == 1 and set(report["seconds"]) >= {"teacher_forced", "stability", "total"}
    assert report["sampler"]["guidance"] == TINY["sampler"]["guidance"]
    stable = report["stability"]
    assert set(stable["policies"]) == {"window", "tempcache+annsa"}
    for run in stable["policies"].values():
        assert (
            set(run["series"]) == {"mean", "contrast", "change", "detail", "view"} and len(run["series"]["mean"]) == 39
        )
        first, second = run["draws"]  # two rollouts from world seeds 0 and 1: the same actions, other noise
        assert (first["seed"], second["seed"]) == (0, 1) and first["mean_by_statistic"] != second["mean_by_statistic"]
        for draw in run["draws"]:
            shares = draw["motion"] >= STABILITY_MOTION and draw["detail"] >= STABILITY_DETAIL
            shares = shares and draw["view_drop_db"] <= STABILITY_VIEW_DROP_DB
            assert draw["ok"] == (all(draw["ok_by_statistic"].values()) and shares)
            assert draw["verdict"] == stability_verdict(draw) and draw["ok"] == (draw["verdict"] == "ok")
        assert run["ok"] == (first["ok"] and second["ok"])
        # the policy's own record is its first draw, series included
        assert run["motion"] == first["motion"] and run["ok_by_statistic"] == first["ok_by_statistic"]
        assert run["mean_by_statistic"]["change"] == pytest.approx(np.mean(run["series"]["change"]), abs=0.01)
    assert stable["draws"] == 2 and report["stability_ok"] == all(r["ok"] for r in stable["policies"].values())
    assert (
        "2 draws per policy" in (out / "eval.md").read_text()
        and "of 2 draws [seed 0: " in (out / "eval.md").read_text()
    )
    statistics = {"mean", "contrast", "change", "detail", "view"}
    assert set(stable["game"]["range"]) == set(stable["game"]["mean_by_statistic"]) == statistics
    decoded = stable["game_through_autoencoder"]  # what the model could draw at best
    assert set(decoded["mean_by_statistic"]) == statistics and decoded["detail"] > 0
    assert stable["motion_min"] == STABILITY_MOTION and stable["detail_min"] == STABILITY_DETAIL
    assert stable["view_drop_max_db"] == STABILITY_VIEW_DROP_DB
    assert Image.open(out / "strip.png").size == (48 + 32 * 16 * 2, 14 + 2 * 16 * 2)
    assert Image.open(out / "stability.png").size[0] > 0
    printed = capsys.readouterr().out
    assert "teacher-forced PSNR" in printed and (out / "eval.md").read_text() in printed


def test_cli_rejects_a_bad_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY)
    assert main(["eval", "--config", str(config), "--out", str(tmp_path / "e"), "--frames", "16"]) == 2
    assert "frames=16 must be >= context" in capsys.readouterr().err
    assert main(["eval", "--config", str(config), "--out", str(tmp_path / "e"), "--policies", "fast"]) == 2
    assert "unknown policy" in capsys.readouterr().err
