// End-to-end test of conflict.js against a real server ($SWITCHYARD_BIN),
// with Node's built-in test runner:
//
//   SWITCHYARD_BIN=target/debug/switchyard node --test examples/node/conflict.test.js
//
// Starts `switchyard serve` on a fresh SQLite database with one API key of
// the tenant `default`, runs the example's story through its exported
// pieces, and checks the decoded error details. Bounded: 20 s to start,
// a few seconds per test; the server is killed whatever happens.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const grpc = require('@grpc/grpc-js');

const example = require('./conflict.js');

const STARTUP_TIMEOUT_MS = 20_000;
const TEST_TIMEOUT_MS = 4_000;
const SCOPES = 'devices:read,devices:write,actions:read,actions:write';
const KEY_RE = /^sy_[a-z2-7]{16}_[a-z2-7]{52}$/;

let tmpdir;
let server; // { proc, addr, logTail() }
let clients; // the example's clients, with the key

/** The "addr" of a JSON log line whose message is "listening", else null. */
function listeningAddr(line) {
  let rec;
  try {
    rec = JSON.parse(line);
  } catch {
    return null;
  }
  // tracing's JSON layout puts the message under "fields".
  for (const obj of [rec, rec && rec.fields]) {
    if (obj && obj.message === 'listening' && obj.addr) return obj.addr;
  }
  return null;
}

/**
 * Starts `switchyard serve` on port 0 and resolves with its address, read
 * from the "listening" log line. stderr is drained for the server's whole
 * life (a full pipe would block it); its last lines explain failures.
 */
function startServer(bin, database, deadline) {
  const proc = spawn(bin, [
    'serve', '--listen', '127.0.0.1:0', '--database', database, '--no-demo', '--log-format', 'json',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  const lines = [];
  const logTail = () => lines.slice(-30).join('\n') || '(no output)';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no 'listening' log line in time:\n${logTail()}`)),
      deadline - Date.now());
    proc.on('error', (err) => { clearTimeout(timer); reject(err); });
    proc.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited early (${signal || code}):\n${logTail()}`));
    });
    readline.createInterface({ input: proc.stderr }).on('line', (line) => {
      lines.push(line);
      const addr = listeningAddr(line);
      if (addr) {
        clearTimeout(timer);
        resolve({ proc, addr, logTail });
      }
    });
  }).catch((err) => {
    proc.kill('SIGKILL');
    throw err;
  });
}

/** SIGTERM (graceful), then SIGKILL if it has not exited within 2 s. */
async function stopServer(proc) {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 2_000);
  await exited;
  clearTimeout(timer);
}

before(async () => {
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  const bin = process.env.SWITCHYARD_BIN;
  assert.ok(bin && fs.existsSync(bin), 'SWITCHYARD_BIN must point at the switchyard server binary');

  tmpdir = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-node-'));
  const database = `sqlite://${path.join(tmpdir, 'x.db')}`;
  // The key is created before the server starts, so auth is on from its
  // first call. It is printed alone on stdout.
  const key = execFileSync(bin, [
    'admin', '--database', database, 'key', 'create', '--tenant', 'default', '--scopes', SCOPES,
  ], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 15_000 }).trim();
  assert.match(key, KEY_RE, '`switchyard admin key create` did not print a key alone');

  server = await startServer(bin, database, deadline);
  // Never leave the server behind, even if this process is torn down.
  process.on('exit', () => server.proc.kill('SIGKILL'));
  clients = example.connect(server.addr, key);

  // Ready once an authenticated CreateDevice goes through.
  for (let lastErr; ;) {
    try {
      await example.createBattery(clients);
      break;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`CreateDevice did not succeed within ${STARTUP_TIMEOUT_MS} ms ` +
        `(last error: ${lastErr.message}):\n${server.logTail()}`);
    }
    await new Promise((r) => setTimeout(r, 100)); // startup poll only
  }
}, { timeout: STARTUP_TIMEOUT_MS + 1_000 });

after(async () => {
  if (clients) clients.close();
  if (server) await stopServer(server.proc);
  if (tmpdir) fs.rmSync(tmpdir, { recursive: true, force: true });
});

test('a call without the key is UNAUTHENTICATED, reason INVALID_API_KEY', { timeout: TEST_TIMEOUT_MS }, async () => {
  const anonymous = example.connect(server.addr); // no interceptor: no authorization header
  try {
    await assert.rejects(example.createBattery(anonymous), (err) => {
      assert.equal(err.code, grpc.status.UNAUTHENTICATED, `got ${grpc.status[err.code]}: ${err.message}`);
      const details = example.decodeStatusDetails(err);
      assert.ok(details, 'no grpc-status-details-bin trailer');
      assert.equal(details.code, grpc.status.UNAUTHENTICATED, 'the Status in the trailer has another code');
      assert.equal(details.errorInfo.reason, 'INVALID_API_KEY');
      assert.equal(details.errorInfo.domain, 'switchyard');
      assert.equal(details.errorInfo.metadata.why, 'missing');
      return true;
    });
  } finally {
    anonymous.close();
  }
});

test('a collision is ACTION_CONFLICT with a ConflictDetail, and QUEUE_AFTER resolves it', { timeout: TEST_TIMEOUT_MS }, async () => {
  const { charge, conflictError, details, queued, resolved } = await example.runExample(clients, () => {});

  // docs/errors.md: ACTION_CONFLICT is FAILED_PRECONDITION.
  assert.equal(conflictError.code, grpc.status.FAILED_PRECONDITION,
    `got ${grpc.status[conflictError.code]}: ${conflictError.message}`);
  assert.ok(details, 'no grpc-status-details-bin trailer');
  assert.equal(details.code, conflictError.code, 'the Status in the trailer has another code');
  // ErrorInfo always comes first; ConflictDetail is there with its type URL.
  assert.equal(details.typeUrls[0], 'type.googleapis.com/google.rpc.ErrorInfo');
  assert.ok(details.typeUrls.includes('type.googleapis.com/switchyard.v1.ConflictDetail'), details.typeUrls);

  const info = details.errorInfo;
  assert.equal(info.reason, 'ACTION_CONFLICT');
  assert.equal(info.domain, 'switchyard');
  assert.equal(info.metadata.conflicting_action_ids, charge.action_id);
  assert.equal(info.metadata.conflicting_action_count, '1');

  // The detail names the booked charge, in its state and window.
  const conflict = details.conflictDetail;
  assert.ok(conflict, 'no ConflictDetail');
  assert.equal(conflict.conflict_count, 1);
  assert.equal(conflict.truncated, false);
  assert.equal(conflict.conflicts.length, 1);
  const [c] = conflict.conflicts;
  assert.equal(c.action_id, charge.action_id);
  assert.equal(c.state, 'ACTION_STATE_SCHEDULED');
  assert.equal(c.command, 'COMMAND_CHARGE');
  assert.equal(c.start_time.seconds, charge.start_time.seconds);
  assert.equal(c.end_time.seconds, charge.end_time.seconds);
  for (const s of ['CONFLICT_STRATEGY_CANCEL_AND_REPLACE', 'CONFLICT_STRATEGY_QUEUE_AFTER']) {
    assert.ok(conflict.strategies.includes(s), `strategies ${conflict.strategies} lack ${s}`);
  }

  // QUEUE_AFTER: the discharge starts when the charge ends, two hours long.
  assert.equal(queued.state, 'ACTION_STATE_SCHEDULED');
  assert.equal(queued.start_time.seconds, charge.end_time.seconds);
  assert.equal(Number(queued.end_time.seconds) - Number(queued.start_time.seconds), 2 * 3600);
  assert.deepEqual(resolved.queued_after_action_ids, [charge.action_id]);
});
