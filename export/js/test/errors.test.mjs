// Bad input gives one clear HNetError (and one `Error:` line from the CLI), never a stack trace.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { HNetError, loadModel } from '../node.mjs';

const CLI = fileURLToPath(new URL('../cli.mjs', import.meta.url));

const made = [];
after(() => made.forEach((dir) => fs.rmSync(dir, { recursive: true, force: true })));

function fakeExport(meta) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hnet-js-'));
  made.push(dir);
  if (meta !== null) fs.writeFileSync(path.join(dir, 'export.json'), typeof meta === 'string' ? meta : JSON.stringify(meta));
  return dir;
}

const META = { format_version: 1, max_seqlen: 64, dtype: 'float32', graphs: { prefill: 'prefill.onnx', step: 'step.onnx' } };

test('a missing export directory is an HNetError naming it', async () => {
  await assert.rejects(loadModel('/nonexistent/hnet_onnx'), (e) => e instanceof HNetError && /not found: \/nonexistent\/hnet_onnx/.test(e.message));
});

test('an export of another format version is refused with what to do', async () => {
  const dir = fakeExport({ ...META, format_version: 2 });
  await assert.rejects(loadModel(dir), (e) => e instanceof HNetError && /format 2/.test(e.message) && /re-export/.test(e.message));
});

test('a directory that is not an export, or a broken export.json, is an HNetError', async () => {
  await assert.rejects(loadModel(fakeExport(null)), (e) => e instanceof HNetError && /export\.json not found/.test(e.message));
  await assert.rejects(loadModel(fakeExport('{oops')), (e) => e instanceof HNetError && /not valid JSON/.test(e.message));
  await assert.rejects(loadModel(fakeExport({ format_version: 1 })), (e) => e instanceof HNetError && /lacks/.test(e.message));
});

test('a graph file onnxruntime cannot read is an HNetError naming the file', async () => {
  const dir = fakeExport(META);
  fs.writeFileSync(path.join(dir, 'io.json'), JSON.stringify({ prefill: { inputs: [], outputs: [] }, step: { inputs: [], outputs: [] } }));
  fs.writeFileSync(path.join(dir, 'config.json'), '{}');
  fs.writeFileSync(path.join(dir, 'prefill.onnx'), 'not a protobuf');
  await assert.rejects(loadModel(dir), (e) => e instanceof HNetError && /cannot load .*prefill\.onnx/.test(e.message));
});

test('the CLI prints one Error: line and exits 1 for user mistakes', () => {
  const cases = [
    [['--model', '/nonexistent/x', '--prompt', 'hi'], /not found/],
    [['--prompt', 'hi'], /--model/],
    [['--model', '/x'], /--prompt/],
    [['--model', '/x', '--prompt', 'hi', '--max-tokens', 'ten'], /max-tokens/],
    [['--model', '/x', '--prompt', 'hi', '--bogus'], /bogus/],
  ];
  for (const [args, pattern] of cases) {
    const run = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf-8' });
    assert.equal(run.status, 1, args.join(' '));
    assert.equal(run.stdout, '');
    const lines = run.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 1, run.stderr);
    assert.match(lines[0], /^Error: /);
    assert.match(lines[0], pattern);
  }
});
