// Streaming UTF-8: the text Node prints equals hnet_core.streaming.TextStream's (invalid bytes as the
// same U+FFFD, stop strings, EOS), and no piece ever ends inside a character.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';

import { EOS_ID, TextStream, encode } from '../hnet.mjs';
import { segment } from '../web.mjs';

const ref = JSON.parse(fs.readFileSync(new URL('./numpy_reference.json', import.meta.url), 'utf-8'));

test('streamed text equals Python\'s TextStream for valid, invalid and stop-string cases', () => {
  for (const c of ref.streams) {
    const stream = new TextStream(c.stop);
    let text = '';
    for (const b of c.bytes) text += stream.feed(b);
    if (!stream.done) text += stream.finish();
    assert.equal(text, c.text, `${JSON.stringify(c.bytes)} stop=${JSON.stringify(c.stop)}`);
  }
});

test('pieces never split a character and EOS ends the stream', () => {
  const bytes = [...new TextEncoder().encode('añ☃🎉z')];
  const stream = new TextStream();
  const pieces = bytes.map((b) => stream.feed(b));
  for (const p of pieces) assert.ok(!/[\ud800-\udbff]$/.test(p) && !p.includes('\ufffd'), JSON.stringify(p));
  assert.deepEqual(pieces, ['a', '', 'ñ', '', '', '☃', '', '', '', '🎉', 'z']);
  assert.equal(stream.feed(EOS_ID), '');
  assert.ok(stream.done);
  assert.equal(stream.feed(65), '');
});

test('encode prepends BOS to the UTF-8 bytes', () => {
  assert.deepEqual(encode('é'), [254, 0xc3, 0xa9]);
});

test('segment groups bytes into characters and marks chunk starts like hnet_core.chunks', () => {
  const bytes = new TextEncoder().encode('aé☃');
  const chars = segment(bytes, [1, 0, 1, 0, 0, 0]); // a chunk starts at 'a' and inside 'é'
  assert.deepEqual(chars.map((c) => [c.c, c.start, c.offset]), [['a', true, 0], ['é', true, 1], ['☃', false, 3]]);
  assert.deepEqual(segment(Uint8Array.from([0xff, 0x41]), []).map((c) => c.c), ['\ufffd', 'A']);
});
