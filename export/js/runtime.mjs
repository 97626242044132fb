// Running an exported H-Net with onnxruntime's JavaScript API: hnet_export.OnnxHNet (export/runtime.py)
// for Node (onnxruntime-node) and the browser (onnxruntime-web). The runtime does not import
// onnxruntime itself: node.mjs and web.mjs pass in their `ort` and a `source` that reads the
// exported directory (files on disk, or URLs on the serving host).
//
//   const model = await OnnxHNet.load(source, ort);
//   let out = await model.prefill([[254, 72, 105]]);   // (B, L) bytes -> out.logits (B*L*256), out.routing
//   out = await model.step([[33]]);                     // (B, 1) -> logits (B*1*256); states live in model
//
// Recurrent states stay in the object between calls, exactly as in Python: global attention caches
// are buffers of `capacity` slots, reserved at prefill and doubled on demand up to max_seqlen.

import { HNetError } from './errors.mjs';

export const FORMAT_VERSION = 1; // of export.json / io.json (hnet_export.exporter writes the same number)
export const STEP_VARIANTS = ['auto', 'where', 'cond'];
const MIN_CAPACITY = 64;

/** float16 bits -> float32 (onnxruntime's JS API gives float16 tensors as Uint16Array). */
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

export function tensorToFloat32(tensor) {
  if (tensor.type === 'float32') return tensor.data;
  if (tensor.type === 'float16' && tensor.data instanceof Uint16Array) return Float32Array.from(tensor.data, halfToFloat);
  return Float32Array.from(tensor.data);
}

function product(dims) {
  return dims.reduce((a, b) => a * b, 1);
}

export class OnnxHNet {
  /**
   * source: { name, readJson(file), createSession(ort, file, sessionOptions, meta) }.
   * options.stepVariant: "where" (every level every step), "cond" (inner levels only at a boundary;
   * needs an export with --batch-variants) or "auto" (cond at batch 1 when exported, as the Python
   * runtime picks on CPU). options.sessionOptions go to ort.InferenceSession.create.
   */
  static async load(source, ort, { stepVariant = 'auto', sessionOptions = {} } = {}) {
    if (!STEP_VARIANTS.includes(stepVariant)) {
      throw new HNetError(`step_variant must be one of ${STEP_VARIANTS.join(', ')}, got ${JSON.stringify(stepVariant)}`);
    }
    const meta = await source.readJson('export.json');
    const missing = ['format_version', 'max_seqlen', 'dtype', 'graphs'].filter((k) => !(k in meta));
    if (missing.length || !meta.graphs.prefill || !meta.graphs.step) {
      throw new HNetError(`${source.name}/export.json lacks ${missing.length ? missing.join(', ') : 'the prefill/step graphs'}; re-export the model`);
    }
    if (!Number.isInteger(meta.format_version) || meta.format_version > FORMAT_VERSION) {
      throw new HNetError(`${source.name} was exported in format ${meta.format_version}, this runtime reads format ` +
        `${FORMAT_VERSION}; use the hnet-mlx that wrote it or re-export the model`);
    }
    const io = await source.readJson('io.json');
    const config = await source.readJson('config.json');
    if (stepVariant === 'cond' && !meta.graphs.step_cond) {
      throw new HNetError('this export has no step_cond.onnx; re-export with --batch-variants or use stepVariant "where"');
    }
    const model = new OnnxHNet(source, ort, meta, io, config, stepVariant, sessionOptions);
    await model.session('prefill'); // loads now, so a broken export fails here; step graphs load on first use
    return model;
  }

  constructor(source, ort, meta, io, config, stepVariant, sessionOptions) {
    this.source = source;
    this.ort = ort;
    this.meta = meta;
    this.io = io;
    this.config = config;
    this.maxSeqlen = meta.max_seqlen;
    this.dtype = meta.dtype;
    this.numStages = io.prefill.outputs.filter((o) => /^stage\d+\.boundary_mask$/.test(o.name)).length;
    this.vocabSize = config.vocab_size ?? 256;
    this.stepVariant = stepVariant;
    this.sessionOptions = { logSeverityLevel: 3, ...sessionOptions }; // errors only, as in Python
    this.sessions = {};
    const stepInputs = io.step.inputs;
    this.stateNames = stepInputs.filter((s) => s.name.startsWith('past.')).map((s) => s.name.slice('past.'.length));
    this.growable = new Set(stepInputs.filter((s) => s.name.startsWith('past.') && s.shape.includes('kv_slots'))
      .map((s) => s.name.slice('past.'.length)));
    this.states = null;
    this.position = 0; // bytes consumed by the longest sample (its level-0 length)
    this.capacity = 0; // slots in each global KV cache (0 until the first step sizes them)
    this.reserve = 0;
    this.batch = 0;
  }

  /** The onnxruntime session of one graph, created on first use and checked against io.json. */
  async session(name) {
    if (!this.sessions[name]) {
      const file = this.meta.graphs[name];
      let session;
      try {
        session = await this.source.createSession(this.ort, file, this.sessionOptions, this.meta);
      } catch (e) {
        if (e instanceof HNetError) throw e;
        const reason = String(e?.message ?? e).trim().split('\n')[0].slice(0, 200);
        // onnxruntime-node/-web 1.30 insert float16 -> float32 casts they then reject (Python's 1.32 loads these).
        const hint = this.dtype === 'float16' ? ' (float16 exports do not load in onnxruntime\'s JavaScript packages ' +
          '1.30; export with --dtype float32)' : '';
        throw new HNetError(`onnxruntime cannot load ${this.source.name}/${file}: ${reason}${hint}`);
      }
      const spec = this.io[name === 'prefill' ? 'prefill' : 'step'];
      const want = [...spec.inputs.map((s) => s.name), '|', ...spec.outputs.map((s) => s.name)].join(',');
      const got = [...session.inputNames, '|', ...session.outputNames].join(',');
      if (want !== got) {
        throw new HNetError(`${this.source.name}/${file} does not match its io.json (another export's graph?); ` +
          're-export the model with `hnet export onnx`');
      }
      this.sessions[name] = session;
    }
    return this.sessions[name];
  }

  #idsTensor(rows, what) {
    if (!Array.isArray(rows) || rows.length === 0 || !rows.every((r) => r.length === rows[0].length)) {
      throw new HNetError(`${what} must be a non-empty (batch, length) array of equal-length rows`);
    }
    if (rows[0].length === 0) throw new HNetError(`${what} is empty; give at least one byte per sample`);
    const flat = rows.flat();
    if (!flat.every((v) => Number.isInteger(v) && v >= 0 && v < this.vocabSize)) {
      throw new HNetError(`${what} must hold byte values in [0, ${this.vocabSize})`);
    }
    return new this.ort.Tensor('int64', BigInt64Array.from(flat, BigInt), [rows.length, rows[0].length]);
  }

  #routing(outputs, step) {
    const routing = [];
    for (let s = 0; s < this.numStages; s++) {
      const prob = tensorToFloat32(outputs[`stage${s}.boundary_prob`]);
      const mask = outputs[`stage${s}.boundary_mask`];
      const valid = outputs[`stage${s}.valid`].data;
      const boundaryProb = step ? Float32Array.from(prob, (p, i) => (valid[i] ? p : NaN)) : Float32Array.from(prob);
      routing.push({ boundaryProb, boundaryMask: Uint8Array.from(mask.data), valid: Uint8Array.from(valid), dims: mask.dims });
    }
    return routing;
  }

  /**
   * Run the prompts (B, L), right-padded with `mask` (default: all real), and keep the states.
   * capacity: decode slots to reserve (prompt + bytes to generate); grows on demand.
   * Returns { logits: Float32Array (B*L*vocab), dims: [B, L, vocab], routing: per stage
   * { boundaryProb, boundaryMask, valid, dims: [B, L_s] } }.
   */
  async prefill(inputIds, mask = null, capacity = null) {
    const ids = this.#idsTensor(inputIds, 'input_ids');
    const [B, L] = ids.dims;
    const maskRows = mask ?? inputIds.map((r) => r.map(() => true));
    const flatMask = maskRows.flat().map(Boolean);
    if (flatMask.length !== B * L) throw new HNetError(`mask shape must equal input_ids shape [${B}, ${L}]`);
    for (let b = 0; b < B; b++) {
      if (!flatMask[b * L]) throw new HNetError('every prompt in the batch needs at least one byte (mask[:, 0] must be true)');
      for (let t = 1; t < L; t++) {
        if (flatMask[b * L + t] && !flatMask[b * L + t - 1]) throw new HNetError('mask must be right-padded: true on a prefix of each row, then false');
      }
    }
    const session = await this.session('prefill');
    const outputs = await session.run({ input_ids: ids, mask: new this.ort.Tensor('bool', Uint8Array.from(flatMask, Number), [B, L]) });
    let longest = 0;
    for (let b = 0; b < B; b++) longest = Math.max(longest, flatMask.slice(b * L, (b + 1) * L).filter(Boolean).length);
    this.position = longest;
    this.batch = B;
    this.states = null;
    if (this.position <= this.maxSeqlen) {
      this.states = Object.fromEntries(this.stateNames.map((n) => [n, outputs[`present.${n}`]]));
      this.capacity = 0;
      this.reserve = Math.max(capacity ?? 0, this.position + MIN_CAPACITY);
    }
    const logits = outputs.logits;
    return { logits: tensorToFloat32(logits), dims: logits.dims, routing: this.#routing(outputs, false) };
  }

  /** Pad axis 1 of a global KV buffer with zeros to `slots`. */
  #padSlots(tensor, slots) {
    const [B, have, ...rest] = tensor.dims;
    if (have >= slots) return tensor;
    const inner = product(rest);
    const data = new tensor.data.constructor(B * slots * inner);
    for (let b = 0; b < B; b++) data.set(tensor.data.subarray(b * have * inner, (b + 1) * have * inner), b * slots * inner);
    return new this.ort.Tensor(tensor.type, data, [B, slots, ...rest]);
  }

  #resize(capacity) {
    this.capacity = capacity;
    for (const name of this.growable) this.states[name] = this.#padSlots(this.states[name], capacity);
  }

  /** The step graph the Python runtime would pick: cond at batch 1 on CPU when exported, else where. */
  stepGraph(batch = this.batch) {
    let variant = this.stepVariant;
    if (variant === 'auto') variant = this.meta.graphs.step_cond && batch === 1 ? 'cond' : 'where';
    return variant === 'cond' ? 'step_cond' : 'step';
  }

  /** Consume one byte per sample: nextIds (B, 1) -> logits (B*1*vocab). */
  async step(nextIds) {
    if (this.states === null) {
      if (this.batch) {
        throw new HNetError(`the prompt is longer than this export's max_seqlen ${this.maxSeqlen}; ` +
          're-export with a larger --max-seqlen to decode from it');
      }
      throw new HNetError('call prefill(inputIds, mask) before step()');
    }
    const ids = this.#idsTensor(nextIds, 'next_ids');
    if (ids.dims[0] !== this.batch || ids.dims[1] !== 1) {
      throw new HNetError(`step takes next_ids of shape (${this.batch}, 1), got (${ids.dims.join(', ')})`);
    }
    if (this.position >= this.maxSeqlen) {
      throw new HNetError(`generation reached this export's max_seqlen ${this.maxSeqlen}; re-export with a larger --max-seqlen`);
    }
    if (this.capacity === 0) this.#resize(Math.min(this.maxSeqlen, this.reserve));
    if (this.position >= this.capacity) this.#resize(Math.min(this.maxSeqlen, Math.max(2 * this.capacity, this.position + 1)));
    const session = await this.session(this.stepGraph());
    const feeds = { input_ids: ids };
    for (const name of this.stateNames) feeds[`past.${name}`] = this.states[name];
    const outputs = await session.run(feeds);
    for (const name of this.stateNames) this.states[name] = outputs[`present.${name}`];
    this.position += 1;
    const logits = outputs.logits;
    return { logits: tensorToFloat32(logits), dims: logits.dims, routing: this.#routing(outputs, true) };
  }

  /** Free the onnxruntime sessions. */
  async release() {
    for (const s of Object.values(this.sessions)) await s.release?.();
    this.sessions = {};
  }
}
