// The draw-a-digit page: strokes on a canvas, sent to POST /predict as a PNG when the pen lifts.
"use strict";

// The canvas is always 280 x 280 pixels, whatever its size on screen, with a round brush
// BRUSH pixels wide: the pair under which drawings were measured to classify best
// (python -m harness.strokes; docs/web.md).
const SIZE = 280;
const BRUSH = 22;

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const undoButton = document.getElementById("undo");
const clearButton = document.getElementById("clear");
const againButton = document.getElementById("again");
const fileInput = document.getElementById("file");
const statusLine = document.getElementById("status");
const digitOut = document.getElementById("digit");
const warningLine = document.getElementById("warning");
const bars = document.getElementById("bars");
const modelVersion = document.getElementById("model-version");
const servedBy = document.getElementById("served-by");
const roundTrip = document.getElementById("round-trip");

let strokes = [];      // every stroke drawn, each a list of {x, y} in canvas pixels
let current = null;    // the stroke under the pen
let lastUpload = null; // what was last sent: {blob, name}, for "Classify again"
let sequence = 0;      // answers to superseded requests are dropped
let cleared = 0;       // times the box was emptied: a drawing's PNG made before is not sent

// --- the ten bars -----------------------------------------------------------------------------

const barParts = [];
for (let d = 0; d < 10; d++) {
  const item = document.createElement("li");
  const label = document.createElement("span");
  label.textContent = String(d);
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  track.append(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = "–";
  item.append(label, track, value);
  bars.append(item);
  barParts.push({ item, fill, value });
}

// --- drawing ------------------------------------------------------------------------------------

function blank() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, SIZE, SIZE);
  ctx.strokeStyle = "#000";
  ctx.fillStyle = "#000";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
}

function dot(p) {
  ctx.beginPath();
  ctx.arc(p.x, p.y, BRUSH / 2, 0, 2 * Math.PI);
  ctx.fill();
}

function segment(a, b) {
  ctx.beginPath();
  ctx.moveTo(a.x, a.y);
  ctx.lineTo(b.x, b.y);
  ctx.stroke();
}

function repaint() {
  blank();
  for (const stroke of strokes) {
    dot(stroke[0]);
    for (let i = 1; i < stroke.length; i++) segment(stroke[i - 1], stroke[i]);
  }
}

function canvasPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * SIZE) / box.width,
    y: ((event.clientY - box.top) * SIZE) / box.height,
  };
}

function updateButtons() {
  undoButton.disabled = strokes.length === 0;
  clearButton.disabled = strokes.length === 0 && lastUpload === null;
  againButton.disabled = lastUpload === null;
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  if (strokes.length === 0) blank(); // an image shown from a file gives way to the drawing
  current = [canvasPoint(event)];
  strokes.push(current);
  dot(current[0]);
  updateButtons();
});

pad.addEventListener("pointermove", (event) => {
  if (current === null) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const each of events.length ? events : [event]) {
    const p = canvasPoint(each);
    segment(current[current.length - 1], p);
    current.push(p);
  }
});

function penUp() {
  if (current === null) return;
  current = null;
  classifyDrawing();
}
pad.addEventListener("pointerup", penUp);
pad.addEventListener("pointercancel", penUp);

undoButton.addEventListener("click", () => {
  strokes.pop();
  repaint();
  if (strokes.length) {
    classifyDrawing();
  } else {
    lastUpload = null; // nothing shown is left to read again
    reset("Nothing drawn yet.");
  }
  updateButtons();
});

clearButton.addEventListener("click", () => {
  strokes = [];
  lastUpload = null;
  repaint();
  updateButtons();
  reset("Nothing drawn yet.");
});

againButton.addEventListener("click", () => {
  if (lastUpload) send(lastUpload.blob, lastUpload.name);
});

function classifyDrawing() {
  const drawn = cleared;
  pad.toBlob((blob) => {
    if (blob && drawn === cleared) send(blob, "drawing.png");
  }, "image/png");
}

// --- files: picked or dropped -------------------------------------------------------------------

async function classifyFile(file) {
  cleared++; // a drawing still being encoded gives way to the file
  strokes = [];
  blank();
  updateButtons();
  // Show the image in the box, fitted, when the browser can decode it; the file itself is sent.
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(SIZE / bitmap.width, SIZE / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    ctx.drawImage(bitmap, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
    bitmap.close();
  } catch {
    // Not an image the browser can show: the server says what it makes of it.
  }
  send(file, file.name || "upload");
}

fileInput.addEventListener("change", () => {
  const file = fileInput.files && fileInput.files[0];
  fileInput.value = "";
  if (file) classifyFile(file);
});

// A file dropped anywhere on the page (the box included: one listener, so one request).
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  pad.classList.add("dropping");
});
document.addEventListener("dragleave", () => pad.classList.remove("dropping"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dropping");
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) classifyFile(file);
});

// --- the answer ---------------------------------------------------------------------------------

function reset(message) {
  sequence++; // any answer still on its way is no longer wanted
  cleared++;
  setStatus(message, false);
  digitOut.textContent = "–";
  warningLine.hidden = true;
  for (const part of barParts) {
    part.item.classList.remove("top");
    part.fill.style.width = "0";
    part.value.textContent = "–";
  }
}

function setStatus(message, isError) {
  statusLine.textContent = message;
  statusLine.classList.toggle("error", isError);
}

function percent(p) {
  return `${(p * 100).toFixed(1)} %`;
}

function show(answer, response, milliseconds) {
  setStatus(`Read as ${answer.digit}, confidence ${percent(answer.confidence)}`, false);
  digitOut.textContent = String(answer.digit);
  warningLine.hidden = !answer.low_confidence;
  warningLine.textContent = answer.low_confidence
    ? answer.warning || "Low confidence: this may not be a digit, or may be drawn unclearly."
    : "";
  answer.probabilities.forEach((p, d) => {
    const part = barParts[d];
    part.item.classList.toggle("top", d === answer.digit);
    part.fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    part.value.textContent = percent(p);
  });
  modelVersion.textContent = answer.model_version || "–";
  servedBy.textContent = response.headers.get("X-Served-By") || "–";
  roundTrip.textContent = `${Math.round(milliseconds)} ms`;
}

// What an error answer means, in words: the server's own `detail` where it gave one.
function describe(response, body) {
  const detail = body && typeof body.detail === "string" ? body.detail : "";
  const retry = response.headers.get("Retry-After");
  const later = retry ? ` Try again in ${retry} s.` : " Try again shortly.";
  switch (response.status) {
    case 413:
      return `That image is too large for the service. ${detail}`.trim();
    case 415:
      return `That file is not an image the service reads. ${detail}`.trim();
    case 400:
    case 422:
      return `The image could not be read: ${detail || "it is damaged or empty"}.`;
    case 429:
      return `Too many requests from this address.${later}`;
    case 502:
    case 503:
    case 504:
      return `The service is busy or restarting and could not answer.${later}${detail ? ` (${detail})` : ""}`;
    default:
      return `The service answered with an error (HTTP ${response.status}).${detail ? ` ${detail}` : ""}`;
  }
}

function showError(message) {
  setStatus(message, true);
  digitOut.textContent = "–";
  warningLine.hidden = true;
}

async function send(blob, name) {
  const mine = ++sequence;
  lastUpload = { blob, name };
  updateButtons();
  setStatus("Reading…", false);
  const form = new FormData();
  form.append("file", blob, name);
  const started = performance.now();
  let response;
  let body = null;
  try {
    response = await fetch("/predict", { method: "POST", body: form });
    body = await response.json().catch(() => null);
  } catch (error) {
    if (mine === sequence) showError(`The service could not be reached (${error.message}).`);
    return;
  }
  const milliseconds = performance.now() - started;
  if (mine !== sequence) return;
  if (response.ok && body && typeof body.digit === "number") show(body, response, milliseconds);
  else showError(describe(response, body));
}

blank();
updateButtons();
