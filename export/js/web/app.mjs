// The page of `hnet export onnx --web`: load the bundled export with onnxruntime-web, generate as the
// prompt is typed, colour the text by stage-0 chunks (as `hnet-mlx chunks --html`) and show bytes/s.
// #status carries data-state (loading | ready | typing | running | done | error); #output carries data-text,
// the generated text exactly as `hnet generate` would print it (the browser test reads both).
// The URL can fill the fields and start it, so a demo can be linked and screenshotted:
//   index.html?prompt=Once%20upon&bytes=120&temperature=0.8&top_p=0.95&seed=7&autorun=1

import * as ort from './ort/ort.wasm.min.mjs';
import { HNetError, loadModelFromUrl, parseNumber, samplingParams, segment, streamGenerate } from './hnet/web.mjs';

// URL parameter -> field it fills.
const URL_FIELDS = { prompt: 'prompt', bytes: 'max-tokens', temperature: 'temperature', top_p: 'top-p', seed: 'seed' };

const PALETTE = ['#cfe8ff', '#ffe3c2', '#d7f5d0', '#f6d0f0', '#fff6b3', '#d9d4ff']; // hnet_core.chunks.PALETTE
const $ = (id) => document.getElementById(id);
const status = $('status');
const output = $('output');

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

/** Clear the output and show the error in its place (never next to an earlier answer). */
function showError(message) {
  output.replaceChildren();
  output.textContent = `Error: ${message}`;
  output.dataset.text = '';
  output.classList.add('error');
  setStatus('error', message);
}

/** A field's number (Python's spellings of inf and nan included); an empty or non-numeric field is
 * NaN, which the range checks then refuse. */
function fieldNumber(id) {
  return parseNumber($(id).value);
}

/** The options of the fields, checked like every runtime checks them (an HNetError otherwise). */
function readOptions() {
  const limit = Number($('max-tokens').dataset.max);
  const maxTokens = fieldNumber('max-tokens');
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1 && maxTokens <= limit)) {
    throw new HNetError(`bytes must be a whole number from 1 to ${limit}, got ${$('max-tokens').value.trim() || 'nothing'}`);
  }
  const seed = $('seed').value.trim();
  const options = {
    maxTokens,
    temperature: fieldNumber('temperature'),
    topP: fieldNumber('top-p'),
    seed: seed === '' ? null : Number(seed),
  };
  samplingParams(options);
  return options;
}

function render(bytes, boundaries, promptLength) {
  // bytes: prompt + generated (no BOS); boundaries: stage-0 chunk starts per byte.
  const chars = segment(bytes, boundaries);
  output.replaceChildren();
  let colour = -1;
  let span = null;
  for (const { c, start, offset } of chars) {
    const inPrompt = offset < promptLength;
    if (start || span === null || (span.classList.contains('prompt') !== inPrompt)) {
      if (start || span === null) colour += 1;
      span = document.createElement('span');
      span.style.background = PALETTE[colour % PALETTE.length];
      if (inPrompt) span.className = 'prompt';
      output.appendChild(span);
    }
    span.textContent += c;
  }
}

let model = null;
let running = null; // the current generation's promise
let cancelled = null; // set to cancel it
let requests = 0;

async function run() {
  const request = ++requests;
  if (running) {
    cancelled.value = true;
    await running.catch(() => {});
  }
  if (request !== requests) return; // a newer request (typed meanwhile) runs instead; one generation at a time
  const token = { value: false };
  cancelled = token;
  running = generateOnce(token);
  return running;
}

async function generateOnce(token) {
  const prompt = $('prompt').value;
  if (!prompt) {
    output.replaceChildren();
    output.dataset.text = '';
    setStatus('ready', 'Type a prompt.');
    return;
  }
  let options;
  try {
    options = readOptions();
  } catch (e) {
    showError(e instanceof HNetError ? e.message : String(e));
    return;
  }
  output.classList.remove('error');
  const promptBytes = new TextEncoder().encode(prompt);
  const bytes = [...promptBytes];
  const boundaries = [];
  let text = '';
  setStatus('running', 'Generating...');
  output.dataset.text = '';
  const gen = streamGenerate(model, prompt, options);
  let stats = null;
  try {
    for (let n = 0; ; n++) {
      const { value, done } = await gen.next();
      if (done) {
        stats = value;
        break;
      }
      const stage0 = value.routing[0];
      if (n === 0) {
        for (let t = 1; t < stage0.boundaryMask.length; t++) boundaries.push(stage0.boundaryMask[t]); // drop BOS
      } else {
        boundaries[bytes.length - 1] = stage0.boundaryMask[0]; // the byte this step consumed
      }
      if (value.bytes[0] !== null && value.bytes[0] !== 255) bytes.push(value.bytes[0]);
      text += value.texts[0];
      if (token.value) {
        await gen.return();
        return;
      }
      if (n % 4 === 0 || value.finished[0]) render(Uint8Array.from(bytes), boundaries, promptBytes.length);
      status.textContent = `Generating... ${n + 1} bytes`;
    }
  } catch (e) {
    showError(e instanceof HNetError ? e.message : String(e));
    return;
  }
  render(Uint8Array.from(bytes), boundaries, promptBytes.length);
  output.dataset.text = text;
  const chunks = boundaries.filter(Boolean).length;
  setStatus('done', `${stats.generatedBytes} bytes at ${stats.decodeBytesPerSecond.toFixed(1)} bytes/s ` +
    `(prompt: ${stats.promptBytes} bytes at ${stats.prefillBytesPerSecond.toFixed(0)} bytes/s); ` +
    `stage 0: ${(boundaries.length / Math.max(chunks, 1)).toFixed(2)} bytes per chunk`);
  status.dataset.decodeBytesPerSecond = String(stats.decodeBytesPerSecond);
}

async function main() {
  const t0 = performance.now();
  // Single-threaded unless the server sends the cross-origin isolation headers threads need.
  ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;
  ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  try {
    model = await loadModelFromUrl(new URL('./model/', location.href).href, ort);
    await model.session(model.stepGraph(1)); // the decode graph too, so the first keystroke does not wait
  } catch (e) {
    showError(`Could not load the model: ${e.message}`);
    return;
  }
  // The longest generation this export allows (the prompt shares max_seqlen; generate says so if it does not fit).
  $('max-tokens').dataset.max = String(model.maxSeqlen);
  const seconds = (performance.now() - t0) / 1000;
  status.dataset.loadSeconds = String(seconds);
  setStatus('ready', `Model loaded in ${seconds.toFixed(1)} s. Type a prompt.`);
  const prompt = $('prompt');
  prompt.disabled = false;
  $('generate').disabled = false;
  let timer = null;
  prompt.addEventListener('input', () => {
    clearTimeout(timer);
    status.dataset.state = 'typing';
    timer = setTimeout(run, 400); // generate once typing pauses
  });
  $('generate').addEventListener('click', run);
  prompt.focus();
  const params = new URLSearchParams(location.search);
  for (const [name, id] of Object.entries(URL_FIELDS)) {
    if (params.has(name)) $(id).value = params.get(name);
  }
  if (params.get('autorun') === '1') run();
}

main();
