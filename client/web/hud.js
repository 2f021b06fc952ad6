// The heads-up display: what the frames say about the session, measured and shown a few times a second.
//
// Each value is a <dd data-hud="NAME"> whose text is for people and whose `data-value` holds the raw number or
// name (what the browser tests read). Latency is input to frame shown: from the `t` of an action (the page's
// performance.now() when it was sent, echoed by the server) to the drawing of the first frame carrying its seq.

import { attentionLabel } from "./labels.js";

const RATE_WINDOW_MS = 2000;
const LATENCY_SAMPLES = 31;
const REFRESH_MS = 250;

export class Hud {
  /** @param {HTMLElement} root  the element holding the [data-hud] fields */
  constructor(root) {
    this.fields = Object.fromEntries([...root.querySelectorAll("[data-hud]")].map((el) => [el.dataset.hud, el]));
    this.values = {};
    this.reset();
    setInterval(() => this.render(), REFRESH_MS);
  }

  /** A new connection: forget rates and latencies (the frame index and session come with the next frames). */
  reset() {
    this.received = []; // performance.now() of each frame received in the last RATE_WINDOW_MS
    this.latencies = [];
    this.lastLatencySeq = null;
    this.targetFps = null;
    delete this.values.latency_ms;
  }

  welcome(welcome) {
    this.targetFps = welcome.fps;
    Object.assign(this.values, {
      session: welcome.session_id,
      seed: welcome.seed,
      attention: welcome.attention,
      frame: welcome.frame_index,
    });
  }

  /** A frame message arrived (delivered, whether or not it gets drawn). */
  frameReceived(frame, now) {
    this.received.push(now);
    Object.assign(this.values, {
      frame: frame.index,
      attention: frame.attention,
      queue_ms: frame.timings.queue_ms,
      step_ms: frame.timings.step_ms,
      encode_ms: frame.timings.encode_ms,
      cache_slots: frame.cache.slots,
      cache_bytes: frame.cache.bytes,
      dropped: frame.dropped,
    });
  }

  /** A frame was drawn; `sentAt` is when the action whose seq it carries was sent (null: none of this connection).
   * Returns the input-to-frame latency (ms) when this is the first frame shown to carry that seq, else null. */
  frameShown(frame, shownAt, sentAt) {
    if (sentAt === null || frame.seq === this.lastLatencySeq) return null;
    this.lastLatencySeq = frame.seq;
    const latency = shownAt - sentAt;
    this.latencies.push(latency);
    if (this.latencies.length > LATENCY_SAMPLES) this.latencies.shift();
    this.values.latency_ms = latency;
    return latency;
  }

  set(name, value) {
    this.values[name] = value;
  }

  get fps() {
    const now = performance.now();
    while (this.received.length && this.received[0] < now - RATE_WINDOW_MS) this.received.shift();
    if (this.received.length < 2) return 0;
    return (this.received.length - 1) / (Math.max(now - this.received[0], 1) / 1000);
  }

  get latencyMedian() {
    if (!this.latencies.length) return null;
    const sorted = [...this.latencies].sort((a, b) => a - b);
    const middle = sorted.length >> 1;
    return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
  }

  render() {
    const v = this.values;
    const fps = this.fps;
    const ms = (x) => (x === undefined || x === null ? "–" : `${x.toFixed(x < 1 ? 2 : x < 10 ? 1 : 0)} ms`);
    this._show("fps", fps, `${fps.toFixed(1)}${this.targetFps ? ` / ${this.targetFps}` : ""}`);
    const median = this.latencyMedian;
    const latency = v.latency_ms === undefined ? "–" : `${ms(v.latency_ms)} · median ${ms(median)}`;
    this._show("latency", v.latency_ms, latency);
    this._show("step", v.step_ms, ms(v.step_ms));
    this._show("encode", v.encode_ms, ms(v.encode_ms));
    this._show("queue", v.queue_ms, ms(v.queue_ms));
    this._show("frame", v.frame, v.frame ?? "–");
    this._show("game_frame", v.game_frame, v.game_frame ?? "–"); // Compare with the game
    const cache = v.cache_slots === undefined ? "–" : `${v.cache_slots} slots · ${bytes(v.cache_bytes)}`;
    this._show("cache", v.cache_slots, cache);
    this._show("attention", v.attention, v.attention ? attentionLabel(v.attention) : "–");
    const skipped = v.skipped ? ` (+${v.skipped} here)` : "";
    this._show("dropped", v.dropped, v.dropped === undefined ? "–" : `${v.dropped}${skipped}`);
    this._show("seed", v.seed, v.seed ?? "–");
    this._show("session", v.session, v.session ?? "–");
    this._show("rtt", v.rtt_ms, ms(v.rtt_ms));
  }

  _show(name, value, text) {
    const el = this.fields[name];
    if (!el) return;
    const raw = value === undefined || value === null ? "" : String(value);
    if (el.dataset.value !== raw) el.dataset.value = raw;
    if (el.textContent !== String(text)) el.textContent = text;
  }
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 ** 2).toFixed(1)} MiB`;
}
