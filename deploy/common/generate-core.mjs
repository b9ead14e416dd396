// The scan_export I/O contract (docs/deploy.md), independent of the host: the caller passes the
// onnxruntime module it uses (onnxruntime-node or onnxruntime-web) and an InferenceSession.
//
// Contract, from OUT_DIR/scan_export.json:
//   inputs:  input_ids (batch, seqlen) int64, then each state input in `description.inputs` order
//            (the inputs that `description.state` names), and logits_to_keep (int64 scalar, version 2
//            exports: 0 = logits for every position, k > 0 = the last k; may be left unfed when it
//            has a `default`)
//   outputs: logits (batch, logits_len, vocab), then the state outputs in `description.outputs` order
//   a new sequence starts from all-zero states; after each run, output state i feeds input state i.

const TYPED = { float32: Float32Array };

export function stateInputs(description) {
  const names = new Set(description.state.flatMap((s) => [s.conv_state.input, s.ssm_state.input]));
  return description.inputs.filter((i) => names.has(i.name));
}

// Fed when listed, unless it has a `default` (--target genai exports): onnxruntime-web 1.30 refuses to
// be fed an input that has a default ("invalid input"), and the default, 0, gives every position's logits.
function takesLogitsToKeep(description) {
  return description.inputs.some((i) => i.name === 'logits_to_keep' && !('default' in i));
}

export function stateOutputs(description) {
  return description.outputs.filter((o) => o.name !== 'logits').map((o) => o.name);
}

/** Zero states for `batch` sequences, as a {name: Tensor} map. */
export function zeroState(ort, description, batch) {
  const feeds = {};
  for (const s of stateInputs(description)) {
    const Typed = TYPED[s.dtype];
    if (!Typed) throw new Error(`state ${s.name} has dtype ${s.dtype}; this host supports float32 exports only`);
    const dims = s.shape.map((d) => (d === 'batch' ? batch : d));
    feeds[s.name] = new ort.Tensor(s.dtype, new Typed(dims.reduce((a, b) => a * b, 1)), dims);
  }
  return feeds;
}

function checkIds(description, ids) {
  if (!ids.length) throw new Error('input ids must not be empty');
  for (const t of ids) {
    if (!Number.isInteger(t) || t < 0 || t >= description.vocab_size) {
      throw new Error(`input ids must lie in [0, ${description.vocab_size}) (vocab_size), got ${t}`);
    }
  }
}

/** Index of the largest of the last position's logits (the first one on ties, like numpy's argmax). */
function lastArgmax(logits) {
  const [, seqlen, vocab] = logits.dims;
  const data = logits.data;
  const base = (seqlen - 1) * vocab;
  let best = 0;
  for (let v = 1; v < vocab; v++) if (data[base + v] > data[base + best]) best = v;
  return best;
}

/**
 * Greedy generation for one prompt: prefill, then one token per run, carrying the state.
 * onToken(tokenId) streams each token; a stopTokenId, when produced, is the last token returned.
 */
export async function generateGreedy(ort, session, description, promptIds, maxNewTokens, { onToken, stopTokenId } = {}) {
  checkIds(description, promptIds);
  const outputs = stateOutputs(description);
  const inputs = stateInputs(description).map((s) => s.name);
  let feeds = zeroState(ort, description, 1);
  let ids = promptIds;
  const tokens = [];
  while (tokens.length < maxNewTokens) {
    feeds.input_ids = new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]);
    // Only the last position's logits are needed: the lm_head skips the others.
    if (takesLogitsToKeep(description)) feeds.logits_to_keep = new ort.Tensor('int64', BigInt64Array.from([1n]), []);
    const result = await session.run(feeds);
    const next = lastArgmax(result.logits);
    tokens.push(next);
    if (onToken) onToken(next);
    if (next === stopTokenId) break;
    feeds = {};
    inputs.forEach((name, i) => { feeds[name] = result[outputs[i]]; });
    ids = [next];
  }
  return tokens;
}
