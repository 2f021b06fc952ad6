// The legend of the action spec the server announced (welcome.actions): one button per key the model knows, which
// also works as an on-screen key for touch screens, and the mouse scale. Held keys light up.

import { keyLabel, keyMeaning } from "./labels.js";

export class Legend {
  /**
   * @param {HTMLElement} keysRoot  where the key buttons go
   * @param {HTMLElement} mouseNote  the line about the mouse
   * @param {{press(code: string): void, release(code: string): void, held: Set<string>}} input
   */
  constructor(keysRoot, mouseNote, input) {
    this.root = keysRoot;
    this.mouseNote = mouseNote;
    this.input = input;
    this.buttons = new Map();
  }

  /** Build the legend from welcome.actions: {keys: [code], mouse: {scale_px}}. */
  show(actions) {
    this.buttons.clear();
    const items = actions.keys.map((code) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "key";
      button.dataset.code = code;
      button.title = code;
      const cap = document.createElement("kbd");
      cap.textContent = keyLabel(code);
      button.append(cap);
      const meaning = keyMeaning(code);
      if (meaning) button.append(` ${meaning}`);
      // Touch and mouse: hold the button to hold the key; pointer capture keeps the release on this button.
      button.addEventListener("pointerdown", (event) => {
        button.setPointerCapture(event.pointerId);
        this.input.press(code);
      });
      for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
        button.addEventListener(type, () => this.input.release(code));
      }
      button.addEventListener("contextmenu", (event) => event.preventDefault()); // long press on phones
      this.buttons.set(code, button);
      return button;
    });
    this.root.replaceChildren(...items);
    const scale = actions.mouse?.scale_px;
    this.mouseNote.textContent = scale
      ? `Mouse: click the picture to capture it, Esc lets go. ${scale} px per frame is full deflection.`
      : "";
  }

  /** Light up the keys held now. */
  update() {
    for (const [code, button] of this.buttons) button.classList.toggle("held", this.input.held.has(code));
  }
}
