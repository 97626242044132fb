// Choosing the next byte from logits: hnet_core/sampling.py in JavaScript, operation for operation.
// Order (as in Hugging Face / mlx-lm): repetition penalty -> temperature -> top-k -> top-p -> min-p ->
// draw; temperature 0 is greedy. Arithmetic is float64 like numpy's, sums use numpy's pairwise
// summation and the draw uses numpy's PCG64 stream (rng.mjs) with Generator.choice's inverse-CDF
// lookup, so with the same seed and logits the bytes match Python's.

import { HNetError } from './errors.mjs';
import { PCG64 } from './rng.mjs';

export const DEFAULT_SAMPLING = Object.freeze({
  temperature: 1.0,
  topK: 0, // 0 = off
  topP: 1.0, // 1 = off
  minP: 0.0, // 0 = off
  repetitionPenalty: 1.0, // 1 = off (CTRL-style: divide positive logits, multiply negative)
  repetitionContext: 64, // recent bytes the penalty looks at
  seed: null,
});

// Python's float() spellings of the non-finite values, so `--temperature inf` (or `?temperature=inf`)
// reaches the range checks below and gets the message Python gives.
const NON_FINITE = { inf: Infinity, '+inf': Infinity, '-inf': -Infinity, infinity: Infinity, '+infinity': Infinity,
  '-infinity': -Infinity, nan: NaN, '+nan': NaN, '-nan': NaN };

/** A number typed by a user, read as Python's float() reads it; NaN for anything else (or nothing). */
export function parseNumber(text) {
  const word = String(text).trim().toLowerCase();
  if (word in NON_FINITE) return NON_FINITE[word];
  return word === '' ? NaN : Number(word);
}

/** A number as Python prints it in the messages below (inf, -inf, nan), so both runtimes say the same. */
function shown(x) {
  if (typeof x !== 'number' || Number.isFinite(x)) return `${x}`;
  return Number.isNaN(x) ? 'nan' : (x > 0 ? 'inf' : '-inf');
}

/** Fill defaults and check ranges exactly as SamplingParams.__post_init__ does (same messages). */
export function samplingParams(options = {}) {
  const p = { ...DEFAULT_SAMPLING, ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) };
  if (!(p.temperature >= 0 && Number.isFinite(p.temperature))) throw new HNetError(`temperature must be a finite number >= 0 (0 = greedy), got ${shown(p.temperature)}`);
  if (!(Number.isInteger(p.topK) && p.topK >= 0)) throw new HNetError(`top_k must be a non-negative integer (0 = off), got ${p.topK}`);
  if (!(p.topP > 0 && p.topP <= 1)) throw new HNetError(`top_p must be in (0, 1] (1 = off), got ${shown(p.topP)}`);
  if (!(p.minP >= 0 && p.minP < 1)) throw new HNetError(`min_p must be in [0, 1) (0 = off), got ${shown(p.minP)}`);
  if (!(p.repetitionPenalty > 0 && Number.isFinite(p.repetitionPenalty))) throw new HNetError(`repetition_penalty must be a finite number > 0 (1 = off), got ${shown(p.repetitionPenalty)}`);
  if (!(p.repetitionContext >= 0)) throw new HNetError(`repetition_context must be >= 0, got ${p.repetitionContext}`);
  if (p.seed !== null && !(Number.isInteger(p.seed) || typeof p.seed === 'bigint')) throw new HNetError(`seed must be an integer, got ${p.seed}`);  // BigInt for seeds beyond 2**53
  if (p.seed !== null && BigInt(p.seed) < 0n) throw new HNetError(`seed must be non-negative, got ${p.seed}`);
  return p;
}

/** numpy's pairwise summation of a float64 array (what ndarray.sum does along a contiguous axis). */
export function pairwiseSum(a, start = 0, n = a.length - start) {
  if (n < 8) {
    let res = 0;
    for (let i = 0; i < n; i++) res += a[start + i];
    return res;
  }
  if (n <= 128) {
    const r = [];
    for (let j = 0; j < 8; j++) r.push(a[start + j]);
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] += a[start + i + j];
    let res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[start + i];
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2);
}

function argmax(a) {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

export class Sampler {
  constructor(options = {}) {
    this.params = samplingParams(options);
    this.rng = new PCG64(this.params.seed);
  }

  /** logits: one Float32Array/Float64Array of the vocabulary per sample; history[b]: bytes seen by sample b. */
  sample(logitsRows, history = null) {
    return logitsRows.map((row, b) => this.#one(row, history ? history[b] : null));
  }

  #one(row, seen) {
    const p = this.params;
    const V = row.length;
    let logits = Float64Array.from(row);
    if (p.repetitionPenalty !== 1.0 && seen && p.repetitionContext > 0) {
      for (const byte of new Set(seen.slice(-p.repetitionContext))) {
        const v = logits[byte];
        logits[byte] = v > 0 ? v / p.repetitionPenalty : v * p.repetitionPenalty;
      }
    }
    if (p.temperature === 0) return argmax(logits);
    let max = -Infinity;
    for (let i = 0; i < V; i++) {
      logits[i] /= p.temperature;
      if (logits[i] > max) max = logits[i];
    }
    let probs = logits.map((x) => Math.exp(x - max));
    let total = pairwiseSum(probs);
    probs = probs.map((x) => x / total);
    if (p.topK > 0 && p.topK < V) {
      const kth = Float64Array.from(probs).sort()[V - p.topK];
      probs = probs.map((x) => (x >= kth ? x : 0));
    }
    if (p.topP < 1.0) {
      // Keep the smallest prefix (by decreasing probability) whose mass reaches top_p; the first stays.
      const order = Array.from(probs.keys()).sort((i, j) => probs[j] - probs[i] || i - j);
      const sorted = Float64Array.from(order, (i) => probs[i]);
      const sortedTotal = pairwiseSum(sorted);
      let cum = 0;
      const keep = new Uint8Array(V);
      for (let k = 0; k < V; k++) {
        cum += sorted[k];
        keep[order[k]] = cum / sortedTotal - sorted[k] / sortedTotal < p.topP ? 1 : 0;
      }
      probs = probs.map((x, i) => (keep[i] ? x : 0));
    }
    if (p.minP > 0) {
      let top = -Infinity;
      for (const x of probs) if (x > top) top = x;
      const floor = p.minP * top;
      probs = probs.map((x) => (x >= floor ? x : 0));
    }
    total = pairwiseSum(probs);
    probs = probs.map((x) => x / total);
    // Generator.choice(V, p=probs): cdf = cumsum(p) / cdf[-1]; the first index whose cdf exceeds u.
    const cdf = new Float64Array(V);
    let acc = 0;
    for (let i = 0; i < V; i++) cdf[i] = acc += probs[i];
    const last = cdf[V - 1];
    for (let i = 0; i < V; i++) cdf[i] /= last;
    const u = this.rng.random();
    let lo = 0;
    let hi = V;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] <= u) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
