// The sampler and its random stream against numpy / hnet_core.sampling (numpy_reference.json, written by
// make_reference.py), plus the sampler's distribution on its own.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';

import { HNetError, PCG64, Sampler, pairwiseSum, samplingParams } from '../hnet.mjs';

const ref = JSON.parse(fs.readFileSync(new URL('./numpy_reference.json', import.meta.url), 'utf-8'));

const fromPython = (p) => ({
  temperature: p.temperature, topK: p.top_k, topP: p.top_p, minP: p.min_p,
  repetitionPenalty: p.repetition_penalty, seed: p.seed ?? null,
});

test('PCG64 seeded like numpy default_rng gives numpy\'s state and uniforms', () => {
  for (const c of ref.rng) {
    const rng = new PCG64(BigInt(c.seed));
    assert.equal(rng.state.toString(), c.state, `seed ${c.seed}`);
    assert.deepEqual(c.random.map(() => rng.random()), c.random, `seed ${c.seed}`);
  }
});

test('pairwise sums equal numpy\'s ndarray.sum bit for bit', () => {
  for (const c of ref.sums) assert.equal(pairwiseSum(Float64Array.from(c.values)), c.sum, `n=${c.values.length}`);
});

test('seeded sampling picks the same bytes as hnet_core.sampling.Sampler', () => {
  const logits = Float32Array.from(ref.logits);
  for (const c of ref.sampling) {
    const sampler = new Sampler(fromPython(c.params));
    const picks = c.picks.map(() => sampler.sample([logits], [ref.history])[0]);
    assert.deepEqual(picks, c.picks, JSON.stringify(c.params));
  }
});

test('unseeded sampling follows the softmax distribution and top-k / min-p supports', () => {
  const logits = Float32Array.from({ length: 256 }, (_, i) => (i < 4 ? [2, 1, 0.5, 0][i] : -30));
  const expected = [2, 1, 0.5, 0].map(Math.exp);
  const total = expected.reduce((a, b) => a + b);
  const sampler = new Sampler({ temperature: 1 });
  const counts = new Array(256).fill(0);
  const N = 20000;
  for (let n = 0; n < N; n++) counts[sampler.sample([logits])[0]] += 1;
  for (let i = 0; i < 4; i++) {
    const p = expected[i] / total;
    const sd = Math.sqrt((p * (1 - p)) / N);
    assert.ok(Math.abs(counts[i] / N - p) < 5 * sd, `byte ${i}: ${counts[i] / N} vs ${p}`);
  }
  const topK = new Sampler({ temperature: 1, topK: 2 });
  const minP = new Sampler({ temperature: 1, minP: 0.5 }); // keeps p >= e^2/2: bytes 0 and 1 (e^1 > e^2 / 2)
  for (let n = 0; n < 500; n++) {
    assert.ok(topK.sample([logits])[0] < 2);
    assert.ok(minP.sample([logits])[0] < 2);
  }
  const greedy = new Sampler({ temperature: 0, repetitionPenalty: 10 });
  assert.equal(greedy.sample([logits], [[0]])[0], 1); // the penalty divides byte 0's logit by 10
});

test('sampling parameters out of range are HNetErrors', () => {
  for (const bad of [{ temperature: -1 }, { topK: 1.5 }, { topP: 0 }, { minP: 1 }, { repetitionPenalty: 0 }, { seed: -3 }]) {
    assert.throws(() => samplingParams(bad), HNetError, JSON.stringify(bad));
  }
});
