// The player's input: held keys (W3C KeyboardEvent.code names), mouse motion under pointer lock, mouse buttons.
//
// Every change is reported at once through `onChange`, so the page sends one action per change and never waits
// for a frame: a key pressed and released between two frames is two actions, and the server latches the tap for
// the next frame. Mouse motion accumulates here until the next action takes it; motion alone is reported at most
// every MOUSE_INTERVAL_MS (about one action per display frame), well under the server's rate limit.

const MOUSE_INTERVAL_MS = 16;

export class Input {
  /**
   * @param {HTMLElement} surface  the element that captures the mouse (the canvas)
   * @param {() => void} onChange  called after every change; the caller then sends `take()`
   */
  constructor(surface, onChange) {
    this.surface = surface;
    this.onChange = onChange;
    this.known = new Set(); // the keys the model announced; others are left to the browser
    this.held = new Set();
    this.dx = 0;
    this.dy = 0;
    this.buttons = 0;
    this.lastMouseReport = 0;
    this.mouseTimer = null;
    this._listen();
  }

  /** The model's keys (welcome.actions.keys): only these are captured and sent. */
  setKnownKeys(keys) {
    this.known = new Set(keys);
    for (const code of this.held) if (!this.known.has(code)) this.held.delete(code);
  }

  get locked() {
    return document.pointerLockElement === this.surface;
  }

  /** The input to send now; takes the accumulated mouse motion. */
  take() {
    clearTimeout(this.mouseTimer);
    this.mouseTimer = null;
    const input = { keys: [...this.held], dx: this.dx, dy: this.dy, buttons: this.buttons };
    this.dx = this.dy = 0;
    return input;
  }

  /** The keys and buttons held now, without taking the motion (for a second connection that joins). */
  current() {
    return { keys: [...this.held], dx: 0, dy: 0, buttons: this.buttons };
  }

  /** Drop motion made while nothing could be sent (disconnected). Held keys stay: they are state. */
  discardMotion() {
    this.dx = this.dy = 0;
  }

  press(code) {
    if (!this.known.has(code) || this.held.has(code)) return;
    this.held.add(code);
    this.onChange();
  }

  release(code) {
    if (!this.held.delete(code)) return;
    this.onChange();
  }

  releaseAll() {
    if (this.held.size === 0 && this.buttons === 0) return;
    this.held.clear();
    this.buttons = 0;
    this.onChange();
  }

  _listen() {
    window.addEventListener("keydown", (event) => {
      if (!this._forGame(event)) return;
      event.preventDefault(); // arrows and Space would scroll the page or press a focused button
      if (!event.repeat) this.press(event.code);
    });
    window.addEventListener("keyup", (event) => {
      if (!this.held.has(event.code)) return; // wherever the focus went meanwhile, a held key is let go
      event.preventDefault();
      this.release(event.code);
    });
    // A key released while the page has no focus never sends keyup: let go of everything instead of walking on.
    window.addEventListener("blur", () => this.releaseAll());
    document.addEventListener("visibilitychange", () => document.hidden && this.releaseAll());

    this.surface.addEventListener("click", () => {
      if (!this.locked) this.surface.requestPointerLock?.()?.catch?.(() => {});
    });
    document.addEventListener("pointerlockchange", () => {
      if (!this.locked && this.buttons) {
        this.buttons = 0;
        this.onChange();
      }
    });
    document.addEventListener("mousemove", (event) => {
      if (!this.locked) return;
      this.dx += event.movementX;
      this.dy += event.movementY;
      this._reportMotion();
    });
    for (const type of ["mousedown", "mouseup"]) {
      document.addEventListener(type, (event) => {
        if (!this.locked || event.buttons === this.buttons) return;
        this.buttons = event.buttons & 31;
        this.onChange();
      });
    }
  }

  _forGame(event) {
    if (!this.known.has(event.code) || event.ctrlKey || event.metaKey || event.altKey) return false;
    const target = event.target; // typing in a field is not playing
    return !(target instanceof HTMLElement && (target.isContentEditable || target.matches("input, textarea, select")));
  }

  _reportMotion() {
    if (this.mouseTimer !== null) return; // a report is already due
    const wait = this.lastMouseReport + MOUSE_INTERVAL_MS - performance.now();
    const report = () => {
      this.mouseTimer = null;
      this.lastMouseReport = performance.now();
      if (this.dx || this.dy) this.onChange();
    };
    if (wait <= 0) report();
    else this.mouseTimer = setTimeout(report, wait);
  }
}
