"""The `worldserve` command line.

worldserve rollout --config configs/default.yaml --frames 64 --seed 0 --actions random --out out/
worldserve bench rollout --config configs/default.yaml --configs dense,window --frames 300 --out bench/
worldserve bench serve --config configs/default.yaml --sessions 4 --seconds 10 --out bench-serve/
worldserve serve --config configs/default.yaml --host 127.0.0.1 --port 8000
worldserve game --prompt "icy cave" --seed 0 --frames 256 --policy human --out game/
worldserve data --out data/ --train-episodes 512 --heldout-episodes 48 --frames 128
worldserve train --config configs/default.yaml --train-config configs/train.yaml --out runs/default
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import pydantic
import yaml

from engine import ATTENTION_PRESETS, CheckpointError, ConfigError, WorldEngine, load_config
from engine.bench_rollout import (
    DEFAULT_FRAMES,
    DEFAULT_PROMPT,
    MEASURE_FRAMES,
    BenchError,
    run_benchmark,
)
from engine.config import describe_config
from engine.evaluate import EvalOptions, markdown, run_eval
from engine.game import START_FRAMES, start_view
from engine.rollout import load_actions, random_actions, run_rollout

DEFAULT_CONFIG = Path("configs/default.yaml")


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. cache.policy=dense), got {text!r}")
    return key, yaml.safe_load(value)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--policy", help="KV cache policy, overriding cache.policy (dense, window, tempcache)")
    parser.add_argument("--device", help="torch device, overriding runtime.device (cpu, cuda, cuda:1, auto)")
    _add_set_argument(parser, "override any config key, e.g. --set cache.window_frames=16 (repeatable)")


def _add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _load(args: argparse.Namespace):
    overrides = dict(args.overrides)
    if args.policy:
        overrides["cache.policy"] = args.policy
    if args.device:
        overrides["runtime.device"] = args.device
    return load_config(args.config, overrides)


def cmd_rollout(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.actions == "random":
        actions = random_actions(args.frames, args.seed)
    else:
        actions = load_actions(args.actions)
        if len(actions) < args.frames:
            raise ValueError(f"{args.actions} holds {len(actions)} actions; --frames asks for {args.frames}")
        actions = actions[: args.frames]
    engine = WorldEngine.from_config(config)
    m = config.model
    start = None
    if args.game_start_frames:
        start = start_view(args.seed, args.prompt, args.game_start_frames, m.frame_height, m.frame_width)
    stats = run_rollout(
        engine, actions, args.out, seed=args.seed, prompt=args.prompt, write_frames=not args.no_png, init_frames=start
    )
    summary = stats["summary"]
    print(
        f"wrote {summary['frames']} frames to {args.out} | policy {summary['policy']} on {summary['device']} | "
        f"step {summary['step_ms_median']:.1f} ms median | cache {stats['frames'][-1]['cache_bytes'] / 2**20:.2f} MiB"
    )
    return 0


def cmd_bench_rollout(args: argparse.Namespace) -> int:
    run_benchmark(
        args.config,
        args.out,
        frames=args.frames,
        seed=args.seed,
        prompt=args.prompt,
        names=args.configs.split(",") if args.configs else None,
        measure_frames=args.measure_frames,
        overrides=dict(args.overrides),
    )
    print(f"wrote {args.out}/bench.json, bench.md, fps_vs_frames.png, memory_vs_frames.png\n")
    print((args.out / "bench.md").read_text(), end="")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from server.bench_serve import run_serve_benchmark, summary_text

    report = asyncio.run(
        run_serve_benchmark(
            args.config,
            args.out,
            sessions=args.sessions,
            seconds=args.seconds,
            warmup=args.warmup,
            overrides=dict(args.overrides),
        )
    )
    print(summary_text(report, args.out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.logs import configure_logging
    from server.serve import WorldServer
    from server.settings import ServerSettings

    flags = {"config": args.config, "host": args.host, "port": args.port, "device": args.device}
    settings = ServerSettings(**{key: value for key, value in flags.items() if value is not None})
    if args.overrides:
        settings = settings.model_copy(update={"overrides": {**settings.overrides, **dict(args.overrides)}})
    load_config(settings.config, settings.overrides)  # a bad config is reported here in one line, before the server
    configure_logging(settings.log_format)
    server = WorldServer(create_app(settings), settings)
    server.run()
    if not server.started:
        print("worldserve serve: error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.describe:
        print(describe_config(), end="")
        return 0
    config = _load(args)
    document = {"config": config.model_dump(mode="json"), "derived": dataclasses.asdict(config.sizes())}
    print(yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def cmd_game(args: argparse.Namespace) -> int:
    import json

    from engine.game import THEMES, Game, HumanPolicy, benchmark, play
    from engine.rollout import write_episode

    if args.bench:
        print(f"game fps at {args.size}x{args.size}, {args.frames} frames per theme (Game.step: update + render):")
        for name in THEMES:
            result = benchmark(args.frames, args.size, args.size, args.seed, name)
            print(
                f"  {name:18s} {result['fps']:8.1f} fps | {result['ms_median']:.3f} ms median, "
                f"{result['ms_p99']:.3f} ms p99 | {result['fps_with_policy']:8.1f} fps with the human policy"
            )
        return 0
    if args.out is None:
        raise ValueError("--out is required (unless --bench)")
    game = Game(args.seed, args.prompt, args.size, args.size)
    if args.policy == "human":
        act = HumanPolicy(args.seed).act
    else:
        scripted = iter(random_actions(args.frames, args.seed))
        act = lambda _game: next(scripted)  # noqa: E731
    episode = play(game, act, args.frames)
    out: Path = args.out
    write_episode(out, episode.frames, episode.actions, 15.0, pngs=not args.no_png)
    visited = {(int(x), int(y)) for x, y in episode.poses[:, :2]}
    summary = {
        "frames": args.frames,
        "seed": args.seed,
        "prompt": args.prompt,
        "theme": game.theme.name,
        "policy": args.policy,
        "size": [args.size, args.size],
        "fps": round(episode.fps, 1),
        "step_ms_mean": round(1e3 * episode.step_seconds / args.frames, 4),
        "policy_ms_mean": round(1e3 * episode.policy_seconds / args.frames, 4),
        "blocked_frames": episode.blocked_frames,
        "tiles_visited": len(visited),
        "open_tiles": int((game.maze.tiles == 0).sum()),
    }
    frames = [
        {"frame": t, "x": round(x, 4), "y": round(y, 4), "heading": round(heading, 5), "eye": round(eye, 4)}
        for t, (x, y, heading, eye) in enumerate(episode.poses.tolist())
    ]
    (out / "stats.json").write_text(json.dumps({"summary": summary, "frames": frames}, indent=1) + "\n")
    print(
        f"wrote {args.frames} frames to {out} | theme {summary['theme']} | policy {args.policy} | "
        f"game {summary['fps']:.0f} fps ({summary['step_ms_mean']:.3f} ms/frame, update + render)"
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import os
    import time

    from engine.dataset import write_dataset

    config = load_config(args.config)
    model = config.model
    size = (args.size, args.size) if args.size is not None else (model.frame_height, model.frame_width)
    workers = args.workers if args.workers is not None else os.cpu_count() or 1
    command = (
        f"worldserve data --out {args.out} --train-episodes {args.train_episodes} "
        f"--heldout-episodes {args.heldout_episodes} --frames {args.frames} --size {size[0]} "
        f"--shard-episodes {args.shard_episodes} --seed {args.seed} --config {args.config}"
    )
    began = time.perf_counter()

    def progress(shard, done: int, total: int) -> None:
        print(
            f"[{done}/{total}] {shard.file}: {shard.episodes} episodes, {shard.frames} frames, "
            f"{shard.bytes / 1e6:.1f} MB | {time.perf_counter() - began:.1f} s",
            flush=True,
        )

    try:
        summary = write_dataset(
            args.out,
            train_episodes=args.train_episodes,
            heldout_episodes=args.heldout_episodes,
            frames=args.frames,
            size=size,
            key_names=model.actions.keys,
            mouse_scale=model.actions.mouse_scale,
            shard_episodes=args.shard_episodes,
            seed=args.seed,
            workers=workers,
            command=command,
            progress=progress,
        )
    except KeyboardInterrupt:
        print(
            f"worldserve data: interrupted; the shards finished so far stay in {args.out}: run the same command to "
            "resume",
            file=sys.stderr,
        )
        return 130
    kept = (
        f" | resumed: kept {summary.kept_shards} shard(s) ({summary.kept_frames} frames) of the interrupted run"
        if summary.kept_shards
        else ""
    )
    print(
        f"wrote {summary.episodes} episodes ({args.train_episodes} train, {args.heldout_episodes} held-out) of "
        f"{args.frames} frames at {size[0]}x{size[1]} to {args.out} | {summary.frames} frames, "
        f"{summary.bytes / 1e6:.1f} MB on disk, {summary.bytes_per_frame:.0f} bytes/frame | "
        f"{summary.fps:.0f} frames/s recorded in {summary.seconds:.1f} s with {workers} worker(s){kept}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import time

    from engine.train import TrainingError, load_train_config, train

    config = load_config(args.config, dict(args.overrides))
    began = time.perf_counter()
    schedule = load_train_config(args.train_config)
    try:
        run = train(
            args.out,
            config,
            schedule,
            args.device,
            args.max_minutes,
            max_steps=args.max_steps,
            init_from=args.init_from,
        )
    except TrainingError as error:
        print(f"worldserve train: error: {error}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - began) / 60
    if run.phase == "done":
        print(f"training done in {args.out} ({run.elapsed / 60:.1f} min of steps in all): {args.out}/model.safetensors")
    else:
        print(
            f"stopped after {minutes:.1f} min in phase {run.phase} at step {run.step}; run the same command to resume"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    overrides = dict(args.overrides)
    if args.device:
        overrides["runtime.device"] = args.device
    config = load_config(args.config, overrides)
    policies = tuple(name.strip() for name in args.policies.split(",") if name.strip())
    options = EvalOptions(
        episodes=args.episodes,
        frames=args.frames,
        stability_frames=args.stability_frames,
        stability_draws=args.stability_draws,
        policies=policies,
    )
    report = run_eval(config, args.out, options, config_path=args.config)
    print(f"\nwrote {args.out}/eval.json, eval.md, strip.png, stability.png\n")
    print(markdown(report), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldserve", description="Interactive world-model game-engine server.")
    commands = parser.add_subparsers(dest="command", required=True)

    rollout = commands.add_parser("rollout", help="generate frames offline and write them to disk")
    _add_config_arguments(rollout)
    rollout.add_argument("--frames", type=_positive, default=64, help="frames to generate (default: %(default)s)")
    rollout.add_argument("--seed", type=int, default=0, help="world seed (noise and random actions)")
    rollout.add_argument("--actions", default="random", help="'random' or an actions JSON file to replay")
    rollout.add_argument("--prompt", default="", help="text prompt, e.g. 'red brick dungeon'")
    rollout.add_argument("--out", type=Path, required=True, help="output folder")
    rollout.add_argument("--no-png", action="store_true", help="skip the per-frame PNGs (long runs)")
    rollout.add_argument(
        "--game-start-frames",
        type=_non_negative,
        default=START_FRAMES,
        help="begin with this many frames of the reference game standing still at the start of maze SEED, as "
        "`worldserve serve` does (WORLDSERVE_GAME_START_FRAMES); 0: from the prompt alone (default: %(default)s)",
    )
    rollout.set_defaults(run=cmd_rollout)

    bench = commands.add_parser("bench", help="benchmarks")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    long_rollout = benchmarks.add_parser(
        "rollout", help="one long rollout under several attention configurations, compared with dense"
    )
    long_rollout.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    long_rollout.add_argument(
        "--frames", type=_positive, default=DEFAULT_FRAMES, help="frames per configuration (default: %(default)s)"
    )
    long_rollout.add_argument("--seed", type=int, default=0, help="world seed (noise and random actions)")
    long_rollout.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="text prompt (default: %(default)r; AnnCA needs several words)"
    )
    long_rollout.add_argument(
        "--configs",
        help=f"comma-separated configurations (default: all; dense always runs): {', '.join(ATTENTION_PRESETS)}",
    )
    long_rollout.add_argument(
        "--measure-frames",
        type=_positive,
        default=MEASURE_FRAMES,
        help="frames of the separate density/recall run of sparse configurations (default: %(default)s)",
    )
    _add_set_argument(
        long_rollout, "override a config key for every configuration, e.g. --set runtime.device=cuda (repeatable)"
    )
    long_rollout.add_argument("--out", type=Path, required=True, help="output folder")
    long_rollout.set_defaults(run=cmd_bench_rollout)

    serve_bench = benchmarks.add_parser(
        "serve", help="simulated realtime players against an in-process server: frames/s and input-to-frame latency"
    )
    serve_bench.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    serve_bench.add_argument("--sessions", type=int, required=True, help="simulated players, one session each")
    serve_bench.add_argument("--seconds", type=float, required=True, help="length of the measured window (s)")
    serve_bench.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds of play first (default: %(default)s)"
    )
    _add_set_argument(serve_bench, "override a config key, e.g. --set runtime.device=cuda (repeatable)")
    serve_bench.add_argument("--out", type=Path, required=True, help="output folder")
    serve_bench.set_defaults(run=cmd_bench_serve)

    serve = commands.add_parser(
        "serve", help="run the game server (settings: flags, then WORLDSERVE_* variables, then defaults)"
    )
    serve.add_argument("--config", type=Path, help=f"world model config (default: {DEFAULT_CONFIG})")
    serve.add_argument("--host", help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, help="TCP port (default: 8000)")
    serve.add_argument("--device", help="torch device, overriding runtime.device (cpu, cuda, cuda:1, auto)")
    _add_set_argument(serve, "override any config key, e.g. --set cache.policy=window (repeatable)")
    serve.set_defaults(run=cmd_serve)

    game = commands.add_parser(
        "game", help="play the reference game (a raycast maze) with a policy and write the episode, or --bench it"
    )
    game.add_argument("--prompt", default="red brick dungeon", help="theme prompt (default: %(default)r)")
    game.add_argument("--seed", type=int, default=0, help="maze and policy seed (default: %(default)s)")
    game.add_argument("--frames", type=_positive, default=256, help="frames to play (default: %(default)s)")
    game.add_argument(
        "--policy", choices=["human", "random"], default="human", help="who plays: HumanPolicy or sticky random"
    )
    game.add_argument("--size", type=_positive, default=64, help="frame height and width in px (default: 64)")
    game.add_argument("--out", type=Path, help="output folder (the layout of `worldserve rollout`)")
    game.add_argument("--no-png", action="store_true", help="skip the per-frame PNGs (long runs)")
    game.add_argument(
        "--bench", action="store_true", help="measure frames per second for each theme over --frames frames instead"
    )
    game.set_defaults(run=cmd_game)

    data = commands.add_parser(
        "data", help="record the reference game played by a human-like policy: a train and a held-out split in shards"
    )
    data.add_argument("--out", type=Path, required=True, help="output folder (new or empty; docs/dataset.md)")
    data.add_argument("--train-episodes", type=int, default=512, help="training episodes (default: %(default)s)")
    data.add_argument(
        "--heldout-episodes", type=int, default=48, help="held-out episodes (default: %(default)s, 8 per theme)"
    )
    data.add_argument("--frames", type=int, default=128, help="frames per episode (default: %(default)s)")
    data.add_argument("--size", type=int, help="frame height and width in px (default: the config's frame size)")
    data.add_argument("--shard-episodes", type=int, default=64, help="episodes per shard (default: %(default)s)")
    data.add_argument("--seed", type=int, default=0, help="training stream seed (default: %(default)s)")
    data.add_argument("--workers", type=int, help="recording processes (default: one per CPU core)")
    data.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="config giving key names and frame size (default: %(default)s)",
    )
    data.set_defaults(run=cmd_data)

    training = commands.add_parser(
        "train",
        help="train the world model on the reference game: the autoencoder, an adversarial decoder fine-tune "
        "(when the schedule has one), then the DiT (resumable)",
    )
    training.add_argument("--out", type=Path, required=True, help="run folder; an existing run there is resumed")
    training.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="world config giving the model (default: %(default)s)"
    )
    training.add_argument(
        "--train-config",
        type=Path,
        default=Path("configs/train.yaml"),
        help="training schedule (default: %(default)s)",
    )
    training.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    training.add_argument(
        "--max-minutes", type=float, help="stop (and save) after this many minutes; run again to resume"
    )
    training.add_argument("--max-steps", type=int, help="stop (and save) after this many optimiser steps")
    training.add_argument(
        "--init-from",
        type=Path,
        help="start a new run from the weights of this checkpoint (e.g. models/default.safetensors); ignored on resume",
    )
    _add_set_argument(training, "override a world-config key, e.g. --set model.depth=4 (repeatable)")
    training.set_defaults(run=cmd_train)

    defaults = EvalOptions()
    evaluation = commands.add_parser(
        "eval", help="fidelity of the world model against the reference game on held-out mazes (docs/eval.md)"
    )
    evaluation.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    evaluation.add_argument("--out", type=Path, required=True, help="output folder: eval.json, eval.md, *.png")
    evaluation.add_argument(
        "--episodes", type=_positive, default=defaults.episodes, help="held-out episodes (default: %(default)s)"
    )
    evaluation.add_argument(
        "--frames", type=_positive, default=defaults.frames, help="frames per episode, >= 40 (default: %(default)s)"
    )
    evaluation.add_argument(
        "--stability-frames",
        type=_positive,
        default=defaults.stability_frames,
        help="frames of each long open-loop rollout (default: %(default)s)",
    )
    evaluation.add_argument(
        "--stability-draws",
        type=_positive,
        default=defaults.stability_draws,
        help="long rollouts per policy, world seeds 0, 1, ...; a policy holds if every one does (default: %(default)s)",
    )
    evaluation.add_argument(
        "--policies",
        default=",".join(defaults.policies),
        help=f"attention policies of the stability rollouts (default: %(default)s; of {', '.join(ATTENTION_PRESETS)})",
    )
    evaluation.add_argument("--device", help="torch device, overriding runtime.device (cpu, cuda, cuda:1, auto)")
    _add_set_argument(evaluation, "override any config key, e.g. --set sampler.steps=2 (repeatable)")
    evaluation.set_defaults(run=cmd_eval)

    config = commands.add_parser("config", help="print the resolved config and its derived sizes")
    _add_config_arguments(config)
    config.add_argument("--describe", action="store_true", help="print the reference of every key (markdown)")
    config.set_defaults(run=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, [args.command, getattr(args, "benchmark", None)]))
    try:
        return args.run(args)
    except pydantic.ValidationError as error:  # settings from flags or WORLDSERVE_* variables
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        print(f"worldserve {command}: error: bad setting: {problems}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"worldserve {command}: error: {error}", file=sys.stderr)
        return 2
    except BenchError as error:
        print(f"worldserve {command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
