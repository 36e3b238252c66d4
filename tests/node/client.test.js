'use strict';
// A Node service calling cx-gateway through @grpc/grpc-js, with stubs loaded from proto/ by
// @grpc/proto-loader. It starts the built binary (`serve --sandbox`, a registered caller) and
// makes the calls a real caller makes. The regions between `[START name]` and `[END name]` are
// the snippets of docs/clients.md (scripts/check-doc-snippets.py keeps them equal).
//
// Usage: CXGW_BINARY=path/to/cx-gateway node --test client.test.js

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { after, before, test } = require('node:test');
const { setTimeout: delay } = require('node:timers/promises');
const { promisify } = require('node:util');

const { startGateway } = require('./gateway');

const ROOT = path.resolve(__dirname, '..', '..');
const PROTO_ROOT = path.join(ROOT, 'proto');
const SERVICE_CONFIG = path.join(ROOT, 'clients', 'service-config.json');

// [START node_stubs]
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// Stubs straight from the contract: field names become lowerCamelCase (page_size: pageSize),
// enums are their names, int64 values strings, and unset fields take their defaults.
const definition = protoLoader.loadSync(
  [
    'cx/gateway/v1/customer_service.proto',
    'cx/gateway/v1/delivery_service.proto',
    'cx/gateway/v1/event_service.proto',
    'cx/gateway/v1/feedback_stream.proto',
  ],
  { includeDirs: [PROTO_ROOT], longs: String, enums: String, defaults: true, oneofs: true },
);
const cx = grpc.loadPackageDefinition(definition).cx.gateway.v1;
// [END node_stubs]

// [START node_error_details]
const protobuf = require('protobufjs');
const { getProtoPath } = require('google-proto-files');

// google.rpc types from googleapis; detail fields become lowerCamelCase like the stubs' fields.
const rpcTypes = new protobuf.Root().loadSync(
  [getProtoPath('rpc', 'status.proto'), getProtoPath('rpc', 'error_details.proto')],
  { keepCase: false },
);
const RpcStatus = rpcTypes.lookupType('google.rpc.Status');

// The google.rpc details of a failed call (ErrorInfo, BadRequest, RetryInfo...), by type name.
function errorDetails(error) {
  const [bytes] = error.metadata.get('grpc-status-details-bin');
  const details = {};
  if (!bytes) return details;
  for (const any of RpcStatus.decode(bytes).details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = rpcTypes.lookupType(typeName);
    details[type.name] = type.toObject(type.decode(any.value), { defaults: true });
  }
  return details;
}
// [END node_error_details]

let gateway;
let token;
let address;

before(async () => {
  const binary = process.env.CXGW_BINARY;
  assert.ok(binary, 'set CXGW_BINARY to the built cx-gateway');
  gateway = await startGateway(path.resolve(binary), [
    'read',
    'events:write',
    'deliveries:read',
    'feedback:subscribe',
  ]);
  token = gateway.token;
  address = gateway.grpc;
});

after(async () => {
  if (gateway) assert.equal(await gateway.stop(), 0, 'the gateway drains and exits 0');
});

// [START node_auth]
// Every call names its caller with a bearer token (never logged by the gateway).
function authMetadata() {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

// Unary calls as promises: (request, metadata, options) => Promise<response>.
function unary(client, method) {
  return promisify(client[method]).bind(client);
}
// [END node_auth]

function insecure() {
  return grpc.credentials.createInsecure();
}

test('a unary call with a bearer token and a deadline', { timeout: 60_000 }, async () => {
  const customers = new cx.CustomerService(address, insecure());
  // [START node_unary]
  const listCustomers = unary(customers, 'listCustomers');
  const page = await listCustomers({ pageSize: 5 }, authMetadata(), {
    deadline: Date.now() + 10_000,
  });
  // [END node_unary]
  assert.equal(page.customers.length, 5);
  assert.ok(page.customers.every((c) => c.email.includes('@')));
  assert.notEqual(page.nextPageToken, '');

  // The same call without the token is refused: the gateway really checks it.
  await assert.rejects(listCustomers({ pageSize: 5 }, new grpc.Metadata(), {}), (error) => {
    assert.equal(error.code, grpc.status.UNAUTHENTICATED);
    assert.equal(errorDetails(error).ErrorInfo.reason, 'CALLER_UNAUTHENTICATED');
    return true;
  });
  customers.close();
});

test('a bad request carries ErrorInfo and BadRequest field violations', { timeout: 60_000 }, async () => {
  const events = new cx.EventService(address, insecure());
  const trackEvent = unary(events, 'trackEvent');
  // [START node_bad_request]
  try {
    await trackEvent({ event: { name: '' } }, authMetadata(), { deadline: Date.now() + 10_000 });
    assert.fail('an event without a name or a customer is refused');
  } catch (error) {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    const { ErrorInfo, BadRequest } = errorDetails(error);
    assert.equal(ErrorInfo.domain, 'cx-gateway');
    assert.equal(ErrorInfo.reason, 'INVALID_FIELDS');
    const fields = BadRequest.fieldViolations.map((violation) => violation.field);
    assert.deepEqual(fields.sort(), ['event.customer_id', 'event.name']);
  }
  // [END node_bad_request]
  events.close();
});

test('an async write is followed with DeliveryService/GetDelivery', { timeout: 60_000 }, async () => {
  const events = new cx.EventService(address, insecure());
  const deliveries = new cx.DeliveryService(address, insecure());
  const trackEvent = unary(events, 'trackEvent');
  const getDelivery = unary(deliveries, 'getDelivery');
  const customerId = `node-${process.pid}`;
  // [START node_async_write]
  // Acknowledged once durably queued; the idempotency key makes a repeated call (a retry after a
  // lost answer) return the first call's delivery instead of queueing the event twice.
  const request = {
    event: { customerId, name: 'trial_started' },
    options: { mode: 'DELIVERY_MODE_ASYNC', idempotencyKey: `trial-${customerId}` },
  };
  const accepted = await trackEvent(request, authMetadata(), { deadline: Date.now() + 10_000 });
  const again = await trackEvent(request, authMetadata(), { deadline: Date.now() + 10_000 });
  assert.equal(again.deliveryId, accepted.deliveryId);

  // Follow the delivery until it leaves the queue.
  let delivery;
  for (;;) {
    ({ delivery } = await getDelivery({ deliveryId: accepted.deliveryId }, authMetadata(), {
      deadline: Date.now() + 10_000,
    }));
    if (['DELIVERY_STATE_DELIVERED', 'DELIVERY_STATE_DEAD_LETTERED'].includes(delivery.state)) break;
    await delay(100);
  }
  // [END node_async_write]
  assert.equal(delivery.state, 'DELIVERY_STATE_DELIVERED');
  assert.equal(delivery.method, '/cx.gateway.v1.EventService/TrackEvent');
  assert.equal(delivery.idempotencyKey, `trial-${customerId}`);
  const { events: received } = await gateway.sandbox('GET', '/retainly/events');
  const ours = received.filter((e) => String(e.customerId) === customerId);
  assert.equal(ours.length, 1, 'retainly received the event once');
  assert.equal(ours[0].event, 'trial_started');
  events.close();
  deliveries.close();
});

test('a FeedbackStream subscription resumes by cursor with no gap and no duplicate', { timeout: 60_000 }, async () => {
  const feedbackStream = new cx.FeedbackStream(address, insecure());
  // [START node_feedback_stream]
  // Reads a subscription, handing each event to `handle` until it returns true, and returns the
  // cursor to resume from: the last message processed (event or heartbeat). Store it with the
  // effect of processing; subscribe({ cursor }) later continues right after it.
  async function consume(start, handle) {
    const call = feedbackStream.subscribe(start, authMetadata()); // no deadline: long-lived
    let cursor = start.cursor;
    for await (const message of call) {
      if (message.heartbeat) {
        cursor = message.heartbeat.cursor;
      } else {
        const done = await handle(message.feedbackEvent);
        cursor = message.feedbackEvent.cursor;
        if (done) break; // leaving the loop cancels the call
      }
    }
    return cursor;
  }
  // [END node_feedback_stream]

  // The start of the log before any response arrives: the first heartbeat of a LATEST stream.
  let origin;
  for await (const message of feedbackStream.subscribe({ position: 'STREAM_POSITION_LATEST' }, authMetadata())) {
    origin = message.heartbeat.cursor;
    break;
  }
  const simulate = async (count) => {
    const { feedback } = await gateway.sandbox('POST', '/feedback/simulate', { count });
    return new Set(feedback.map((item) => item.id));
  };
  // Collects events until every id of `wanted` has been seen.
  const until = (wanted, into) => (event) => {
    into.push(event);
    wanted.delete(event.feedback.feedbackId);
    return wanted.size === 0;
  };

  const firstIds = await simulate(3);
  const expectedFirst = new Set(firstIds);
  const first = [];
  const resumeAt = await consume({ cursor: origin }, until(firstIds, first));

  const secondIds = await simulate(3);
  const expectedSecond = new Set(secondIds);
  const second = [];
  await consume({ cursor: resumeAt }, until(secondIds, second));

  const seen = [...first, ...second];
  const ids = (events) => events.map((event) => event.feedback.feedbackId);
  assert.deepEqual(new Set(ids(first).filter((id) => expectedFirst.has(id))), expectedFirst);
  assert.deepEqual(new Set(ids(second).filter((id) => expectedSecond.has(id))), expectedSecond);
  // No duplicate: sequences strictly increase across the reconnect.
  const sequences = seen.map((event) => Number(event.sequence));
  sequences.forEach((sequence, i) => i === 0 || assert.ok(sequence > sequences[i - 1], `${sequences}`));
  // No gap: one uninterrupted stream from the same origin holds exactly the same entries.
  const last = sequences[sequences.length - 1];
  const whole = [];
  await consume({ cursor: origin }, (event) => {
    whole.push(event);
    return Number(event.sequence) >= last;
  });
  assert.deepEqual(
    whole.map((event) => [event.sequence, event.feedback.feedbackId, event.kind]),
    seen.map((event) => [event.sequence, event.feedback.feedbackId, event.kind]),
  );
  feedbackStream.close();
});

test('the service config retries a read the upstream refused', { timeout: 60_000 }, async () => {
  // [START node_service_config]
  // The gateway's published service config: per-method timeouts, and retries where they are
  // safe, paced by the gateway's grpc-retry-pushback-ms (its RetryInfo delay).
  const serviceConfig = fs.readFileSync(SERVICE_CONFIG, 'utf8');
  const customers = new cx.CustomerService(address, grpc.credentials.createInsecure(), {
    'grpc.service_config': serviceConfig,
  });
  // [END node_service_config]
  const listCustomers = unary(customers, 'listCustomers');
  const labels = { rpc_method: 'ListCustomers', rpc_service: 'cx.gateway.v1.CustomerService' };
  const callsBefore = await gateway.metric('rpc_server_calls_total', labels);
  const answeredBefore = await gateway.upstreamCount('/api/v2/customers', 200);

  // Retently refuses the next four requests (429, Retry-After: 1). The gateway's own retries use
  // up its four attempts on them and answer RESOURCE_EXHAUSTED with RetryInfo; the client's
  // policy calls again after the pushback and that call reaches a willing upstream.
  await gateway.sandbox('PUT', '/faults/retently', { burst429: 4, burstRetryAfterSecs: 1 });
  try {
    const page = await listCustomers({ pageSize: 3 }, authMetadata(), {});
    assert.equal(page.customers.length, 3);
  } finally {
    await gateway.sandbox('DELETE', '/faults/retently');
  }
  const stats = await gateway.sandbox('GET', '/stats');
  assert.equal(stats.faults.retently.forced429, 4, 'all four refusals were met');
  assert.equal(await gateway.upstreamCount('/api/v2/customers', 200), answeredBefore + 1);
  // The gateway counts a call once its answer is written, which may trail the client's view by a
  // moment: wait for the count to settle (bounded), then check it.
  let calls;
  for (let i = 0; i < 50; i += 1) {
    calls = (await gateway.metric('rpc_server_calls_total', labels)) - callsBefore;
    if (calls >= 2) break;
    await delay(100);
  }
  assert.equal(calls, 2, 'one call of the application reached the gateway twice');
  const refused = await gateway.metric('rpc_server_calls_total', {
    ...labels,
    rpc_grpc_status_code: '8',
  });
  assert.equal(refused, 1, 'the first one was answered RESOURCE_EXHAUSTED');
  customers.close();
});
