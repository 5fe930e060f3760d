#!/usr/bin/env node
// A switchyard client in Node.js (@grpc/grpc-js + @grpc/proto-loader):
// authenticate, book a charge, hit a conflict with a discharge, read the
// typed error details (google.rpc.ErrorInfo and switchyard.v1.ConflictDetail
// from the `grpc-status-details-bin` trailer), then resolve the conflict by
// queueing the discharge after the charge.
//
//   npm ci    # once, in this directory (or use NODE_PATH, as scripts/test.sh does)
//   SWITCHYARD_ADDR=127.0.0.1:50051 SWITCHYARD_API_KEY=sy_... node conflict.js
//
// The key needs the scopes devices:write, actions:read and actions:write.
// conflict.test.js imports the pieces exported at the bottom.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
// Plain requires: resolved from ./node_modules or, failing that, NODE_PATH.
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The API's protos, straight from the repository, and the two google.rpc
// messages the error details need (minimal copies, in ./protos).
// google/protobuf/*.proto (timestamp, any, ...) are bundled with protobufjs.
const PROTO_DIR = path.resolve(__dirname, '..', '..', 'proto');
const LOCAL_PROTO_DIR = path.resolve(__dirname, 'protos');
const INCLUDE_DIRS = [PROTO_DIR, LOCAL_PROTO_DIR];
const RPC_TIMEOUT_MS = 10_000;
const HOUR_S = 3600;

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/** The switchyard.v1 package (services and messages), loaded at run time. */
function loadApi() {
  const dir = path.join(PROTO_DIR, 'switchyard', 'v1');
  const files = fs.readdirSync(dir)
    .filter((f) => f.endsWith('.proto'))
    .map((f) => path.join('switchyard', 'v1', f));
  const definition = protoLoader.loadSync(files, {
    includeDirs: INCLUDE_DIRS,
    keepCase: true, // field names as in the .proto files: device_id, on_conflict, ...
    longs: String,
    enums: String, // enums by name, both ways: 'COMMAND_CHARGE'
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).switchyard.v1;
}

/** An interceptor that sends `authorization: Bearer <key>` on every call. */
function bearerInterceptor(key) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', `Bearer ${key}`);
      next(metadata, listener);
    },
  });
}

/**
 * DeviceService and ActionService clients for `addr` (host:port, plaintext).
 * With `key`, every call carries it; without, calls go out unauthenticated.
 */
function connect(addr, key) {
  const api = loadApi();
  const options = key ? { interceptors: [bearerInterceptor(key)] } : {};
  const creds = grpc.credentials.createInsecure();
  return {
    devices: new api.DeviceService(addr, creds, options),
    actions: new api.ActionService(addr, creds, options),
    close() {
      this.devices.close();
      this.actions.close();
    },
  };
}

/** Calls a unary method as a promise, with a deadline. */
function call(client, method, request) {
  const deadline = new Date(Date.now() + RPC_TIMEOUT_MS);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// ---------------------------------------------------------------------------
// Error details
// ---------------------------------------------------------------------------

// A protobufjs root for decoding the details: google.rpc.Status holds them
// as google.protobuf.Any, whose type URL names the message to decode.
let detailsRoot;
function loadDetailsRoot() {
  if (!detailsRoot) {
    const root = new protobuf.Root();
    // Same include dirs as proto-loader: first match wins.
    root.resolvePath = (_origin, target) => {
      const found = INCLUDE_DIRS.map((d) => path.join(d, target)).find((p) => fs.existsSync(p));
      return found || target;
    };
    root.loadSync(
      ['google/rpc/status.proto', 'google/rpc/error_details.proto', 'switchyard/v1/errors.proto'],
      { keepCase: true },
    );
    detailsRoot = root;
  }
  return detailsRoot;
}

// Plain objects out of decoded messages, in the same shape as the clients'
// answers (enum names, 64-bit integers as strings).
const TO_OBJECT = { enums: String, longs: String, defaults: true, arrays: true, objects: true };

/**
 * The rich error of a failed call (`err` as grpc-js rejects it), decoded
 * from its `grpc-status-details-bin` trailer: `{ code, message, errorInfo,
 * conflictDetail, typeUrls }`. `errorInfo` and `conflictDetail` are null
 * when absent; `typeUrls` lists every detail, decoded or not. Returns null
 * when the error has no such trailer (a transport error, a deadline).
 */
function decodeStatusDetails(err) {
  const raw = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return null;
  const root = loadDetailsRoot();
  const Status = root.lookupType('google.rpc.Status');
  const status = Status.decode(raw[0]);
  const out = {
    code: status.code,
    message: status.message,
    errorInfo: null,
    conflictDetail: null,
    typeUrls: [],
  };
  for (const any of status.details) {
    out.typeUrls.push(any.type_url);
    // type.googleapis.com/<full message name>
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (name === 'google.rpc.ErrorInfo') {
      const T = root.lookupType(name);
      out.errorInfo = T.toObject(T.decode(any.value), TO_OBJECT);
    } else if (name === 'switchyard.v1.ConflictDetail') {
      const T = root.lookupType(name);
      out.conflictDetail = T.toObject(T.decode(any.value), TO_OBJECT);
    }
    // Other standard details (e.g. google.rpc.PreconditionFailure) are left
    // encoded here; declare them in protos/ to decode them the same way.
  }
  return out;
}

// ---------------------------------------------------------------------------
// The example
// ---------------------------------------------------------------------------

/** A google.protobuf.Timestamp (as the clients send and receive it) from Unix seconds. */
const timestamp = (seconds) => ({ seconds: String(seconds), nanos: 0 });
/** RFC 3339 text of a Timestamp, for printing. */
const iso = (ts) => new Date(Number(ts.seconds) * 1000).toISOString().replace('.000Z', 'Z');

/** Registers a simulated battery; the server picks its device_id. */
function createBattery(clients) {
  return call(clients.devices, 'CreateDevice', {
    device: { family: 'DEVICE_FAMILY_BATTERY', driver: 'simulated', timezone: 'UTC' },
  });
}

/** Pushes a 3 kW `command` from `start` to `end` (Unix seconds). */
function pushWindow(clients, deviceId, command, start, end, onConflict) {
  return call(clients.actions, 'PushAction', {
    device_id: deviceId,
    action: {
      command,
      power: { value: 3, unit: 'UNIT_KILOWATT' },
      start_time: timestamp(start),
      end_time: timestamp(end),
    },
    on_conflict: onConflict || 'CONFLICT_STRATEGY_UNSPECIFIED',
  });
}

/**
 * The whole story, on `clients` (from connect). `log` prints each step
 * (pass () => {} to keep quiet). Returns what happened, for the test:
 * `{ deviceId, charge, conflictError, details, queued }`.
 */
async function runExample(clients, log = console.log) {
  const device = await createBattery(clients);
  log(`registered simulated battery ${device.device_id}`);

  // Windows a few hours ahead, on whole minutes: a 2 h charge, then a 2 h
  // discharge that overlaps its second hour.
  const t0 = Math.floor(Date.now() / 1000 / 60) * 60;
  const charge = (await pushWindow(clients, device.device_id, 'COMMAND_CHARGE',
    t0 + 2 * HOUR_S, t0 + 4 * HOUR_S)).action;
  log(`booked ${charge.command} ${charge.action_id} from ${iso(charge.start_time)} to ${iso(charge.end_time)}`);

  const dischargeStart = t0 + 3 * HOUR_S;
  const dischargeEnd = t0 + 5 * HOUR_S;
  let conflictError;
  try {
    await pushWindow(clients, device.device_id, 'COMMAND_DISCHARGE', dischargeStart, dischargeEnd);
  } catch (err) {
    conflictError = err;
  }
  if (!conflictError) throw new Error('the overlapping discharge was booked: expected a conflict');

  // Branch on ErrorInfo.reason, never on the message text.
  const details = decodeStatusDetails(conflictError);
  log(`push refused: ${grpc.status[conflictError.code]} (${conflictError.code}): ${conflictError.details}`);
  if (!details || !details.errorInfo) throw conflictError; // not a switchyard error
  const { errorInfo, conflictDetail } = details;
  log(`  ErrorInfo: reason ${errorInfo.reason}, domain ${errorInfo.domain}`);
  for (const [k, v] of Object.entries(errorInfo.metadata).sort()) log(`    ${k} = ${v}`);
  if (errorInfo.reason !== 'ACTION_CONFLICT' || !conflictDetail) throw conflictError;
  log(`  ConflictDetail: ${conflictDetail.conflict_count} colliding action(s)`);
  for (const c of conflictDetail.conflicts) {
    log(`    ${c.action_id} ${c.state} ${c.command} on ${c.channel} from ${iso(c.start_time)} to ${iso(c.end_time)}`);
  }
  log(`    strategies: ${conflictDetail.strategies.join(', ')}`);

  // The existing plan wins: the discharge goes after the charge, keeping
  // its two hours.
  if (!conflictDetail.strategies.includes('CONFLICT_STRATEGY_QUEUE_AFTER')) throw conflictError;
  const resolved = await pushWindow(clients, device.device_id, 'COMMAND_DISCHARGE',
    dischargeStart, dischargeEnd, 'CONFLICT_STRATEGY_QUEUE_AFTER');
  const queued = resolved.action;
  log(`queued ${queued.command} ${queued.action_id} from ${iso(queued.start_time)} to ${iso(queued.end_time)}` +
    ` after ${resolved.queued_after_action_ids.join(', ')}`);

  return { deviceId: device.device_id, charge, conflictError, details, queued, resolved };
}

async function main() {
  const addr = process.env.SWITCHYARD_ADDR || '127.0.0.1:50051';
  const key = process.env.SWITCHYARD_API_KEY;
  if (!key) console.warn('SWITCHYARD_API_KEY is not set: calls go out without a key');
  const clients = connect(addr, key);
  try {
    await runExample(clients);
  } finally {
    clients.close();
  }
}

module.exports = {
  loadApi, bearerInterceptor, connect, call, decodeStatusDetails,
  createBattery, pushWindow, runExample, timestamp, iso,
};

if (require.main === module) {
  main().catch((err) => {
    const details = decodeStatusDetails(err);
    console.error(`failed: ${err.message}`);
    if (details && details.errorInfo) console.error(`  reason ${details.errorInfo.reason}`, details.errorInfo.metadata);
    process.exitCode = 1;
  });
}
