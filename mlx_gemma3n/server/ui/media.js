// Attachments: files (picker, drop, paste: images, audio, videos), photos from the camera, recordings from the microphone
// (encoded here as 16 kHz mono 16-bit WAV). An attachment is {kind, name, mime, data} with `data`
// the file's bytes in base64; `contentPart` makes the OpenAI content part the server takes.

// The input_audio formats the server takes (server/media.py), by MIME type or else the file's extension.
const AUDIO_FORMATS = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3",
  "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg", "audio/mp4": "m4a",
  "audio/x-m4a": "m4a", "audio/m4a": "m4a", "audio/webm": "webm" };
const AUDIO_EXTENSIONS = ["wav", "mp3", "flac", "ogg", "m4a"];
// The video types the server takes (server/media.py), by the file's extension when the browser gives none.
const VIDEO_TYPES = { mp4: "video/mp4", m4v: "video/mp4", webm: "video/webm", mov: "video/quicktime", mkv: "video/x-matroska" };
const RECORDING_RATE = 16000;

function extension(name) {
  return (name.split(".").pop() || "").toLowerCase();
}

function audioFormat(mime, name) {
  return AUDIO_FORMATS[mime] || (AUDIO_EXTENSIONS.includes(extension(name)) ? extension(name) : null);
}

function base64Of(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// The attachment of a File; throws an Error saying why a file cannot be attached.
export async function attachmentOf(file) {
  const mime = file.type || "";
  const video = mime.startsWith("video/") ? mime : mime.startsWith("audio/") ? null : VIDEO_TYPES[extension(file.name)];
  const kind = mime.startsWith("image/") ? "image" : video ? "video" : audioFormat(mime, file.name) ? "audio" : null;
  if (!kind) {
    throw new Error(`${file.name}: attach an image (PNG, JPEG, WebP, GIF), audio (WAV, MP3, FLAC, OGG, M4A) or a video (MP4, WebM, MOV, MKV)`);
  }
  const data = base64Of(new Uint8Array(await file.arrayBuffer()));
  const type = kind === "video" ? video : mime || `audio/${audioFormat(mime, file.name)}`;
  return { kind, name: file.name, mime: type, data };
}

export function contentPart(attachment) {
  if (attachment.kind === "image") {
    return { type: "image_url", image_url: { url: `data:${attachment.mime};base64,${attachment.data}` } };
  }
  if (attachment.kind === "video") {  // the server shows the model its frames, each after its time, then its sound
    return { type: "video_url", video_url: { url: `data:${attachment.mime};base64,${attachment.data}` } };
  }
  return { type: "input_audio", input_audio: { data: attachment.data, format: audioFormat(attachment.mime, attachment.name) } };
}

export function previewUrl(attachment) {
  return `data:${attachment.mime};base64,${attachment.data}`;
}

export function encodeWav(samples, rate) {
  const bytes = new Uint8Array(44 + samples.length * 2);
  const view = new DataView(bytes.buffer);
  const text = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, samples.length * 2, true);
  samples.forEach((s, i) => view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, s)) * 0x7fff, true));
  return bytes;
}

// The microphone, recorded until stop(); stop() resolves to a WAV attachment.
export async function startRecording() {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.start();
  return {
    stop: () => new Promise((resolve, reject) => {
      recorder.onstop = async () => {
        stream.getTracks().forEach((track) => track.stop());
        try {
          const encoded = await new Blob(chunks).arrayBuffer();
          const decoded = await new AudioContext().decodeAudioData(encoded);
          const frames = Math.max(1, Math.ceil(decoded.duration * RECORDING_RATE));
          const offline = new OfflineAudioContext(1, frames, RECORDING_RATE); // downmixes and resamples
          const source = offline.createBufferSource();
          source.buffer = decoded;
          source.connect(offline.destination);
          source.start();
          const mono = (await offline.startRendering()).getChannelData(0);
          const stamp = new Date().toISOString().slice(11, 19).replaceAll(":", "");
          resolve({ kind: "audio", name: `recording-${stamp}.wav`, mime: "audio/wav", data: base64Of(encodeWav(mono, RECORDING_RATE)) });
        } catch (error) {
          reject(new Error(`the recording could not be decoded: ${error.message}`));
        }
      };
      recorder.stop();
    }),
  };
}

// The camera shown in `video` until capture() (a JPEG attachment) or close().
export async function openCamera(video) {
  const stream = await navigator.mediaDevices.getUserMedia({ video: true });
  video.srcObject = stream;
  await video.play();
  const close = () => {
    stream.getTracks().forEach((track) => track.stop());
    video.srcObject = null;
  };
  return {
    close,
    capture: () => {
      const canvas = document.createElement("canvas");
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      close();
      const data = canvas.toDataURL("image/jpeg", 0.92).split(",", 2)[1];
      return { kind: "image", name: "camera.jpg", mime: "image/jpeg", data };
    },
  };
}
