// Connection state and messages: the status pill, and a banner that says in plain words what the server said
// (server full, bad token, idle timeout, ...) and what the page is doing about it.

import { ErrorCode, MESSAGE_TOO_BIG, SERVICE_RESTART } from "./protocol.js";

const STATE_TEXT = {
  idle: "idle",
  connecting: "connecting…",
  open: "connected",
  waiting: "reconnecting…",
  stopped: "disconnected",
  closed: "closed",
};

const FATAL_TEXT = {
  [ErrorCode.BAD_HELLO]: "The server refused this page's hello",
  [ErrorCode.UNSUPPORTED_PROTOCOL]: "The server speaks another protocol version than this page; reload the page",
  [ErrorCode.BAD_TOKEN]: "This server needs an access token, and the one given is missing or wrong",
  [ErrorCode.BAD_INIT_FRAME]: "The server refused the start picture",
  [ErrorCode.UNKNOWN_ATTENTION]: "The server does not know the attention configuration asked for",
  [ErrorCode.FLOOD]: "The page sent too many messages and was cut off",
  [ErrorCode.SERVER_FULL]: "The server is full: every session slot is taken",
  [ErrorCode.RESUME_FAILED]: "The previous session is gone (it waited too long for this page)",
  [ErrorCode.IDLE_TIMEOUT]: "The session timed out: the server heard nothing from this page for too long",
  [ErrorCode.SESSION_EXPIRED]: "The session reached the server's time limit",
  [ErrorCode.SHUTTING_DOWN]: "The server is shutting down or restarting",
  [ErrorCode.REPLACED]: "This session was taken over by another tab or window",
  [ErrorCode.ENGINE_ERROR]: "The world model failed on this world",
};

// Where the server's own words add something (which field, which names), they follow ours.
const WITH_DETAIL = new Set([
  ErrorCode.BAD_HELLO,
  ErrorCode.BAD_INIT_FRAME,
  ErrorCode.UNKNOWN_ATTENTION,
  ErrorCode.ENGINE_ERROR,
]);

const ADVICE_TEXT = {
  resume: "Resuming",
  new: "Starting a new world",
  later: "Trying again",
};

export class Status {
  /**
   * @param {HTMLElement} pill  shows the connection state (data-state holds its name)
   * @param {HTMLElement} banner  the message banner (role=alert), with a [data-text] span and a [data-retry] button
   * @param {() => void} onRetry  the banner's Reconnect button
   */
  constructor(pill, banner, onRetry) {
    this.pill = pill;
    this.banner = banner;
    this.text = banner.querySelector("[data-text]");
    this.retry = banner.querySelector("[data-retry]");
    this.retry.addEventListener("click", () => onRetry());
    this.hideTimer = null;
    this.last = null; // {kind, code, text}: what the banner says (tests read it from window.worldserve)
  }

  state(name, detail) {
    this.pill.dataset.state = name;
    this.pill.textContent = name === "open" && detail === "resumed" ? "resumed" : STATE_TEXT[name] ?? name;
  }

  /** The session is open again: clear what the banner said about the drop. */
  connected(resumed) {
    if (this.last?.kind !== "info") this.hide();
    if (resumed) this.show("info", "", "Reconnected: the world went on where it was", 3000);
  }

  /** The connection closed: say why and what happens next (see Connection's `closed` callback). `prefix` names
   * another connection than the page's own (the game's, "game: "). */
  closed({ code, advice, error, retryInMs, reason }, prefix = "") {
    let text;
    if (reason === "unreachable") text = "The server cannot be reached";
    else if (reason === "token_required") text = "This server needs an access token";
    else if (error && error.code in FATAL_TEXT) {
      text = FATAL_TEXT[error.code] + (WITH_DETAIL.has(error.code) ? ` (${error.message})` : "");
    } else if (error) text = `${error.code}: ${error.message}`;
    else if (code === MESSAGE_TOO_BIG) text = "A message was too big for the server";
    else if (code === SERVICE_RESTART) text = "The server is restarting";
    else if (reason === "handshake") text = "Could not open a connection to the server";
    else text = `The connection dropped (code ${code})`;
    const what = error?.code || reason || String(code);
    if (retryInMs === null) {
      const token = reason === "token_required" || error?.code === ErrorCode.BAD_TOKEN; // the token form connects
      this.show("error", what, `${prefix}${text}${token ? ": enter it below" : "."}`, 0, !token && !prefix);
    } else {
      const when = retryInMs < 500 ? "…" : ` in ${(retryInMs / 1000).toFixed(1)} s…`;
      this.show("warn", what, `${prefix}${text}. ${ADVICE_TEXT[advice]}${when}`);
    }
  }

  /** A non-fatal error: the message it answers had no effect; the session goes on. */
  error(message, prefix = "") {
    const text =
      message.code === ErrorCode.RATE_LIMITED ? "Input is being sent too fast: some was dropped" : message.message;
    this.show("info", message.code, prefix + text, 4000);
  }

  show(kind, code, text, hideAfterMs = 0, retry = false) {
    clearTimeout(this.hideTimer);
    this.last = { kind, code, text };
    this.banner.dataset.kind = kind;
    this.banner.dataset.code = code;
    this.text.textContent = text;
    this.retry.hidden = !retry;
    this.banner.hidden = false;
    if (hideAfterMs) this.hideTimer = setTimeout(() => this.hide(), hideAfterMs);
  }

  /** Hide the banner if it speaks of the connection named by `prefix` (that one is open again). */
  hideIf(prefix) {
    if (this.last?.text.startsWith(prefix)) this.hide();
  }

  hide() {
    clearTimeout(this.hideTimer);
    this.last = null;
    this.banner.hidden = true;
  }
}
