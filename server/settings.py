"""Deployment settings of the game server, read from `WORLDSERVE_*` environment variables (pydantic-settings).

The world model itself (architecture, checkpoint, cache and attention defaults) is described by the YAML file named
in `config`; these settings are what an operator tunes per box: where to listen, who may connect, and how much
load to admit. `create_app(settings)` receives one `ServerSettings` object; nothing reads the environment later.

    WORLDSERVE_PORT=9000 WORLDSERVE_MAX_SESSIONS=16 WORLDSERVE_TOKEN=s3cret worldserve serve
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine import ATTENTION_PRESETS
from engine.game import START_FRAMES


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WORLDSERVE_", extra="forbid", frozen=True)

    config: Path = Field(
        Path("configs/default.yaml"), description="world model config (YAML; relative to the working directory)"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description='config keys to override, dotted (JSON map, e.g. {"cache.policy": "window"})'
    )
    device: str | None = Field(None, description="torch device, overriding the config's runtime.device")
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")

    token: SecretStr | None = Field(None, description="when set, `hello` must carry this bearer token")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to open /ws besides the server's own (JSON list; '*' allows any)",
    )

    max_sessions: int = Field(8, ge=1, description="sessions admitted per device; more are refused (count)")
    idle_timeout_s: float = Field(60.0, gt=0, description="a session that sends nothing this long is closed (s)")
    max_session_s: float = Field(3600.0, gt=0, description="longest a session may last (s)")
    resume_grace_s: float = Field(30.0, ge=0, description="a dropped session waits this long for a resume (s)")
    heartbeat_s: float = Field(10.0, gt=0, description="how often clients should ping when otherwise silent (s)")

    default_fps: float = Field(15.0, gt=0, description="realtime frame rate when hello asks for none (frames/s)")
    max_fps: float = Field(60.0, gt=0, description="highest realtime frame rate a session may ask for (frames/s)")
    attention_presets: list[str] = Field(
        default_factory=lambda: ["dense", "window", "tempcache", "tempcache+annsa+annca"],
        description="attention configurations a session may choose (names of engine.ATTENTION_PRESETS)",
    )
    max_dense_cache_mib: float = Field(
        1024.0,
        gt=0,
        description="a world under dense attention (a KV cache that grows with every frame) ends its session once its "
        "cache would pass this, with engine_error; the other configurations are bounded by construction (MiB)",
    )
    switch_prime_frames: int = Field(
        8, ge=1, description="frames shown last that seed the new cache when a session switches attention (frames)"
    )
    game_start_frames: int = Field(
        START_FRAMES,
        ge=0,
        description="every world begins with this many frames of the reference game standing still at the start of "
        "its seed's maze: a game session plays them, a model session without an init frame is primed with them, so "
        "both begin in the same place at this frame index; 0: model sessions begin from the prompt alone, for a "
        "model not trained on the game (frames; a multiple of chunk_frames)",
    )
    warmup_steps: int = Field(2, ge=0, description="engine steps per attention configuration before ready (count)")

    jpeg_quality: int = Field(85, ge=1, le=100, description="JPEG quality of frames (1-100)")
    encode_threads: int = Field(2, ge=1, description="threads that JPEG-encode frames off the event loop (count)")

    max_message_bytes: int = Field(
        128 * 1024, ge=1024, description="largest WebSocket message accepted; larger closes with 1009 (bytes)"
    )
    rate_limit_per_s: float = Field(200.0, gt=0, description="client messages per second a session may send")
    rate_burst: int = Field(400, ge=1, description="messages a session may send at once above the rate (count)")
    max_pending_steps: int = Field(8, ge=1, description="lockstep steps queued per session before refusing (count)")
    shutdown_grace_s: float = Field(5.0, ge=0, description="time sessions get to receive their close on shutdown (s)")

    log_format: Literal["text", "json"] = Field("text", description="log lines as text or one JSON object each")

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        unknown = [name for name in self.attention_presets if name not in ATTENTION_PRESETS]
        if unknown or not self.attention_presets:
            raise ValueError(
                f"attention_presets must name at least one of {', '.join(ATTENTION_PRESETS)}; unknown: {unknown}"
            )
        if self.default_fps > self.max_fps:
            raise ValueError(f"default_fps ({self.default_fps}) exceeds max_fps ({self.max_fps})")
        return self


def describe_settings() -> str:
    """Markdown table of every setting: environment variable, default, meaning (docs/server.md holds this text)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in ServerSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default) if isinstance(default, list) else default
        lines.append(f"| `WORLDSERVE_{name.upper()}` | `{shown}` | {field.description} |")
    return "\n".join(lines) + "\n"
