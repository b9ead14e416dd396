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
//   Hybrid exports (version 4) also take attention_mask (batch, past_seqlen + seqlen) int64 and KV
//   caches past_key_values.{i}.key/value (batch, kv_heads, past_seqlen, head_dim) that start empty
//   (past_seqlen 0) and come back grown by seqlen: one prompt needs a mask of all ones.

const TYPED = { float32: Float32Array };

export function stateInputs(description) {
  // Every dict with an `input` in a state entry: conv_state/ssm_state (Mamba), key/value (attention).
  const names = new Set(description.state.flatMap((s) => Object.values(s).filter((t) => t && t.input).map((t) => t.input)));
  return description.inputs.filter((i) => names.has(i.name));
}

function takesAttentionMask(description) {
  return description.inputs.some((i) => i.name === 'attention_mask');
}

// Fed when listed, unless it has a `default` (--target genai exports): onnxruntime-web 1.30 refuses to
// be fed an input that has a default ("invalid input"), and the default, 0, gives every position's logits.
function takesLogitsToKeep(description) {
  return description.inputs.some((i) => i.name === 'logits_to_keep' && !('default' in i));
}

export function stateOutputs(description) {
  return description.outputs.filter((o) => o.name !== 'logits').map((o) => o.name);
}

/** The states a new sequence starts from, for `batch` sequences, as a {name: Tensor} map: zeros, and
 * KV caches with past_seqlen 0 (empty tensors). */
export function zeroState(ort, description, batch) {
  const feeds = {};
  for (const s of stateInputs(description)) {
    const Typed = TYPED[s.dtype];
    if (!Typed) throw new Error(`state ${s.name} has dtype ${s.dtype}; this host supports float32 exports only`);
    const dims = s.shape.map((d) => (d === 'batch' ? batch : d === 'past_seqlen' ? 0 : d));
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
  let seen = 0; // tokens already in the KV cache
  const tokens = [];
  while (tokens.length < maxNewTokens) {
    feeds.input_ids = new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]);
    if (takesAttentionMask(description)) {
      // One sequence, no padding: every cached and new position is a real token.
      feeds.attention_mask = new ort.Tensor('int64', new BigInt64Array(seen + ids.length).fill(1n), [1, seen + ids.length]);
    }
    seen += ids.length;
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
