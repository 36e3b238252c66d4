'use strict';
// Segment's own Node library (@segment/analytics-node from npm) against the gateway's Segment
// intake: configured with the gateway's host and a write key, nothing else. The library always
// sends batches to /v1/batch with HTTP Basic auth, as it does to Segment.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const { Analytics } = require('@segment/analytics-node');

const BINARY = process.env.CXGW_BINARY;
const WRITE_KEY = `wk-node-${crypto.randomBytes(16).toString('hex')}`;
let gateway;

async function startGateway() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cxgw-segment-node-'));
  const keyFile = path.join(dir, 'web.key');
  fs.writeFileSync(keyFile, `${WRITE_KEY}\n`);
  const callers = [
    '[[caller]]',
    'name = "node-shop"',
    'permissions = ["events:write", "customers:write"]',
    `segment_write_key_files = [${JSON.stringify(keyFile)}]`,
  ].join('\n');
  const child = spawn(BINARY, ['serve', '--sandbox'], {
    env: {
      ...process.env,
      CXGW_GRPC_ADDR: '127.0.0.1:0',
      CXGW_ADMIN_ADDR: '127.0.0.1:0',
      CXGW_SEGMENT_LISTEN_ADDR: '127.0.0.1:0',
      CXGW_SANDBOX_ADDR: '127.0.0.1:0',
      CXGW_LOG_FORMAT: 'json',
      CXGW_SHUTDOWN_GRACE: '5s',
      CXGW_CALLERS: callers,
      CXGW_FEEDBACK_SYNC: 'false',
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const log = [];
  const addresses = await new Promise((resolve, reject) => {
    const found = {};
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      log.push(line);
      let entry;
      try {
        entry = JSON.parse(line);
      } catch {
        return;
      }
      if (entry.sandbox) found.sandbox = entry.sandbox.replace(/\/$/, '');
      if (entry.message === 'segment intake serving') found.segment = `http://${entry.addr}`;
      if (entry.message === 'gateway serving') resolve(found);
    });
    child.on('exit', (code) => reject(new Error(`the gateway exited early (${code}):\n${log.join('\n')}`)));
  });
  return {
    segment: addresses.segment,
    sandboxUrl: addresses.sandbox,
    log,
    dir,
    async sandbox(route) {
      const response = await fetch(`${addresses.sandbox}/_sandbox${route}`);
      return response.json();
    },
    async stop() {
      const exited = new Promise((resolve) => child.on('exit', resolve));
      child.kill('SIGTERM');
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Polls the sandbox (another process, which announces nothing) until `check` returns a value. */
async function eventually(what, check, limitMs = 30000) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function eventsOf(user) {
  const { events } = await gateway.sandbox('/retainly/events');
  return events.filter((event) => event.customerId === user);
}

before(async () => {
  gateway = await startGateway();
});

after(async () => {
  await gateway.stop();
  assert.ok(!gateway.log.join('\n').includes(WRITE_KEY), 'the write key leaked into the log');
});

test('identify, track and a batch reach the upstreams, in order', async () => {
  const errors = [];
  const [writeKey, intake] = [WRITE_KEY, gateway.segment];
  // [START segment_node]
  const analytics = new Analytics({ writeKey, host: intake, flushAt: 4, maxRetries: 0 });
  analytics.on('error', (error) => errors.push(error));
  analytics.identify({ userId: 'node-1', traits: { email: 'node.one@example.com', name: 'No De', plan: 'team' } });
  for (const step of ['Signed Up', 'Invited Team', 'Upgraded']) {
    analytics.track({ userId: 'node-1', event: step, properties: { source: 'node' } });
  }
  await analytics.closeAndFlush();
  // [END segment_node]
  assert.deepEqual(errors, []);
  const events = await eventually('three events', async () => {
    const found = await eventsOf('node-1');
    return found.length === 3 && found;
  });
  assert.deepEqual(
    events.map((event) => event.event),
    ['Signed Up', 'Invited Team', 'Upgraded'],
  );
  const customer = await eventually('the Retently customer', async () => {
    const { customers } = await gateway.sandbox('/retently/customers');
    return customers.find((c) => c.email === 'node.one@example.com');
  });
  assert.equal(customer.firstName, 'No');
  const retainly = await eventually('the Retainly customer', async () => {
    const response = await fetch(`${gateway.sandboxUrl}/_sandbox/retainly/customers/node-1`);
    return response.ok && response.json();
  });
  assert.equal(retainly.fields.plan, 'team');
});

test('a wrong write key is refused', async () => {
  const statuses = [];
  const errors = [];
  const analytics = new Analytics({ writeKey: 'wk-not-a-key', host: gateway.segment, flushAt: 1, maxRetries: 0 });
  analytics.on('http_response', (response) => statuses.push(response.status));
  analytics.on('error', (error) => errors.push(error.code));
  analytics.track({ userId: 'node-wrong', event: 'Anything' });
  await analytics.closeAndFlush();
  assert.deepEqual(statuses, [401]);
  assert.deepEqual(errors, ['delivery_failure']);
  assert.deepEqual(await eventsOf('node-wrong'), []);
});

test('a repeated messageId makes no second upstream call', async () => {
  const analytics = new Analytics({ writeKey: WRITE_KEY, host: gateway.segment, flushAt: 1, maxRetries: 0 });
  const messageId = crypto.randomUUID();
  for (let attempt = 0; attempt < 3; attempt += 1) {
    analytics.track({ userId: 'node-dup', event: 'Trial Started', messageId });
    await analytics.flush();
  }
  // A later event of the same customer: the outbox delivers a customer's events in order, so
  // once it arrived any duplicate queued before it would have arrived too.
  analytics.track({ userId: 'node-dup', event: 'Trial Ended' });
  await analytics.closeAndFlush();
  const events = await eventually('the later event', async () => {
    const found = await eventsOf('node-dup');
    return found.some((event) => event.event === 'Trial Ended') && found;
  });
  assert.deepEqual(
    events.map((event) => event.event),
    ['Trial Started', 'Trial Ended'],
  );
});
