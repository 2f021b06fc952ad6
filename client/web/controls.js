// The control panel: prompt, seed and reset, pause/resume, attention switch, recording, and the access token form.
// It only reads the form and reports what the player asked for; app.js turns that into protocol messages.

import { attentionLabel } from "./labels.js";

const MAX_SEED = Number.MAX_SAFE_INTEGER; // the protocol allows up to 2^63 - 1; JavaScript numbers stay exact to here

export class Controls {
  /**
   * @param {HTMLElement} root  the panel holding the forms and buttons (found by id)
   * @param {object} on  setPrompt(text), reset(seed|undefined), pause(), resume(), attention(name), record(),
   *   token(text)
   */
  constructor(root, on) {
    const $ = (id) => root.querySelector(`#${id}`);
    this.promptForm = $("prompt-form");
    this.prompt = $("prompt");
    this.seed = $("seed");
    this.resetButton = $("reset");
    this.newWorld = $("new-world");
    this.pauseButton = $("pause");
    this.attention = $("attention");
    this.recordButton = $("record");
    this.tokenForm = $("token-form");
    this.token = $("token");
    this.paused = false;

    this.promptForm.addEventListener("submit", (event) => {
      event.preventDefault();
      on.setPrompt(this.prompt.value);
      this.prompt.blur(); // back to the game: the keys move again
    });
    this.resetButton.addEventListener("click", () => {
      const seed = this.seedValue();
      if (seed === null) return;
      on.reset(seed);
      this.resetButton.blur(); // back to the game: Space would press the button again
    });
    this.newWorld.addEventListener("click", () => {
      this.seed.value = String(Math.floor(Math.random() * 2 ** 31));
      on.reset(Number(this.seed.value));
      this.newWorld.blur();
    });
    this.pauseButton.addEventListener("click", () => {
      if (this.paused) on.resume();
      else on.pause();
      this.setPaused(!this.paused);
      this.pauseButton.blur();
    });
    this.attention.addEventListener("change", () => {
      on.attention(this.attention.value);
      this.attention.blur(); // arrow keys on a focused <select> would switch again instead of turning
    });
    this.recordButton.addEventListener("click", () => {
      on.record();
      this.recordButton.blur();
    });
    this.tokenForm.addEventListener("submit", (event) => {
      event.preventDefault();
      on.token(this.token.value.trim());
      this.token.value = "";
      this.showToken(false);
    });
  }

  /** The seed typed in, undefined when empty (keep the current seed), null when invalid (the field says why). */
  seedValue() {
    const text = this.seed.value.trim();
    if (text === "") return undefined;
    const seed = Number(text);
    const ok = Number.isInteger(seed) && seed >= 0 && seed <= MAX_SEED;
    this.seed.setCustomValidity(ok ? "" : `a whole number from 0 to ${MAX_SEED}`);
    this.seed.reportValidity();
    return ok ? seed : null;
  }

  welcome(welcome) {
    const options = welcome.attention_choices.map((name) => new Option(attentionLabel(name), name));
    this.attention.replaceChildren(...options);
    this.attention.value = welcome.attention;
    if (document.activeElement !== this.prompt) this.prompt.value = welcome.prompt;
    this.setPaused(welcome.paused); // a new world runs; a resumed one keeps its paused state
  }

  /** Frames say which configuration made them; the switch follows (it may have been changed elsewhere). */
  attentionShown(name) {
    if (document.activeElement !== this.attention && this.attention.value !== name) this.attention.value = name;
  }

  setPaused(paused) {
    this.paused = paused;
    this.pauseButton.textContent = paused ? "Resume" : "Pause";
    this.pauseButton.setAttribute("aria-pressed", String(paused));
  }

  setRecording(recording, seconds = 0) {
    this.recordButton.textContent = recording ? `Stop ${seconds.toFixed(0)} s` : "Record";
    this.recordButton.setAttribute("aria-pressed", String(recording));
  }

  setRecordingSupported(supported) {
    this.recordButton.disabled = !supported;
    if (!supported) this.recordButton.title = "This browser cannot record a canvas";
  }

  /** Enable the session controls only while connected. */
  setEnabled(enabled) {
    for (const el of [this.resetButton, this.newWorld, this.pauseButton, this.attention]) el.disabled = !enabled;
    this.promptForm.querySelector("button").disabled = !enabled;
  }

  showToken(show) {
    this.tokenForm.hidden = !show;
    if (show) this.token.focus();
  }
}
