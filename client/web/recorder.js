// Records what the canvas showed (MediaRecorder on canvas.captureStream()) and downloads it as a video file.
//
// The stream takes a picture whenever the canvas is drawn, so the clip has the frames as shown, at the rate they
// were shown, at the canvas's size (the frame scaled up by an integer factor). WebM (VP9, else VP8) where the
// browser records it, MP4 otherwise (Safari).

const TYPES = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm", "video/mp4"];

export class Recorder {
  /** @param {HTMLCanvasElement} canvas */
  constructor(canvas) {
    this.canvas = canvas;
    this.recorder = null;
    this.chunks = [];
    this.startedAt = 0;
    this.type = globalThis.MediaRecorder ? TYPES.find((type) => MediaRecorder.isTypeSupported(type)) : undefined;
  }

  get supported() {
    return Boolean(this.type && this.canvas.captureStream);
  }

  get recording() {
    return this.recorder?.state === "recording";
  }

  get seconds() {
    return this.recording ? (performance.now() - this.startedAt) / 1000 : 0;
  }

  start() {
    if (!this.supported || this.recording) return;
    this.chunks = [];
    this.recorder = new MediaRecorder(this.canvas.captureStream(), {
      mimeType: this.type,
      videoBitsPerSecond: 4_000_000,
    });
    this.recorder.ondataavailable = (event) => event.data.size && this.chunks.push(event.data);
    this.recorder.start(1000); // a chunk a second, so a long clip is not one huge buffer at the end
    this.startedAt = performance.now();
  }

  /** Stop and download the clip as `name` + the extension of its format. */
  stop(name) {
    if (!this.recording) return Promise.resolve(null);
    return new Promise((resolve) => {
      this.recorder.onstop = () => {
        const blob = new Blob(this.chunks, { type: this.type.split(";")[0] });
        this.chunks = [];
        const link = document.createElement("a");
        link.href = URL.createObjectURL(blob);
        link.download = `${name}.${this.type.startsWith("video/mp4") ? "mp4" : "webm"}`;
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
        resolve(blob);
      };
      this.recorder.stop();
    });
  }
}
