"""Server test helpers: a real uvicorn on 127.0.0.1 port 0 in the test's event loop, and a wire-level client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import websockets

from engine import WorldEngine
from server.app import create_app
from server.protocol import Frame, ServerMessage, decode_server
from server.serve import WorldServer, serving
from server.settings import ServerSettings
from tests.conftest import write_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class Client:
    """One WebSocket connection speaking protocol v1 with plain dicts, so tests can also send what the server's
    models would never produce."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    async def send(self, **fields: Any) -> None:
        await self.ws.send(msgpack.packb(fields, use_bin_type=True))

    async def recv(self, timeout: float = 10.0) -> ServerMessage:
        return decode_server(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_until(self, kind: str, timeout: float = 10.0) -> ServerMessage:
        """Skip other messages (frames, usually) until one of `kind` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message.type == kind:
                    return message

    async def frames(self, count: int, timeout: float = 20.0) -> list[Frame]:
        out: list[Frame] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                message = await self.recv(timeout)
                assert message.type == "frame", message
                out.append(message)
        return out

    async def hello(self, **fields: Any) -> ServerMessage:
        await self.send(type="hello", protocol=1, **fields)
        return await self.recv()

    async def closed(self, timeout: float = 10.0) -> int:
        """Read until the server closes; returns the close code."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self.ws.recv()
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd is not None else 1006


class Server:
    def __init__(self, server: WorldServer) -> None:
        self.server = server
        self.app = server.app
        self.url = f"ws://127.0.0.1:{server.port}/ws"
        self.http = f"http://127.0.0.1:{server.port}"

    @property
    def state(self):
        return self.app.state.server

    async def get(self, path: str) -> httpx.Response:
        """HTTP GET without blocking the event loop the server runs on."""
        async with httpx.AsyncClient(base_url=self.http) as http:
            return await http.get(path)

    @asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[Client]:
        async with websockets.connect(self.url, max_size=2**22, **kwargs) as ws:
            yield Client(ws)


@asynccontextmanager
async def run_server(engine: WorldEngine | None, config: Path, **settings: Any) -> AsyncIterator[Server]:
    """A real server; `engine` None builds it from `config` in the lifespan as `worldserve serve` does."""
    values = {"config": config, "port": 0, "warmup_steps": 1, "attention_presets": ["dense", "window"], **settings}
    options = ServerSettings(**values)
    async with serving(create_app(options, engine), options) as server:
        yield Server(server)


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml")
