// Protocol v1, mirrored one-to-one from server/protocol.py (docs/protocol.md is the prose version).
//
// Every message, both ways, is one binary WebSocket frame holding one msgpack map with a `type` field. This module
// has one builder per client message type, the server message types the page handles, and the error and close
// code tables; tests/client/test_browser.py compares these tables with server/protocol.py so that drift fails a
// test. Nothing here knows about sockets, the canvas or the page.

import { Encoder, decode } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = 1;

// client -> server
export const CLIENT_TYPES = Object.freeze([
  "hello",
  "action",
  "step",
  "reset",
  "set_prompt",
  "set_attention",
  "pause",
  "resume",
  "ping",
]);

// server -> client
export const SERVER_TYPES = Object.freeze(["welcome", "frame", "pong", "error"]);

export const ErrorCode = Object.freeze({
  BAD_MESSAGE: "bad_message",
  UNKNOWN_TYPE: "unknown_type",
  OUT_OF_ORDER: "out_of_order",
  BAD_HELLO: "bad_hello",
  UNSUPPORTED_PROTOCOL: "unsupported_protocol",
  BAD_TOKEN: "bad_token",
  BAD_INIT_FRAME: "bad_init_frame",
  UNKNOWN_ATTENTION: "unknown_attention",
  TOO_MANY_STEPS: "too_many_steps",
  RATE_LIMITED: "rate_limited",
  FLOOD: "flood",
  SERVER_FULL: "server_full",
  RESUME_FAILED: "resume_failed",
  IDLE_TIMEOUT: "idle_timeout",
  SESSION_EXPIRED: "session_expired",
  SHUTTING_DOWN: "shutting_down",
  REPLACED: "replaced",
  ENGINE_ERROR: "engine_error",
});

export const CloseCode = Object.freeze({
  BAD_HELLO: 4000,
  BAD_TOKEN: 4001,
  UNSUPPORTED_PROTOCOL: 4002,
  RESUME_FAILED: 4004,
  FLOOD: 4008,
  SERVER_FULL: 4009,
  IDLE_TIMEOUT: 4010,
  SESSION_EXPIRED: 4011,
  SHUTTING_DOWN: 4012,
  REPLACED: 4013,
  ENGINE_ERROR: 4014,
});

// WebSocket codes the server does not choose itself (RFC 6455).
export const NORMAL_CLOSURE = 1000; // from the client: "done", the world is freed at once
export const MESSAGE_TOO_BIG = 1009; // a client message over max_message_bytes; the world stays resumable
export const SERVICE_RESTART = 1012; // uvicorn's shutdown before a hello was answered: treat as "later"

// What to do after each close (server/protocol.py RECONNECT, plus docs/protocol.md §6 for 1009 and 1012).
// "no": the same request fails again; "later": back off, then a fresh hello; "new": a fresh hello now;
// "resume": a hello with the resume token continues the world. Any code not listed (1006, ...) means "resume".
export const RECONNECT = Object.freeze({
  [CloseCode.BAD_HELLO]: "no",
  [CloseCode.BAD_TOKEN]: "no",
  [CloseCode.UNSUPPORTED_PROTOCOL]: "no",
  [CloseCode.RESUME_FAILED]: "new",
  [CloseCode.FLOOD]: "resume",
  [CloseCode.SERVER_FULL]: "later",
  [CloseCode.IDLE_TIMEOUT]: "new",
  [CloseCode.SESSION_EXPIRED]: "new",
  [CloseCode.SHUTTING_DOWN]: "later",
  [CloseCode.REPLACED]: "no",
  [CloseCode.ENGINE_ERROR]: "new",
  [MESSAGE_TOO_BIG]: "resume",
  [SERVICE_RESTART]: "later",
});

// Fatal errors and the close code that follows each (server/protocol.py FATAL); every other error is not fatal.
export const FATAL = Object.freeze({
  [ErrorCode.BAD_HELLO]: CloseCode.BAD_HELLO,
  [ErrorCode.UNSUPPORTED_PROTOCOL]: CloseCode.UNSUPPORTED_PROTOCOL,
  [ErrorCode.BAD_TOKEN]: CloseCode.BAD_TOKEN,
  [ErrorCode.BAD_INIT_FRAME]: CloseCode.BAD_HELLO,
  [ErrorCode.UNKNOWN_ATTENTION]: CloseCode.BAD_HELLO,
  [ErrorCode.FLOOD]: CloseCode.FLOOD,
  [ErrorCode.SERVER_FULL]: CloseCode.SERVER_FULL,
  [ErrorCode.RESUME_FAILED]: CloseCode.RESUME_FAILED,
  [ErrorCode.IDLE_TIMEOUT]: CloseCode.IDLE_TIMEOUT,
  [ErrorCode.SESSION_EXPIRED]: CloseCode.SESSION_EXPIRED,
  [ErrorCode.SHUTTING_DOWN]: CloseCode.SHUTTING_DOWN,
  [ErrorCode.REPLACED]: CloseCode.REPLACED,
  [ErrorCode.ENGINE_ERROR]: CloseCode.ENGINE_ERROR,
});

/** The advice for a close code: "no", "later", "new" or "resume". */
export function reconnectAdvice(code) {
  return RECONNECT[code] ?? "resume";
}

// ---- client -> server builders. Optional fields left undefined are not sent (the server's default applies).

/** A new session, or (with `resumeToken`) the continuation of one; the server then ignores the other fields. */
export function hello({
  prompt, seed, fps, attention, token, resumeToken, initFrame, mode = "realtime", world = "model",
} = {}) {
  return {
    type: "hello",
    protocol: PROTOCOL_VERSION,
    token,
    mode,
    world,
    prompt,
    seed,
    init_frame: initFrame,
    fps,
    attention,
    resume_token: resumeToken,
  };
}

/** Realtime input: `keys` is every key held now (KeyboardEvent.code names), `dx`/`dy` the CSS px of mouse motion
 * since the previous action, `buttons` the MouseEvent.buttons bitmask. `t` (ms) comes back in frames. */
export function action(seq, t, { keys = [], dx = 0, dy = 0, buttons = 0 } = {}) {
  return { type: "action", seq, t, keys, dx, dy, buttons };
}

/** Lockstep only: one chunk under one input (the page's game session under "Compare with the game"). */
export function step(seq, t, { keys = [], dx = 0, dy = 0, buttons = 0 } = {}) {
  return { type: "step", seq, t, action: { keys, dx, dy, buttons } };
}

/** A new world; a field left undefined keeps its current value. */
export function reset({ seed, prompt, initFrame } = {}) {
  return { type: "reset", seed, prompt, init_frame: initFrame };
}

export function setPrompt(prompt) {
  return { type: "set_prompt", prompt };
}

export function setAttention(attention) {
  return { type: "set_attention", attention };
}

export function pause() {
  return { type: "pause" };
}

export function resume() {
  return { type: "resume" };
}

export function ping(t) {
  return { type: "ping", t };
}

// ---- wire format

// Integers (seq, seed, buttons) go out as msgpack ints and fractional numbers as float64, as the server expects;
// undefined fields are left out; Uint8Array goes out as bin.
const encoder = new Encoder({ ignoreUndefined: true });

/** A client message -> the bytes of one binary WebSocket frame. */
export function pack(message) {
  if (!CLIENT_TYPES.includes(message.type)) throw new Error(`not a protocol v1 client message: ${message.type}`);
  return encoder.encode(message);
}

/** The bytes of one server frame -> a message; `jpeg` is a Uint8Array. Throws on anything not protocol v1. */
export function unpack(data) {
  const message = decode(new Uint8Array(data));
  if (message === null || typeof message !== "object" || !SERVER_TYPES.includes(message.type)) {
    throw new Error(`not a protocol v1 server message: ${JSON.stringify(message?.type ?? message)}`);
  }
  return message;
}
