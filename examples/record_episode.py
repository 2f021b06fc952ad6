"""Record an episode of a random agent: the frames as PNGs and the actions, replayable offline.

    python examples/record_episode.py --url ws://127.0.0.1:8000/ws --steps 64 --seed 0 --out episode/
    worldserve rollout --config configs/default.yaml --seed 0 --frames 65 --actions episode/actions.json \
        --game-start-frames 8 --out replay/

(the server's config file; `episode.json` holds the command with the seed, prompt, frame count and the frames the
world began with filled in: the server's WORLDSERVE_GAME_START_FRAMES, read from the first frame's index.)

Writes to --out:
    frames/000000.png ...  every frame: the reset's first, then each step's, as the client decoded them
    actions.json           one action per frame, format "worldserve-actions/1" (engine/rollout.py `load_actions`);
                           the first is the idle step `WorldEnv.reset` takes
    episode.json           url, seed, prompt, game start frames, frame count and the replay command

The replay's frame i (same config, seed, prompt and actions) is this episode's frame i before JPEG compression:
the server sends JPEGs (quality WORLDSERVE_JPEG_QUALITY), so these PNGs are decoded JPEGs. It holds for a server
running the config's own attention configuration, which is what `WorldEnv` gets unless told otherwise. With
chunk_frames > 1 every frame of a chunk is saved, and the step's one action is written once per frame.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from PIL import Image

from client import WorldEnv

ACTIONS_FORMAT = "worldserve-actions/1"  # the format `worldserve rollout --actions` reads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record a random agent's episode: frames and replayable actions.")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="server endpoint (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=64, help="steps after the reset (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world seed and action sampling seed")
    parser.add_argument("--prompt", default="", help="text prompt, e.g. 'red brick dungeon'")
    parser.add_argument("--token", help="bearer token, when the server requires one")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)

    (args.out / "frames").mkdir(parents=True, exist_ok=True)
    actions: list[dict] = []
    with WorldEnv(args.url, prompt=args.prompt, token=args.token, max_episode_steps=args.steps + 1) as env:
        env.action_space.seed(args.seed)
        env.reset(seed=args.seed)
        start_frames = env.last_chunk[0].index  # the frames the world began with (the server's game start)
        _record(env, [], 0.0, 0.0, actions, args.out)
        for _ in range(args.steps):
            action = env.action_space.sample()
            env.step(action)
            keys, dx, dy = env.to_input(action)
            _record(env, keys, dx, dy, actions, args.out)
    document = {"format": ACTIONS_FORMAT, "actions": actions}
    (args.out / "actions.json").write_text(json.dumps(document, indent=1) + "\n")
    replay = (
        f"worldserve rollout --config SERVER_CONFIG --seed {args.seed} --prompt {shlex.quote(args.prompt)} "
        f"--frames {len(actions)} --actions {shlex.quote(str(args.out / 'actions.json'))} "
        f"--game-start-frames {start_frames} --out REPLAY_DIR"
    )
    episode = {
        "url": args.url,
        "seed": args.seed,
        "prompt": args.prompt,
        "game_start_frames": start_frames,
        "frames": len(actions),
        "replay": replay,
    }
    (args.out / "episode.json").write_text(json.dumps(episode, indent=1) + "\n")
    print(f"wrote {len(actions)} frames and actions to {args.out}; replay with:\n  {replay}")
    return 0


def _record(env: WorldEnv, keys: list[str], dx: float, dy: float, actions: list[dict], out: Path) -> None:
    """Save the last step's frames, and its action once per frame (as the engine's actions files hold it)."""
    for frame in env.last_chunk:
        Image.fromarray(frame.image).save(out / "frames" / f"{len(actions):06d}.png")
        actions.append({"keys": sorted(keys), "mouse_dx": dx, "mouse_dy": dy})


if __name__ == "__main__":
    sys.exit(main())
