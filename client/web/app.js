// The page: wires the connection, the view, the input, the HUD and the controls together.
//
// URL parameters (all optional): ?token= (kept in sessionStorage, then removed from the address bar), ?prompt=,
// ?seed=, ?attention=, ?fps=. `window.worldserve.state` mirrors what the page shows, for tests and the console.
//
// "Compare with the game" opens a second connection (`world: "game"`, lockstep, the model session's seed and prompt)
// that takes one step per model frame under the input that frame applied (`frame.input`), and every reset and prompt
// the model session gets; its frames go to a second canvas.

import { Connection } from "./connection.js";
import { Controls } from "./controls.js";
import { Hud } from "./hud.js";
import { Input } from "./input.js";
import { Legend } from "./legend.js";
import * as protocol from "./protocol.js";
import { Recorder } from "./recorder.js";
import { Status } from "./status.js";
import { View } from "./view.js";

const TOKEN_KEY = "worldserve.token";
const SETTINGS_KEY = "worldserve.settings"; // prompt, seed, attention: a reload asks for the same kind of world

const $ = (id) => document.getElementById(id);

// ---- settings: the URL, then what this tab chose before a reload

const params = new URLSearchParams(location.search);
if (params.has("token")) {
  sessionStorage.setItem(TOKEN_KEY, params.get("token"));
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
}
const settings = { ...JSON.parse(sessionStorage.getItem(SETTINGS_KEY) ?? "{}") };
if (params.has("prompt")) settings.prompt = params.get("prompt");
if (params.has("attention")) settings.attention = params.get("attention");
const seed = Number(params.get("seed") ?? NaN);
if (Number.isSafeInteger(seed) && seed >= 0) settings.seed = seed;
const fpsParam = Number(params.get("fps") ?? NaN);
const fps = fpsParam > 0 && fpsParam <= 1000 ? fpsParam : undefined; // the server caps it at its max_fps

function remember(changes) {
  Object.assign(settings, changes);
  sessionStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

// ---- state the page shows (read by the browser tests through window.worldserve.state)

const state = {
  connection: "idle",
  sessionId: null,
  sessions: 0, // welcomes so far (a reconnect to a new world counts one more)
  resumed: false,
  frameIndex: null,
  framesReceived: 0,
  framesShown: 0,
  attention: null,
  attentionChoices: [],
  paused: false,
  latencyMs: null,
  lastSeqSent: null,
  closes: [], // the last closes: {code, advice, error (its code), reason}
  compare: false, // "Compare with the game" is on
  game: { connection: "idle", sessionId: null, frameIndex: null, framesReceived: 0, framesShown: 0, lastSeqSent: null },
  get message() {
    return status.last; // what the banner says: {kind, code, text}, or null
  },
};

// ---- the parts

const canvas = $("screen");
const stageNote = $("stage-note");
const hud = new Hud($("hud"));
const status = new Status($("status"), $("message"), () => connection.start());
const recorder = new Recorder(canvas);

const view = new View(canvas, (frame, shownAt) => {
  const sentAt = frame.seq === null || frame.seq === undefined ? null : connection.sentTime(frame.seq, frame.t);
  const latency = hud.frameShown(frame, shownAt, sentAt);
  hud.set("skipped", view.skipped);
  state.framesShown += 1;
  if (latency !== null) state.latencyMs = latency;
});

const input = new Input(canvas, () => {
  legend.update();
  const taken = input.take();
  const seq = connection.sendAction(taken);
  if (seq !== null) state.lastSeqSent = seq;
});
const legend = new Legend($("keys"), $("mouse-note"), input);

const controls = new Controls(document.querySelector(".panel"), {
  setPrompt(prompt) {
    if (!connection.send(protocol.setPrompt(prompt))) return;
    remember({ prompt });
    world.prompt = prompt;
    gameSend(protocol.setPrompt(prompt));
  },
  reset(seed) {
    if (!connection.send(protocol.reset({ seed }))) return;
    world.resetFrom = state.frameIndex; // frames of the old world still on their way step no game
    if (seed !== undefined) {
      remember({ seed });
      hud.set("seed", seed);
      world.seed = seed;
    }
    gameSend(protocol.reset({ seed: world.seed, prompt: world.prompt }));
  },
  pause() {
    connection.send(protocol.pause()); // the game needs none: it steps only when a model frame arrives
    state.paused = true;
    note();
  },
  resume() {
    connection.send(protocol.resume());
    state.paused = false;
    note();
  },
  attention(name) {
    connection.send(protocol.setAttention(name));
    remember({ attention: name });
  },
  async record() {
    if (recorder.recording) {
      await recorder.stop(`worldserve-${state.sessionId ?? "clip"}-${timestamp()}`);
      controls.setRecording(false);
    } else {
      recorder.start();
      controls.setRecording(true, 0);
    }
  },
  token(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    connection.start();
  },
});
controls.setRecordingSupported(recorder.supported);
controls.setEnabled(false);
setInterval(() => recorder.recording && controls.setRecording(true, recorder.seconds), 500);

const connection = new Connection({
  url: wsUrl(),
  infoUrl: new URL("api/info", location.href).href,
  helloFields: () => ({
    prompt: controls.prompt.value || settings.prompt || "",
    seed: settings.seed,
    fps,
    attention: settings.attention,
    token: sessionStorage.getItem(TOKEN_KEY) ?? undefined,
  }),
  on: {
    state(name, detail) {
      state.connection = name;
      status.state(name, detail);
      controls.setEnabled(name === "open");
      note();
    },
    welcome(welcome) {
      const fresh = !welcome.resumed && world.seed !== null; // a new world after the first: the game follows it
      Object.assign(world, {
        seed: welcome.seed,
        prompt: welcome.prompt,
        chunkFrames: welcome.chunk_frames,
        resetFrom: null, // a new session: no frame of an older world arrives on this connection
      });
      if (fresh) gameSend(protocol.reset({ seed: world.seed, prompt: world.prompt }));
      if (state.compare) game.start(); // waited for this welcome (seed and prompt)
      Object.assign(state, {
        sessionId: welcome.session_id,
        sessions: state.sessions + 1,
        resumed: welcome.resumed,
        frameIndex: null,
        attention: welcome.attention,
        attentionChoices: welcome.attention_choices,
      });
      state.paused = welcome.paused;
      view.clear();
      view.configure({
        width: welcome.frame.width,
        height: welcome.frame.height,
        fps: welcome.fps,
        chunkFrames: welcome.chunk_frames,
      });
      hud.reset();
      hud.welcome(welcome);
      input.setKnownKeys(welcome.actions.keys);
      legend.show(welcome.actions);
      legend.update();
      controls.welcome(welcome);
      status.connected(welcome.resumed);
      note();
      // The server keeps the last input of a resumed world (held keys stay held): tell it what is held now.
      const seq = connection.sendAction(input.take(), false);
      if (seq !== null) state.lastSeqSent = seq;
    },
    frame(frame) {
      stepGame(frame);
      state.framesReceived += 1;
      state.frameIndex = frame.index;
      state.attention = frame.attention;
      hud.frameReceived(frame, performance.now());
      controls.attentionShown(frame.attention);
      view.push(frame);
    },
    pong(_, rttMs) {
      hud.set("rtt_ms", rttMs);
    },
    error(message) {
      status.error(message);
    },
    closed(info) {
      state.closes = [...state.closes.slice(-19), { ...info, error: info.error?.code ?? null }];
      input.discardMotion();
      status.closed(info);
      if (info.reason === "token_required" || info.error?.code === protocol.ErrorCode.BAD_TOKEN) {
        sessionStorage.removeItem(TOKEN_KEY);
        controls.showToken(true);
      }
    },
  },
});

// ---- Compare with the game: a second session, `world: "game"`, stepped with each model frame's input

// The model session's world, which the game copies. `resetFrom`: the model's frame index when the page last asked
// for a reset (null: none pending), so that frames of the old world, still on their way, do not step the new game.
const world = { seed: null, prompt: "", chunkFrames: 1, resetFrom: null };
const GAME = "game: "; // the banner's prefix for what the game connection says
let gameAsked = {}; // the seed and prompt of the game's last hello
const stage = $("stage");
const gamePane = $("game-pane");
const gameHud = $("hud-game");
const compareBox = $("compare");

const gameView = new View($("game-screen"), () => {
  state.game.framesShown += 1;
});

const game = new Connection({
  url: wsUrl(),
  infoUrl: new URL("api/info", location.href).href,
  storageKey: "worldserve.resume_token.game",
  helloFields: () => {
    gameAsked = { seed: world.seed, prompt: world.prompt };
    return {
      world: "game",
      mode: "lockstep", // one step per model frame, under the input that frame applied
      prompt: world.prompt,
      seed: world.seed ?? undefined,
      token: sessionStorage.getItem(TOKEN_KEY) ?? undefined,
    };
  },
  on: {
    state(name) {
      state.game.connection = name;
    },
    welcome(welcome) {
      Object.assign(state.game, { sessionId: welcome.session_id, frameIndex: null });
      gameView.clear();
      gameView.configure({
        width: welcome.frame.width,
        height: welcome.frame.height,
        fps: welcome.fps,
        chunkFrames: welcome.chunk_frames,
      });
      status.hideIf(GAME);
      if (welcome.seed !== world.seed || (!welcome.resumed && gameAsked.prompt !== world.prompt)) {
        game.send(protocol.reset({ seed: world.seed, prompt: world.prompt })); // the model's world moved on meanwhile
      }
    },
    frame(frame) {
      state.game.framesReceived += 1;
      state.game.frameIndex = frame.index;
      hud.set("game_frame", frame.index);
      gameView.push(frame);
    },
    pong() {},
    error(message) {
      status.error(message, GAME);
    },
    closed(info) {
      status.closed(info, GAME);
    },
  },
});

function gameSend(message) {
  if (state.compare) game.send(message);
}

/** The game takes the step the model frame took: the same input, once per model chunk. Called before
 * `state.frameIndex` takes this frame's index, so that it still holds the last frame's (null after a welcome). */
function stepGame(frame) {
  const last = state.frameIndex;
  if (world.resetFrom !== null) {
    if (frame.index > world.resetFrom) return; // the old world's
    world.resetFrom = null; // the index restarted: the new world's first frame
  }
  if (!state.compare || frame.index % world.chunkFrames !== 0) return;
  // chunks the server dropped before sending (a slow connection) left a gap in the indices: the game takes their
  // steps too, under this frame's input (theirs never arrived), so that both stay at the same index
  const missed = last !== null && frame.index > last ? Math.floor((frame.index - last - 1) / world.chunkFrames) : 0;
  const { keys, dx, dy, buttons } = frame.input;
  // a step carries at most 32 keys and |dx|, |dy| <= 1e4 (protocol.md); taps and motion between frames may add up to more
  const clamp = (v) => Math.max(-1e4, Math.min(1e4, v));
  const action = { keys: keys.slice(0, 32), dx: clamp(dx), dy: clamp(dy), buttons };
  for (let i = 0; i <= missed; i++) {
    const seq = game.sendStep(action);
    if (seq !== null) state.game.lastSeqSent = seq;
  }
}

function setCompare(on) {
  state.compare = on;
  compareBox.checked = on;
  stage.classList.toggle("compare", on);
  gamePane.hidden = !on;
  gameHud.hidden = !on;
  if (on) {
    if (world.seed !== null) game.start(); // else on the model's welcome
  } else {
    game.stop("compare off"); // 1000: the game session ends at once
    gameView.clear();
    hud.set("game_frame", undefined);
    state.game.frameIndex = null;
    status.hideIf(GAME);
  }
}

compareBox.checked = false; // off on every load (a reload may restore the box's old state)
compareBox.addEventListener("change", () => {
  setCompare(compareBox.checked);
  compareBox.blur(); // back to the game: Space would toggle it again
});

// ---- the page's life: done when it goes away; a page restored from the back/forward cache starts again

window.addEventListener("pagehide", () => {
  connection.stop();
  game.stop();
});
window.addEventListener("pageshow", (event) => {
  if (!event.persisted) return;
  connection.start();
  if (state.compare && world.seed !== null) game.start();
});
document.addEventListener("pointerlockchange", note);

window.worldserve = { state, protocol, connection, game };
connection.start();

// ---- helpers

function wsUrl() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/** The line over the picture: what the player can do now, or why nothing moves. */
function note() {
  let text = "";
  if (state.connection === "connecting" || state.connection === "waiting") text = "connecting…";
  else if (state.connection === "stopped" || state.connection === "closed") text = "disconnected";
  else if (state.paused) text = "paused";
  else if (matchMedia("(pointer: coarse)").matches) text = "Hold the keys below to move";
  else if (document.pointerLockElement !== canvas) text = "Click the picture to capture the mouse";
  stageNote.textContent = text;
}

function timestamp() {
  return new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
}
