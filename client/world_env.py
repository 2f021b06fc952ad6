"""WorldEnv: a gymnasium environment over one lockstep session of a worldserve server.

    env = WorldEnv("ws://127.0.0.1:8000/ws", prompt="red brick dungeon")
    obs, info = env.reset(seed=0)                     # uint8 (H, W, 3)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    env.close()

Spaces, from the server's welcome:
- observation_space: Box(0, 255, (H, W, 3), uint8), the frame size announced in `welcome.frame`.
- action_space: Dict(keys=MultiBinary(K), mouse=Box(-scale_px, scale_px, (2,), float32)): `keys[i]` holds
  `welcome.actions.keys[i]` during the step; `mouse` is the step's (dx, dy) in CSS px, right and down positive.
  The model sees mouse / scale_px, so the box covers its whole range [-1, 1].

Episodes:
- `reset(seed=s)` makes a new world from (prompt, s) on the server, then takes one idle step: the observation is
  that step's frame. Without a seed the world seed is drawn from `np_random`, so a seeded env is reproducible.
  The server's frames are a deterministic function of (config, attention, prompt, seed, actions), so the same
  seed and actions give the same observations (gymnasium's `check_env` checks exactly that), as long as the
  server steps this session alone: batched with other sessions' steps, a pixel may differ by one level.
  `options` may carry "prompt" (kept for later resets) and "init_frame" (uint8 (H, W, 3): the world starts from it).
- `step` sends one lockstep step; the observation is the last frame of its chunk (all of them: `last_chunk`).
  Reward is always 0.0 and `terminated` always False (the world has no goal of its own: wrap the env to add
  one); `truncated` is True after `max_episode_steps` steps.
- `info` holds only `frame_index`, because `check_env` demands equal infos for equal seeds and actions; the server's
  timings, cache size and the client's latency of the last frame are in `last_frame` (a client `Frame`).

The env runs its own asyncio loop on a background thread and drives a `WorldClient` on it, so it can be used from
plain synchronous code. Every call waits at most `timeout_s`. Call `close()` (or use `with WorldEnv(...) as env`)
to end the session and stop the thread. Do not call it from the event loop thread of a server it talks to (tests:
use `asyncio.to_thread`), since it blocks until the server answers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from client.frame import Frame
from client.world_client import WorldClient

T = TypeVar("T")

MAX_WORLD_SEED = 2**63 - 1  # the protocol's seed range is [0, 2**63)
OPTIONS = frozenset({"prompt", "init_frame"})


class WorldEnv(gym.Env[np.ndarray, dict[str, np.ndarray]]):
    """One lockstep session as a gymnasium env; the module docstring states the spaces and episode rules."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(
        self,
        url: str,
        *,
        prompt: str = "",
        world: Literal["model", "game"] = "model",
        attention: str | None = None,
        token: str | None = None,
        max_episode_steps: int = 1000,
        render_mode: str | None = None,
        resume: bool = False,
        timeout_s: float | None = 60.0,
    ) -> None:
        """Connect (lockstep) and read the spaces from the welcome. `resume` resumes the session after a dropped
        connection (see WorldClient). Raises the server's refusal as a `WorldError` (`ServerFull`, ...)."""
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.timeout_s = timeout_s
        self.prompt = prompt
        self.last_frame: Frame | None = None
        self.last_chunk: list[Frame] = []
        self._steps = 0
        self._ready = False  # reset() was called
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="worldenv-loop", daemon=True)
        self._thread.start()
        try:
            self.client: WorldClient = self._run(
                WorldClient.connect(
                    url, mode="lockstep", world=world, prompt=prompt, attention=attention, token=token, resume=resume
                )
            )
        except BaseException:
            self._stop_loop()
            raise
        height, width, _ = self.client.frame_shape
        self.keys = self.client.action_keys
        scale = self.client.mouse_scale_px
        self.observation_space = spaces.Box(0, 255, (height, width, 3), np.uint8)
        self.action_space = spaces.Dict(
            {
                "keys": spaces.MultiBinary(len(self.keys)),
                "mouse": spaces.Box(-scale, scale, (2,), np.float32),
            }
        )
        self.metadata = {**self.metadata, "render_fps": self.client.fps}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: {sorted(OPTIONS)}")
        self.prompt = options.get("prompt", self.prompt)
        world_seed = seed if seed is not None else int(self.np_random.integers(0, MAX_WORLD_SEED))
        self._run(self.client.reset(seed=world_seed, prompt=self.prompt, init_frame=options.get("init_frame")))
        self._steps = 0
        self._ready = True
        return self._observe(self._run(self.client.step()))

    def step(self, action: dict[str, np.ndarray]) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self._ready:
            raise RuntimeError("call reset() before step()")
        keys, dx, dy = self.to_input(action)
        observation, info = self._observe(self._run(self.client.step(keys=keys, dx=dx, dy=dy)))
        self._steps += 1
        return observation, 0.0, False, self._steps >= self.max_episode_steps, info

    def to_input(self, action: dict[str, np.ndarray]) -> tuple[list[str], float, float]:
        """An action of `action_space` -> (held key names, dx, dy) as sent to the server (and as
        engine's actions files record them)."""
        pressed = np.asarray(action["keys"]).reshape(-1)
        mouse = np.asarray(action["mouse"], dtype=np.float64).reshape(-1)
        if pressed.shape != (len(self.keys),) or mouse.shape != (2,):
            raise ValueError(f"expected keys of shape ({len(self.keys)},) and mouse of shape (2,), got {action!r}")
        keys = [key for key, held in zip(self.keys, pressed) if held]
        return keys, float(mouse[0]), float(mouse[1])

    def render(self) -> np.ndarray | None:
        """rgb_array: the last observation (black before the first reset); None without a render mode."""
        if self.render_mode is None:
            return None
        if self.last_frame is None:
            return np.zeros(self.observation_space.shape, np.uint8)
        return self.last_frame.image.copy()

    def close(self) -> None:
        """End the session (the server frees the world at once) and stop the env's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self, "client"):
                self._run(self.client.close())
        finally:
            self._stop_loop()
        super().close()

    def __del__(self) -> None:
        # A forgotten env: end its session without blocking the collector (its heartbeat would keep it open).
        loop = getattr(self, "_loop", None)
        if getattr(self, "_closed", True) or not hasattr(self, "client") or loop is None or loop.is_closed():
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self.client.close(), loop)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
        except RuntimeError:  # the loop is already stopping (interpreter shutdown)
            pass

    def _observe(self, frames: list[Frame]) -> tuple[np.ndarray, dict[str, Any]]:
        self.last_chunk = frames
        self.last_frame = frames[-1]
        return frames[-1].image.copy(), {"frame_index": frames[-1].index}

    def _run(self, awaitable: Awaitable[T]) -> T:
        """Run `awaitable` on the env's loop and wait for it (at most `timeout_s`)."""
        if not self._thread.is_alive():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise RuntimeError("this WorldEnv is closed")

        async def run() -> T:
            return await awaitable

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"the server did not answer within {self.timeout_s} s") from None

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
