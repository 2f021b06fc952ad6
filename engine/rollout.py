"""Offline rollouts: step one world for N frames under an action sequence and write what it generated.

Output folder:
    frames/000000.png ...   every frame at the model's resolution
    contact_sheet.png       up to 64 evenly spaced frames, 8 per row
    rollout.gif             the whole rollout, upscaled for viewing
    actions.json            the actions used (replayable with --actions)
    stats.json              per frame: step time, cache tokens per layer, cache bytes, peak RSS; plus a summary
    frames.npy              all frames as one uint8 (T, H, W, 3) array (only with write_npy=True)
"""

from __future__ import annotations

import json
import platform
import random
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.actions import Action
from engine.world_engine import WorldEngine

ACTIONS_FORMAT = "worldserve-actions/1"

# Sticky "intents" of the random policy: (held keys, mouse dx per frame), each kept for several frames, as a
# person would walk, turn and stop rather than mash a new key every frame.
_INTENTS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("KeyW",), 0.0),
    (("KeyW",), 0.0),
    (("KeyW", "ArrowLeft"), 0.0),
    (("KeyW", "ArrowRight"), 0.0),
    (("ArrowLeft",), 0.0),
    (("ArrowRight",), 0.0),
    (("KeyA",), 0.0),
    (("KeyD",), 0.0),
    (("KeyS",), 0.0),
    (("KeyW", "ShiftLeft"), 0.0),
    ((), 12.0),
    ((), -12.0),
    ((), 0.0),
)


class FrameRecorder:
    """A rollout's frames, copied as they come into one uint8 (capacity, H, W, 3) array allocated up front.

    Not a list of the engine's arrays: each of those is a view of a small tensor allocated among the step's
    transient buffers, and hundreds of them kept alive pin the heap around them. A `tempcache` rollout that kept
    them grew its process by ~0.4 MiB a frame (342 to 1023 MiB over 2000 frames on the CPU, its cache flat at
    3.94 MiB); copied into one array it stays flat (docs/server.md, "Memory").
    """

    def __init__(self, capacity: int, height: int, width: int) -> None:
        self._frames = np.empty((capacity, height, width, 3), dtype=np.uint8)
        self.length = 0

    def extend(self, frames: Sequence[np.ndarray]) -> None:
        end = self.length + len(frames)
        if end > len(self._frames):
            raise ValueError(f"{end} frames do not fit a recorder of {len(self._frames)}")
        self._frames[self.length : end] = np.stack(frames)
        self.length = end

    @property
    def frames(self) -> np.ndarray:
        """The frames recorded so far, (length, H, W, 3): a view, not a copy."""
        return self._frames[: self.length]

    def __len__(self) -> int:
        return self.length


def random_actions(frames: int, seed: int) -> list[Action]:
    """A seeded human-like action sequence: sticky intents held for 3 to 15 frames each."""
    rng = random.Random(seed)
    actions: list[Action] = []
    while len(actions) < frames:
        keys, mouse_dx = rng.choice(_INTENTS)
        actions += [Action(frozenset(keys), mouse_dx, 0.0)] * rng.randint(3, 15)
    return actions[:frames]


def save_actions(path: str | Path, actions: Sequence[Action]) -> None:
    document = {"format": ACTIONS_FORMAT, "actions": [a.to_dict() for a in actions]}
    Path(path).write_text(json.dumps(document, indent=1) + "\n")


def load_actions(path: str | Path) -> list[Action]:
    """Read an actions file: {"format": "worldserve-actions/1", "actions": [{keys, mouse_dx, mouse_dy}, ...]}
    or a bare list of such objects."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read actions: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if isinstance(document, dict):
        if document.get("format") != ACTIONS_FORMAT:
            raise ValueError(f"{path}: expected format {ACTIONS_FORMAT!r}, got {document.get('format')!r}")
        document = document.get("actions")
    if not isinstance(document, list):
        raise ValueError(f"{path}: expected a list of actions")
    actions = []
    for i, item in enumerate(document):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: action {i} is not an object")
        try:
            actions.append(Action.from_dict(item))
        except ValueError as error:
            raise ValueError(f"{path}: action {i}: {error}") from None
    return actions


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def run_rollout(
    engine: WorldEngine,
    actions: Sequence[Action],
    out: str | Path,
    seed: int = 0,
    prompt: str = "",
    write_frames: bool = True,
    fps: float = 15.0,
    write_npy: bool = False,
    write_gif: bool = True,
    stop_on_oom: bool = False,
    init_frames: np.ndarray | None = None,
) -> dict[str, Any]:
    """Generate len(actions) frames (a multiple of the chunk size) in one world and write them to `out`; the world
    begins with `init_frames` (`WorldEngine.new_world`), which are not written.

    `write_frames` writes one PNG per frame, `write_npy` all frames as frames.npy, `write_gif` rollout.gif (long
    benchmark runs skip the PNGs and the GIF). Returns what stats.json holds: "frames", one entry per frame, and
    "summary", which also holds `cache_stats` (`WorldCache.stats()` after the last frame is written; a frame's own
    `cache_tokens` are counted after its step, which leaves its chunk for the next step to write) and, when the engine
    carries an attention meter (`attention.measure`), `attention` (the meter's summary: density and recall).
    With `stop_on_oom`, running out of memory after the first chunk ends the rollout early instead of failing; the
    summary's `stopped_early` then says at which frame and why (an unbounded cache on a long benchmark run).
    """
    chunk = engine.chunk_frames
    if not actions or len(actions) % chunk:
        raise ValueError(f"the number of frames ({len(actions)}) must be a positive multiple of chunk_frames={chunk}")
    out = Path(out)
    world = engine.new_world(prompt=prompt, seed=seed, init_frames=init_frames)
    recorder = FrameRecorder(len(actions), engine.config.model.frame_height, engine.config.model.frame_width)
    per_frame: list[dict[str, Any]] = []
    stopped_early = None
    cuda = engine.device.type == "cuda"
    for start in range(0, len(actions), chunk):
        began = time.perf_counter()
        try:
            [generated] = engine.step([world], [actions[start : start + chunk]])
        except (torch.OutOfMemoryError, MemoryError) as error:
            if not stop_on_oom or not len(recorder):
                raise
            stopped_early = {"frame": len(recorder), "reason": f"out of memory: {str(error).splitlines()[0]}"}
            break
        step_ms = (time.perf_counter() - began) * 1e3
        recorder.extend(generated)
        for frame in range(len(recorder) - len(generated), len(recorder)):
            per_frame.append(
                {
                    "frame": frame,
                    "step_ms": round(step_ms, 3),
                    "decode_ms": round(world.stats.last_decode_ms, 3),
                    "cache_tokens": world.cache.tokens_per_layer(),
                    "cache_bytes": world.cache.nbytes,
                    "peak_rss_bytes": peak_rss_bytes(),
                    **({"device_peak_bytes": torch.cuda.max_memory_allocated(engine.device)} if cuda else {}),
                }
            )
    if stopped_early is None:
        engine.flush([world])  # the last chunk waits for a next step that does not come
    frames = recorder.frames
    write_episode(out, frames, actions[: len(frames)], fps, pngs=write_frames, gif=write_gif, npy=write_npy)
    steps = [f["step_ms"] for f in per_frame]
    stats = {
        "summary": {
            "frames": len(frames),
            "seed": seed,
            "prompt": prompt,
            "init_frames": 0 if init_frames is None else len(init_frames),
            "policy": engine.policy.name,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "parameters": engine.model.parameter_count(),
            "tokens_per_frame": engine.sizes.tokens_per_frame,
            "cache_capacity_bytes": engine.sizes.capacity_bytes,
            "step_ms_mean": round(float(np.mean(steps)), 3),
            "step_ms_median": round(float(np.median(steps)), 3),
            "unknown_keys": world.stats.unknown_keys,
            "peak_rss_bytes": peak_rss_bytes(),
            "chunk_frames": chunk,
            "cache_stats": world.cache.stats(),
            "stopped_early": stopped_early,
        },
        "frames": per_frame,
    }
    if engine.meter is not None:  # only with attention.measure on
        stats["summary"]["attention"] = engine.meter.summary()
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def write_episode(
    out: str | Path,
    frames: Sequence[np.ndarray],
    actions: Sequence[Action],
    fps: float = 15.0,
    pngs: bool = True,
    gif: bool = True,
    npy: bool = False,
) -> None:
    """Write frames and their actions in the layout of the module docstring (`worldserve rollout`, `worldserve
    game`): frames/NNNNNN.png, contact_sheet.png, rollout.gif, frames.npy and actions.json, each as asked."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if pngs:
        (out / "frames").mkdir(exist_ok=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(out / "frames" / f"{t:06d}.png")
    _contact_sheet(frames).save(out / "contact_sheet.png")
    if gif:
        _save_gif(frames, out / "rollout.gif", fps)
    if npy:
        np.save(out / "frames.npy", np.stack(frames))  # (T, H, W, 3) uint8
    save_actions(out / "actions.json", actions)


def _contact_sheet(frames: Sequence[np.ndarray], columns: int = 8, most: int = 64, scale: int = 2) -> Image.Image:
    picks = np.linspace(0, len(frames) - 1, min(most, len(frames))).round().astype(int)
    h, w, _ = frames[0].shape
    rows = -(-len(picks) // columns)
    sheet = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, index in enumerate(picks):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = frames[index]
    image = Image.fromarray(sheet)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _save_gif(frames: Sequence[np.ndarray], path: Path, fps: float, scale: int = 4) -> None:
    h, w, _ = frames[0].shape
    images = [Image.fromarray(f).resize((w * scale, h * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
