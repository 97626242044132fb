// hnet-onnx: run an H-Net exported by `hnet export onnx` with onnxruntime's JavaScript API.
// This entry point is environment-free; node.mjs (onnxruntime-node) and web.mjs (onnxruntime-web)
// add the loaders.

export { HNetError } from './errors.mjs';
export { OnnxHNet, FORMAT_VERSION, STEP_VARIANTS, tensorToFloat32 } from './runtime.mjs';
export { Sampler, samplingParams, parseNumber, pairwiseSum, DEFAULT_SAMPLING } from './sampling.mjs';
export { TextStream, encode, BOS_ID, EOS_ID } from './streaming.mjs';
export { streamGenerate, generate, promptBatch, GenerationStats } from './generate.mjs';
export { PCG64 } from './rng.mjs';
