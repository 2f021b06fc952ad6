// One realtime session over /ws, kept alive across drops: hello, heartbeat, the close rules of docs/protocol.md §6,
// and reconnecting with back-off (resuming the world when the server keeps it).
//
// The page talks to the session through `send*` methods and hears from it through callbacks; it never sees a
// WebSocket. The resume token lives in sessionStorage so that a page that dies without `pagehide` (a crashed or
// killed tab) can still resume its world when reloaded; `stop()` (the page is done) closes with 1000 and forgets it.

import * as protocol from "./protocol.js";

const TOKEN_KEY = "worldserve.resume_token";
const BACKOFF_FIRST_MS = 250;
const BACKOFF_MAX_MS = 4000;

export class Connection {
  /**
   * @param {object} options
   * @param {string} options.url  ws:// or wss:// URL of /ws
   * @param {string} options.infoUrl  URL of /api/info, asked before each fresh hello
   * @param {() => object} options.helloFields  {prompt, seed, fps, attention, token} for a fresh hello
   * @param {object} options.on  callbacks: state(name, detail), welcome(msg), frame(msg), pong(msg, rttMs),
   *   error(msg) for non-fatal errors, closed(info) when it stops or waits: {code, advice, error, retryInMs}
   * @param {string} [options.storageKey]  the sessionStorage key of the resume token (one per connection of a page)
   */
  constructor({ url, infoUrl, helloFields, on, storageKey = TOKEN_KEY }) {
    this.url = url;
    this.storageKey = storageKey;
    this.infoUrl = infoUrl;
    this.helloFields = helloFields;
    this.on = on;
    this.ws = null;
    this.welcome = null; // the current welcome while open
    this.state = "idle"; // idle | connecting | open | waiting | stopped | closed
    this.attempts = 0;
    this.seq = 0;
    this.sentAt = new Map(); // seq -> t of the actions sent on this connection (for latency)
    this.timer = null;
    this.heartbeat = null;
    this.fatal = null; // the fatal error the server sent before its close
    this.waitingForVisible = false;
    this.attempt = 0; // bumped by every connect, start and stop: an outdated connect gives up
  }

  get open() {
    return this.state === "open";
  }

  get resumeToken() {
    return sessionStorage.getItem(this.storageKey);
  }

  forget() {
    sessionStorage.removeItem(this.storageKey);
  }

  /** Connect (resuming the stored session if there is one); a no-op while a socket is open or opening. */
  start() {
    if (this.ws) return;
    clearTimeout(this.timer);
    this.waitingForVisible = false;
    this.attempts = 0;
    this._connect();
  }

  /** The page is done: close with 1000, which ends the world at once, and forget the resume token. */
  stop(reason = "page closed") {
    clearTimeout(this.timer);
    this.waitingForVisible = false;
    this.attempt += 1;
    this._stopHeartbeat();
    this.forget();
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(protocol.NORMAL_CLOSURE, reason);
    this._setState("closed");
  }

  // ---- sending

  send(message) {
    if (!this.open) return false;
    this.ws.send(protocol.pack(message));
    return true;
  }

  /** The current input state; returns the seq sent, or null when not connected. `measured`: a player's input,
   * whose input-to-frame latency counts (the state sent on connecting is not: it waits for a new world). */
  sendAction(input, measured = true) {
    if (!this.open) return null;
    const t = performance.now();
    this.seq += 1;
    if (measured) this.sentAt.set(this.seq, t);
    this.send(protocol.action(this.seq, t, input));
    return this.seq;
  }

  /** Lockstep: one step under `input` ({keys, dx, dy, buttons}); returns the seq sent, or null when not connected. */
  sendStep(input) {
    if (!this.open) return null;
    this.seq += 1;
    this.send(protocol.step(this.seq, performance.now(), input));
    return this.seq;
  }

  /** The time (performance.now() ms) an action of this connection was sent, given a frame's echoed seq and t. */
  sentTime(seq, t) {
    const sent = this.sentAt.get(seq);
    if (sent === undefined || sent !== t) return null; // an action of an earlier connection or page
    for (const old of this.sentAt.keys()) {
      if (old >= seq) break;
      this.sentAt.delete(old); // frames only move forward in seq
    }
    return sent;
  }

  // ---- connecting

  async _connect() {
    const attempt = ++this.attempt;
    this._setState("connecting", this.attempts ? `attempt ${this.attempts + 1}` : "");
    const token = this.resumeToken;
    let fields;
    if (token) {
      const { token: accessToken, world } = this.helloFields();
      fields = { token: accessToken, world, resumeToken: token };
    } else {
      // A fresh hello: /api/info says whether the server is up, needs a token, and knows the attention we ask for.
      let info;
      try {
        const response = await fetch(this.infoUrl, { cache: "no-store" });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        info = await response.json();
      } catch {
        if (attempt === this.attempt) this._retry({ code: 0, advice: "later", reason: "unreachable" });
        return;
      }
      if (attempt !== this.attempt) return; // stopped or started again meanwhile
      fields = this.helloFields();
      if (info.token_required && !fields.token) {
        this._halt({ code: protocol.CloseCode.BAD_TOKEN, advice: "no", reason: "token_required" });
        return;
      }
      if (fields.attention && !info.attention.choices.includes(fields.attention)) delete fields.attention;
    }
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.fatal = null;
    this.seq = 0;
    this.sentAt.clear();
    let opened = false;
    ws.onopen = () => {
      opened = true;
      ws.send(protocol.pack(protocol.hello(fields)));
    };
    ws.onmessage = (event) => this._receive(ws, event.data);
    ws.onclose = (event) => this._closed(ws, event.code, opened);
  }

  _receive(ws, data) {
    if (ws !== this.ws) return;
    let message;
    try {
      message = protocol.unpack(data);
    } catch (error) {
      console.warn("worldserve:", error);
      return;
    }
    switch (message.type) {
      case "welcome":
        this.welcome = message;
        this.attempts = 0;
        sessionStorage.setItem(this.storageKey, message.resume_token);
        this._setState("open", message.resumed ? "resumed" : "new");
        this._startHeartbeat(message.heartbeat_s);
        this.on.welcome(message);
        break;
      case "frame":
        this.on.frame(message);
        break;
      case "pong":
        this.on.pong(message, performance.now() - message.t);
        break;
      case "error":
        // A fatal error is followed by the server's close: wait for it (closing with 1000 here would end a world
        // that may still be resumable), then act on its code.
        if (message.fatal) this.fatal = message;
        else this.on.error(message);
        break;
    }
  }

  _closed(ws, code, opened) {
    if (ws !== this.ws) return; // an old socket, or stop() closed it
    this.ws = null;
    this.welcome = null;
    this._stopHeartbeat();
    // The close frame's code decides; when the socket was cut off after a fatal error, that error's code does.
    if (this.fatal && !(code in protocol.RECONNECT)) code = protocol.FATAL[this.fatal.code] ?? code;
    if (code === protocol.NORMAL_CLOSURE) code = protocol.SERVICE_RESTART; // the server never ends a world so
    const advice = protocol.reconnectAdvice(code);
    // never opened: the server went away, or refused the handshake (HTTP 403: an Origin it does not allow)
    const info = { code, advice, error: this.fatal, reason: opened ? "" : "handshake" };
    if (advice === "no") this._halt(info);
    else this._retry(info);
  }

  _retry(info) {
    if (info.advice === "new" || info.advice === "later") this.forget(); // the world is gone, or will be
    const immediate = info.advice === "new" && this.attempts === 0;
    const delay = immediate ? 0 : Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempts);
    const retryInMs = Math.round(delay * (0.8 + 0.4 * Math.random()));
    this.attempts += 1;
    this._setState("waiting", info.advice);
    this.on.closed({ ...info, retryInMs });
    clearTimeout(this.timer);
    if (document.hidden && info.advice === "new") {
      // e.g. an idle timeout in a background tab: start the new world when someone is looking again
      this.waitingForVisible = true;
      document.addEventListener("visibilitychange", () => this._whenVisible(), { once: true });
      return;
    }
    this.timer = setTimeout(() => this._connect(), retryInMs);
  }

  _whenVisible() {
    if (!this.waitingForVisible || this.state !== "waiting") return;
    if (document.hidden) {
      document.addEventListener("visibilitychange", () => this._whenVisible(), { once: true });
      return;
    }
    this.waitingForVisible = false;
    this._connect();
  }

  _halt(info) {
    clearTimeout(this.timer);
    this._setState("stopped", info.advice);
    this.on.closed({ ...info, retryInMs: null });
  }

  _startHeartbeat(seconds) {
    this._stopHeartbeat();
    this.send(protocol.ping(performance.now())); // a first round-trip time at once
    this.heartbeat = setInterval(() => this.send(protocol.ping(performance.now())), seconds * 1000);
  }

  _stopHeartbeat() {
    clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  _setState(state, detail = "") {
    this.state = state;
    this.on.state(state, detail);
  }
}
