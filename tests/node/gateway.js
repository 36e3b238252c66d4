'use strict';
// Starts the built gateway with `serve --sandbox` for a client test: loopback port 0 for gRPC and
// admin (the bound addresses are read back from the "gateway serving" log line, so no port is
// guessed), one registered caller with a fresh bearer token, feedback fed by the sandbox's
// webhook (no poller, so the sandbox sees only the requests a test makes), and the embedded
// sandbox's admin API for fault injection and request counters.

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const readline = require('node:readline');

const WEBHOOK_SECRET = crypto.randomBytes(16).toString('hex');

async function startGateway(binary, permissions) {
  const token = crypto.randomBytes(32).toString('base64url');
  const digest = crypto.createHash('sha256').update(token).digest('hex');
  const callers = [
    '[[caller]]',
    'name = "node-client"',
    `token_sha256 = ["${digest}"]`,
    `permissions = ${JSON.stringify(permissions)}`,
  ].join('\n');
  const child = spawn(binary, ['serve', '--sandbox'], {
    env: {
      ...process.env,
      CXGW_GRPC_ADDR: '127.0.0.1:0',
      CXGW_ADMIN_ADDR: '127.0.0.1:0',
      CXGW_LOG_FORMAT: 'json',
      CXGW_SHUTDOWN_GRACE: '5s',
      CXGW_CALLERS: callers,
      CXGW_FEEDBACK_SYNC: 'false',
      CXGW_WEBHOOK_SECRET: WEBHOOK_SECRET,
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const log = [];
  const started = new Promise((resolve, reject) => {
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
      if (entry.message === 'gateway serving') {
        resolve({ ...found, grpc: entry.grpc_addr, admin: `http://${entry.admin_addr}` });
      }
    });
    child.on('exit', (code) => reject(new Error(`the gateway exited early (${code}):\n${log.join('\n')}`)));
  });
  const addresses = await started;
  const gateway = {
    ...addresses,
    token,
    log,
    async sandbox(method, path, body) {
      const response = await fetch(`${addresses.sandbox}/_sandbox${path}`, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (!response.ok) throw new Error(`sandbox ${method} ${path}: http ${response.status}`);
      return response.status === 204 ? null : response.json();
    },
    // Upstream requests the sandbox answered, by route template and status.
    async upstreamCount(route, status) {
      const stats = await gateway.sandbox('GET', '/stats');
      return stats.requests
        .filter((r) => r.route === route && r.status === status)
        .reduce((sum, r) => sum + r.count, 0);
    },
    // A counter of the gateway's Prometheus text, summed over the series matching all labels.
    async metric(name, labels) {
      const text = await (await fetch(`${addresses.admin}/metrics`)).text();
      let sum = 0;
      for (const line of text.split('\n')) {
        if (!line.startsWith(`${name}{`)) continue;
        if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) {
          sum += Number(line.slice(line.lastIndexOf(' ') + 1));
        }
      }
      return sum;
    },
    async stop() {
      if (child.exitCode !== null) return child.exitCode;
      const exited = new Promise((resolve) => child.on('exit', resolve));
      child.kill('SIGTERM');
      return exited;
    },
  };
  // New feedback reaches the gateway through the webhook at once, the way Retently pushes it.
  await gateway.sandbox('PUT', '/webhook', {
    url: `${addresses.admin}/webhooks/retently`,
    headers: { 'x-cx-webhook-secret': WEBHOOK_SECRET },
  });
  return gateway;
}

module.exports = { startGateway };
