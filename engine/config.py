"""Typed configuration of a world model and its runtime, loaded from YAML.

One `WorldConfig` object is passed down; each component reads its own section. Every field has a default and
a description with its unit; unknown keys and wrong types are rejected with a message naming the key and the file.
Sizes derived from the config (tokens per frame, cache capacity in slots and bytes) are computed in `sizes()`
and nowhere else.

The `model` section is the architecture: it is embedded in every checkpoint, and a checkpoint loads only into a
model whose `model` section is equal to it. `sampler`, `cache` and `runtime` are inference choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_KEYS = (
    "KeyW",
    "KeyA",
    "KeyS",
    "KeyD",
    "ArrowLeft",
    "ArrowRight",
    "ArrowUp",
    "ArrowDown",
    "Space",
    "ShiftLeft",
)


# Named attention configurations (dotted-key overrides): what the rollout benchmark compares and what a server
# session may choose. Each sets every key it is about, so a base config that turns on sparse attention cannot make
# "dense" sparse, nor a base bound on the cache (`cache.max_slots`) bound it.
_DENSE_ATTENTION = {"attention.annsa": False, "attention.annca": False}
ATTENTION_PRESETS: dict[str, dict[str, Any]] = {
    "dense": {"cache.policy": "dense", "cache.max_slots": None, **_DENSE_ATTENTION},  # the unbounded baseline
    "window": {"cache.policy": "window", **_DENSE_ATTENTION},
    "tempcache": {"cache.policy": "tempcache", **_DENSE_ATTENTION},
    "tempcache+annsa": {"cache.policy": "tempcache", "attention.annsa": True, "attention.annca": False},
    "tempcache+annsa+annca": {"cache.policy": "tempcache", "attention.annsa": True, "attention.annca": True},
}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AutoencoderConfig(_Section):
    channels: tuple[int, ...] = Field(
        (32, 64, 128), description="conv channels per stage; each stage halves height and width (count)"
    )
    latent_channels: int = Field(16, ge=1, description="channels of the latent frame (count)")
    latent_scale: float = Field(1.0, gt=0, description="latents are multiplied by this before diffusion (unitless)")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** len(self.channels)

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("channels must be a non-empty list of positive integers")
        return self


class PromptConfig(_Section):
    vocab_size: int = Field(4096, ge=3, description="word-hash buckets of the learned prompt embedding (count)")
    max_tokens: int = Field(16, ge=1, description="prompt words kept; later words are dropped (tokens)")
    dim: int = Field(128, ge=1, description="width of a prompt token embedding (features)")


class ActionConfig(_Section):
    keys: tuple[str, ...] = Field(
        DEFAULT_KEYS, description="held keys the model understands, as W3C KeyboardEvent.code names, in tensor order"
    )
    mouse_scale: float = Field(
        20.0, gt=0, description="mouse motion that maps to 1.0 in the action tensor, clamped to [-1, 1] (CSS px)"
    )

    @model_validator(mode="after")
    def _check(self) -> ActionConfig:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("keys must not repeat")
        return self


class ModelConfig(_Section):
    frame_height: int = Field(64, ge=1, description="height of a generated frame (pixels)")
    frame_width: int = Field(64, ge=1, description="width of a generated frame (pixels)")
    chunk_frames: int = Field(1, ge=1, description="frames generated per autoregressive step (frames)")
    patch_size: int = Field(2, ge=1, description="latent cells per token along each side (cells)")
    dim: int = Field(160, ge=1, description="transformer width (features)")
    depth: int = Field(6, ge=1, description="transformer blocks (count)")
    heads: int = Field(5, ge=1, description="attention heads per block (count)")
    mlp_ratio: float = Field(4.0, gt=0, description="feed-forward width / transformer width (ratio)")
    rope_theta: float = Field(10000.0, gt=1, description="rotary base period (positions)")
    previous_frame_input: bool = Field(
        False,
        description="each frame's tokens also embed the latent of the frame before it (its patch, the same cell), "
        "as GameNGen and DIAMOND give their denoiser the previous frames; zero for a world's first frame",
    )
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig, description="frame autoencoder")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="prompt encoder")
    actions: ActionConfig = Field(default_factory=ActionConfig, description="action space")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        step = self.autoencoder.downsample * self.patch_size
        for name in ("frame_height", "frame_width"):
            if getattr(self, name) % step:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of autoencoder downsample x patch_size = {step}"
                )
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if self.head_dim < 6 or self.head_dim % 2:
            raise ValueError(f"head dim dim/heads={self.head_dim} must be even and >= 6 for 3D rotary position")
        return self


class SamplerConfig(_Section):
    steps: int = Field(3, ge=1, description="denoising steps per chunk (count)")
    shift: float = Field(1.0, gt=0, description="timestep shift; >1 spends more steps at high noise (unitless)")
    context_noise: float = Field(
        0.0, ge=0, lt=1, description="noise level at which finished frames are written into the cache (0 = clean)"
    )
    guidance: float = Field(
        1.0,
        ge=1,
        description="classifier-free guidance on the prompt: v = v_free + guidance (v_prompt - v_free), one more row "
        "per world in each denoising step's DiT forward; 1 = off (unitless)",
    )
    action_guidance: float = Field(
        0.4,
        ge=0,
        description="guidance on the action against standing still: v += action_guidance (v(action) - v(idle)), "
        "one more row per world in each denoising step's DiT forward; 0 = off (unitless)",
    )
    reencode: bool = Field(
        False,
        description="write each generated frame into the history as the autoencoder's encoding of the decoded frame "
        "(what the player saw, as observe writes true frames), not the denoised latent: keeps the history on the "
        "latents the DiT was trained on; one encoder pass per frame",
    )


class CacheConfig(_Section):
    policy: Literal["dense", "window", "tempcache"] = Field(
        "tempcache",
        description="which slots exist: dense keeps every frame, window keeps sinks + recent frames, tempcache "
        "merges near-duplicate tokens into counted slots under a hard bound",
    )
    sink_frames: int = Field(1, ge=0, description="first frames kept forever by bounded policies (frames)")
    window_frames: int = Field(32, ge=1, description="most recent frames kept by the window policy (frames)")
    grow_frames: int = Field(64, ge=1, description="unbounded caches grow their buffers by this much at once (frames)")
    max_slots: int | None = Field(
        None,
        ge=1,
        description="hard bound per layer (slots). tempcache: none = the window policy's capacity, "
        "(sink_frames + window_frames) x tokens per frame; dense: none = unbounded, else a world whose cache would "
        "pass it fails its step (CacheFull); a bound within one growth (grow_frames) is allocated whole, as rows of "
        "one pool",
    )
    exact_frames: int = Field(
        2,
        ge=0,
        description="tempcache keeps this many most recent frames exact, unmerged, and merges a frame's tokens into "
        "the compressed history when it leaves them (frames; 0 = merge each frame as it is written)",
    )
    tau: float = Field(
        0.9, description="tempcache merges a token into its match when cosine similarity >= tau (unitless; >1: never)"
    )
    ann: Literal["exact", "torch", "faiss"] = Field(
        "torch", description="tempcache top-1 search: exact, torch (8-bit quantised), faiss (8-bit scalar quantiser)"
    )


class AttentionConfig(_Section):
    annsa: bool = Field(False, description="AnnSA: block-sparse self-attention over LSH buckets")
    annca: bool = Field(False, description="AnnCA: per frame, cross-attend only to prompt tokens sharing a bucket")
    kernel: Literal["auto", "torch", "triton"] = Field(
        "auto", description="block-sparse kernel: torch reference, triton, or auto (triton on cuda, else torch)"
    )
    block_q: int = Field(4, ge=1, description="queries per block of the block-sparse layout (tokens)")
    block_k: int = Field(16, ge=1, description="keys per block of the block-sparse layout (tokens)")
    lsh_bits: int = Field(4, ge=1, le=12, description="random hyperplanes of the LSH: 2^bits buckets (bits)")
    lsh_probes: int = Field(
        1, ge=0, le=12, description="extra buckets per query, one least-confident hyperplane away (buckets)"
    )
    lsh_seed: int = Field(0, description="seed of the LSH hyperplanes")
    dense_step_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="the first round(fraction x sampler.steps) denoising steps attend densely (fraction)",
    )
    dense_layers: tuple[int, ...] = Field((), description="blocks that always attend densely (block indices)")
    measure: bool = Field(
        False, description="measure density and recall of sparse attention per layer (costs a dense pass)"
    )

    @model_validator(mode="after")
    def _check(self) -> AttentionConfig:
        if any(layer < 0 for layer in self.dense_layers):
            raise ValueError("dense_layers must be non-negative block indices")
        if self.lsh_probes > self.lsh_bits:
            raise ValueError(f"lsh_probes={self.lsh_probes} cannot exceed lsh_bits={self.lsh_bits}")
        return self


class RuntimeConfig(_Section):
    device: str = Field("auto", description="torch device, or auto: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="compute and cache dtype; auto is float32 on cpu, bfloat16 on cuda"
    )
    checkpoint: Path | None = Field(
        None,
        description=(
            "safetensors weights, relative to the config file (set on the command line: to the working "
            "directory); none = seeded random weights"
        ),
    )
    init_seed: int = Field(0, description="seed of the random weights used when there is no checkpoint")


class WorldConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="architecture (embedded in checkpoints)")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="few-step flow sampler")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="KV cache policy")
    attention: AttentionConfig = Field(default_factory=AttentionConfig, description="sparse attention")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="device, dtype, weights")

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        if self.cache.window_frames < self.model.chunk_frames:
            raise ValueError(
                f"cache.window_frames={self.cache.window_frames} must hold at least one chunk "
                f"(model.chunk_frames={self.model.chunk_frames})"
            )
        if any(layer >= self.model.depth for layer in self.attention.dense_layers):
            raise ValueError(f"attention.dense_layers must be below model.depth={self.model.depth}")
        sizes = self.sizes()
        if self.cache.policy == "tempcache":
            # merging one frame needs room for its tokens beside the frame merged before it; without exact frames
            # a whole chunk is merged as it is written
            exact = self.cache.exact_frames
            merging = 2 * (sizes.tokens_per_frame if exact else sizes.tokens_per_chunk)
            least = (self.cache.sink_frames + exact) * sizes.tokens_per_frame + merging
            if sizes.capacity_slots < least:
                raise ValueError(
                    f"tempcache capacity {sizes.capacity_slots} slots (cache.max_slots) must hold the sinks, the "
                    f"{exact} exact frames (cache.exact_frames) and room to merge (>= {least} slots)"
                )
        if self.cache.policy == "dense" and sizes.capacity_slots is not None:
            if sizes.capacity_slots < sizes.tokens_per_chunk:
                raise ValueError(
                    f"a dense cache bounded at {sizes.capacity_slots} slots (cache.max_slots) must hold one chunk "
                    f"(>= {sizes.tokens_per_chunk} slots)"
                )
        return self

    def sizes(self, dtype_bytes: int = 4) -> Sizes:
        """Every size derived from the config; `dtype_bytes` is the byte width of cached keys and values."""
        m = self.model
        down = m.autoencoder.downsample
        latent_h, latent_w = m.frame_height // down, m.frame_width // down
        grid_h, grid_w = latent_h // m.patch_size, latent_w // m.patch_size
        tokens = grid_h * grid_w
        # key + value per head, a 3-int32 position, a float32 count and an int64 frame index per slot
        slot_bytes = 2 * m.heads * m.head_dim * dtype_bytes + 3 * 4 + 4 + 8
        window = (self.cache.sink_frames + self.cache.window_frames) * tokens
        if self.cache.policy == "window":
            capacity = window
        elif self.cache.policy == "tempcache":
            capacity = self.cache.max_slots or window
        else:
            capacity = self.cache.max_slots  # dense: unbounded unless bounded
        return Sizes(
            latent_shape=(m.autoencoder.latent_channels, latent_h, latent_w),
            token_grid=(grid_h, grid_w),
            tokens_per_frame=tokens,
            tokens_per_chunk=tokens * m.chunk_frames,
            action_dim=len(m.actions.keys) + 2,
            slot_bytes=slot_bytes,
            grow_slots=self.cache.grow_frames * tokens,
            capacity_slots=capacity,
            capacity_bytes_per_layer=None if capacity is None else capacity * slot_bytes,
            capacity_bytes=None if capacity is None else capacity * slot_bytes * m.depth,
        )


@dataclass(frozen=True)
class Sizes:
    """Sizes derived from a `WorldConfig`; see `WorldConfig.sizes`."""

    latent_shape: tuple[int, int, int]  # (C, h, w) of one latent frame
    token_grid: tuple[int, int]  # tokens along height and width of one frame
    tokens_per_frame: int
    tokens_per_chunk: int
    action_dim: int  # held keys (multi-hot) + mouse dx, dy
    slot_bytes: int  # bytes of one cache slot in one layer
    grow_slots: int  # slots added at once when an unbounded cache is full
    capacity_slots: int | None  # slots per layer of a bounded policy; None = unbounded
    capacity_bytes_per_layer: int | None
    capacity_bytes: int | None  # all layers


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: the key and what is wrong with it, prefixed with `source` (a file or a name)."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: key '{key}': {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> WorldConfig:
    """Validate a config mapping; `source` names where it came from in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return WorldConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


def with_overrides(config: WorldConfig, overrides: dict[str, Any], source: str = "<overrides>") -> WorldConfig:
    """A validated copy of `config` with dotted-key `overrides` (``cache.policy``) applied."""
    data = config.model_dump()
    for key, value in overrides.items():
        _set_dotted(data, key, value, source)
    return parse_config(data, source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> WorldConfig:
    """Load a YAML config; `overrides` maps dotted keys (``cache.policy``) to values, applied before validation.

    A relative `runtime.checkpoint` is resolved against the folder of the file that names it, and one given as
    an override (``--set runtime.checkpoint=runs/x/model.safetensors``) against the working directory, where
    the person who typed it stands.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "config")
    _resolve_checkpoint(data, path.parent)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value, str(path))
    _resolve_checkpoint(data, Path.cwd())
    return parse_config(data, str(path))


def _resolve_checkpoint(data: dict[str, Any], folder: Path) -> None:
    """Make a relative `runtime.checkpoint` path in raw config `data` absolute against `folder`; other values
    are left for validation to judge."""
    runtime = data.get("runtime")
    if not isinstance(runtime, dict):
        return
    checkpoint = runtime.get("checkpoint")
    if isinstance(checkpoint, (str, Path)) and not Path(checkpoint).is_absolute():
        runtime["checkpoint"] = str((folder / checkpoint).resolve())


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file (empty file: {}); unreadable files, bad YAML and other top-level
    values are a ConfigError naming the file and `what` it was meant to be."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def describe_config() -> str:
    """Markdown reference of every config key: default and description (docs/config.md is this text)."""
    lines = [
        "# Configuration reference",
        "",
        "Every key of a worldserve config file, its default and its meaning with the unit. Generated from",
        "`engine/config.py` by `worldserve config --describe`; a test keeps this page equal to that output.",
        "",
        "| key | default | description |",
        "|---|---|---|",
    ]

    def walk(section: type[BaseModel], prefix: str) -> None:
        for name, field in section.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, _Section):
                walk(annotation, f"{prefix}{name}.")
                continue
            assert field.description, f"config field {prefix}{name} has no description"
            default = field.get_default(call_default_factory=True)
            shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default, default_flow_style=True)
            shown = shown.strip().removesuffix("...").strip()
            lines.append(f"| `{prefix}{name}` | {shown} | {field.description} |")

    walk(WorldConfig, "")
    return "\n".join(lines) + "\n"
