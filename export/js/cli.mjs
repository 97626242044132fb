#!/usr/bin/env node
// node export/js/cli.mjs --model DIR --prompt "..." [--max-tokens N] [--temperature T] ...
// Prints exactly what `hnet generate --backend onnx` prints for one prompt (the text streamed as it
// is generated, then a newline; -v adds the same statistics on stderr). A user mistake prints one
// line `Error: ...` and exits with status 1, as the Python CLI does.

import fs from 'node:fs';
import { parseArgs } from 'node:util';

import { HNetError, generate, loadModel } from './node.mjs';
import { parseNumber, samplingParams } from './sampling.mjs';

const HELP = `Usage: node cli.mjs --model DIR --prompt TEXT [options]

  Generate text from a prompt with an H-Net exported by \`hnet export onnx\`,
  streaming UTF-8 as it is produced (same output as \`hnet generate --backend onnx\`).

Options:
  --model DIR                Directory written by \`hnet export onnx\`.
  -p, --prompt TEXT          Prompt text, or - for stdin.
  -m, --max-tokens N         Bytes to generate.  [default: 256]
  --temperature, --temp T    Sampling temperature; 0 = greedy.  [default: 1.0]
  --top-p P                  Nucleus sampling mass (1 = off).  [default: 1.0]
  --top-k K                  Keep the k most likely bytes (0 = off).  [default: 0]
  --min-p P                  Drop bytes below min_p x the top probability (0 = off).  [default: 0.0]
  --repetition-penalty R     Penalise bytes seen in the last 64 (1 = off).  [default: 1.0]
  --seed N                   Random seed (same stream as Python's numpy: same bytes).
  --stop TEXT                Stop when this text appears (repeatable).
  --step-variant V           auto | where | cond.  [default: auto]
  --threads N                onnxruntime intra-op threads (0 = its default).  [default: 0]
  -v, --verbose              Print throughput and chunk statistics after generating.
  -h, --help                 Show this message and exit.`;

function number(name, value, integer = false) {
  if (value === undefined) return undefined;
  if (!integer && /^[+-]?nan$/i.test(value.trim())) return NaN;  // as Python's float('nan'): the range check judges it
  const n = integer ? Number(value) : parseNumber(value);  // floats: Python's spellings of inf too
  if (value.trim() === '' || Number.isNaN(n) || (integer && !Number.isInteger(n))) {
    throw new HNetError(`Invalid value for '--${name}': '${value}' is not a valid ${integer ? 'integer' : 'float'}.`);
  }
  return n;
}

/** Seeds stay exact beyond 2**53 (numpy takes any non-negative integer). */
function seed(value) {
  if (!/^-?\d+$/.test(value.trim())) throw new HNetError(`Invalid value for '--seed': '${value}' is not a valid integer.`);
  return BigInt(value.trim());
}

function format(x) {
  return Number.isNaN(x) ? 'nan' : x.toFixed(1);
}

/** `--max-tokens -5` as `--max-tokens=-5`: parseArgs takes a value starting with a dash for a
 * forgotten argument ("ambiguous"), but a negative number is a value, which the range checks judge. */
function joinNegativeNumbers(argv) {
  const out = [];
  for (let i = 0; i < argv.length; i += 1) {
    const next = argv[i + 1];
    if (/^-/.test(argv[i]) && !argv[i].includes('=') && next !== undefined && /^-(\d|\.\d|inf|nan)/i.test(next)) {
      out.push(argv[i].startsWith('--') ? `${argv[i]}=${next}` : `${argv[i]}${next}`);  // -m-5 is -m with -5
      i += 1;
    } else {
      out.push(argv[i]);
    }
  }
  return out;
}

async function main(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: joinNegativeNumbers(argv),
      options: {
        model: { type: 'string' },
        prompt: { type: 'string', short: 'p', multiple: true },
        'max-tokens': { type: 'string', short: 'm' },
        temperature: { type: 'string' },
        temp: { type: 'string' },
        'top-p': { type: 'string' },
        'top-k': { type: 'string' },
        'min-p': { type: 'string' },
        'repetition-penalty': { type: 'string' },
        seed: { type: 'string' },
        stop: { type: 'string', multiple: true },
        'step-variant': { type: 'string' },
        threads: { type: 'string' },
        verbose: { type: 'boolean', short: 'v' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (e) {
    throw new HNetError(e.message.split("\n")[0]);
  }
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    return;
  }
  if (!values.model) throw new HNetError("Missing option '--model' (a directory written by `hnet export onnx`).");
  if (!values.prompt) throw new HNetError("Missing option '--prompt' / '-p'.");
  if (values.prompt.length !== 1) throw new HNetError('give one --prompt (batches are for the Python CLI)');
  let prompt = values.prompt[0];
  if (prompt === '-') {
    try {
      prompt = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(fs.readFileSync(0));
    } catch {
      throw new HNetError('stdin is not valid UTF-8; pass text or fix the input encoding');
    }
  }
  const maxTokens = number('max-tokens', values['max-tokens'], true) ?? 256;
  if (maxTokens < 0) throw new HNetError(`--max-tokens must be >= 0, got ${maxTokens}`);
  const options = {
    maxTokens,
    temperature: number('temperature', values.temperature ?? values.temp),
    topP: number('top-p', values['top-p']),
    topK: number('top-k', values['top-k'], true),
    minP: number('min-p', values['min-p']),
    repetitionPenalty: number('repetition-penalty', values['repetition-penalty']),
    seed: values.seed === undefined ? null : seed(values.seed),
    stop: values.stop ?? [],
  };
  samplingParams(options);  // a bad value is one line before the model loads, as in the Python CLI
  const model = await loadModel(values.model, {
    stepVariant: values['step-variant'] ?? 'auto',
    threads: number('threads', values.threads, true) ?? 0,
  });
  const { stats } = await generate(model, prompt, options, (step) => {
    if (step.texts[0]) process.stdout.write(step.texts[0]);
  });
  process.stdout.write('\n');
  if (values.verbose) {
    const err = [];
    err.push('='.repeat(10));
    err.push(`Prompt: ${stats.promptBytes} bytes, ${format(stats.prefillBytesPerSecond)} bytes/s`);
    err.push(`Generation: ${stats.generatedBytes} bytes, ${format(stats.decodeBytesPerSecond)} bytes/s`);
    stats.chunkLengths.forEach((ratio, s) => {
      err.push(`Stage ${s}: ${stats.stageBoundaries[s]} chunks over ${stats.stageTokens[s]} tokens, ` +
        `${Number.isNaN(ratio) ? 'nan' : ratio.toFixed(2)} tokens per chunk`);
    });
    process.stderr.write(`${err.join('\n')}\n`);
  }
  await model.release();
}

main(process.argv.slice(2)).catch((e) => {
  if (e instanceof HNetError) {
    process.stderr.write(`Error: ${e.message}\n`);
  } else {
    process.stderr.write(`${e?.stack ?? e}\n`);
  }
  process.exitCode = 1;
});
