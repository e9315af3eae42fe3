// The edge engine under Node.js (no dependencies): load a bundle into warmpod_engine.wasm through the ABI of
// wasm/ABI.md and run one request.
//
//   node wasm/node/edge.mjs BUNDLE_DIR [--engine PATH] [--bench N] < request.json > response.json
//
// MLP request {"input": [[floats], ...]} → {"outputs": {"logits": [[...]], "probabilities": [[...]]}}
// (probabilities only with an output activation). BERT request {"ids": [[101, ...], ...]} (token ids, unpadded)
// → {"outputs": {"embedding": [[...]]}}. --bench N runs the request N times and prints
// {"compile_ms", "instantiate_ms", "load_ms", "run_ms": [...]} instead. Errors: message on stderr, exit 1.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

const DEFAULT_ENGINE = join(dirname(fileURLToPath(import.meta.url)), "..", "engine", "warmpod_engine.wasm");
// Engine codes (ABI.md)
const KIND = { mlp: 1, bert: 2 };
const MLP_ACTIVATION = { identity: 0, relu: 1, tanh: 2, gelu: 3, sigmoid: 4 };
const OUTPUT_ACTIVATION = { softmax: 1, sigmoid: 2 }; // null: 0
const BERT_ACTIVATION = { relu: 1, gelu: 3, gelu_new: 5, gelu_pytorch_tanh: 5 };
const POOLING = { mean: 0, cls: 1, max: 2, mean_sqrt_len: 3 };
const DTYPE = { F32: 0, F16: 1, I8: 2 };
const STATUS = { "-1": "bad argument", "-2": "out of memory", "-3": "weights do not fit the graph",
                 "-4": "bad input", "-5": "not ready" };

class EdgeError extends Error {}

function code(table, name, what) {
  if (!(name in table)) throw new EdgeError(`edge.json: ${what} ${JSON.stringify(name)} is not one of ${Object.keys(table).join(", ")}`);
  return table[name];
}

// The wp_init words: ABI.md's layout, from edge.json's config by name.
function configWords(kind, c) {
  if (kind === "mlp") {
    const out = c.output_activation == null ? 0 : code(OUTPUT_ACTIVATION, c.output_activation, "output_activation");
    return [c.sizes.length - 1, ...c.sizes, code(MLP_ACTIVATION, c.activation, "activation"), out];
  }
  const epsBits = new Int32Array(new Float32Array([c.layer_norm_eps]).buffer)[0];
  return [c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
          c.max_position_embeddings, c.type_vocab_size, code(BERT_ACTIVATION, c.hidden_act, "hidden_act"),
          code(POOLING, c.pooling, "pooling"), c.normalize ? 1 : 0, epsBits];
}

// safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
function readSafetensors(path) {
  const file = readFileSync(path);
  const headerLength = Number(file.readBigUInt64LE(0));
  const header = JSON.parse(file.subarray(8, 8 + headerLength).toString("utf8"));
  const tensors = new Map();
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [start, end] = info.data_offsets;
    tensors.set(name, { dtype: info.dtype, bytes: file.subarray(8 + headerLength + start, 8 + headerLength + end) });
  }
  return { file, tensors };
}

function readBundle(dir) {
  const manifest = JSON.parse(readFileSync(join(dir, "edge.json"), "utf8"));
  if (manifest.format !== "warmpod-edge" || manifest.format_version !== 1)
    throw new EdgeError(`${dir}/edge.json is not a warmpod-edge bundle of format_version 1`);
  if (!(manifest.kind in KIND)) throw new EdgeError(`edge.json: kind ${JSON.stringify(manifest.kind)} is not mlp or bert`);
  const { file, tensors } = readSafetensors(join(dir, manifest.weights.file));
  const digest = createHash("sha256").update(file).digest("hex");
  if (manifest.weights.sha256 && digest !== manifest.weights.sha256)
    throw new EdgeError(`${manifest.weights.file}: sha256 ${digest} is not the ${manifest.weights.sha256} edge.json records`);
  return { manifest, tensors };
}

// One engine instance: typed views of its memory are re-taken after every call (memory may grow).
class Engine {
  constructor(instance) {
    this.fn = instance.exports;
    this.fn._initialize();
    if (this.fn.wp_abi_version() !== 1) throw new EdgeError(`the engine speaks ABI ${this.fn.wp_abi_version()}, not 1`);
  }
  bytes() { return new Uint8Array(this.fn.memory.buffer); }
  alloc(nbytes) {
    const ptr = this.fn.wp_alloc(Math.max(nbytes, 1)) >>> 0;
    if (ptr === 0) throw new EdgeError(`wp_alloc(${nbytes}): ${this.message()}`);
    return ptr;
  }
  put(view) { // copy a typed array into a fresh guest buffer
    const bytes = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
    const ptr = this.alloc(bytes.length);
    this.bytes().set(bytes, ptr);
    return ptr;
  }
  message() {
    const memory = this.bytes(), start = this.fn.wp_error() >>> 0;
    const end = memory.indexOf(0, start);
    return new TextDecoder().decode(memory.subarray(start, end < 0 ? memory.length : end)) || "(no message)";
  }
  check(status, what) {
    if (status < 0) throw new EdgeError(`${what}: ${this.message()} (${STATUS[status] ?? `status ${status}`})`);
  }
  load({ manifest, tensors }) {
    const words = Int32Array.from(configWords(manifest.kind, manifest.config));
    const cfg = this.put(words);
    this.check(this.fn.wp_init(KIND[manifest.kind], cfg, words.length), "wp_init");
    this.fn.wp_free(cfg);
    manifest.tensors.forEach((name, index) => {
      const tensor = tensors.get(name);
      if (!tensor) throw new EdgeError(`weights: tensor ${name} (engine index ${index}) is missing`);
      const dtype = code(DTYPE, tensor.dtype, `tensor ${name} dtype`);
      const scale = tensors.get(`${name}.scale`);
      if (dtype === DTYPE.I8 && !scale) throw new EdgeError(`weights: INT8 tensor ${name} has no ${name}.scale`);
      const numel = tensor.bytes.length / [4, 2, 1][dtype];
      const data = this.put(tensor.bytes), scalePtr = dtype === DTYPE.I8 ? this.put(scale.bytes) : 0;
      this.check(this.fn.wp_set_tensor(index, dtype, numel, data, scalePtr), `tensor ${index} (${name})`);
    });
    this.check(this.fn.wp_ready(), "wp_ready");
  }
  // One forward pass; returns a copy of `outFloats` floats of output.
  run(batch, seq, input, outFloats) {
    const inPtr = this.put(input), outPtr = this.alloc(outFloats * 4);
    try {
      this.check(this.fn.wp_run(batch, seq, inPtr, outPtr), `a batch of ${batch}x${seq}`);
      return new Float32Array(this.fn.memory.buffer, outPtr, outFloats).slice();
    } finally {
      this.fn.wp_free(inPtr);
      this.fn.wp_free(outPtr);
    }
  }
}

function rows(flat, width) {
  return Array.from({ length: flat.length / width }, (_, r) => Array.from(flat.subarray(r * width, (r + 1) * width)));
}

// The request → (batch, seq, input, output floats, and how to read the output back).
function prepare(manifest, request) {
  const c = manifest.config;
  if (manifest.kind === "mlp") {
    const width = c.sizes[0], out = c.sizes[c.sizes.length - 1], x = request.input;
    if (!Array.isArray(x) || x.length === 0 || !x.every((r) => Array.isArray(r) && r.length === width))
      throw new EdgeError(`request: "input" must be a non-empty list of rows of ${width} numbers`);
    const withProbabilities = c.output_activation != null;
    return {
      batch: x.length, seq: 0, input: Float32Array.from(x.flat()),
      outFloats: x.length * out * (withProbabilities ? 2 : 1),
      outputs: (flat) => withProbabilities
        ? { logits: rows(flat.subarray(0, x.length * out), out), probabilities: rows(flat.subarray(x.length * out), out) }
        : { logits: rows(flat, out) },
    };
  }
  const ids = request.ids;
  if (!Array.isArray(ids) || ids.length === 0 || !ids.every((s) => Array.isArray(s) && s.length > 0 && s.every(Number.isInteger)))
    throw new EdgeError(`request: "ids" must be a non-empty list of non-empty lists of token ids`);
  const batch = ids.length, seq = Math.max(...ids.map((s) => s.length));
  const pad = manifest.text?.pad_token_id ?? c.pad_token_id ?? 0;
  const input = new Int32Array(2 * batch * seq).fill(pad, 0, batch * seq); // ids, then the mask (0 = padding)
  ids.forEach((s, row) => {
    input.set(s, row * seq);
    input.fill(1, batch * seq + row * seq, batch * seq + row * seq + s.length);
  });
  return { batch, seq, input, outFloats: batch * c.hidden_size, outputs: (flat) => ({ embedding: rows(flat, c.hidden_size) }) };
}

function parseArgs(argv) {
  const args = { engine: DEFAULT_ENGINE, bench: 0 };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--engine") args.engine = argv[++i];
    else if (argv[i] === "--bench") args.bench = Number.parseInt(argv[++i], 10);
    else if (!argv[i].startsWith("--") && args.bundle === undefined) args.bundle = argv[i];
    else args.bad = argv[i];
  }
  if (!args.bundle || args.bad !== undefined || !args.engine || !(args.bench >= 0)) {
    console.error("usage: node edge.mjs BUNDLE_DIR [--engine PATH] [--bench N] < request.json > response.json");
    process.exit(2);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const bundle = readBundle(args.bundle);
  const request = JSON.parse(readFileSync(0, "utf8"));
  let t = performance.now();
  const module = await WebAssembly.compile(readFileSync(args.engine));
  const compileMs = performance.now() - t;
  t = performance.now();
  const engine = new Engine(await WebAssembly.instantiate(module, {}));
  const instantiateMs = performance.now() - t;
  t = performance.now();
  engine.load(bundle);
  const loadMs = performance.now() - t;
  const job = prepare(bundle.manifest, request);
  const forward = () => engine.run(job.batch, job.seq, job.input, job.outFloats);
  if (args.bench > 0) {
    const runMs = [];
    for (let i = 0; i < args.bench; i++) {
      t = performance.now();
      forward();
      runMs.push(performance.now() - t);
    }
    console.log(JSON.stringify({ compile_ms: compileMs, instantiate_ms: instantiateMs, load_ms: loadMs, run_ms: runMs }));
  } else {
    console.log(JSON.stringify({ outputs: job.outputs(forward()) }));
  }
}

main().catch((e) => {
  console.error(`edge.mjs: ${e instanceof Error ? e.message : e}`);
  process.exit(1);
});
