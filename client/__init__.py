"""worldserve clients: the browser page (client/web/) and the Python agent SDK, which talk to the server over
protocol v1 only (docs/protocol.md) and never import `server` or `engine`.

    from client import WorldClient, WorldEnv

- `WorldClient` (client/world_client.py): one session, asyncio; realtime (`send_action`, `frames()`) or lockstep
  (`step`); typed `WorldError`s; automatic resume after a dropped connection.
- `WorldEnv` (client/world_env.py): a `gymnasium.Env` over a lockstep session, for agents.
- client/protocol.py: the wire models, mirrored one-to-one from server/protocol.py.

docs/agents.md shows an agent in 10 lines. `WorldEnv` is imported on first use, so that importing this package
(the server does, to find client/web/) does not import gymnasium.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from client.frame import Frame, encode_init_frame
from client.protocol import (
    AuthenticationFailed,
    BadInitFrame,
    ConnectionLost,
    EngineError,
    ErrorCode,
    ResumeFailed,
    ServerFull,
    SessionClosed,
    ShuttingDown,
    TooManySteps,
    UnknownAttention,
    WorldError,
)
from client.world_client import WorldClient

if TYPE_CHECKING:
    from client.world_env import WorldEnv

__all__ = [
    "AuthenticationFailed",
    "BadInitFrame",
    "ConnectionLost",
    "EngineError",
    "ErrorCode",
    "Frame",
    "ResumeFailed",
    "ServerFull",
    "SessionClosed",
    "ShuttingDown",
    "TooManySteps",
    "UnknownAttention",
    "WorldClient",
    "WorldEnv",
    "WorldError",
    "encode_init_frame",
]


def __getattr__(name: str) -> Any:
    if name == "WorldEnv":
        from client.world_env import WorldEnv

        return WorldEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
