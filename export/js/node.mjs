// Loading an exported directory in Node with onnxruntime-node (CPU; its binaries ship in the package).
//
//   import { loadModel, generate } from 'hnet-onnx/node';
//   const model = await loadModel('hnet_onnx/');
//   const { texts } = await generate(model, 'Hello', { maxTokens: 64, temperature: 0 });

import fs from 'node:fs';
import path from 'node:path';

import { HNetError } from './errors.mjs';
import { OnnxHNet } from './runtime.mjs';

export * from './hnet.mjs';

async function importOrt() {
  try {
    return (await import('onnxruntime-node')).default;
  } catch (e) {
    throw new HNetError(`onnxruntime-node is not installed (${String(e.message).split('\n')[0]}); ` +
      'run `ONNXRUNTIME_NODE_INSTALL=skip npm ci` in export/js');
  }
}

/** A source (see runtime.mjs) reading an exported directory on disk. */
export function directorySource(dir) {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
    throw new HNetError(`ONNX model directory not found: ${dir} (create it with \`hnet export onnx\`)`);
  }
  return {
    name: dir,
    async readJson(file) {
      const p = path.join(dir, file);
      if (!fs.existsSync(p)) throw new HNetError(`${p} not found; is this a directory written by \`hnet export onnx\`?`);
      try {
        return JSON.parse(fs.readFileSync(p, 'utf-8'));
      } catch (e) {
        throw new HNetError(`${p} is not valid JSON (${e.message}); re-export the model`);
      }
    },
    async createSession(ort, file, options) {
      const p = path.join(dir, file);
      if (!fs.existsSync(p)) throw new HNetError(`${p} not found; re-export the model with \`hnet export onnx\``);
      // External weights (weights.onnx.data) are found next to the graph by onnxruntime itself.
      return ort.InferenceSession.create(p, { executionProviders: ['cpu'], ...options });
    },
  };
}

/** Load an exported directory. options: stepVariant ("auto" | "where" | "cond"), threads. */
export async function loadModel(dir, { stepVariant = 'auto', threads = 0 } = {}) {
  const source = directorySource(dir);
  const ort = await importOrt();
  const sessionOptions = threads ? { intraOpNumThreads: threads } : {};
  return OnnxHNet.load(source, ort, { stepVariant, sessionOptions });
}
