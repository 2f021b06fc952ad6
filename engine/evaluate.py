"""Fidelity of a world model against the reference game on held-out mazes (`worldserve eval`; docs/eval.md).

    report = run_eval(load_config("configs/default.yaml"), "eval/", EvalOptions(episodes=8, frames=64))

Every number compares frames the engine generates with the frames the game (engine/game/) renders for the same
maze and the same actions. Episodes come from `heldout_spec(i)` (maze seeds in HELDOUT_SEEDS, which training never
draws). Frame t of an episode is the view after action t; action 0 is idle, frame 0 the first view.

Parts, each an engine loop feeding a pure metric function below it (the functions are what the tests pin down):
    teacher-forced   predict each next chunk from the TRUE history (`predict`, then `observe` the true frames):
                     PSNR and SSIM, and the copy-last-frame baseline
    controllability  at the same steps, a twin world (same seed, same history, so the same noise) predicts under an
                     `alternative_action`; share of steps whose true-action prediction is closer to the game's frame
    open-loop        `observe` `context` true frames, then `step` HORIZONS[-1] frames under the true actions;
                     PSNR / SSIM at each horizon, and the last context frame as the baseline
    prompt-following from scratch under each theme's name; the clip is classified as the theme whose game clip
                     (same maze seed and actions) has the nearest `colour_signature`
    stability        long open-loop rollouts per attention policy (`stability_draws` of them, world seeds 0, 1, ...:
                     one rollout is one draw from the model's noise, and last-bit differences send the same
                     policy down other paths) under HumanPolicy actions; every per-frame
                     statistic, smoothed, must stay within the game's own range (`stability_check`), and the
                     rollout must keep at least STABILITY_MOTION of the game's frame change and STABILITY_DETAIL of
                     its detail (`share_of_game`), and its frames must lie at most STABILITY_VIEW_DROP_DB further
                     from the views the game shows than the game's own (`nearest_view`); the game's frames through
                     the autoencoder are the reference of what the model can draw at best
    speed            frames per second of the FPS_POLICY rollout around frame FPS_FRAME (median step, with decode)

Output: eval.json (everything, with seeds, config, device and wall times), eval.md, strip.png, stability.png.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from engine.actions import Action
from engine.autoencoder import FrameAutoencoder
from engine.bench_rollout import PSNR_CAP_DB
from engine.config import ATTENTION_PRESETS, WorldConfig, with_overrides
from engine.dataset import THEME_NAMES, Episode, episode_actions, heldout_spec, is_heldout, record, record_episode
from engine.game import Game
from engine.rollout import FrameRecorder
from engine.world_engine import WorldEngine

EVAL_FORMAT = "worldserve-eval/1"
HORIZONS = (1, 4, 8, 16, 32)  # open-loop horizons: the h-th generated frame (frames)
DEFAULT_POLICIES = tuple(ATTENTION_PRESETS)  # every attention configuration the server offers
# per frame, on 0..255: mean, std, mean |frame - previous frame|, mean |pixel - its right and lower neighbours|;
# and in dB: the PSNR of the nearest game view (`nearest_view`)
STATISTICS = ("mean", "contrast", "change", "detail", "view")
VIEW_POOL = 4  # `nearest_view` compares frames averaged over VIEW_POOL x VIEW_POOL pixels: layout, not texture
VIEW_EXCLUDE = 8  # a frame's own neighbourhood in the stability episode (+-8 frames) is not a candidate view
VIEW_MAZES = 4  # views also come from this many other held-out mazes, played under the same prompt
VIEW_PLOT_TOP_DB = 50.0  # stability.png shows the view statistic up to here
STABILITY_WINDOW = 25  # frames of the trailing rolling mean a model's statistics are smoothed with
STABILITY_MARGIN = 0.1  # the game's range of a statistic is widened by this fraction of its width on each side
STABILITY_MOTION = 0.5  # a policy's mean frame change must be at least this share of the game's under the same actions
STABILITY_DETAIL = 0.5  # and its mean detail at least this share of the game's: a smear of the right colours has little
STABILITY_VIEW_DROP_DB = 3.01  # and its frames at most twice as far from the game's views as its own (`view_drop`)
DIFFERENT_FRAMES = 1.0  # mean |a - b| (0..255) above which the game's two next frames count as different
FPS_POLICY, FPS_FRAME, FPS_FRAMES = "tempcache+annsa", 1000, 64  # speed: median step over frames 1000..1063

Log = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class EvalOptions:
    """What `run_eval` measures; sizes in frames."""

    episodes: int = 8  # held-out episodes for teacher forcing, controllability and open-loop
    frames: int = 64  # frames per held-out episode (>= context + HORIZONS[-1])
    context: int = 8  # true frames an open-loop rollout starts from
    open_loop_starts: int = 2  # start points per episode, evenly spaced
    prompt_seeds: int = 3  # maze seeds per theme for prompt following
    prompt_frames: int = 16
    stability_frames: int = 2000
    stability_draws: int = 1  # rollouts per policy, each from its own world seed; a policy holds if every one does
    policies: tuple[str, ...] = DEFAULT_POLICIES

    def check(self, chunk: int) -> None:
        """Raise ValueError for options the parts cannot run with (`chunk` = the model's chunk_frames)."""
        for name in (
            "episodes",
            "frames",
            "context",
            "open_loop_starts",
            "prompt_seeds",
            "prompt_frames",
            "stability_draws",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames < self.context + HORIZONS[-1]:
            raise ValueError(f"frames={self.frames} must be >= context + {HORIZONS[-1]} = {self.context + 32}")
        for name in ("frames", "context", "prompt_frames", "stability_frames"):
            if getattr(self, name) % chunk:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of chunk_frames={chunk}")
        if self.stability_frames < max(2 * chunk, 2):
            raise ValueError(f"stability_frames must be >= {max(2 * chunk, 2)}, got {self.stability_frames}")
        unknown = [name for name in self.policies if name not in ATTENTION_PRESETS]
        if unknown or not self.policies:
            raise ValueError(f"unknown policy {unknown[:1]}; choose from {', '.join(ATTENTION_PRESETS)}")


# ---- metrics: pure functions of uint8 (..., H, W, 3) frames ---------------------------------------------------------


def psnr(predicted: np.ndarray, true: np.ndarray) -> float:
    """PSNR in dB of uint8 frames (scikit-image, data range 255); identical frames count as PSNR_CAP_DB (not
    infinity)."""
    if np.array_equal(predicted, true):
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(true, predicted, data_range=255)))


def ssim(predicted: np.ndarray, true: np.ndarray) -> float:
    """SSIM of one uint8 (H, W, 3) frame pair (scikit-image, channel_axis=-1, data_range=255)."""
    return float(structural_similarity(true, predicted, channel_axis=-1, data_range=255))


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def differ(a: np.ndarray, b: np.ndarray, threshold: float = DIFFERENT_FRAMES) -> bool:
    """Do two uint8 frames differ by more than `threshold` grey levels in mean absolute difference?"""
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)))) > threshold


_SWAPS = (
    ({"ArrowLeft": "ArrowRight", "ArrowRight": "ArrowLeft"}, True),  # turning: the other way (mouse too)
    ({"KeyW": "KeyS", "KeyS": "KeyW", "ArrowUp": "ArrowDown", "ArrowDown": "ArrowUp"}, False),  # forward / back
    ({"KeyA": "KeyD", "KeyD": "KeyA"}, False),  # strafing: the other side
)


def alternative_action(action: Action) -> Action:
    """An action that moves the view differently: a turn turns the other way (keys and mouse mirrored), else a
    walk walks the other way, else a strafe strafes to the other side, else (idle, jump, run alone) turn right."""
    for swap, mouse in _SWAPS:
        if action.keys & swap.keys() or (mouse and action.mouse_dx):
            keys = frozenset(swap.get(key, key) for key in action.keys)
            return Action(keys, -action.mouse_dx if mouse else action.mouse_dx, action.mouse_dy)
    return Action(action.keys | {"ArrowRight"}, action.mouse_dx, action.mouse_dy)


def controllability(
    predicted: Sequence[np.ndarray],
    predicted_alternative: Sequence[np.ndarray],
    true: Sequence[np.ndarray],
    true_alternative: Sequence[np.ndarray],
    threshold: float = DIFFERENT_FRAMES,
) -> tuple[float | None, int]:
    """Share of steps where the prediction under the true action is closer (MSE) to the game's true frames than
    the prediction under the alternative action is; ties (a model that ignores the action) count half. Only steps
    where the game's two outcomes differ (mean |true - true_alternative| > threshold) count. Returns (score, steps);
    the score is None when no step counts. Each item is one step's frames (any shape, equal within a step)."""
    score, steps = 0.0, 0
    for p, q, t, u in zip(predicted, predicted_alternative, true, true_alternative, strict=True):
        if not differ(t, u, threshold):
            continue
        steps += 1
        right, wrong = _mse(p, t), _mse(q, t)
        score += 1.0 if right < wrong else 0.5 if right == wrong else 0.0
    return (score / steps if steps else None), steps


def colour_signature(clip: np.ndarray) -> np.ndarray:
    """Mean RGB of the top, middle and bottom thirds of the frame (ceiling or sky / walls / floor), averaged over a
    uint8 (T, H, W, 3) clip: float64 (9,) on 0..255. Position-free on purpose: a world generated from a prompt
    alone cannot know the maze, only how the theme looks."""
    bounds = np.linspace(0, clip.shape[1], 4).round().astype(int)
    return np.concatenate([clip[:, a:b].reshape(-1, 3).mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])


def classify_theme(clip: np.ndarray, references: dict[str, np.ndarray]) -> str:
    """The name of the reference clip whose `colour_signature` is nearest (Euclidean) to the clip's."""
    signature = colour_signature(clip)
    return min(references, key=lambda name: float(np.linalg.norm(colour_signature(references[name]) - signature)))


def frame_statistics(frames: np.ndarray, previous: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame of uint8 (T, H, W, 3): mean intensity, contrast (std), change (mean |frame - the frame before|;
    `previous` is the frame before the first) and detail (mean |pixel - its right neighbour| and |pixel - its lower
    neighbour|, averaged: edges and texture, which a smear lacks and noise has too much of), each float64 (T,) on
    0..255."""
    x = frames.astype(np.float64)  # (T, H, W, 3)
    before = np.concatenate([previous[None].astype(np.float64), x[:-1]])  # (T, H, W, 3)
    across = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
    down = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
    return {
        "mean": x.mean(axis=(1, 2, 3)),
        "contrast": x.reshape(len(x), -1).std(axis=1),
        "change": np.abs(x - before).mean(axis=(1, 2, 3)),
        "detail": (across + down) / 2,
    }


def pooled_views(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3 H W / VIEW_POOL^2) in [0, 1]: each frame averaged over VIEW_POOL x
    VIEW_POOL pixels, which keeps where the walls, floor and ceiling are and drops their texture."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    return torch.nn.functional.avg_pool2d(x, VIEW_POOL).flatten(1)


def nearest_view(
    frames: np.ndarray, views: torch.Tensor, indices: Sequence[int], exclude: int = VIEW_EXCLUDE
) -> np.ndarray:
    """Per uint8 frame (T, H, W, 3): the PSNR in dB (capped at PSNR_CAP_DB) between it and the nearest of `views`
    (`pooled_views` of game frames), both pooled. The first rows of `views` are the stability episode's frames
    0, 1, ...; for frame k, whose index in that episode is indices[k], the episode's frames within `exclude` of it
    are left out, so the game's own frames are scored against other moments and mazes, as a model's are. A frame
    the game could show scores near the game's own values; a smear of its colours, or noise, far below."""
    queries = pooled_views(frames)
    scores = []
    for start in range(0, len(queries), 256):  # (256, V) distances at a time
        block = torch.cdist(queries[start : start + 256], views).square() / views.shape[1]  # mean squared error
        for row, index in enumerate(indices[start : start + 256]):
            block[row, max(0, index - exclude) : index + exclude + 1] = float("inf")
        error = block.min(dim=1).values.clamp(min=10 ** (-PSNR_CAP_DB / 10))
        scores.append(-10.0 * torch.log10(error))
    return torch.cat(scores).double().numpy()


def rollout_statistics(
    frames: np.ndarray, previous: np.ndarray, views: torch.Tensor, indices: Sequence[int]
) -> dict[str, np.ndarray]:
    """Every statistic of STATISTICS per frame: `frame_statistics` (`previous`: the frame before the first) and the
    `nearest_view` among `views` (`indices`: the frames' indices in the stability episode)."""
    return {**frame_statistics(frames, previous), "view": nearest_view(frames, views, indices)}


@torch.no_grad()
def through_autoencoder(autoencoder: FrameAutoencoder, frames: np.ndarray) -> np.ndarray:
    """uint8 frames (T, H, W, 3) encoded and decoded: what a model drawing through this autoencoder shows at best."""
    return autoencoder.decode(autoencoder.encode(torch.from_numpy(frames))).cpu().numpy()


def view_drop(model: np.ndarray, game: np.ndarray) -> float:
    """How much further a rollout's frames lie from the game's views than the game's own frames, in dB: 10 log10 of
    the ratio of their mean squared errors to the nearest view (`nearest_view` values, dB). Averaged as errors, not
    as dB: where the game stands still, its frames have an exact twin beyond the left-out neighbourhood (PSNR at the
    cap), which would dominate a mean of dB."""
    model_error, game_error = (float(np.mean(10.0 ** (-np.asarray(v) / 10.0))) for v in (model, game))
    return 10.0 * float(np.log10(model_error / game_error))


def rolling_mean(values: np.ndarray, window: int = STABILITY_WINDOW) -> np.ndarray:
    """Means over every run of `window` consecutive values (len - window + 1 of them; one mean if shorter)."""
    window = min(window, len(values))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def stability_range(game: dict[str, np.ndarray], margin: float = STABILITY_MARGIN) -> dict[str, tuple[float, float]]:
    """The game's min..max of each statistic, widened by `margin` x its width on each side."""
    bounds = {}
    for name, values in game.items():
        low, high = float(values.min()), float(values.max())
        bounds[name] = (low - margin * (high - low), high + margin * (high - low))
    return bounds


def stability_check(
    model: dict[str, np.ndarray], bounds: dict[str, tuple[float, float]], window: int = STABILITY_WINDOW
) -> dict[str, bool]:
    """Per statistic: does its rolling mean over `window` frames stay within the game's bounds throughout?"""
    checks = {}
    for name, (low, high) in bounds.items():
        smooth = rolling_mean(model[name], window)
        checks[name] = bool(smooth.min() >= low and smooth.max() <= high)
    return checks


def share_of_game(model: np.ndarray, game: np.ndarray) -> float:
    """A rollout's mean of a statistic as a share of the game's under the same actions: what the range check cannot
    see when the game itself reaches the extreme at times. The game stands still at times (its change reaches 0),
    so a world that freezes stays in range; it faces a wall up close at times (little detail), so a world that
    smears into its colours does too."""
    reference = float(game.mean())
    return float(model.mean()) / reference if reference > 0 else float("inf")


def stability_verdict(run: dict[str, Any]) -> str:
    """'ok', or 'OUT:' and what failed: each statistic that left the game's range, 'motion' when the rollout moved
    less than STABILITY_MOTION of the game's frame change, 'blur' when it kept less than STABILITY_DETAIL of the
    game's detail, 'layout' when its frames lay more than STABILITY_VIEW_DROP_DB further from the game's views than the
    game's own (`view_drop`). The two shares have names of their own so that they never read as the statistics
    'change' and 'detail' leaving their range."""
    failed = [name for name, ok in run["ok_by_statistic"].items() if not ok]
    failed += [] if run["motion"] >= STABILITY_MOTION else ["motion"]
    failed += [] if run["detail"] >= STABILITY_DETAIL else ["blur"]
    failed += [] if run["view_drop_db"] <= STABILITY_VIEW_DROP_DB else ["layout"]
    return f"OUT: {', '.join(failed)}" if failed else "ok"


def _mean(values: Sequence[float], digits: int = 4) -> float:
    return round(float(np.mean(values)), digits)


def _means(rows: dict[str, list[float]], keep: np.ndarray) -> dict[str, float | None]:
    """Each row's mean over the kept items (a boolean mask); None where nothing is kept."""
    return {name: _mean(np.asarray(values)[keep]) if keep.any() else None for name, values in rows.items()}


def _span(values: np.ndarray) -> list[float]:
    return [round(float(values.min()), 2), round(float(values.max()), 2)]


# ---- the game side: reference frames under other actions and prompts -----------------------------------------------


def alternative_outcomes(episode: Episode, chunk: int = 1) -> tuple[list[list[Action]], list[np.ndarray]]:
    """For every chunk of the episode after the first: the `alternative_action` of each of its actions and the
    frames the game renders under them from the same state (a copy of the game). Returns (actions, frames uint8
    (chunk, H, W, 3)) per chunk, aligned with the episode's chunks 1, 2, ..."""
    _, height, width, _ = episode.frames.shape
    actions = episode_actions(episode)
    game = Game(episode.seed, episode.prompt, height, width)
    for t in range(chunk):
        game.step(actions[t])
    alternatives, outcomes = [], []
    for start in range(chunk, len(actions), chunk):
        other = [alternative_action(a) for a in actions[start : start + chunk]]
        branch = copy.deepcopy(game)
        outcomes.append(np.stack([branch.step(a) for a in other]))
        alternatives.append(other)
        for t in range(start, start + chunk):
            assert np.array_equal(game.step(actions[t]), episode.frames[t]), "the game no longer replays its episode"
    return alternatives, outcomes


def theme_clips(seed: int, actions: Sequence[Action], height: int, width: int) -> dict[str, np.ndarray]:
    """The game's clip (uint8 (T, H, W, 3)) of maze `seed` under `actions` for every theme, prompted by its name."""
    clips = {}
    for theme in THEME_NAMES:
        game = Game(seed, theme, height, width)
        clips[theme] = np.stack([game.step(action) for action in actions])
    return clips


# ---- the engine loops ----------------------------------------------------------------------------------------------


def teacher_forced(engine: WorldEngine, episodes: Sequence[Episode], log: Log = _say) -> dict[str, Any]:
    """Predict every chunk after the first from the true history, batched over episodes; a twin world per episode
    (same seed and history, hence the same noise) predicts under the alternative actions at the same time."""
    T = engine.chunk_frames
    actions = [episode_actions(e) for e in episodes]
    games = [alternative_outcomes(e, T) for e in episodes]
    worlds = [engine.new_world(e.prompt, seed=i) for i, e in enumerate(episodes)]
    twins = [engine.new_world(e.prompt, seed=i) for i, e in enumerate(episodes)]
    for world, twin, episode, acts in zip(worlds, twins, episodes, actions):
        engine.observe(world, episode.frames[:T], acts[:T])
        engine.observe(twin, episode.frames[:T], acts[:T])
    rows: dict[str, list] = {k: [] for k in ("psnr", "ssim", "base_psnr", "base_ssim")}
    moved: list[bool] = []  # per compared frame: did the game's view change since the frame before the chunk?
    pairs: dict[str, list[np.ndarray]] = {k: [] for k in ("predicted", "alternative", "true", "true_alternative")}
    for k, start in enumerate(range(T, len(episodes[0]), T)):
        chunk_actions = [a[start : start + T] for a in actions] + [g[0][k] for g in games]
        predicted = engine.predict([*worlds, *twins], chunk_actions)
        for i, episode in enumerate(episodes):
            true = episode.frames[start : start + T]  # (T, H, W, 3)
            ours, theirs = np.stack(predicted[i]), np.stack(predicted[len(episodes) + i])
            before = episode.frames[start - 1]
            for frame, want in zip(ours, true):
                rows["psnr"].append(psnr(frame, want))
                rows["ssim"].append(ssim(frame, want))
                rows["base_psnr"].append(psnr(before, want))
                rows["base_ssim"].append(ssim(before, want))
                moved.append(differ(want, before))
            for name, value in zip(pairs, (ours, theirs, true, games[i][1][k])):
                pairs[name].append(value)
            for world in (worlds[i], twins[i]):
                engine.observe(world, true, actions[i][start : start + T])
        if k % 16 == 0:
            log(f"  teacher-forced frame {start}/{len(episodes[0])}: PSNR {_mean(rows['psnr'], 2)} dB so far")
    score, steps = controllability(pairs["predicted"], pairs["alternative"], pairs["true"], pairs["true_alternative"])
    every, moving = _means(rows, np.ones(len(moved), bool)), _means(rows, np.array(moved))
    return {
        "psnr": every["psnr"],
        "ssim": every["ssim"],
        "baseline_psnr": every["base_psnr"],
        "baseline_ssim": every["base_ssim"],
        "frames": len(moved),
        "moving": {"frames": int(sum(moved)), **moving},
        "controllability": None if score is None else round(score, 4),
        "controllability_steps": steps,
    }


@torch.no_grad()
def autoencoder_baselines(autoencoder: FrameAutoencoder, episodes: Sequence[Episode], first: int) -> dict[str, Any]:
    """Two references for the teacher-forced targets (each episode's frames from `first` on), each a frame decoded
    from the autoencoder's encoding of a true frame, scored against the target:
        ceiling     the target's own encoding: what a prediction in the latent space scores at best
        copy_last   the encoding of the frame before it: copying the last frame in the latent space
    PSNR and SSIM over every target, and over those whose view changed since the frame before (`moving`)."""
    rows: dict[str, dict[str, list[float]]] = {name: {"psnr": [], "ssim": []} for name in ("ceiling", "copy_last")}
    moved = []
    for episode in episodes:
        decoded = through_autoencoder(autoencoder, episode.frames[first - 1 :])
        for k, want in enumerate(episode.frames[first:]):  # target k's frame before it is decoded[k]
            for name, frame in (("ceiling", decoded[k + 1]), ("copy_last", decoded[k])):
                rows[name]["psnr"].append(psnr(frame, want))
                rows[name]["ssim"].append(ssim(frame, want))
            moved.append(differ(want, episode.frames[first - 1 + k]))
    every, moving = np.ones(len(moved), bool), np.array(moved)
    return {name: {**_means(row, every), "moving": _means(row, moving)} for name, row in rows.items()}


def open_loop_starts(frames: int, context: int, starts: int) -> list[int]:
    """Up to `starts` evenly spaced first frames of a context + HORIZONS[-1] window within `frames`."""
    last = frames - context - HORIZONS[-1]
    return sorted({int(round(s)) for s in np.linspace(0, last, starts)})


def open_loop(engine: WorldEngine, episodes: Sequence[Episode], options: EvalOptions) -> dict[str, Any]:
    """From `context` true frames, `step` HORIZONS[-1] frames under the true actions, all windows in one batch.
    Returns per-horizon means, baselines, and the first window's game and model clips (for the strip)."""
    T, n, context = engine.chunk_frames, HORIZONS[-1], options.context
    windows = [(e, s) for e in episodes for s in open_loop_starts(options.frames, context, options.open_loop_starts)]
    actions = {id(e): episode_actions(e) for e in episodes}
    worlds = []
    for i, (episode, s) in enumerate(windows):
        worlds.append(engine.new_world(episode.prompt, seed=i))
        engine.observe(worlds[-1], episode.frames[s : s + context], actions[id(episode)][s : s + context])
    generated: list[list[np.ndarray]] = [[] for _ in windows]
    for k in range(0, n, T):
        chunk = [actions[id(e)][s + context + k : s + context + k + T] for e, s in windows]
        for frames, new in zip(generated, engine.step(worlds, chunk)):
            frames.extend(new)
    names = ("psnr", "ssim", "baseline_psnr", "baseline_ssim")
    result: dict[str, Any] = {"windows": len(windows), **{name: {} for name in names}}
    result["moving"] = {"windows": {}, **{name: {} for name in names}}  # windows whose view changed by horizon h
    for h in HORIZONS:
        # (generated frame h, true frame, last context frame) per window
        triples = [
            (g[h - 1], e.frames[s + context + h - 1], e.frames[s + context - 1])
            for g, (e, s) in zip(generated, windows)
        ]
        rows = {
            "psnr": [psnr(p, t) for p, t, _ in triples],
            "ssim": [ssim(p, t) for p, t, _ in triples],
            "baseline_psnr": [psnr(b, t) for _, t, b in triples],
            "baseline_ssim": [ssim(b, t) for _, t, b in triples],
        }
        moved = np.array([differ(t, b) for _, t, b in triples])
        result["moving"]["windows"][str(h)] = int(moved.sum())
        for source, target in (
            (_means(rows, np.ones(len(moved), bool)), result),
            (_means(rows, moved), result["moving"]),
        ):
            for name in names:
                target[name][str(h)] = source[name]
    episode, s = windows[0]
    result["strip"] = (episode.frames[s + context : s + context + n], np.stack(generated[0]))
    return result


def prompt_following(engine: WorldEngine, options: EvalOptions, key_names: Sequence[str]) -> dict[str, Any]:
    """Generate `prompt_frames` frames from scratch under each theme's name for `prompt_seeds` held-out mazes (all in
    one batch) and classify each clip against the game's clips of the same maze and actions under every theme."""
    height, width = engine.config.model.frame_height, engine.config.model.frame_width
    jobs, worlds, references = [], [], {}
    for j in range(options.prompt_seeds):
        spec = heldout_spec(j)
        actions = episode_actions(record(spec, options.prompt_frames, (height, width), key_names))
        references[spec.seed] = theme_clips(spec.seed, actions, height, width)
        for theme in THEME_NAMES:
            jobs.append((theme, spec.seed, actions))
            worlds.append(engine.new_world(prompt=theme, seed=j))
    clips: list[list[np.ndarray]] = [[] for _ in jobs]
    T = engine.chunk_frames
    for start in range(0, options.prompt_frames, T):
        for clip, new in zip(clips, engine.step(worlds, [actions[start : start + T] for _, _, actions in jobs])):
            clip.extend(new)
    confusion = {theme: dict.fromkeys(THEME_NAMES, 0) for theme in THEME_NAMES}
    for (theme, seed, _), clip in zip(jobs, clips):
        confusion[theme][classify_theme(np.stack(clip), references[seed])] += 1
    correct = sum(confusion[theme][theme] for theme in THEME_NAMES)
    return {"accuracy": round(correct / len(jobs), 4), "clips": len(jobs), "confusion": confusion}


def stability_episode(config: WorldConfig, frames: int, key_names: Sequence[str]) -> Episode:
    """The game episode whose actions the stability rollouts play: held-out maze 0 under its HumanPolicy."""
    spec = heldout_spec(0)
    size = (config.model.frame_height, config.model.frame_width)
    return record_episode(spec.seed, spec.prompt, frames, spec.policy_seed, size, key_names)


def stability_views(config: WorldConfig, game: Episode, key_names: Sequence[str]) -> torch.Tensor:
    """`pooled_views` of the stability episode's frames, then of VIEW_MAZES other held-out mazes played as long under
    its prompt: the views `nearest_view` searches."""
    size = (config.model.frame_height, config.model.frame_width)
    frames = [game.frames]
    for j in range(1, VIEW_MAZES + 1):
        spec = heldout_spec(j)
        frames.append(record_episode(spec.seed, game.prompt, len(game), spec.policy_seed, size, key_names).frames)
    return pooled_views(np.concatenate(frames))


def stability(
    engine: WorldEngine,
    options: EvalOptions,
    key_names: Sequence[str],
    log: Log = _say,
    autoencoder: FrameAutoencoder | None = None,
) -> dict[str, Any]:
    """Per policy, `stability_draws` open-loop rollouts of `stability_frames` frames (world seeds 0, 1, ...) under the
    HumanPolicy actions of a game episode (one chunk of true frames first); statistics against the game's own range,
    and the step times of FPS_POLICY (its first draw). A policy's record holds its first draw in full (the series
    stability.png draws), `draws` every draw's verdict and statistics, and `ok`: whether every draw held. With
    `autoencoder`, the same statistics of the game's frames encoded and decoded: what a model drawing through it
    could show at best."""
    config, T, n = engine.config, engine.chunk_frames, options.stability_frames
    game = stability_episode(config, n, key_names)
    actions = episode_actions(game)
    views = stability_views(config, game, key_names)
    indices = list(range(T, n))  # the episode index of every compared frame

    def statistics(frames: np.ndarray) -> dict[str, np.ndarray]:
        return rollout_statistics(frames, game.frames[T - 1], views, indices)

    game_stats = statistics(game.frames[T:])
    bounds = stability_range(game_stats)
    fps_start = FPS_FRAME if n >= FPS_FRAME + FPS_FRAMES else max(T, n - FPS_FRAMES)
    runs: dict[str, Any] = {}
    speed: dict[str, Any] = {}
    names = list(options.policies) + ([] if FPS_POLICY in options.policies else [FPS_POLICY])
    for name in names:
        timing_only = name not in options.policies  # run only as far as the speed window needs
        sibling = engine.sibling(with_overrides(config, ATTENTION_PRESETS[name], f"<policy {name}>"))
        draws = []
        for draw in range(1 if timing_only else options.stability_draws):
            last = min(n, fps_start + FPS_FRAMES) if timing_only else n
            world = sibling.new_world(game.prompt, seed=draw)
            sibling.observe(world, game.frames[:T], actions[:T])
            recorder, seconds = FrameRecorder(last - T, *game.frames.shape[1:3]), []
            began = time.perf_counter()
            for start in range(T, last, T):
                stepped = time.perf_counter()
                recorder.extend(sibling.step([world], [actions[start : start + T]])[0])
                seconds.extend([time.perf_counter() - stepped] * T)  # per frame: its chunk's step time
                if (start // T) % 500 == 0:
                    log(f"  stability {name}, draw {draw}: frame {start}/{last} ({time.perf_counter() - began:.0f} s)")
            if name == FPS_POLICY and draw == 0:
                window = seconds[fps_start - T : fps_start - T + FPS_FRAMES]
                speed = {"fps": round(T / float(np.median(window)), 2), "frame": fps_start, "frames": len(window)}
            if timing_only:
                continue
            stats = statistics(recorder.frames)
            run = {
                "seed": draw,
                "ok_by_statistic": stability_check(stats, bounds),
                "motion": round(share_of_game(stats["change"], game_stats["change"]), 3),
                "detail": round(share_of_game(stats["detail"], game_stats["detail"]), 3),
                "view_drop_db": round(view_drop(stats["view"], game_stats["view"]), 2),
                "smoothed_range": {k: _span(rolling_mean(v)) for k, v in stats.items()},
                "mean_by_statistic": {k: round(float(v.mean()), 2) for k, v in stats.items()},
                "seconds": round(time.perf_counter() - began, 2),
            }
            run["verdict"] = stability_verdict(run)
            run["ok"] = run["verdict"] == "ok"
            draws.append((run, stats))
            log(f"  stability {name}, draw {draw}: {run['verdict']} ({run['seconds']:.0f} s)")
        if draws:
            # the first draw's whole record (its series are what stability.png draws), and every draw's summary
            first, stats = draws[0]
            runs[name] = {
                **{k: v for k, v in first.items() if k not in ("seed", "verdict")},
                "series": {k: np.round(v, 2).tolist() for k, v in stats.items()},
                "ok": all(run["ok"] for run, _ in draws),
                "draws": [run for run, _ in draws],
            }
    reference = None
    if autoencoder is not None:
        decoded_stats = statistics(through_autoencoder(autoencoder, game.frames[T:]))
        reference = {
            "mean_by_statistic": {k: round(float(v.mean()), 2) for k, v in decoded_stats.items()},
            "detail": round(share_of_game(decoded_stats["detail"], game_stats["detail"]), 3),
            "view_drop_db": round(view_drop(decoded_stats["view"], game_stats["view"]), 2),
        }
    return {
        "ok": all(run["ok"] for run in runs.values()),
        "frames": n,
        "draws": options.stability_draws,
        "first_frame": T,
        "seed": game.seed,
        "policy_seed": game.policy_seed,
        "prompt": game.prompt,
        "statistics": list(STATISTICS),
        "window": STABILITY_WINDOW,
        "margin": STABILITY_MARGIN,
        "motion_min": STABILITY_MOTION,
        "detail_min": STABILITY_DETAIL,
        "view_drop_max_db": STABILITY_VIEW_DROP_DB,
        "view": {"pool": VIEW_POOL, "exclude": VIEW_EXCLUDE, "mazes": VIEW_MAZES},
        "game_through_autoencoder": reference,
        "game": {
            "range": {k: [round(low, 2), round(high, 2)] for k, (low, high) in bounds.items()},
            "mean_by_statistic": {k: round(float(v.mean()), 2) for k, v in game_stats.items()},
            "series": {k: np.round(v, 2).tolist() for k, v in game_stats.items()},
        },
        "policies": runs,
        "speed": speed,
    }


def _shown(path: Path) -> str:
    """A path as a reader of the report should see it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _sampler_line(sampler: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value}" for name, value in sampler.items())


# ---- the whole evaluation and its files ----------------------------------------------------------------------------


def run_eval(
    config: WorldConfig,
    out: str | Path,
    options: EvalOptions | None = None,
    config_path: str | Path | None = None,
    log: Log = _say,
) -> dict[str, Any]:
    """Run every part on `config`'s engine and write eval.json, eval.md, strip.png and stability.png to `out`.
    Returns what eval.json holds (keys in docs/eval.md); `config_path` is only recorded."""
    options = options or EvalOptions()
    options.check(config.model.chunk_frames)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    began = time.perf_counter()

    def timed(part: str, began_part: float) -> None:
        seconds[part] = round(time.perf_counter() - began_part, 2)
        log(f"{part}: {seconds[part]:.1f} s")

    # 1. The engine and the held-out episodes.
    engine = WorldEngine.from_config(config)
    keys, size = config.model.actions.keys, (config.model.frame_height, config.model.frame_width)
    log(f"eval on {engine.device} ({torch.get_num_threads()} torch threads), policy {engine.policy.name}")
    part = time.perf_counter()
    episodes = [record(heldout_spec(i), options.frames, size, keys) for i in range(options.episodes)]
    assert all(is_heldout(e.seed) for e in episodes)
    timed("record", part)
    # 2. Teacher-forced next frame and controllability.
    part = time.perf_counter()
    forced = teacher_forced(engine, episodes, log)
    timed("teacher_forced", part)
    part = time.perf_counter()
    through_autoencoder = autoencoder_baselines(engine.model.autoencoder, episodes, engine.chunk_frames)
    timed("autoencoder", part)
    # 3. Open-loop from true starts.
    part = time.perf_counter()
    loop = open_loop(engine, episodes, options)
    timed("open_loop", part)
    # 4. Prompt following from scratch.
    part = time.perf_counter()
    prompts = prompt_following(engine, options, keys)
    timed("prompt_following", part)
    # 5. Long-rollout stability per attention policy, and the speed of FPS_POLICY.
    part = time.perf_counter()
    stable = stability(engine, options, keys, log, engine.model.autoencoder)
    timed("stability", part)
    seconds["total"] = round(time.perf_counter() - began, 2)
    seeds = {e.seed for e in episodes} | {heldout_spec(j).seed for j in range(options.prompt_seeds)} | {stable["seed"]}
    report = {
        "format": EVAL_FORMAT,
        "config": None if config_path is None else str(config_path),
        "checkpoint": None if config.runtime.checkpoint is None else _shown(config.runtime.checkpoint),
        "sampler": config.sampler.model_dump(),
        "attention_policy": engine.policy.name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "options": {**asdict(options), "policies": list(options.policies)},
        "heldout_seeds": sorted(seeds),
        "teacher_forced_psnr": forced["psnr"],
        "teacher_forced_ssim": forced["ssim"],
        "teacher_forced_frames": forced["frames"],
        "teacher_forced_moving_psnr": forced["moving"]["psnr"],
        "teacher_forced_moving_ssim": forced["moving"]["ssim"],
        "teacher_forced_moving_frames": forced["moving"]["frames"],
        "open_loop_psnr": loop["psnr"],
        "open_loop_ssim": loop["ssim"],
        "open_loop_windows": loop["windows"],
        "open_loop_moving_psnr": loop["moving"]["psnr"],
        "open_loop_moving_ssim": loop["moving"]["ssim"],
        "open_loop_moving_windows": loop["moving"]["windows"],
        "baselines": {
            "copy_last": {
                "teacher_forced_psnr": forced["baseline_psnr"],
                "teacher_forced_ssim": forced["baseline_ssim"],
                "teacher_forced_moving_psnr": forced["moving"]["base_psnr"],
                "teacher_forced_moving_ssim": forced["moving"]["base_ssim"],
                "open_loop_psnr": loop["baseline_psnr"],
                "open_loop_ssim": loop["baseline_ssim"],
                "open_loop_moving_psnr": loop["moving"]["baseline_psnr"],
                "open_loop_moving_ssim": loop["moving"]["baseline_ssim"],
            },
            **{
                name: {
                    "teacher_forced_psnr": through_autoencoder[reference]["psnr"],
                    "teacher_forced_ssim": through_autoencoder[reference]["ssim"],
                    "teacher_forced_moving_psnr": through_autoencoder[reference]["moving"]["psnr"],
                    "teacher_forced_moving_ssim": through_autoencoder[reference]["moving"]["ssim"],
                }
                for name, reference in (("autoencoder", "ceiling"), ("autoencoder_copy_last", "copy_last"))
            },
        },
        "controllability": forced["controllability"],
        "controllability_steps": forced["controllability_steps"],
        "controllability_threshold": DIFFERENT_FRAMES,
        "prompt_following": prompts["accuracy"],
        "prompt_following_clips": prompts["clips"],
        "prompt_following_confusion": prompts["confusion"],
        "stability_ok": stable["ok"],
        "stability": {k: v for k, v in stable.items() if k != "speed"},
        "cpu_fps_at_1000": stable["speed"]["fps"],
        "cpu_fps_frame": stable["speed"]["frame"],
        "cpu_fps_policy": FPS_POLICY,
        "seconds": seconds,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval.md").write_text(markdown(report))
    strip(*loop["strip"]).save(out / "strip.png")
    plot_stability(report["stability"], out / "stability.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    """eval.md: the run in one line and a table of every metric with its copy-last baselines and the autoencoder's
    ceiling."""
    base = report["baselines"]["copy_last"]
    horizons = list(report["open_loop_psnr"])
    stable = report["stability"]
    verdicts = ", ".join(
        f"{name} {_draws_line(run['draws'])}" if len(run["draws"]) > 1 else f"{name} {_draw_line(run)}"
        for name, run in stable["policies"].items()
    )
    decoded = stable["game_through_autoencoder"]
    if decoded is not None:
        verdicts += (
            f"; the game through the autoencoder: detail {100 * decoded['detail']:.0f}%, "
            f"views {decoded['view_drop_db']:.1f} dB further than the game's"
        )
    control = report["controllability"]
    ceiling, latent_copy = report["baselines"]["autoencoder"], report["baselines"]["autoencoder_copy_last"]
    moved = report["teacher_forced_moving_frames"]
    moving_windows = "/".join(str(report["open_loop_moving_windows"][h]) for h in horizons)
    lines = [
        f"# Eval: {report['config'] or 'config'} ({report['checkpoint'] or 'random weights'})",
        "",
        f"{len(report['heldout_seeds'])} held-out maze seeds, {report['device']} ({report['torch_threads']} torch "
        f"threads), policy {report['attention_policy']}, {_sampler_line(report['sampler'])}, "
        f"{report['seconds']['total']:.0f} s; definitions in "
        "docs/eval.md.",
        "",
        "| metric | model | copy last frame | copy last frame, encoded and decoded | autoencoder (ceiling) |",
        "|---|---:|---:|---:|---:|",
        f"| teacher-forced PSNR / SSIM, {report['teacher_forced_frames']} frames | "
        + " | ".join(_psnr_ssim(source, "teacher_forced") for source in (report, base, latent_copy, ceiling))
        + " |",
        f"| teacher-forced PSNR / SSIM, the {moved} frames where the view moved | "
        + " | ".join(_psnr_ssim(source, "teacher_forced_moving") for source in (report, base, latent_copy, ceiling))
        + " |",
        *(
            f"| open-loop PSNR / SSIM @{h} | {report['open_loop_psnr'][h]:.2f} / {report['open_loop_ssim'][h]:.4f} "
            f"| {base['open_loop_psnr'][h]:.2f} / {base['open_loop_ssim'][h]:.4f} | - | - |"
            for h in horizons
        ),
        f"| open-loop PSNR @{'/'.join(horizons)} where the view moved ({moving_windows} windows) | "
        f"{_horizons(report['open_loop_moving_psnr'])} | {_horizons(base['open_loop_moving_psnr'])} | - | - |",
        f"| controllability ({report['controllability_steps']} steps) | "
        f"{'-' if control is None else f'{control:.3f}'} | 0.5 (chance) | - | - |",
        f"| prompt following ({report['prompt_following_clips']} clips) | {report['prompt_following']:.3f} | "
        f"{1 / len(report['prompt_following_confusion']):.3f} (chance) | - | - |",
        f"| stability over {stable['frames']} frames, {stable['draws']} draw{'s' if stable['draws'] > 1 else ''} "
        "per policy (policy, verdict, frame change and detail against the game's, "
        "distance to the game's views against the game's own) | "
        f"{'ok' if report['stability_ok'] else 'NOT ok'} ({verdicts}) | - | - | - |",
        f"| fps at frame {report['cpu_fps_frame']} ({report['cpu_fps_policy']}, {report['device']}) | "
        f"{report['cpu_fps_at_1000']:.1f} | - | - | - |",
        "",
    ]
    return "\n".join(lines)


def _draw_line(run: dict[str, Any]) -> str:
    """One stability rollout: its verdict, and its shares of the game's motion and detail and its view drop."""
    return (
        f"{stability_verdict(run)} (motion {100 * run['motion']:.0f}%, detail {100 * run['detail']:.0f}%, "
        f"views {run['view_drop_db']:.1f} dB further than the game's)"
    )


def _draws_line(draws: list[dict[str, Any]]) -> str:
    """A policy's stability rollouts: how many held, then each draw's line."""
    held = sum(run["ok"] for run in draws)
    return (
        f"held in {held} of {len(draws)} draws ["
        + "; ".join(f"seed {run['seed']}: {_draw_line(run)}" for run in draws)
        + "]"
    )


def _psnr_ssim(source: dict[str, Any], prefix: str) -> str:
    """'PSNR / SSIM' of the keys `prefix`_psnr and `prefix`_ssim ('-' when there were no frames)."""
    value, similarity = source[f"{prefix}_psnr"], source[f"{prefix}_ssim"]
    return "-" if value is None else f"{value:.2f} / {similarity:.4f}"


def _horizons(values: dict[str, float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values.values())


def strip(game: np.ndarray, model: np.ndarray, scale: int = 2) -> Image.Image:
    """Game (top row) and model (bottom row) frames, uint8 (T, H, W, 3) each, upscaled `scale`x nearest, with the
    row names on the left and the open-loop horizon (+1, +2, ...) above each column."""
    T, H, W, _ = game.shape
    label, header = 48, 14
    sheet = Image.new("RGB", (label + T * W * scale, header + 2 * H * scale), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, frames) in enumerate((("game", game), ("model", model))):
        top = header + row * H * scale
        draw.text((4, top + H * scale // 2 - 6), name, fill="black")
        for t, frame in enumerate(frames):
            big = Image.fromarray(frame).resize((W * scale, H * scale), Image.NEAREST)
            sheet.paste(big, (label + t * W * scale, top))
    for t in range(T):
        draw.text((label + t * W * scale + 2, 1), f"+{t + 1}", fill="black")
    return sheet


def plot_stability(stable: dict[str, Any], path: Path) -> None:
    """One row per statistic: the game (grey; black: its rolling mean), each policy's rolling mean (drawn at the
    window's last frame), and the game's widened range (shaded)."""
    from matplotlib.figure import Figure  # here, not at the top: only this plot needs matplotlib

    names = stable["statistics"]
    figure = Figure(figsize=(10, 2.6 * len(names)), layout="constrained")
    rows = figure.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    window = stable["window"]
    for axes, name in zip(rows, names):
        game = np.array(stable["game"]["series"][name])
        x = np.arange(len(game)) + stable["first_frame"]
        low, high = stable["game"]["range"][name]
        axes.axhspan(low, high, color="grey", alpha=0.12, label="game range (widened)")
        axes.plot(x, game, color="grey", linewidth=0.6, alpha=0.7, label="game")
        smooth = rolling_mean(game, window)
        axes.plot(x[len(x) - len(smooth) :], smooth, color="black", linewidth=1.2, label="game, smoothed")
        for policy, run in stable["policies"].items():
            smooth = rolling_mean(np.array(run["series"][name]), window)
            axes.plot(
                x[len(x) - len(smooth) :], smooth, linewidth=1.4, label=f"{policy}{'' if run['ok'] else ' (out)'}"
            )
        if name == "view":  # the game's standstills reach the 100 dB cap (an exact twin); the rest lies below 50
            axes.set(ylabel="view (dB, shown to 50)", ylim=(0, VIEW_PLOT_TOP_DB))
        else:
            axes.set(ylabel=f"{name} (0..255)")
        axes.grid(alpha=0.3)
    rows[0].set_title(f"Long-rollout statistics: model (rolling mean of {window}) vs the game", fontsize=10)
    rows[0].legend(fontsize=8, ncols=3)
    rows[-1].set(xlabel="frame index")
    figure.savefig(path, dpi=100)
