#!/usr/bin/env node
// Opens the deploy/web page in headless Chromium and prints its {"tokens": [...]} (for tests).
//   node deploy/web/run-in-chromium.mjs URL [--chromium /usr/bin/chromium]
import { chromium } from 'playwright-core';

const url = process.argv[2];
const i = process.argv.indexOf('--chromium');
const executablePath = i > 0 ? process.argv[i + 1] : '/usr/bin/chromium';
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  await page.goto(url);
  await page.waitForFunction(() => /^(done|error)/.test(document.getElementById('status').textContent), null, { timeout: 120000 });
  const status = await page.textContent('#status');
  if (status !== 'done') throw new Error(`page reported ${status}`);
  process.stdout.write(`${await page.textContent('#tokens')}\n`);
} finally {
  await browser.close();
}
