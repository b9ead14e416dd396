#!/usr/bin/env node
// Greedy generation from a scan_export export directory with onnxruntime-node (no Python).
//   node deploy/node/generate.mjs OUT_DIR --input-ids 5,6,7 --max-new-tokens 20 [--json]
// Streams token ids to stdout as they are chosen; with --json prints {"tokens": [...]} instead.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { generateGreedy } from '../common/generate-core.mjs';

function parseArgs(argv) {
  const args = { json: false };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--json') args.json = true;
    else if (a === '--input-ids') args.ids = argv[++i];
    else if (a === '--max-new-tokens') args.maxNewTokens = argv[++i];
    else if (a === '--stop-token-id') args.stop = argv[++i];
    else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
    else rest.push(a);
  }
  if (rest.length !== 1) throw new Error('usage: generate.mjs OUT_DIR --input-ids 5,6,7 --max-new-tokens N [--json]');
  if (!args.ids) throw new Error('--input-ids is required, e.g. --input-ids 5,6,7');
  const ids = args.ids.split(',').filter((t) => t.trim() !== '').map(Number);
  const maxNewTokens = Number(args.maxNewTokens ?? NaN);
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 0) throw new Error('--max-new-tokens must be an integer >= 0');
  return { dir: rest[0], ids, maxNewTokens, json: args.json, stop: args.stop === undefined ? undefined : Number(args.stop) };
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const description = JSON.parse(await readFile(path.join(opts.dir, 'scan_export.json'), 'utf8'));
  if (description.format !== 'scan_export/mamba-lm') throw new Error(`${opts.dir} is not a scan_export export (format ${description.format})`);
  const session = await ort.InferenceSession.create(path.join(opts.dir, description.model_file), { executionProviders: ['cpu'] });
  const stop = opts.stop ?? description.eos_token_id ?? undefined;
  const onToken = opts.json ? undefined : (t) => process.stdout.write(`${t} `);
  const tokens = await generateGreedy(ort, session, description, opts.ids, opts.maxNewTokens, { onToken, stopTokenId: stop });
  process.stdout.write(opts.json ? `${JSON.stringify({ tokens })}\n` : '\n');
}

main().catch((err) => {
  process.stderr.write(`generate.mjs: error: ${err.message}\n`);
  process.exit(1);
});
