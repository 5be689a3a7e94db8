'use strict';
// A real Spectacles consumer, for tests/test_amqp_interop.py.
//
//   node consumer.js <user:pass@host:port> <group> <EVENT>...
//
// Subscribes to the events with @spectacles/brokers (which asserts the exchange <group> and the
// durable queues <group>:<EVENT> itself), decodes each message as the Spectacles libraries do
// (msgpack -> string, then JSON.parse), acks it, and prints one JSON line per message on stdout:
//   {"type":"event","event":...,"id":...,"kind":"string"} (and "fields" for GATEWAY_* events)
// Lines on stdin publish through the same broker: {"event":"SEND","data":"<JSON text>"} is
// broker.publish("SEND", data), i.e. a msgpack string, as a Spectacles bot sends commands.
// Prints {"type":"ready"} once subscribed, {"type":"published"} after each publish and
// {"type":"error",...} for anything unexpected.
const readline = require('readline');
const { Amqp } = require('@spectacles/brokers');

const [url, group, ...events] = process.argv.slice(2);
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

const broker = new Amqp(group, { reconnectTimeout: 500 });
broker.on('error', (err) => out({ type: 'error', message: String(err) }));

for (const event of events) {
  broker.on(event, (data, { ack }) => {
    let parsed = null;
    try {
      parsed = JSON.parse(data);
    } catch (err) {
      out({ type: 'error', message: `cannot parse ${event}: ${err}`, kind: typeof data });
    }
    const record = { type: 'event', event, id: parsed && parsed.id, kind: typeof data };
    // Control events come whole: the test reads their fields.
    if (event.startsWith('GATEWAY_')) record.fields = parsed;
    out(record);
    ack();
  });
}

(async () => {
  await broker.connect(url);
  await broker.subscribe(events);
  out({ type: 'ready' });
  const lines = readline.createInterface({ input: process.stdin });
  lines.on('line', (line) => {
    if (!line.trim()) return;
    const { event, data } = JSON.parse(line);
    broker.publish(event, data);
    out({ type: 'published', event });
  });
  lines.on('close', () => setTimeout(() => process.exit(0), 200));
})().catch((err) => {
  out({ type: 'error', message: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
