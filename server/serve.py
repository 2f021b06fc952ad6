"""Running the app under uvicorn, with a shutdown that drains sessions before uvicorn closes their sockets.

uvicorn's own shutdown closes every WebSocket with 1012 before the app's lifespan hears of it; `WorldServer` first
tells each session (an `error` "shutting_down" and close code 4012, see docs/protocol.md), then lets uvicorn go on.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from server.settings import ServerSettings

WS_PING_S = 20.0  # WebSocket-level pings find dead TCP connections that never said goodbye


def uvicorn_config(app: FastAPI, settings: ServerSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=WS_PING_S,
        ws_ping_timeout=WS_PING_S,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s) + 1),
        log_config=None,  # our own logging set-up (server/logs.py); uvicorn's loggers propagate to the root
        access_log=False,
    )


class WorldServer(uvicorn.Server):
    def __init__(self, app: FastAPI, settings: ServerSettings) -> None:
        super().__init__(uvicorn_config(app, settings))
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self.app.state, "server", None)
        if state is not None:
            await state.manager.drain()
        await super().shutdown(sockets)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return self.servers[0].sockets[0].getsockname()[1]


@asynccontextmanager
async def serving(
    app: FastAPI, settings: ServerSettings, startup_timeout_s: float = 120.0
) -> AsyncIterator[WorldServer]:
    """Run `app` on this event loop for the duration of the block (tests, `worldserve bench serve`); leaving the
    block shuts it down the way a SIGTERM would (sessions drained first).

        async with serving(create_app(settings), settings) as server:
            url = f"ws://127.0.0.1:{server.port}/ws"
    """
    server = WorldServer(app, settings)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(startup_timeout_s):
            while not server.started:
                if task.done():
                    task.result()  # re-raises a startup exception
                    raise RuntimeError("the server stopped during startup (see the log)")
                await asyncio.sleep(0.02)
        yield server
    finally:
        server.should_exit = True
        await task
