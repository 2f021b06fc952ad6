"""Recorded play of the reference game (engine/game/): episodes, the train/held-out split, shards and their reader.

A world model is trained the GameNGen/DIAMOND way on frames of the game played by `HumanPolicy`. docs/dataset.md
describes the rules, the files and the numbers; in short:

Split (by maze seed, the only thing that makes one episode's world differ from another's):
    train      maze seeds in TRAIN_SEEDS   = [0, 10**9)            drawn per episode from (--seed, episode index)
    held-out   maze seeds in HELDOUT_SEEDS = [10**9, 10**9 + 10**6)  episode j plays seed 10**9 + j, for every --seed
`TrainingEpisodes` (also what `worldserve data` writes as its train split) asserts that it never yields a held-out
seed, so training that only draws from it cannot see a held-out maze. Policy and prompt distributions are shared.

Inputs the game cannot tell apart: `HumanPolicy` walks with KeyW/KeyS and never moves the mouse vertically, but
people also walk with ArrowUp/ArrowDown and their mouse drifts up and down. The game treats those alike (ArrowUp is
KeyW; mouse_dy does nothing), so a spec may ask for `arrows` (a quarter of episodes walk with the arrow keys) and
`mouse_dy` (vertical jitter, in px, on frames where the mouse moves) without changing a frame, and the world model
learns that they mean the same.

Alignment: an episode of T frames holds T actions; frames[t] is the view AFTER applying actions[0..t] in order,
which is what a world model generates for action t. actions[0] is always idle, so frames[0] is the first view of
the maze (an idle step changes nothing); the policy chooses actions[1:]. Replaying `episode_actions(e)` in a fresh
`Game(e.seed, e.prompt)` gives e.frames exactly (`replay`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.actions import IDLE, Action
from engine.config import DEFAULT_KEYS
from engine.game import THEMES, Game, HumanPolicy, theme_for_prompt

SHARD_FORMAT = "worldserve-dataset-shard/1"
TRAIN_SEEDS = range(0, 10**9)
HELDOUT_SEEDS = range(10**9, 10**9 + 10**6)
THEME_NAMES: tuple[str, ...] = tuple(THEMES)
SPLITS = ("train", "heldout")
_ARRAYS = ("frames", "keys", "mouse", "poses")
_DEFAULT_THEME = theme_for_prompt("").name
_TRAIN_STREAM, _HELDOUT_STREAM = 0x7261696E, 0x68656C64  # SeedSequence tags: the two splits never share a stream

# Prompt wording. The world model's prompt encoder hashes words, so it learns the words it sees: a prompt is the
# theme's name or one or two of its keywords, sometimes wrapped in words that name no theme (checked below).
_BEFORE = ("a", "the", "inside a", "walking through a", "lost in a", "exploring a")
_AFTER = ("level", "world", "corridors", "at dusk")
_ARROWS = 0.25  # share of episodes whose player walks with ArrowUp/ArrowDown instead of KeyW/KeyS
_MOUSE_DY_PX = 2.0  # std of the vertical mouse jitter added while the mouse moves (px; the game ignores it)
_ARROW_KEYS = {"KeyW": "ArrowUp", "KeyS": "ArrowDown"}
_EMPTY_PROMPT = 0.08  # share of default-theme episodes with an empty prompt (the server's prompt before any is set)
assert all(theme_for_prompt(words).name == _DEFAULT_THEME for words in _BEFORE + _AFTER), "a filler names a theme"


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file."""


def is_heldout(seed: int) -> bool:
    """True for a held-out maze seed. Seeds are taken mod 2**64 first, as the game does (engine/game/maze.py)."""
    return seed % 2**64 in HELDOUT_SEEDS


def prompt_for(theme: str, rng: np.random.Generator) -> str:
    """A prompt whose `theme_for_prompt` is `theme`, in one of the wordings of the module's prompt rules."""
    spec = THEMES[theme]
    if theme == _DEFAULT_THEME and rng.random() < _EMPTY_PROMPT:
        return ""
    if rng.random() < 0.5:
        core = spec.name
    else:
        picks = np.sort(rng.choice(len(spec.keywords), size=int(rng.integers(1, 3)), replace=False))
        core = " ".join(spec.keywords[i] for i in picks)
    words = [core]
    if rng.random() < 0.4:
        words.insert(0, _BEFORE[int(rng.integers(len(_BEFORE)))])
    if rng.random() < 0.3:
        words.append(_AFTER[int(rng.integers(len(_AFTER)))])
    prompt = " ".join(words)
    return prompt if theme_for_prompt(prompt).name == theme else spec.name  # a keyword another theme also owns


@dataclass(frozen=True)
class EpisodeSpec:
    """What to record: `index` within its split's stream, the maze `seed`, the `policy_seed`, the `prompt` (whose
    theme is `theme`) and the input aliases (`arrows`, `mouse_dy`: module docstring). A pure function of (split,
    stream seed, index)."""

    split: str
    index: int
    seed: int
    policy_seed: int
    prompt: str
    theme: str
    arrows: bool = False
    mouse_dy: float = 0.0


def train_spec(seed: int, index: int) -> EpisodeSpec:
    """Episode `index` of the training stream `seed`: themes in a shuffled cycle (each block of len(THEMES)
    consecutive episodes holds every theme once), maze seed drawn from TRAIN_SEEDS."""
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    block, slot = divmod(index, len(THEME_NAMES))
    order = np.random.default_rng((_TRAIN_STREAM, seed % 2**64, block)).permutation(len(THEME_NAMES))
    rng = np.random.default_rng((_TRAIN_STREAM, seed % 2**64, block, slot))
    maze = int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop))
    theme = THEME_NAMES[int(order[slot])]
    policy_seed, prompt, arrows = int(rng.integers(2**63)), prompt_for(theme, rng), bool(rng.random() < _ARROWS)
    spec = EpisodeSpec("train", index, maze, policy_seed, prompt, theme, arrows, _MOUSE_DY_PX)
    assert not is_heldout(spec.seed), f"training episode {index} drew held-out seed {spec.seed}"
    return spec


def heldout_spec(index: int) -> EpisodeSpec:
    """Held-out episode `index`: maze seed HELDOUT_SEEDS[index], themes in a plain cycle; independent of --seed."""
    if not 0 <= index < len(HELDOUT_SEEDS):
        raise ValueError(f"held-out episode index must be in [0, {len(HELDOUT_SEEDS)}), got {index}")
    rng = np.random.default_rng((_HELDOUT_STREAM, index))
    theme = THEME_NAMES[index % len(THEME_NAMES)]
    policy_seed, prompt, arrows = int(rng.integers(2**63)), prompt_for(theme, rng), bool(rng.random() < _ARROWS)
    return EpisodeSpec("heldout", index, HELDOUT_SEEDS[index], policy_seed, prompt, theme, arrows, _MOUSE_DY_PX)


@dataclass(frozen=True, eq=False)
class Episode:
    """One recorded episode of T frames (alignment in the module docstring). Arrays, read-only by convention:
    `frames` uint8 (T, H, W, 3); `keys` uint8 (T, K), multi-hot in the order of `key_names`; `mouse` float32
    (T, 2), (dx, dy) in CSS px as the game received them (it clamps dx to +-20 px and ignores dy); `poses`
    float32 (T, 4), the player's (x, y) in tiles, heading in radians and eye height in tiles after each step."""

    seed: int
    policy_seed: int
    prompt: str
    theme: str
    key_names: tuple[str, ...]
    frames: np.ndarray
    keys: np.ndarray
    mouse: np.ndarray
    poses: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def split(self) -> str:
        """'heldout' for a held-out maze seed, 'train' for one in TRAIN_SEEDS, else 'other'."""
        return "heldout" if is_heldout(self.seed) else "train" if self.seed in TRAIN_SEEDS else "other"


def record_episode(
    seed: int,
    prompt: str,
    frames: int,
    policy_seed: int,
    size: tuple[int, int] = (64, 64),
    key_names: Sequence[str] = DEFAULT_KEYS,
    *,
    arrows: bool = False,
    mouse_dy: float = 0.0,
) -> Episode:
    """Play `frames` frames of `Game(seed, prompt, *size)` with `HumanPolicy(policy_seed)` (size = (H, W) px).

    With `arrows`, KeyW/KeyS become ArrowUp/ArrowDown (where `key_names` has them); with `mouse_dy` > 0, frames
    whose mouse moves get vertical motion of that std (px) too (own random stream; the policy's is untouched).
    Neither changes a frame. The game is stepped with exactly the stored action: keys outside `key_names` are
    dropped and the mouse is rounded to float32 before the step, so `replay` reproduces the frames bit for bit."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    height, width = size
    index = {key: i for i, key in enumerate(key_names)}
    game, policy = Game(seed, prompt, height, width), HumanPolicy(policy_seed)
    jitter = np.random.default_rng((policy_seed % 2**64, 3))
    aliases = {key: arrow for key, arrow in _ARROW_KEYS.items() if arrows and arrow in index}
    out = np.empty((frames, height, width, 3), dtype=np.uint8)  # (T, H, W, 3)
    keys = np.zeros((frames, len(key_names)), dtype=np.uint8)  # (T, K)
    mouse = np.zeros((frames, 2), dtype=np.float32)  # (T, 2)
    poses = np.empty((frames, 4), dtype=np.float32)  # (T, 4)
    for t in range(frames):
        wanted = IDLE if t == 0 else policy.act(game)
        held = sorted(index[name] for key in wanted.keys if (name := aliases.get(key, key)) in index)
        keys[t, held] = 1
        dy = round(float(jitter.normal(0.0, mouse_dy)), 1) if mouse_dy > 0 and wanted.mouse_dx else wanted.mouse_dy
        mouse[t] = wanted.mouse_dx, dy
        out[t] = game.step(Action(frozenset(key_names[i] for i in held), float(mouse[t, 0]), float(mouse[t, 1])))
        poses[t] = game.x, game.y, game.heading, game.eye
    return Episode(seed, policy_seed, prompt, game.theme.name, tuple(key_names), out, keys, mouse, poses)


def record(spec: EpisodeSpec, frames: int, size: tuple[int, int], key_names: Sequence[str]) -> Episode:
    """Record the episode `spec` describes."""
    return record_episode(
        spec.seed, spec.prompt, frames, spec.policy_seed, size, key_names, arrows=spec.arrows, mouse_dy=spec.mouse_dy
    )


def episode_actions(episode: Episode) -> list[Action]:
    """The episode's T actions, for `engine.rollout.save_actions` (then `worldserve rollout --actions`)."""
    names = episode.key_names
    return [
        Action(frozenset(names[i] for i in np.flatnonzero(row)), float(dx), float(dy))
        for row, (dx, dy) in zip(episode.keys, episode.mouse.tolist())
    ]


def action_array(episode: Episode, mouse_scale: float) -> np.ndarray:
    """The model's action tensor for every frame, float32 (T, K + 2): what `ActionSpace.encode(episode_actions(e))`
    gives for an ActionSpace with the same keys and `mouse_scale` (px), without the per-action Python loop."""
    mouse = np.clip(episode.mouse / np.float32(mouse_scale), -1.0, 1.0)  # (T, 2)
    return np.concatenate([episode.keys.astype(np.float32), mouse], axis=1).astype(np.float32)  # (T, K + 2)


def replay(episode: Episode) -> np.ndarray:
    """Re-simulate the episode's actions in a fresh game: uint8 (T, H, W, 3), equal to episode.frames."""
    _, height, width, _ = episode.frames.shape
    game = Game(episode.seed, episode.prompt, height, width)
    return np.stack([game.step(action) for action in episode_actions(episode)])


class TrainingEpisodes(torch.utils.data.IterableDataset):
    """The endless training stream `seed`: episodes start, start + 1, ... (up to `stop`) of `train_spec`, recorded
    on the fly (the game is nearly free to run). Episodes 0..N-1 are what `worldserve data --seed S` writes as its
    train split, so `start=N` gives fresh ones. Under a torch DataLoader with workers, worker w of W takes every
    W-th episode; use `batch_size=None` to receive `Episode`s. Never yields a held-out maze (asserted)."""

    def __init__(
        self,
        seed: int,
        frames: int,
        size: tuple[int, int] = (64, 64),
        key_names: Sequence[str] = DEFAULT_KEYS,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        super().__init__()
        self.seed, self.frames, self.size, self.key_names = seed, frames, size, tuple(key_names)
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[Episode]:
        worker = torch.utils.data.get_worker_info()
        offset, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        index = self.start + offset
        while self.stop is None or index < self.stop:
            spec = train_spec(self.seed, index)
            assert not is_heldout(spec.seed)
            yield record(spec, self.frames, self.size, self.key_names)
            index += step


# ---- shards: one deterministic .npz (a zip of .npy arrays) per up to K episodes of one split -----------------------


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz that `np.load` reads, byte-identical for equal arrays (fixed zip timestamps; deflate level 1)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return buffer.getvalue()


def shard_bytes(specs: Sequence[EpisodeSpec], episodes: Sequence[Episode]) -> bytes:
    """Encode episodes of one split (equal key names and frame size) and the specs they were recorded from.

    Arrays: `frames` uint8 (N, H, W, 3), `keys` uint8 (N, K), `mouse` float32 (N, 2), `poses` float32 (N, 4), all
    episodes' frames concatenated (N = sum of T), and `meta`, UTF-8 JSON as uint8: format, key names, size and per
    episode its spec and frame count."""
    first = episodes[0]
    assert all(e.key_names == first.key_names and e.frames.shape[1:] == first.frames.shape[1:] for e in episodes)
    assert len({spec.split for spec in specs}) == 1 and len(specs) == len(episodes)
    entries = [{**dataclasses.asdict(spec), "frames": len(e)} for spec, e in zip(specs, episodes)]
    _, height, width, _ = first.frames.shape
    meta = {"format": SHARD_FORMAT, "key_names": list(first.key_names), "height": height, "width": width}
    arrays = {name: np.concatenate([getattr(e, name) for e in episodes]) for name in _ARRAYS}
    meta_bytes = json.dumps({**meta, "episodes": entries}, sort_keys=True).encode()
    return _npz_bytes({"meta": np.frombuffer(meta_bytes, dtype=np.uint8), **arrays})


def load_shard(path: str | Path, sha256: str | None = None) -> list[Episode]:
    """Read a shard written by `shard_bytes`. With `sha256`, the file must hash to it. Raises DatasetError (naming
    the file) for a file that is missing, corrupt, of another format, inconsistent, or breaks the split rule."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read shard: {error.strerror}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetError(f"{path}: sha256 differs from the manifest's (corrupt or replaced shard)")
    return _shard_episodes(path, data)


def _shard_episodes(path: Path, data: bytes) -> list[Episode]:
    """The episodes of a shard's bytes `data` (read from `path`, which errors name); `load_shard`'s checks."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("meta", *_ARRAYS)}
        meta = json.loads(arrays["meta"].tobytes().decode())
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable dataset shard ({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DatasetError(f"{path}: shard format {found!r}, expected {SHARD_FORMAT!r}")
    try:
        key_names, entries = tuple(meta["key_names"]), meta["episodes"]
        specs = [EpisodeSpec(**{k: v for k, v in entry.items() if k != "frames"}) for entry in entries]
        lengths = [int(entry["frames"]) for entry in entries]
        shape = (sum(lengths), int(meta["height"]), int(meta["width"]), 3)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DatasetError(f"{path}: malformed shard metadata ({type(error).__name__}: {error})") from None
    expected = {
        "frames": (shape, np.uint8),
        "keys": ((shape[0], len(key_names)), np.uint8),
        "mouse": ((shape[0], 2), np.float32),
        "poses": ((shape[0], 4), np.float32),
    }
    for name, (want_shape, dtype) in expected.items():
        if arrays[name].shape != want_shape or arrays[name].dtype != dtype:
            got = f"{arrays[name].dtype}{arrays[name].shape}"
            raise DatasetError(f"{path}: array {name!r} is {got}, expected {np.dtype(dtype)}{want_shape}")
    bounds = np.cumsum([0, *lengths])
    episodes = []
    for spec, begin, end in zip(specs, bounds[:-1], bounds[1:]):
        cut = {name: arrays[name][begin:end] for name in expected}
        episode = Episode(spec.seed, spec.policy_seed, spec.prompt, spec.theme, key_names, **cut)
        if episode.split != spec.split:
            raise DatasetError(f"{path}: seed {episode.seed} is a {episode.split} seed, listed as {spec.split}")
        episodes.append(episode)
    return episodes


# ---- a dataset folder: shards of each split and manifest.json, written last --------------------------------------

MANIFEST_FORMAT = "worldserve-dataset/1"
RECIPE_FILE = "recipe.json"  # written first, removed last: a folder with it and no manifest is still being recorded


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the manifest lists it: `file` (relative to the folder), its split, counts, size and sha256."""

    file: str
    split: str
    episodes: int
    frames: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetSummary:
    """What `write_dataset` wrote: episodes, frames, bytes of shards on disk, and wall-clock seconds it took; when it
    resumed an interrupted run, the shards it kept from it (`kept_shards`, holding `kept_frames`)."""

    episodes: int
    frames: int
    bytes: int
    seconds: float
    kept_shards: int = 0
    kept_frames: int = 0

    @property
    def bytes_per_frame(self) -> float:
        return self.bytes / self.frames

    @property
    def fps(self) -> float:
        """Frames recorded and stored per wall-clock second by this run, all workers together."""
        recorded = self.frames - self.kept_frames
        return recorded / self.seconds if self.seconds else float("inf")


@dataclass(frozen=True)
class _ShardJob:
    path: Path
    split: str
    specs: tuple[EpisodeSpec, ...]
    frames: int
    size: tuple[int, int]
    key_names: tuple[str, ...]


def start_recording_worker() -> None:
    """A recording worker process (`worldserve data`'s, and training's) ignores SIGINT and SIGTERM: a stop sent to
    the whole process group (Ctrl-C in a terminal, `timeout`, a container's stop) is its parent's to handle (training
    finishes its step, saves and closes the workers; `write_dataset` ends them and leaves the shards done), where
    workers killed with it would break the pool under the parent and print a traceback each. And it exits when its
    parent is gone: one killed outright (SIGKILL, the out-of-memory killer) cannot close its workers, which would
    otherwise wait forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_after, args=(parent.sentinel,), daemon=True).start()


@contextmanager
def workers_start_deaf_to_stops() -> Iterator[None]:
    """SIGINT and SIGTERM held back from the calling thread in the block: a worker process spawned there inherits
    them blocked through fork and exec, so a stop sent to the process group while it is still importing (before
    `start_recording_worker` ignores them) neither prints its traceback among the parent's last lines nor kills it
    under the pool. A stop that reaches the caller in the block is held, not lost: it is delivered when the block
    ends (ignoring the signals instead, as this once did, dropped a Ctrl-C that arrived during a submission)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held stop is handled here


def _exit_after(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready once the parent process has ended
    os._exit(0)


def _kept_shard(job: _ShardJob) -> ShardInfo | None:
    """The shard an interrupted run already wrote for `job`, if it reads back whole with exactly the job's episodes
    (`_write_shard` renames a shard into place, so a file present was written in full); None if it must be recorded."""
    try:
        data = job.path.read_bytes()
        episodes = _shard_episodes(job.path, data)
    except (OSError, DatasetError):  # not written yet, or not whole
        return None
    found = [
        (e.split, e.seed, e.policy_seed, e.prompt, e.theme, len(e), e.key_names, e.frames.shape[1:3]) for e in episodes
    ]
    wanted = [
        (s.split, s.seed, s.policy_seed, s.prompt, s.theme, job.frames, job.key_names, job.size) for s in job.specs
    ]
    if found != wanted:
        return None
    frames = sum(len(e) for e in episodes)
    return ShardInfo(job.path.name, job.split, len(episodes), frames, len(data), hashlib.sha256(data).hexdigest())


def _write_shard(job: _ShardJob) -> ShardInfo:
    """Record a shard's episodes and write it (to a temporary name first, so a file present is a whole one)."""
    episodes = [record(spec, job.frames, job.size, job.key_names) for spec in job.specs]
    data = shard_bytes(job.specs, episodes)
    partial = job.path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(job.path)
    frames = sum(len(e) for e in episodes)
    return ShardInfo(job.path.name, job.split, len(episodes), frames, len(data), hashlib.sha256(data).hexdigest())


def write_dataset(
    out: str | Path,
    *,
    train_episodes: int,
    heldout_episodes: int,
    frames: int,
    size: tuple[int, int] = (64, 64),
    key_names: Sequence[str] = DEFAULT_KEYS,
    mouse_scale: float = 20.0,
    shard_episodes: int = 64,
    seed: int = 0,
    workers: int = 1,
    command: str = "",
    progress: Callable[[ShardInfo, int, int], None] | None = None,
) -> DatasetSummary:
    """Record train episodes 0..train_episodes-1 of stream `seed` and held-out episodes 0..heldout_episodes-1 into
    shards of up to `shard_episodes` episodes in `out` (a new or empty folder), then manifest.json.

    The folder's contents are a pure function of the arguments other than `workers`, `command` and `progress`:
    `workers` processes record shards in parallel; `progress(shard_info, done, total)` is called per shard recorded.
    An interrupted run resumes: called again on its folder with the same arguments, it keeps every whole shard that
    run wrote (read back and checked) and records the rest, ending with the files an uninterrupted run writes."""
    # 1. Check the arguments and the folder.
    for name, value, least in (
        ("train_episodes", train_episodes, 0),
        ("heldout_episodes", heldout_episodes, 0),
        ("frames", frames, 1),
        ("shard_episodes", shard_episodes, 1),
        ("workers", workers, 1),
    ):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if train_episodes + heldout_episodes == 0:
        raise ValueError("nothing to record: train_episodes and heldout_episodes are both 0")
    if heldout_episodes > len(HELDOUT_SEEDS):
        raise ValueError(f"heldout_episodes must be <= {len(HELDOUT_SEEDS)}, got {heldout_episodes}")
    if min(size) < 8:
        raise ValueError(f"frames must be at least 8x8 px, got {size[0]}x{size[1]}")
    if len(set(key_names)) != len(key_names) or not key_names:
        raise ValueError(f"key_names must be distinct and non-empty, got {list(key_names)}")
    size, key_names = (int(size[0]), int(size[1])), tuple(key_names)
    recipe = {
        "format": MANIFEST_FORMAT,
        "seed": seed,
        "train_episodes": train_episodes,
        "heldout_episodes": heldout_episodes,
        "frames": frames,
        "shard_episodes": shard_episodes,
        "size": list(size),
        "key_names": list(key_names),
        "mouse_scale": mouse_scale,
    }
    out = Path(out)
    _claim_folder(out, recipe)
    # 2. Plan the shards: each split's episodes in stream order, `shard_episodes` at a time.
    specs = {
        "train": [train_spec(seed, i) for i in range(train_episodes)],
        "heldout": [heldout_spec(j) for j in range(heldout_episodes)],
    }
    jobs = [
        _ShardJob(out / f"{split}-{k // shard_episodes:05d}.npz", split, tuple(chunk), frames, size, key_names)
        for split in SPLITS
        for k in range(0, len(specs[split]), shard_episodes)
        if (chunk := specs[split][k : k + shard_episodes])
    ]
    # 3. Keep what an interrupted run of the same recipe wrote; record the rest, in parallel where asked (each shard
    # depends on its job alone).
    began = time.perf_counter()
    for stray in out.glob("*.partial"):  # a shard or manifest an interrupted run was writing
        stray.unlink()
    shards: dict[Path, ShardInfo] = {job.path: info for job in jobs if (info := _kept_shard(job)) is not None}
    kept = dict(shards)
    jobs_left = [job for job in jobs if job.path not in kept]
    if workers == 1 or len(jobs_left) <= 1:
        for job in jobs_left:
            shards[job.path] = _write_shard(job)
            if progress is not None:
                progress(shards[job.path], len(shards), len(jobs))
    else:
        context = multiprocessing.get_context("spawn")  # not fork: the caller may hold torch/OpenMP threads
        others = set(multiprocessing.active_children())  # the caller's own child processes, if it has any
        pool = ProcessPoolExecutor(min(workers, len(jobs_left)), mp_context=context, initializer=start_recording_worker)
        try:
            with workers_start_deaf_to_stops():  # the pool starts its workers as jobs are submitted
                futures = {pool.submit(_write_shard, job): job.path for job in jobs_left}
            for future in as_completed(futures):
                shards[futures[future]] = future.result()
                if progress is not None:
                    progress(shards[futures[future]], len(shards), len(jobs))
        except BaseException:  # Ctrl-C among them: stop at once; the shards in progress are recorded again on resume
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in set(multiprocessing.active_children()) - others:  # the pool's: they ignore SIGINT, SIGTERM
                worker.kill()
                worker.join()
            raise
        pool.shutdown()
    seconds = time.perf_counter() - began
    # 4. The manifest, last: a folder with manifest.json is a complete dataset.
    infos = [shards[job.path] for job in jobs]
    episodes = train_episodes + heldout_episodes
    kept_frames = sum(info.frames for info in kept.values())
    summary = DatasetSummary(
        episodes, episodes * frames, sum(info.bytes for info in infos), seconds, len(kept), kept_frames
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "command": command,
        "recipe": {
            "seed": seed,
            "train_episodes": train_episodes,
            "heldout_episodes": heldout_episodes,
            "frames": frames,
            "shard_episodes": shard_episodes,
        },
        "game": {
            "height": int(size[0]),
            "width": int(size[1]),
            "key_names": list(key_names),
            "mouse_scale": mouse_scale,
            "mouse_units": "CSS px",
            "themes": list(THEME_NAMES),
            "policy": "engine.game.HumanPolicy",
            "first_action": "idle",
        },
        "split": {
            "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop],
            "heldout_seeds": [HELDOUT_SEEDS.start, HELDOUT_SEEDS.stop],
        },
        "totals": {"episodes": summary.episodes, "frames": summary.frames, "bytes": summary.bytes},
        "shards": [dataclasses.asdict(info) for info in infos],
        "episodes": [
            {**dataclasses.asdict(spec), "frames": frames, "shard": job.path.name} for job in jobs for spec in job.specs
        ],
    }
    partial = out / "manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    partial.replace(out / "manifest.json")
    (out / RECIPE_FILE).unlink()  # the manifest holds the recipe now
    return summary


def _claim_folder(out: Path, recipe: dict[str, Any]) -> None:
    """Make `out` the folder of a dataset recorded to `recipe`: a new or empty one (which gets RECIPE_FILE first), or
    one an interrupted run of the same recipe left (resumed). Raises ValueError for anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not an empty folder; write a dataset into a new one")
    if (out / "manifest.json").exists():
        raise ValueError(f"{out} already holds a complete dataset (manifest.json); write a new one into another folder")
    if out.exists() and any(out.iterdir()):
        try:
            found = json.loads((out / RECIPE_FILE).read_text())
        except (OSError, ValueError):
            raise ValueError(
                f"{out} exists and is not an empty folder, nor one an interrupted `worldserve data` left (no readable "
                f"{RECIPE_FILE}); write a dataset into a new one"
            ) from None
        differ = [key for key in recipe if not isinstance(found, dict) or found.get(key) != recipe[key]]
        if differ:
            raise ValueError(
                f"{out} holds an interrupted dataset recorded with other arguments ({', '.join(differ)} differ); "
                "resume it with the same arguments, or write into a new folder"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{RECIPE_FILE}.partial"
    partial.write_text(json.dumps(recipe, indent=1) + "\n")
    partial.replace(out / RECIPE_FILE)


class Dataset:
    """A dataset folder written by `write_dataset`, validated on opening (manifest format and fields; every shard
    present with its listed size). Shards are read lazily and checked against their sha256 as they are read.
    Raises DatasetError naming the file at fault."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except OSError as error:
            raise DatasetError(f"{path}: cannot read the manifest: {error.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DatasetError(f"{path}: not valid JSON: {error}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise DatasetError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r} (not a worldserve dataset?)")
        try:
            game = manifest["game"]
            self.height, self.width = int(game["height"]), int(game["width"])
            self.key_names: tuple[str, ...] = tuple(game["key_names"])
            self.mouse_scale = float(game["mouse_scale"])
            self.shards = [ShardInfo(**entry) for entry in manifest["shards"]]
            self.entries: list[dict[str, Any]] = list(manifest["episodes"])
            for entry in self.entries:
                EpisodeSpec(**{k: v for k, v in entry.items() if k not in ("shard", "frames")})
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from None
        self.manifest = manifest
        for shard in self.shards:
            if shard.split not in SPLITS:
                raise DatasetError(f"{path}: shard {shard.file} has unknown split {shard.split!r}")
            file = self.root / shard.file
            if not file.is_file():
                raise DatasetError(f"{file}: shard listed in the manifest is missing")
            if file.stat().st_size != shard.bytes:
                raise DatasetError(f"{file}: {file.stat().st_size} bytes, the manifest says {shard.bytes}")
        for entry in self.entries:
            if (entry["split"] == "heldout") != is_heldout(entry["seed"]):
                raise DatasetError(f"{path}: episode seed {entry['seed']} listed as {entry['split']} breaks the split")

    def count(self, split: str) -> int:
        """Episodes in `split` ('train' or 'heldout')."""
        return sum(shard.episodes for shard in self._shards(split))

    def episodes(self, split: str) -> Iterator[Episode]:
        """The episodes of `split` in manifest order, one shard in memory at a time."""
        for shard in self._shards(split):
            path = self.root / shard.file
            episodes = load_shard(path, shard.sha256)
            listed = [e["seed"] for e in self.entries if e["shard"] == shard.file]
            if [e.seed for e in episodes] != listed or len(episodes) != shard.episodes:
                raise DatasetError(f"{path}: episodes differ from the manifest's list for this shard")
            if episodes and (episodes[0].key_names, episodes[0].frames.shape[1:3]) != (
                self.key_names,
                (self.height, self.width),
            ):
                raise DatasetError(f"{path}: key names or frame size differ from the manifest's")
            yield from episodes

    def verify(self) -> None:
        """Read every shard (hashes and contents) and replay each split's first episode in the game: a game whose
        rules or looks changed since recording no longer reproduces the frames."""
        for split in SPLITS:
            for i, episode in enumerate(self.episodes(split)):
                if i == 0 and not np.array_equal(replay(episode), episode.frames):
                    raise DatasetError(
                        f"{self.root}: {split} episode seed {episode.seed} no longer replays to its frames"
                    )

    def _shards(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [shard for shard in self.shards if shard.split == split]
