// A remote-controlled phoenix.js client for the end-to-end tests.
//
// Reads one JSON command per line on stdin and writes one JSON event per line
// on stdout, so Python tests drive the real npm `phoenix` client (with `ws` as
// Node's WebSocket) and assert on exactly what it saw. Binary payloads travel
// as {"$binary": "<base64>"} in both directions.
import { createRequire } from "node:module";
import readline from "node:readline";

const require = createRequire(import.meta.url);
const { Socket, LongPoll, Presence } = require("phoenix");
const WebSocket = require("ws");

const sockets = new Map();
const channels = new Map();

function emit(ev) {
  process.stdout.write(JSON.stringify(ev) + "\n");
}

function toWire(value) {
  if (value && typeof value === "object" && typeof value.$binary === "string") {
    const buf = Buffer.from(value.$binary, "base64");
    return buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  }
  return value;
}

function fromWire(value) {
  if (value instanceof ArrayBuffer) return { $binary: Buffer.from(value).toString("base64") };
  if (ArrayBuffer.isView(value)) return { $binary: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("base64") };
  if (value && typeof value === "object" && !Array.isArray(value)) {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = fromWire(v);
    return out;
  }
  return value;
}

function memoryStorage() {
  const data = new Map();
  return { getItem: (k) => (data.has(k) ? data.get(k) : null), setItem: (k, v) => data.set(k, String(v)), removeItem: (k) => data.delete(k) };
}

function makeSocket(cmd) {
  const o = cmd.opts || {};
  const opts = {
    params: cmd.params || {},
    transport: o.longpoll ? LongPoll : WebSocket,
    sessionStorage: memoryStorage(),
  };
  if (o.longPollFallbackMs !== undefined) {
    opts.longPollFallbackMs = o.longPollFallbackMs;
    opts.transport = WebSocket;
  }
  if (o.cookie !== undefined) {
    // Node's WebSocket has no cookie jar: send the browser's Cookie header by hand.
    opts.transport = class extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols, { headers: { Cookie: o.cookie } });
      }
    };
  }
  if (o.authToken !== undefined) opts.authToken = o.authToken;
  if (o.heartbeatIntervalMs !== undefined) opts.heartbeatIntervalMs = o.heartbeatIntervalMs;
  if (o.timeout !== undefined) opts.timeout = o.timeout;
  if (o.longpollerTimeout !== undefined) opts.longpollerTimeout = o.longpollerTimeout;
  if (o.vsn !== undefined) opts.vsn = o.vsn;
  if (o.reconnectAfterMs !== undefined) opts.reconnectAfterMs = () => o.reconnectAfterMs;
  if (o.rejoinAfterMs !== undefined) opts.rejoinAfterMs = () => o.rejoinAfterMs;
  const socket = new Socket(cmd.url, opts);
  const id = cmd.id;
  socket.onOpen(() => emit({ ev: "open", socket: id, transport: socket.transport === LongPoll ? "longpoll" : "websocket" }));
  socket.onClose((e) => emit({ ev: "close", socket: id, code: e && e.code, reason: e && e.reason, wasClean: e && e.wasClean }));
  socket.onError((e) => emit({ ev: "error", socket: id, detail: e && (e.message || e.reason || String(e)) }));
  socket.onMessage((m) => emit({ ev: "frame", socket: id, msg: { join_ref: m.join_ref, ref: m.ref, topic: m.topic, event: m.event, payload: fromWire(m.payload) } }));
  sockets.set(id, socket);
  if (cmd.connect !== false) socket.connect();
}

function makeChannel(cmd) {
  const socket = sockets.get(cmd.socket);
  // track: an event name whose ref (a history offset) is remembered and sent back as
  // `since` on every (re)join, through phoenix.js's params function (docs/recovery.md).
  let last = cmd.params && cmd.params.since !== undefined ? cmd.params.since : null;
  const params = cmd.track ? () => ({ ...(cmd.params || {}), since: last }) : cmd.params || {};
  const channel = socket.channel(cmd.topic, params);
  const id = cmd.id;
  const original = channel.onMessage.bind(channel);
  channel.onMessage = (event, payload, ref, joinRef) => {
    emit({ ev: "chan", channel: id, event, payload: fromWire(payload), ref: ref === undefined ? null : ref });
    return original(event, payload, ref, joinRef);
  };
  if (cmd.track) channel.on(cmd.track, (_payload, ref) => { if (ref) last = ref; });
  channel.onClose(() => emit({ ev: "chan_close", channel: id }));
  channel.onError((reason) => emit({ ev: "chan_error", channel: id, reason: fromWire(reason) }));
  channels.set(id, channel);
}

function watch(push, req) {
  for (const status of ["ok", "error", "timeout"]) {
    push.receive(status, (response) => emit({ ev: "reply", req, status, response: fromWire(response === undefined ? null : response) }));
  }
}

const opt = (v) => (v === null ? undefined : v);

const commands = {
  socket: makeSocket,
  channel: makeChannel,
  connect: (c) => sockets.get(c.socket).connect(),
  disconnect: (c) => sockets.get(c.socket).disconnect(() => emit({ ev: "disconnected", socket: c.socket }), c.code, c.reason),
  join: (c) => watch(channels.get(c.channel).join(opt(c.timeout)), c.req),
  push: (c) => watch(channels.get(c.channel).push(c.event, toWire(c.payload), opt(c.timeout)), c.req),
  leave: (c) => watch(channels.get(c.channel).leave(opt(c.timeout)), c.req),
  // Join, and the moment its ok reply arrives push on another channel (no round trip through the test).
  join_then_push: (c) => {
    const join = channels.get(c.channel).join(opt(c.timeout));
    watch(join, c.req);
    join.receive("ok", () => watch(channels.get(c.then).push(c.event, toWire(c.payload)), c.req + ":push"));
  },
  ping: (c) => sockets.get(c.socket).ping((rtt) => emit({ ev: "pong", req: c.req, rtt })),
  // phoenix.js's Presence on a channel (before its join): every sync reports the whole list.
  presence: (c) => {
    const presence = new Presence(channels.get(c.channel));
    presence.onSync(() => emit({ ev: "presence_sync", channel: c.channel, list: presence.list((key, { metas }) => ({ key, metas })) }));
  },
  state: (c) => emit({ ev: "state", req: c.req, socket: sockets.has(c.socket) ? sockets.get(c.socket).connectionState() : null, channel: channels.has(c.channel) ? channels.get(c.channel).state : null }),
  exit: () => process.exit(0),
};

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
    commands[cmd.cmd](cmd);
  } catch (err) {
    emit({ ev: "driver_error", cmd: cmd && cmd.cmd, error: String(err && err.stack || err) });
  }
});
rl.on("close", () => process.exit(0));
emit({ ev: "ready" });
