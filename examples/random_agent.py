"""A random agent: the smallest complete program on WorldEnv (docs/agents.md explains each line).

    worldserve serve &
    python examples/random_agent.py --url ws://127.0.0.1:8000/ws --steps 100

Prints steps per second as the agent sees them (network and JPEG included) and the server's engine step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from client import WorldEnv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Play a worldserve world with random actions (lockstep).")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="server endpoint (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="steps to take (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world seed and action sampling seed")
    parser.add_argument("--prompt", default="", help="text prompt, e.g. 'red brick dungeon'")
    parser.add_argument("--token", help="bearer token, when the server requires one")
    args = parser.parse_args(argv)

    with WorldEnv(args.url, prompt=args.prompt, token=args.token) as env:
        env.action_space.seed(args.seed)
        observation, info = env.reset(seed=args.seed)
        engine_ms = []
        started = time.perf_counter()
        for _ in range(args.steps):
            observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
            engine_ms.append(env.last_frame.timings.step_ms)
            if terminated or truncated:
                observation, info = env.reset()
        elapsed = time.perf_counter() - started
    median = statistics.median(engine_ms) if engine_ms else float("nan")
    print(
        f"{args.steps} steps in {elapsed:.2f} s ({args.steps / max(elapsed, 1e-9):.1f} steps/s) | "
        f"observation {observation.shape} {observation.dtype} | engine step {median:.1f} ms median | "
        f"last frame {info['frame_index']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
