"""One WebSocket connection on `/ws`: the hello handshake, a reader and a writer task.

The reader validates every message, applies the rate limit and hands valid ones to the session or the manager;
a bad message gets an `error` and the session goes on, a fatal one closes the socket with its close code. The
writer is the only task that sends: first this connection's control replies (pong, error), then the session's
newest frames. A client that stops reading blocks only its own writer; the engine keeps going and newer frames
replace older ones in the session's outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from starlette.websockets import WebSocket, WebSocketDisconnect

from server.protocol import (
    Action,
    Error,
    ErrorCode,
    Hello,
    Pause,
    Ping,
    Pong,
    ProtocolError,
    Reset,
    Resume,
    SetAttention,
    SetPrompt,
    Step,
    decode_client,
    encode,
)
from server.session import Chunk, Session, to_action
from server.sessions import SessionManager

log = logging.getLogger("worldserve.connection")

CONTROL_LIMIT = 32  # unsent control replies kept per connection; older ones are dropped first
CLOSE_TIMEOUT_S = 2.0  # a client that does not take its close message in this time is cut off
CLIENT_DONE = 1000  # a client that closes with 1000 is finished: its world goes at once; any other drop may resume


def _payload(message: dict) -> bytes | str:
    """The data of an ASGI `websocket.receive` message: bytes, or text (which the protocol refuses)."""
    return message.get("bytes") or message.get("text") or b""


class TokenBucket:
    """`rate` messages per second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Connection:
    def __init__(self, websocket: WebSocket, manager: SessionManager) -> None:
        self.ws = websocket
        self.manager = manager
        self.settings = manager.settings
        self.session: Session | None = None
        self.finished = asyncio.Event()
        self._control: deque[bytes] = deque(maxlen=CONTROL_LIMIT)
        self._wake = asyncio.Event()
        self._close_code: int | None = None
        self._bucket = TokenBucket(self.settings.rate_limit_per_s, self.settings.rate_burst)
        self._limited_window = (0.0, 0)  # (start of the current second, messages refused in it)
        self._last_rate_error = float("-inf")
        self._last_seq: int | None = None
        self._tasks: tuple[asyncio.Task, ...] = ()

    # ---- life cycle

    async def serve(self) -> None:
        await self.ws.accept()
        try:
            await self._serve()
        finally:
            self.finished.set()

    async def _serve(self) -> None:
        try:
            hello = await asyncio.wait_for(self._receive_hello(), timeout=self.settings.heartbeat_s)
            session, resumed = await self.manager.join(hello, self)
        except ProtocolError as error:
            await self._refuse(error)
            return
        except TimeoutError:
            await self._refuse(ProtocolError(ErrorCode.BAD_HELLO, "no hello received in time"))
            return
        except WebSocketDisconnect:
            return
        except Exception as error:  # making the world failed (a bad init frame for this model, out of memory, ...)
            log.exception("could not open a session")
            await self._refuse(ProtocolError(ErrorCode.ENGINE_ERROR, f"could not make the world: {error}"))
            return
        self.session = session
        session.outbox.listener = self._wake
        self._send(self.manager.welcome(session, resumed))
        self._wake.set()
        writer = asyncio.create_task(self._write(), name=f"write-{session.id}")
        reader = asyncio.create_task(self._read(), name=f"read-{session.id}")
        self._tasks = (writer, reader)
        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        if not writer.done() and self._close_code is not None:  # give the client a moment to take its close
            await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S)
        self._abort()
        await asyncio.gather(writer, reader, return_exceptions=True)
        if session.outbox.listener is self._wake:
            session.outbox.listener = None
        self.manager.detach(session, self)  # a no-op when the session ended or another connection resumed it

    def _abort(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _receive_hello(self) -> Hello:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        try:
            hello = decode_client(_payload(message), self.settings.max_message_bytes)
        except ProtocolError as error:
            raise ProtocolError(ErrorCode.BAD_HELLO, f"the first message must be a hello: {error.message}") from None
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.BAD_HELLO, f"the first message must be a hello, got {hello.type}")
        return hello

    async def _refuse(self, error: ProtocolError) -> None:
        self.manager.metrics.protocol_errors.labels(code=error.code.value).inc()
        try:
            await self.ws.send_bytes(encode(Error(code=error.code, message=error.message, fatal=True)))
            await self.ws.close(error.close_code)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client is already gone

    def close(self, code: ErrorCode, message: str) -> None:
        """Send a fatal error and close with its close code; frames stop at once."""
        if self._close_code is not None:
            return
        error = ProtocolError(code, message, fatal=True)
        self._close_code = error.close_code
        self.error(error)
        # a client that does not read cannot take its close message either: cut it off after a while
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._abort)

    def error(self, error: ProtocolError) -> None:
        self.manager.metrics.protocol_errors.labels(code=error.code.value).inc()
        self._send(Error(code=error.code, message=error.message, fatal=error.fatal))
        if error.fatal and self._close_code is None:
            self._close_code = error.close_code

    def _send(self, message: Error | Pong | object) -> None:
        self._control.append(encode(message))
        self._wake.set()

    # ---- writer

    async def _write(self) -> None:
        session = self.session
        while True:
            if self._control:
                await self.ws.send_bytes(self._control.popleft())
                continue
            if self._close_code is not None:
                await self.ws.close(self._close_code)
                return
            chunk = session.outbox.take()
            if chunk is not None:
                await self._send_chunk(session, chunk)
                continue
            self._wake.clear()
            await self._wake.wait()

    async def _send_chunk(self, session: Session, chunk: Chunk) -> None:
        sent = 0
        try:
            for message in chunk.messages:
                await self.ws.send_bytes(message)
                sent += 1
        finally:
            if sent == len(chunk.messages):
                self.manager.sent(session, chunk)
            else:
                chunk.messages, chunk.frames = chunk.messages[sent:], chunk.frames[sent:]
                self.manager.unsent(session, chunk)

    # ---- reader

    async def _read(self) -> None:
        session = self.session
        max_bytes = self.settings.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                if message.get("code") == CLIENT_DONE:
                    self.manager.finish(session, self)
                return
            now = time.monotonic()
            session.last_message_at = now
            if not self._admit(now):
                if self._close_code is not None:
                    return
                continue
            try:
                parsed = decode_client(_payload(message), max_bytes)
                await self._handle(session, parsed, now)
            except ProtocolError as error:
                self.error(error)
            except Exception as error:  # an engine job (reset, prompt, attention switch) failed: the world is suspect
                log.exception("session change failed", extra={"session": session.id})
                self.manager.end(session, ErrorCode.ENGINE_ERROR, f"the engine failed: {type(error).__name__}: {error}")
            if self._close_code is not None:
                return

    def _admit(self, now: float) -> bool:
        """Rate limit: refuse messages over the rate (one error per second), close on a flood."""
        if self._bucket.take(now):
            return True
        start, refused = self._limited_window
        if now - start >= 1.0:
            start, refused = now, 0
        self._limited_window = (start, refused + 1)
        if refused + 1 >= max(self.settings.rate_limit_per_s, self.settings.rate_burst):
            self.close(ErrorCode.FLOOD, "far too many messages; slow down before reconnecting")
        elif now - self._last_rate_error >= 1.0:
            self._last_rate_error = now
            self.error(
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"over {self.settings.rate_limit_per_s:g} messages/s; messages are being dropped",
                    fatal=False,
                )
            )
        return False

    async def _handle(self, session: Session, message: object, now: float) -> None:
        match message:
            case Action():
                self._expect_mode(session, "realtime", "action")
                self._expect_newer(message.seq)
                session.input.update(message.input(), message.seq, message.t, now)
            case Step():
                self._expect_mode(session, "lockstep", "step")
                self._expect_newer(message.seq)
                limit = self.settings.max_pending_steps
                if not session.queue_step(message.seq, message.t, to_action(message.action), now, limit):
                    raise ProtocolError(
                        ErrorCode.TOO_MANY_STEPS, f"{limit} steps are already waiting; this one is dropped"
                    )
                self.manager.wake(session)
            case Ping():
                self._send(Pong(t=message.t, server_time=time.time()))
            case Pause():
                session.set_paused(True)
            case Resume():
                session.set_paused(False)
                self.manager.wake(session)
            case SetPrompt():
                await self.manager.set_prompt(session, message.prompt)
            case SetAttention():
                await self.manager.set_attention(session, message.attention)
            case Reset():
                await self.manager.reset(session, message)
                self._last_seq = None
            case Hello():
                raise ProtocolError(ErrorCode.OUT_OF_ORDER, "hello was already received on this connection")

    @staticmethod
    def _expect_mode(session: Session, mode: str, kind: str) -> None:
        if session.mode != mode:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"{kind} is for {mode} mode; this session is {session.mode}")

    def _expect_newer(self, seq: int) -> None:
        if self._last_seq is not None and seq <= self._last_seq:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"seq {seq} is not after {self._last_seq}; message ignored")
        self._last_seq = seq
