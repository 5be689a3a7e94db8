'use strict';
// A Node consumer of spectacles-gateway's RabbitMQ output with @spectacles/brokers
// (docs/consumers.md).
//
//   npm ci && AMQP_URL=amqp://guest:guest@localhost:5672 BROKER_GROUP=gateway \
//     node consumer.js MESSAGE_CREATE GUILD_CREATE
//
// The library declares the exchange <group> and the durable queues <group>:<EVENT>, decodes each
// body (a msgpack string) and hands over the JSON text of Discord's `d`. An event whose AMQP
// message_id was handled already (a resume replays what was not yet confirmed) is dropped; the
// library does not pass message properties on, so they are read from the channel's deliveries
// (the one wrapper below). Every STATUS_EVERY new events (default 50) a presence update goes back
// as a SEND routed by the event's guild, published as Spectacles bots do (a msgpack string).
// Prints one JSON line per event, duplicate and command on stdout.
const { Amqp } = require('@spectacles/brokers');

const url = (process.env.AMQP_URL || 'amqp://guest:guest@localhost:5672').replace(/^amqp:\/\//, '');
const group = process.env.BROKER_GROUP || 'gateway';
const every = Number(process.env.STATUS_EVERY || 50);
const events = process.argv.slice(2).length ? process.argv.slice(2) : ['MESSAGE_CREATE'];
const out = (record) => process.stdout.write(`${JSON.stringify(record)}\n`);

// The last 100,000 message ids, oldest first (a Map keeps insertion order).
const seen = new Map();
const firstTime = (id) => {
  if (seen.has(id)) return false;
  seen.set(id, true);
  if (seen.size > 100000) seen.delete(seen.keys().next().value);
  return true;
};

const broker = new Amqp(group, { reconnectTimeout: 1000 });
broker.on('error', (err) => out({ type: 'error', message: String(err) }));
let delivery = null; // the properties of the message being handled
let handled = 0;

for (const event of events) {
  broker.on(event, (text, { ack }) => {
    const messageId = delivery && delivery.messageId;
    if (messageId && !firstTime(messageId)) {
      out({ type: 'duplicate', event, message_id: messageId });
      ack();
      return;
    }
    const data = JSON.parse(text);
    const headers = (delivery && delivery.headers) || {};
    handled += 1;
    out({ type: 'event', event, message_id: messageId, shard_id: headers.shard_id, id: data.id });
    if (handled % every === 0 && data.guild_id) {
      const presence = {
        since: null, activities: [{ name: `${handled} events`, type: 3 }], status: 'online', afk: false,
      };
      broker.publish('SEND', JSON.stringify({ guild_id: data.guild_id, packet: { op: 3, d: presence } }));
      out({ type: 'command', guild_id: data.guild_id, count: handled });
    }
    ack();
  });
}

(async () => {
  await broker.connect(url);
  // Keep each delivery's properties (message_id, headers) for the handler, which the library
  // calls synchronously from its consumer callback.
  const consume = broker.channel.consume.bind(broker.channel);
  broker.channel.consume = (queue, onMessage, options) => consume(queue, (msg) => {
    delivery = msg && msg.properties;
    onMessage(msg);
  }, options);
  await broker.subscribe(events);
  out({ type: 'ready' });
})().catch((err) => {
  out({ type: 'error', message: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
process.on('SIGTERM', () => process.exit(0));
