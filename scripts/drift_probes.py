"""Probes behind the README's notes on long-rollout drift (section "How close it is to the game"); research
tools, not part of the engine. Each prints one JSON object; run from the repository root.

    python scripts/drift_probes.py positions --policy dense --frames 1000 --max-distance 128
    python scripts/drift_probes.py annsa --frames 1000
    python scripts/drift_probes.py starts --frames 200 --image docs/images/drift_starts.png
    python scripts/drift_probes.py stages --frames 48 --every 4 --image docs/images/drift_stages.png
    python scripts/drift_probes.py autoencoder --frames 2000

`positions`: one open-loop rollout under the actions of `worldserve eval`'s stability episode (held-out maze 0),
once as configured and once with every cached frame presented at most `--max-distance` frames before the frame
being generated (the rotary embedding then never sees a distance beyond it); per run the rolling mean brightness
every 100 frames and the strongest periods of the brightness spectrum.

`annsa`: a `tempcache` rollout; at a few frames the next frame is predicted from the same cache and the same
noise with and without AnnSA, and their PSNR against each other is printed.

`starts`: the same actions from four starts (the prompt alone, 1 true frame, 8 true frames, and the game's start
view held for 8 frames before frame 0, where `worldserve serve` begins a model world), under the configured
policy; per start the PSNR against the game at a few frame indices, and its frame change and detail (the
evaluation's statistics) as shares of the game's and per 25 frames, and how far its frames lie from the views the
game shows (the evaluation's view drop in dB, and its nearest-view PSNR per 25 frames); with `--image` a picture:
the game's row, then one row per start, every `--every` frames from frame 8 on: what the evaluation's statistics
summarise, to look at.

`stages`: where the frames lose what the game shows, from the same 8 true frames on: the game's frames encoded and
decoded by the autoencoder, predicted teacher-forced (each from the true history), and rolled out open loop; per
row its PSNR against the game, its detail as a share of the game's and its view drop (the evaluation's statistics),
in all and per 8 frames; with `--image` the game's row and the three, every `--every` frames, at twice the size.

`autoencoder`: the ceiling a model drawing through the config's autoencoder has: the stability episode's frames
and 4 held-out episodes of 128 frames (the evaluation's first four), encoded and decoded; their PSNR against the
game, detail as a share of the game's and, for the stability episode, the view drop (the evaluation's
`game_through_autoencoder`). To measure a training run's autoencoder: `--config RUN/config.yaml --set
runtime.checkpoint=RUN/model.safetensors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import WorldEngine, load_config  # noqa: E402
from engine.config import ATTENTION_PRESETS, with_overrides  # noqa: E402
from engine.dataset import episode_actions, heldout_spec, record  # noqa: E402
from engine.evaluate import (  # noqa: E402
    frame_statistics,
    nearest_view,
    psnr,
    rolling_mean,
    rollout_statistics,
    share_of_game,
    stability_check,
    stability_episode,
    stability_range,
    stability_views,
    through_autoencoder,
    view_drop,
)
from engine.game import START_FRAMES, start_view  # noqa: E402
from engine.kv_cache import KVView, LayerCache  # noqa: E402
from engine.policies import CachePolicy  # noqa: E402
from engine.rollout import FrameRecorder  # noqa: E402
from server.cli import _override  # noqa: E402  (worldserve's own KEY=VALUE parser)


class RecentPositions(CachePolicy):
    """Another policy's slots, each presented at most `max_distance` frames before the frame being generated (the
    newest cached frame + 1); what is stored is unchanged."""

    def __init__(self, inner: CachePolicy, max_distance: int) -> None:
        super().__init__(inner.config, inner.sizes)
        self.inner, self.max_distance, self.name = inner, max_distance, inner.name

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def commit_worlds(self, caches: Sequence[LayerCache], key, value, pos, first_frames: Sequence[int]) -> None:
        self.inner.commit_worlds(caches, key, value, pos, first_frames)

    def view(self, cache: LayerCache) -> KVView:
        view = self.inner.view(cache)
        if view.pos.shape[0] == 0:
            return view
        current = int(view.pos[:, 0].max()) + 1
        pos = view.pos.clone()
        pos[:, 0] = pos[:, 0].clamp(min=current - self.max_distance)
        return dataclasses.replace(view, pos=pos)

    def view_worlds(self, caches: Sequence[LayerCache]) -> None:
        return None  # the pooled read would skip `view`'s positions: each world is viewed alone


def _game(engine: WorldEngine, frames: int):
    game = stability_episode(engine.config, frames, engine.config.model.actions.keys)
    return game, episode_actions(game)


def positions(base: WorldEngine, policy: str, frames: int, max_distance: int) -> dict:
    game, actions = _game(base, frames)
    game_stats = frame_statistics(game.frames[1:], game.frames[0])
    bounds = stability_range(game_stats)
    runs = {}
    for clamped in (False, True):
        engine = base.sibling(with_overrides(base.config, ATTENTION_PRESETS[policy], f"<policy {policy}>"))
        if clamped:
            engine.policy = RecentPositions(engine.policy, max_distance)
        world = engine.new_world(game.prompt, seed=0)
        engine.observe(world, game.frames[:1], actions[:1])
        generated = FrameRecorder(frames - 1, *game.frames.shape[1:3])
        for i in range(1, frames):
            generated.extend(engine.step([world], [actions[i : i + 1]])[0])
        stats = frame_statistics(generated.frames, game.frames[0])
        mean = rolling_mean(stats["mean"])
        series = stats["mean"][100:] - stats["mean"][100:].mean()  # past the start-up, linear trend removed
        t = np.arange(len(series))
        series = series - np.polyval(np.polyfit(t, series, 1), t)
        power = np.abs(np.fft.rfft(series))[1:]
        periods = len(series) / np.arange(1, len(power) + 1)
        top = np.argsort(power)[::-1][:3]
        runs[f"max_distance={max_distance}" if clamped else "as configured"] = {
            "within_range": stability_check(stats, bounds),
            "motion_share": round(share_of_game(stats["change"], game_stats["change"]), 3),
            "rolling_mean_every_100": [round(float(mean[i]), 1) for i in range(0, len(mean), 100)],
            "strongest_periods_frames": [[round(float(periods[i]), 1), round(float(power[i]), 1)] for i in top],
        }
    return {"policy": policy, "frames": frames, "game_mean_range": [round(v, 1) for v in bounds["mean"]], **runs}


def annsa(base: WorldEngine, frames: int) -> dict:
    game, actions = _game(base, frames + 2)
    dense = base.sibling(with_overrides(base.config, ATTENTION_PRESETS["tempcache"], "<tempcache>"))
    sparse = base.sibling(with_overrides(base.config, ATTENTION_PRESETS["tempcache+annsa"], "<tempcache+annsa>"))
    world = dense.new_world(game.prompt, seed=0)
    dense.observe(world, game.frames[:1], actions[:1])
    rows = []
    for i in range(1, frames + 1):
        dense.step([world], [actions[i : i + 1]])
        if i in (10, 50) or i % 200 == 0:
            state = world.generator.get_state()
            [[a]] = dense.predict([world], [actions[i + 1 : i + 2]])
            world.generator.set_state(state)
            [[b]] = sparse.predict([world], [actions[i + 1 : i + 2]])
            world.generator.set_state(state)
            rows.append(
                {
                    "frame": i + 1,
                    "psnr_db": round(psnr(a, b), 2),
                    "mean": [round(float(a.mean()), 2), round(float(b.mean()), 2)],
                }
            )
    return {"frames": frames, "dense_vs_annsa": rows}


# true frames the rollout starts from; "the game's start view" is where `worldserve serve` begins a model world
# (WORLDSERVE_GAME_START_FRAMES): the game's first view held for START_FRAMES frames, then the same actions from frame 0
VIEW = "the game's start view"
STARTS = {"prompt alone": 0, "1 true frame": 1, "8 true frames": 8, VIEW: 0}


def starts(base: WorldEngine, frames: int, every: int, image: str | None) -> dict:
    game, actions = _game(base, frames)
    first = max(STARTS.values())  # the first frame every start generates
    blocks = (frames - first) // 25 * 25
    views, indices = stability_views(base.config, game, base.config.model.actions.keys), list(range(first, frames))

    def statistics(made: np.ndarray) -> dict[str, np.ndarray]:  # of frames first.. of a start indexed like the game's
        return rollout_statistics(made[first:], made[first - 1], views, indices)

    game_stats = statistics(game.frames)
    rows, report = [game.frames], {}
    height, width = base.config.model.frame_height, base.config.model.frame_width
    for name, context in STARTS.items():
        begin = start_view(game.seed, game.prompt, START_FRAMES, height, width) if name == VIEW else None
        world = base.new_world(game.prompt, seed=0, init_frames=begin)
        if context:
            base.observe(world, game.frames[:context], actions[:context])
        generated = FrameRecorder(frames - context, *game.frames.shape[1:3])
        for i in range(context, frames):
            generated.extend(base.step([world], [actions[i : i + 1]])[0])
        made = np.concatenate([game.frames[:context], generated.frames])  # indexed like the game's frames
        rows.append(made)
        stats = statistics(made)
        report[name] = {
            "psnr_db_at_frame": {
                i: round(psnr(made[i], game.frames[i]), 2)
                for i in (0, 1, 4, 8, 9, 12, 16, 24, 40, 72, 136)
                if context <= i < frames  # the frames this start generated
            },
            "motion_share": round(share_of_game(stats["change"], game_stats["change"]), 3),
            "detail_share": round(share_of_game(stats["detail"], game_stats["detail"]), 3),
            "change_per_25": [round(float(v), 1) for v in stats["change"][:blocks].reshape(-1, 25).mean(1)],
            "detail_per_25": [round(float(v), 1) for v in stats["detail"][:blocks].reshape(-1, 25).mean(1)],
            "view_drop_db": round(view_drop(stats["view"], game_stats["view"]), 2),
            "view_per_25": [round(float(v), 1) for v in stats["view"][:blocks].reshape(-1, 25).mean(1)],
        }
    report["game"] = {
        name: [round(float(v), 1) for v in game_stats[name][:blocks].reshape(-1, 25).mean(1)]
        for name in ("change", "detail", "view")
    }
    if image:
        shown = list(range(first, frames, every))
        picture = np.concatenate([np.concatenate([row[i] for i in shown], axis=1) for row in rows], axis=0)
        Image.fromarray(picture).save(image)
        report["image"] = {"path": image, "rows": ["game", *STARTS], "frames": shown}
    return {"policy": base.policy.name, "prompt": game.prompt, "frames": frames, "starts": report}


def stages(base: WorldEngine, frames: int, every: int, image: str | None) -> dict:
    game, actions = _game(base, frames)
    first = 8  # true frames before the first compared one
    views, indices = stability_views(base.config, game, base.config.model.actions.keys), list(range(first, frames))
    decoded = through_autoencoder(base.model.autoencoder, game.frames)
    forced, rolled = (FrameRecorder(frames - first, *game.frames.shape[1:3]) for _ in range(2))
    for made, teacher in ((forced, True), (rolled, False)):
        world = base.new_world(game.prompt, seed=0)
        base.observe(world, game.frames[:first], actions[:first])
        for i in range(first, frames):
            if teacher:
                made.extend(base.predict([world], [actions[i : i + 1]])[0])
                base.observe(world, game.frames[i : i + 1], actions[i : i + 1])
            else:
                made.extend(base.step([world], [actions[i : i + 1]])[0])
    rows = {"game": game.frames[first:], "through the autoencoder": decoded[first:]}
    rows |= {"teacher-forced": forced.frames, "open loop": rolled.frames}
    blocks = (frames - first) // 8 * 8

    def statistics(made: np.ndarray) -> dict[str, np.ndarray]:
        return rollout_statistics(made, game.frames[first - 1], views, indices)

    game_stats = statistics(rows["game"])
    report = {}
    for name, made in rows.items():
        stats = statistics(made)
        per_8 = {k: v[:blocks].reshape(-1, 8).mean(1) for k, v in stats.items()}
        report[name] = {
            "psnr_db": round(float(np.mean([psnr(a, b) for a, b in zip(made, rows["game"])])), 2),
            "detail_share": round(share_of_game(stats["detail"], game_stats["detail"]), 3),
            "view_drop_db": round(view_drop(stats["view"], game_stats["view"]), 2),
            "detail_per_8": [round(float(v), 2) for v in per_8["detail"]],
            "view_per_8": [round(float(v), 1) for v in per_8["view"]],
        }
    if image:
        shown = list(range(0, frames - first, every))
        picture = np.concatenate([np.concatenate([row[i] for i in shown], axis=1) for row in rows.values()], axis=0)
        Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(image)
        report["image"] = {"path": image, "rows": list(rows), "frames": [first + i for i in shown]}
    return {"policy": base.policy.name, "prompt": game.prompt, "first_frame": first, "frames": frames, "stages": report}


def autoencoder(base: WorldEngine, frames: int) -> dict:
    game, _ = _game(base, frames)
    keys, size = base.config.model.actions.keys, game.frames.shape[1:3]
    heldout = np.concatenate([record(heldout_spec(i), 128, size, keys).frames for i in range(4)])
    views, indices = stability_views(base.config, game, keys), list(range(frames))
    report = {"latent_channels": base.config.model.autoencoder.latent_channels, "frames": frames}
    for name, true in (("stability_episode", game.frames), ("heldout_episodes", heldout)):
        decoded = through_autoencoder(base.model.autoencoder, true)
        made, real = frame_statistics(decoded, decoded[0]), frame_statistics(true, true[0])
        report[name] = {
            "psnr_db": round(psnr(decoded, true), 2),
            "detail_share": round(share_of_game(made["detail"], real["detail"]), 3),
        }
        if name == "stability_episode":
            drop = view_drop(nearest_view(decoded, views, indices), nearest_view(true, views, indices))
            report[name]["view_drop_db"] = round(drop, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["positions", "annsa", "starts", "stages", "autoencoder"])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument(
        "--policy",
        default="dense",
        choices=sorted(ATTENTION_PRESETS),
        help="positions only (starts, stages: the config's)",
    )
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--max-distance", type=int, default=128)
    parser.add_argument("--every", type=int, default=8, help="starts, stages: frames between the picture's columns")
    parser.add_argument("--image", help="starts, stages: write the picture (PNG) here")
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE", help="config key")
    args = parser.parse_args()
    base = WorldEngine.from_config(load_config(args.config, dict(args.set)))
    if args.probe == "positions":
        print(json.dumps(positions(base, args.policy, args.frames, args.max_distance)))
    elif args.probe == "starts":
        print(json.dumps(starts(base, args.frames, args.every, args.image)))
    elif args.probe == "stages":
        print(json.dumps(stages(base, args.frames, args.every, args.image)))
    elif args.probe == "autoencoder":
        print(json.dumps(autoencoder(base, args.frames)))
    else:
        print(json.dumps(annsa(base, args.frames)))


if __name__ == "__main__":
    main()
