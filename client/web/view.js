// The one canvas: decodes frames (JPEG -> createImageBitmap) and draws the newest, scaled up crisply.
//
// The canvas holds the frame at an integer multiple of its size (at least MIN_BACKING_PX on its longer side, nearest
// neighbour), so a recording of it is not a thumbnail; CSS then fits it to the view with `image-rendering:
// pixelated` and `object-fit: contain`. Frames are drawn on animation frames: with chunk_frames > 1 they arrive in
// bursts, and the view spreads a burst over its frame interval; frames that fall too far behind are skipped.

const MIN_BACKING_PX = 512;

export class View {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {(frame: object, shownAt: number) => void} onShown  called after a frame is drawn
   */
  constructor(canvas, onShown) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.onShown = onShown;
    this.queue = []; // decoded, not yet drawn: {frame, bitmap}
    this.decoding = Promise.resolve(); // decodes run one after another, so frames stay in order
    this.generation = 0; // bumped by clear(): decodes of an earlier world or connection are dropped
    this.intervalMs = 1000 / 15;
    this.burst = 1;
    this.lastDrawnAt = 0;
    this.skipped = 0; // frames decoded but never drawn (the page fell behind)
    requestAnimationFrame((now) => this._tick(now));
  }

  /** Frame size, rate and chunk length from welcome. */
  configure({ width, height, fps, chunkFrames }) {
    const scale = Math.max(1, Math.ceil(MIN_BACKING_PX / Math.max(width, height)));
    if (this.canvas.width !== width * scale || this.canvas.height !== height * scale) {
      this.canvas.width = width * scale;
      this.canvas.height = height * scale;
    }
    this.intervalMs = 1000 / fps;
    this.burst = chunkFrames;
    this.canvas.dataset.frameWidth = width;
    this.canvas.dataset.frameHeight = height;
  }

  /** Forget queued frames (new connection). */
  clear() {
    this.generation += 1;
    for (const { bitmap } of this.queue) bitmap.close();
    this.queue = [];
  }

  /** A frame message: decode its JPEG and queue it for drawing. */
  push(frame) {
    const generation = this.generation;
    const blob = new Blob([frame.jpeg], { type: "image/jpeg" });
    this.decoding = this.decoding
      .then(() => createImageBitmap(blob))
      .then((bitmap) => {
        if (generation !== this.generation) return bitmap.close();
        this.queue.push({ frame, bitmap });
        // Keep only the newest frame waiting, or a chunk plus one frame when frames come in chunks (also while
        // hidden, when no animation frames run): older frames would only add latency.
        while (this.queue.length > (this.burst > 1 ? this.burst + 1 : 1)) {
          this.queue.shift().bitmap.close();
          this.skipped += 1;
        }
      })
      .catch((error) => console.warn("worldserve: a frame did not decode", error));
  }

  _tick(now) {
    requestAnimationFrame((next) => this._tick(next));
    if (this.queue.length === 0) return;
    // The newest frame at once when frames come singly; the frames of a burst spread over the frame interval.
    const spacing = this.burst > 1 ? this.intervalMs * 0.9 : 0;
    if (now - this.lastDrawnAt < spacing) return;
    const { frame, bitmap } = this.queue.shift();
    this.ctx.imageSmoothingEnabled = false; // nearest neighbour (a resize resets it, so set it every time)
    this.ctx.drawImage(bitmap, 0, 0, this.canvas.width, this.canvas.height);
    bitmap.close();
    this.lastDrawnAt = now;
    this.onShown(frame, performance.now());
  }
}
