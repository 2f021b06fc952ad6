// Readable names for the identifiers the server announces (attention configurations, key codes). Unknown ones are
// shown as they are: the server's lists are the truth, these tables only dress them.

const ATTENTION = {
  dense: "Dense",
  window: "Window",
  tempcache: "TempCache",
  annsa: "AnnSA",
  annca: "AnnCA",
  config: "Config file",
};

/** "tempcache+annsa+annca" -> "TempCache+AnnSA+AnnCA". */
export function attentionLabel(name) {
  return name
    .split("+")
    .map((part) => ATTENTION[part] ?? part)
    .join("+");
}

const KEYS = {
  ArrowUp: "↑",
  ArrowDown: "↓",
  ArrowLeft: "←",
  ArrowRight: "→",
  Space: "Space",
  ShiftLeft: "Shift",
  ShiftRight: "R Shift",
  ControlLeft: "Ctrl",
  Enter: "Enter",
  Escape: "Esc",
};

/** "KeyW" -> "W", "Digit1" -> "1", "ArrowLeft" -> "←". */
export function keyLabel(code) {
  return KEYS[code] ?? code.replace(/^(Key|Digit|Numpad)/, "");
}

// What the keys do in the default game (docs/actions.md); another model may announce other keys.
const MEANING = {
  KeyW: "forward",
  KeyA: "strafe left",
  KeyS: "back",
  KeyD: "strafe right",
  ArrowLeft: "turn left",
  ArrowRight: "turn right",
  ArrowUp: "forward",
  ArrowDown: "back",
  Space: "action",
  ShiftLeft: "run",
};

export function keyMeaning(code) {
  return MEANING[code] ?? "";
}
