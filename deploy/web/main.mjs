// Loads an export directory over HTTP and generates greedily with onnxruntime-web's WASM backend.
// The page is served next to deploy/node_modules (see docs/deploy.md); single-threaded WASM, so no
// cross-origin-isolation headers are needed.
import * as ort from '../node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { generateGreedy } from '../common/generate-core.mjs';

const status = document.getElementById('status');
const out = document.getElementById('tokens');

async function main() {
  const params = new URLSearchParams(window.location.search);
  const base = (params.get('export') || '../../export/').replace(/\/?$/, '/');
  const ids = (params.get('ids') || '1,2,3').split(',').map(Number);
  const n = Number(params.get('n') || '20');
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = new URL('../node_modules/onnxruntime-web/dist/', import.meta.url).href;
  const description = await (await fetch(`${base}scan_export.json`)).json();
  const model = new Uint8Array(await (await fetch(`${base}${description.model_file}`)).arrayBuffer());
  const session = await ort.InferenceSession.create(model, { executionProviders: ['wasm'] });
  status.textContent = 'generating';
  const tokens = await generateGreedy(ort, session, description, ids, n, {
    stopTokenId: description.eos_token_id ?? undefined,
    onToken: (t) => { out.textContent += `${t} `; },
  });
  out.textContent = JSON.stringify({ tokens });
  status.textContent = 'done';
}

main().catch((err) => {
  status.textContent = `error: ${err.message}`;
});
