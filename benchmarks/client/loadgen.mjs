// The load generator of the benchmarks: many WebSocket clients in one Node process.
//
//   node loadgen.mjs '<json config>'
//
// Protocols: "phx" (phx_gevent) and "raw" (the raw reference) speak the Phoenix V2
// JSON wire protocol directly over `ws`, like phoenix.js does (vsn=2.0.0, join with
// join_ref = ref, heartbeats on the "phoenix" topic, a missing heartbeat reply is an
// error); "sio" (Flask-SocketIO) uses socket.io-client with the websocket transport.
//
// Workloads: "fanout" (latency at a fixed rate, then saturation), "pushreply",
// "conns" (memory per connection, then holding them with heartbeats), "storm" (N clients
// connect and join at once while `base` connected clients heartbeat).
// The server's CPU and RSS are read from /proc (config.serverPids), and this
// process's own CPU use is reported so a saturated client is visible.
// Progress goes to stderr; the result is one JSON object on stdout.
// Every phase has a deadline: the process always ends by itself.

import http from "node:http";
import fs from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import WebSocket from "ws";

const cfg = JSON.parse(process.argv[2] || "{}");
const PROTO = cfg.proto || "phx";
const PORT = cfg.port;
const HOST = cfg.host || "127.0.0.1";
const TOPIC = cfg.topic || "room:lobby";
const CLK_TCK = cfg.clkTck || 100;
const SERVER_PIDS = cfg.serverPids || [];
const PAD = "x".repeat(cfg.pad ?? 40);
const now = () => performance.now();

function log(...args) {
  process.stderr.write(`[loadgen ${PROTO}] ${args.join(" ")}\n`);
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor(pred, timeoutMs, what) {
  const end = now() + timeoutMs;
  while (!pred()) {
    if (now() > end) throw new Error(`timeout waiting for ${what}`);
    await sleep(20);
  }
}

// -- server measurements from /proc ---------------------------------------------------

function serverCpuSeconds() {
  let total = 0;
  for (const pid of SERVER_PIDS) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, "latin1");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      total += (Number(fields[11]) + Number(fields[12])) / CLK_TCK; // utime + stime
    } catch {
      /* process gone */
    }
  }
  return total;
}

function serverRssKb() {
  let total = 0;
  for (const pid of SERVER_PIDS) {
    try {
      const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, "latin1"));
      if (m) total += Number(m[1]);
    } catch {
      /* process gone */
    }
  }
  return total;
}

function coreTimes() {
  // Per core from /proc/stat: [user+nice, system, irq+softirq, idle+iowait, steal] in ticks.
  const out = {};
  for (const line of fs.readFileSync("/proc/stat", "latin1").split("\n")) {
    const m = /^cpu(\d+) (.*)/.exec(line);
    if (!m) continue;
    const f = m[2].trim().split(/\s+/).map(Number);
    out[m[1]] = [f[0] + f[1], f[2], f[5] + f[6], f[3] + f[4], f[7] || 0];
  }
  return out;
}

class Meter {
  // Wall time, this process's CPU, the server's CPU and each core's use over a window.
  start() {
    this.t0 = now();
    this.c0 = process.cpuUsage();
    this.s0 = serverCpuSeconds();
    this.k0 = coreTimes();
  }
  cores() {
    // Fractions of each core's time: busy (all but idle), of which softirq (network
    // processing that no process is charged for), and idle.
    const k1 = coreTimes();
    const out = {};
    for (const [core, t1] of Object.entries(k1)) {
      const t0 = this.k0[core];
      if (!t0) continue;
      const d = t1.map((v, i) => v - t0[i]);
      const total = d.reduce((a, b) => a + b, 0) || 1;
      out[core] = { busy: 1 - d[3] / total, softirq: d[2] / total, idle: d[3] / total };
    }
    return out;
  }
  stop() {
    const wall = (now() - this.t0) / 1000;
    const c = process.cpuUsage(this.c0);
    const clientCpu = (c.user + c.system) / 1e6;
    const serverCpu = serverCpuSeconds() - this.s0;
    const cores = this.cores();
    let busy = 0;
    for (const c of Object.values(cores)) busy += c.busy - c.softirq;
    return {
      cores,
      // CPU (in cores) used by processes other than the server and this client: other
      // engineers' work on a shared machine. Large values mean a disturbed run.
      otherCpu: Math.max(0, busy - clientCpu / wall - serverCpu / wall),
      wall,
      clientCpu: clientCpu / wall, // fraction of one core
      serverCpu: serverCpu / wall,
      serverCpuSeconds: serverCpu,
      clientSaturated: clientCpu / wall >= 0.9,
    };
  }
}

function percentiles(arr, n) {
  if (n === 0) return { n: 0 };
  const a = arr.subarray(0, n).sort();
  const q = (p) => a[Math.min(n - 1, Math.floor(p * n))];
  return { n, p50: q(0.5), p90: q(0.9), p99: q(0.99), max: a[n - 1] };
}

// -- shared state -----------------------------------------------------------------------

const stats = {
  delivered: 0, // broadcasts received, all connections
  polls: 0, // long-poll responses received (phx GETs, Socket.IO polling GETs), all connections
  latency: null, // Float64Array while measuring
  latN: 0,
  errors: 0,
  closes: 0,
  hbSent: 0,
  hbOk: 0,
  hbMissed: 0,
  watchBroadcast: false, // manyconns: wall-clock times of the one broadcast to everybody
  bcastN: 0,
  bcastFirst: 0,
  bcastLast: 0,
  presenceFrames: 0,
  presenceBytes: 0,
  hbRtt: null, // Float64Array of heartbeat round trips while measuring (storm)
  hbRttN: 0,
  nodes: {},
};

function recordLatency(t) {
  const lat = stats.latency;
  if (lat !== null && stats.latN < lat.length) lat[stats.latN++] = now() - t;
}

// -- Phoenix V2 over ws (phx and raw) -----------------------------------------------------

const BROADCAST_T = Buffer.from('"t":');

class PhxConn {
  constructor(i) {
    this.i = i;
    this.ref = 0;
    this.count = 0;
    this.pending = new Map();
    this.joinRef = null;
    this.hbRef = null;
    this.hbTimer = null;
    this.open = false;
    this.closed = false;
  }

  connect() {
    return new Promise((resolve, reject) => {
      const url = `ws://${HOST}:${PORT}/socket/websocket?user=u${this.i}&vsn=2.0.0`;
      const ws = (this.ws = new WebSocket(url, {
        perMessageDeflate: false,
        skipUTF8Validation: true,
        handshakeTimeout: 30000,
        // Several 127.0.0.x source addresses: ~28,000 ephemeral ports each (manyconns.py).
        ...(cfg.localAddresses ? { localAddress: cfg.localAddresses[this.i % cfg.localAddresses.length] } : {}),
      }));
      ws.on("open", () => {
        this.open = true;
        if (cfg.heartbeatMs) this.hbTimer = setInterval(() => this.heartbeat(), cfg.heartbeatMs);
        resolve();
      });
      ws.on("message", (data) => this.onMessage(data));
      ws.on("error", (err) => {
        stats.errors++;
        if (!this.open) reject(err);
      });
      ws.on("close", () => {
        this.closed = true;
        if (this.hbTimer) clearInterval(this.hbTimer);
        if (!stopping) stats.closes++;
        for (const p of this.pending.values()) p.reject(new Error("closed"));
        this.pending.clear();
        if (!this.open) reject(new Error("closed before open"));
      });
    });
  }

  nextRef() {
    return String(++this.ref);
  }

  heartbeat() {
    // As phoenix.js: a heartbeat still unanswered at the next tick is a failure.
    if (this.hbRef !== null) {
      stats.hbMissed++;
    }
    this.hbRef = this.nextRef();
    this.hbAt = now();
    stats.hbSent++;
    this.ws.send(`[null,"${this.hbRef}","phoenix","heartbeat",{}]`);
  }

  request(joinRef, topic, event, payloadJson) {
    const ref = this.nextRef();
    if (joinRef === "") joinRef = ref;
    this.ws.send(`[${joinRef === null ? "null" : `"${joinRef}"`},"${ref}","${topic}","${event}",${payloadJson}]`);
    return new Promise((resolve, reject) => this.pending.set(ref, { resolve, reject, joinRef }));
  }

  async join(topic) {
    const p = this.request("", topic, "phx_join", cfg.joinPayload || "{}");
    this.joinRef = String(this.ref);
    const reply = await p;
    if (reply.status !== "ok") throw new Error(`join refused: ${JSON.stringify(reply)}`);
  }

  push(event, payloadJson) {
    return this.request(this.joinRef, TOPIC, event, payloadJson);
  }

  onMessage(data) {
    // Broadcasts are `[null,null,...` (or `[null,"<offset>",...` on a history topic joined with
    // `since`; an offset starts with a letter, a heartbeat reply's ref with a digit): counted
    // without parsing the JSON.
    if (data[1] === 0x6e && (data[6] === 0x6e || (data[6] === 0x22 && data[7] >= 0x61 && data[7] <= 0x7a))) {
      this.count++;
      stats.delivered++;
      if (stats.watchBroadcast) {
        const w = performance.timeOrigin + now();
        if (stats.bcastN++ === 0) stats.bcastFirst = w;
        stats.bcastLast = w;
      }
      if (stats.latency !== null) {
        const i = data.indexOf(BROADCAST_T, 20);
        if (i > 0) {
          let j = i + 4;
          while (data[j] !== 0x2c && data[j] !== 0x7d) j++;
          recordLatency(Number(data.latin1Slice(i + 4, j)));
        }
      }
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      stats.errors++;
      return;
    }
    const [, ref, topic, event, payload] = msg;
    if (event === "phx_reply") {
      if (topic === "phoenix") {
        if (ref === this.hbRef) {
          this.hbRef = null;
          stats.hbOk++;
          if (stats.hbRtt !== null && stats.hbRttN < stats.hbRtt.length) stats.hbRtt[stats.hbRttN++] = now() - this.hbAt;
        }
        return;
      }
      const p = this.pending.get(ref);
      if (p) {
        this.pending.delete(ref);
        p.resolve(payload);
      }
    } else if (event === "welcome") {
      const node = payload && payload.node;
      if (node) stats.nodes[node] = (stats.nodes[node] || 0) + 1;
    } else if (event === "phx_error" || event === "phx_close") {
      stats.errors++;
    }
  }

  close() {
    if (this.hbTimer) clearInterval(this.hbTimer);
    try {
      this.ws.terminate();
    } catch {
      /* already gone */
    }
  }
}

// -- Socket.IO (Flask-SocketIO) -------------------------------------------------------------

let ioFactory = null;
let sioKeepAliveAgent = null;

function sioAgent() {
  if (sioKeepAliveAgent === null) sioKeepAliveAgent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
  return sioKeepAliveAgent;
}

class SioConn {
  constructor(i) {
    this.i = i;
    this.count = 0;
    this.open = false;
  }

  connect() {
    return new Promise((resolve, reject) => {
      const s = (this.s = ioFactory(`http://${HOST}:${PORT}`, {
        // cfg.longpoll: Socket.IO's HTTP long-polling transport instead of its WebSocket.
        transports: cfg.longpoll ? ["polling"] : ["websocket"],
        forceNew: true,
        reconnection: false,
        timeout: 30000,
        perMessageDeflate: false,
        // cfg.sioKeepAlive: keep polling connections alive, as a browser does (see run.py, SIO_KEEPALIVE=1).
        ...(cfg.sioKeepAlive ? { agent: sioAgent() } : {}),
      }));
      s.on("connect", () => {
        this.open = true;
        // Polling responses, for messages per poll (engine.io-client's polling transport).
        if (cfg.longpoll && !this.countsPolls) {
          this.countsPolls = true;
          s.io.engine.transport.on("pollComplete", () => stats.polls++);
        }
        resolve();
      });
      s.on("connect_error", (err) => {
        stats.errors++;
        reject(err);
      });
      s.on("disconnect", () => {
        if (!stopping) stats.closes++;
      });
      s.on("new_msg", (payload) => {
        this.count++;
        stats.delivered++;
        if (stats.latency !== null) recordLatency(payload.t);
      });
    });
  }

  join(topic) {
    return new Promise((resolve, reject) => {
      this.s.timeout(30000).emit("join", { room: topic }, (err, reply) => {
        if (err) reject(err);
        else if (!reply || reply.status !== "ok") reject(new Error("join refused"));
        else resolve();
      });
    });
  }

  push(event, payloadJson) {
    // emit with ack; the payload goes as an object (socket.io encodes it itself)
    const payload = JSON.parse(payloadJson);
    return new Promise((resolve, reject) => {
      this.s.timeout(30000).emit("echo", payload, (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  close() {
    this.s.disconnect();
  }
}

// -- presence: a client that keeps the room's presence list (presence_state, presence_diff) -------

class PresConn extends PhxConn {
  constructor(i) {
    super(i);
    this.users = new Set();
  }

  onMessage(data) {
    const text = data.toString();
    if (!text.includes('"presence_')) return super.onMessage(data);
    const [, , , event, payload] = JSON.parse(text);
    stats.presenceFrames++;
    stats.presenceBytes += data.length;
    if (event === "presence_state") {
      for (const key of Object.keys(payload)) this.users.add(key);
    } else if (event === "presence_diff") {
      for (const key of Object.keys(payload.joins || {})) this.users.add(key);
      for (const key of Object.keys(payload.leaves || {})) this.users.delete(key);
    }
  }
}

// -- Phoenix long-poll (phoenix.js's LongPoll: GET polls, POST sends ndjson) ------------------

const lpAgent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

function lpRequest(method, path, body) {
  return new Promise((resolve, reject) => {
    const headers = body === undefined ? {} : { "content-type": "application/x-ndjson", "content-length": Buffer.byteLength(body) };
    const req = http.request({ host: HOST, port: PORT, path, method, agent: lpAgent, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks)));
        } catch (err) {
          reject(new Error(`HTTP ${res.statusCode}: ${err.message}`));
        }
      });
    });
    req.on("error", reject);
    req.end(body);
  });
}

class LpConn {
  constructor(i) {
    this.i = i;
    this.ref = 0;
    this.count = 0;
    this.pending = new Map();
    this.open = false;
    this.closed = false;
  }

  url() {
    const token = this.token ? `&token=${encodeURIComponent(this.token)}` : "";
    return `/socket/longpoll?vsn=2.0.0&user=u${this.i}${token}`;
  }

  async connect() {
    const r = await lpRequest("GET", this.url());
    if (r.status !== 410 || !r.token) throw new Error(`long-poll open: ${JSON.stringify(r)}`);
    this.token = r.token;
    this.open = true;
    this.poll();
  }

  async poll() {
    while (!stopping && !this.closed) {
      let r;
      try {
        r = await lpRequest("GET", this.url());
      } catch {
        if (stopping || this.closed) return;
        stats.errors++;
        await sleep(100);
        continue;
      }
      if (r.token) this.token = r.token;
      stats.polls++;
      if (r.status === 200) {
        for (const text of r.messages) this.onText(text);
      } else if (r.status !== 204) {
        this.closed = true;
        if (!stopping) stats.closes++;
        return;
      }
    }
  }

  onText(text) {
    const [, ref, , event, payload] = JSON.parse(text);
    if (event === "new_msg") {
      this.count++;
      stats.delivered++;
      if (stats.latency !== null) recordLatency(payload.t);
    } else if (event === "phx_reply") {
      const p = this.pending.get(ref);
      if (p) {
        this.pending.delete(ref);
        p.resolve(payload);
      }
    }
  }

  async join(topic) {
    const ref = String(++this.ref);
    const reply = new Promise((resolve, reject) => this.pending.set(ref, { resolve, reject }));
    const r = await lpRequest("POST", this.url(), JSON.stringify([ref, ref, topic, "phx_join", {}]));
    if (r.status !== 200) throw new Error(`long-poll post: ${JSON.stringify(r)}`);
    const payload = await reply;
    if (payload.status !== "ok") throw new Error(`join refused: ${JSON.stringify(payload)}`);
  }

  close() {
    this.closed = true;
  }
}

// -- connection management ------------------------------------------------------------------

let stopping = false;
const conns = [];

async function openAll(n, { join, concurrency = 100, timeoutMs = 120000 }) {
  if (PROTO === "sio" && ioFactory === null) {
    ioFactory = (await import("socket.io-client")).io;
  }
  const Conn = PROTO === "sio" ? SioConn : cfg.longpoll ? LpConn : cfg.presence ? PresConn : PhxConn;
  const deadline = now() + timeoutMs;
  let next = 0;
  let failed = 0;
  async function worker() {
    while (next < n) {
      if (now() > deadline) throw new Error(`timeout opening ${n} connections`);
      const i = next++;
      const c = new Conn(i);
      let tries = 0;
      for (;;) {
        try {
          await c.connect();
          if (join) await c.join(TOPIC);
          break;
        } catch (err) {
          // A refused or reset connect (listen backlog full) is retried a few times.
          if (++tries >= 3) {
            failed++;
            log(`connection ${i} failed: ${err.message}`);
            break;
          }
          await sleep(100 * tries);
        }
      }
      conns[i] = c;
    }
  }
  const t0 = now();
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  const ok = conns.filter((c) => c && c.open).length;
  log(`opened ${ok}/${n} connections${join ? " (joined)" : ""} in ${((now() - t0) / 1000).toFixed(1)}s`);
  return { opened: ok, failed, seconds: (now() - t0) / 1000 };
}

async function joinAll(concurrency = 200) {
  let next = 0;
  async function worker() {
    while (next < conns.length) {
      const c = conns[next++];
      if (c && c.open) await c.join(TOPIC);
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
}

// -- the producer: POST /broadcast ----------------------------------------------------------

const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
let seq = 0;

function postBroadcast() {
  const body = JSON.stringify({
    topic: TOPIC,
    event: "new_msg",
    payload: { t: now(), s: ++seq, p: PAD },
  });
  return new Promise((resolve) => {
    const req = http.request(
      {
        host: HOST,
        port: PORT,
        path: "/broadcast",
        method: "POST",
        agent,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode));
      },
    );
    req.on("error", () => resolve(0));
    req.end(body);
  });
}

// -- workloads ------------------------------------------------------------------------------

async function fanout() {
  const subs = cfg.subs;
  const rate = cfg.rate ?? 20;
  const latSeconds = cfg.latSeconds ?? 6;
  const satSeconds = cfg.satSeconds ?? 8;
  const warmSeconds = cfg.warmSeconds ?? 2;
  const concurrency = cfg.concurrency ?? 8;
  const drainMs = (cfg.drainSeconds ?? 20) * 1000;
  const result = { workload: "fanout", proto: PROTO, subs };

  result.open = await openAll(subs, { join: true, concurrency: cfg.openConcurrency ?? 100 });
  const live = conns.filter((c) => c && c.open);
  const n = live.length;
  await sleep(500);

  // (a) latency at a fixed rate; the first latWarmSeconds are not recorded (JIT, first allocations)
  const latWarm = cfg.latWarmSeconds ?? 1;
  let sent = 0;
  let accepted = 0;
  const inflight = [];
  async function paced(seconds) {
    const start = now();
    let k = 0;
    while (now() - start < seconds * 1000) {
      const wait = start + (k * 1000) / rate - now();
      if (wait > 0) await sleep(wait);
      k++;
      sent++;
      inflight.push(postBroadcast().then((code) => code >= 200 && code < 300 && accepted++));
    }
  }
  stats.latency = new Float64Array(Math.ceil(rate * (latSeconds + latWarm) + 10) * n);
  await paced(latWarm);
  await Promise.all(inflight);
  await waitFor(() => stats.delivered >= accepted * n, drainMs, "latency warm-up delivery");
  stats.latN = 0;
  const meter = new Meter();
  meter.start();
  await paced(latSeconds);
  await Promise.all(inflight);
  const target = accepted * n;
  const latDeadline = now() + drainMs;
  while (stats.delivered < target && now() < latDeadline) await sleep(20);
  const latMeter = meter.stop();
  result.latency = {
    rate,
    sent,
    accepted,
    delivered: stats.delivered,
    expected: target,
    complete: stats.delivered >= target,
    ms: percentiles(stats.latency, stats.latN),
    clientCpu: latMeter.clientCpu,
    serverCpu: latMeter.serverCpu,
    cores: latMeter.cores,
    otherCpu: latMeter.otherCpu,
  };
  stats.latency = null;
  log(`latency: p50 ${result.latency.ms.p50?.toFixed(1)} p99 ${result.latency.ms.p99?.toFixed(1)} ms`);

  // (b) saturation: producers as fast as the server accepts
  for (const c of live) c.count = 0;
  stats.delivered = 0;
  let running = true;
  let acc = 0;
  let rejected = 0;
  let accWindow = 0;
  let inWindow = false;
  let rssMax = serverRssKb();
  const rssTimer = setInterval(() => {
    rssMax = Math.max(rssMax, serverRssKb());
  }, 250);
  const producers = Array.from({ length: concurrency }, async () => {
    while (running) {
      const code = await postBroadcast();
      if (code >= 200 && code < 300) {
        acc++;
        if (inWindow) accWindow++;
      } else rejected++;
    }
  });
  const rssBefore = serverRssKb();
  await sleep(warmSeconds * 1000);
  const d0 = stats.delivered;
  const p0 = stats.polls;
  inWindow = true;
  meter.start();
  await sleep(satSeconds * 1000);
  inWindow = false;
  const m = meter.stop();
  const delivered = stats.delivered - d0;
  const polls = stats.polls - p0;
  running = false;
  await Promise.all(producers);
  const stopAt = now();
  const expected = acc * n;
  const deadline = now() + drainMs;
  while (stats.delivered < expected && now() < deadline) await sleep(20);
  clearInterval(rssTimer);
  const minCount = Math.min(...live.map((c) => c.count));
  result.saturation = {
    window: m.wall,
    concurrency,
    accepted: acc,
    rejected,
    acceptedPerSec: accWindow / m.wall,
    deliveredPerSec: delivered / m.wall,
    // accepted broadcasts x subscribers over delivered messages in the window (target <= 1.2)
    acceptedOverDelivered: (accWindow * n) / Math.max(1, delivered),
    // long-poll clients: poll responses in the window, and broadcasts each carried on average
    pollsPerSec: cfg.longpoll ? polls / m.wall : null,
    msgsPerPoll: cfg.longpoll && polls ? delivered / polls : null,
    serverCpu: m.serverCpu,
    serverUsPerDelivery: (m.serverCpuSeconds * 1e6) / Math.max(1, delivered),
    clientCpu: m.clientCpu,
    clientSaturated: m.clientSaturated,
    cores: m.cores,
    otherCpu: m.otherCpu,
    complete: stats.delivered >= expected && minCount >= acc,
    missing: Math.max(0, expected - stats.delivered),
    drainSeconds: (now() - stopAt) / 1000,
    rssBeforeKb: rssBefore,
    rssMaxKb: rssMax,
  };
  log(
    `saturation: ${Math.round(result.saturation.deliveredPerSec)} msgs/s, ` +
      `${result.saturation.serverUsPerDelivery.toFixed(2)} us/delivery, client CPU ${(m.clientCpu * 100).toFixed(0)}%`,
  );
  result.errors = stats.errors;
  result.closes = stats.closes;
  result.nodes = stats.nodes;
  return result;
}

async function pushreply() {
  const clients = cfg.clients;
  const seconds = cfg.seconds ?? 8;
  const warmSeconds = cfg.warmSeconds ?? 2;
  const result = { workload: "pushreply", proto: PROTO, clients };
  result.open = await openAll(clients, { join: true, concurrency: cfg.openConcurrency ?? 100 });
  const live = conns.filter((c) => c && c.open);
  await sleep(500);
  const rtt = new Float64Array(4_000_000);
  let n = 0;
  let replies = 0;
  let measuring = false;
  let running = true;
  let failures = 0;
  const loops = live.map(async (c) => {
    while (running) {
      const t = now();
      try {
        await c.push("ping", `{"t":${t},"p":"${PAD}"}`);
      } catch {
        failures++;
        return;
      }
      if (measuring) {
        replies++;
        if (n < rtt.length) rtt[n++] = now() - t;
      }
    }
  });
  await sleep(warmSeconds * 1000);
  const meter = new Meter();
  measuring = true;
  meter.start();
  await sleep(seconds * 1000);
  measuring = false;
  const m = meter.stop();
  running = false;
  await Promise.race([Promise.all(loops), sleep(10000)]);
  result.repliesPerSec = replies / m.wall;
  result.rttMs = percentiles(rtt, n);
  result.serverCpu = m.serverCpu;
  result.serverUsPerReply = (m.serverCpuSeconds * 1e6) / Math.max(1, replies);
  result.clientCpu = m.clientCpu;
  result.clientSaturated = m.clientSaturated;
  result.cores = m.cores;
  result.otherCpu = m.otherCpu;
  result.failures = failures;
  result.errors = stats.errors;
  result.closes = stats.closes;
  log(`pushreply: ${Math.round(result.repliesPerSec)} replies/s, p99 ${result.rttMs.p99?.toFixed(1)} ms`);
  return result;
}

async function connsWorkload() {
  const count = cfg.conns;
  const settleMs = (cfg.settleSeconds ?? 2) * 1000;
  // manyconns.py runs several of these processes: they hold until one wall-clock time.
  let holdSeconds = cfg.holdSeconds ?? 0;
  const result = { workload: "conns", proto: PROTO, conns: count, heartbeatMs: cfg.heartbeatMs || null };
  await sleep(settleMs);
  const rss0 = serverRssKb();
  result.open = await openAll(count, { join: false, concurrency: cfg.openConcurrency ?? 100, timeoutMs: 300000 });
  const n = result.open.opened;
  await sleep(settleMs);
  const rssIdle = serverRssKb();
  await joinAll();
  await sleep(settleMs);
  const rssJoined = serverRssKb();
  result.rssBaseKb = rss0;
  result.rssIdleKb = rssIdle;
  result.rssJoinedKb = rssJoined;
  result.kbPerConnIdle = (rssIdle - rss0) / Math.max(1, n);
  result.kbPerConnJoined = (rssJoined - rss0) / Math.max(1, n);
  log(`memory: ${result.kbPerConnIdle.toFixed(1)} KB/conn idle, ${result.kbPerConnJoined.toFixed(1)} KB/conn joined`);
  if (cfg.holdUntilMs) holdSeconds = Math.max(0, (cfg.holdUntilMs - Date.now()) / 1000);
  if (holdSeconds > 0) {
    const meter = new Meter();
    const hb0 = stats.hbOk;
    meter.start();
    await sleep(holdSeconds * 1000);
    const m = meter.stop();
    result.hold = {
      seconds: holdSeconds,
      stillOpen: conns.filter((c) => c && c.open && !c.closed).length,
      heartbeatsSent: stats.hbSent,
      heartbeatReplies: stats.hbOk - hb0,
      heartbeatsMissed: stats.hbMissed,
      serverCpu: m.serverCpu,
      clientCpu: m.clientCpu,
      rssKb: serverRssKb(),
    };
    log(`hold: ${result.hold.stillOpen}/${n} open, ${result.hold.heartbeatReplies} heartbeat replies, ${stats.hbMissed} missed`);
  }
  if (cfg.broadcastAtMs) {
    // One broadcast to every connection of every client process: first and last delivery times.
    stats.watchBroadcast = true;
    const wait = cfg.broadcastAtMs - Date.now();
    if (wait > 0) await sleep(wait);
    if (cfg.broadcaster) {
      result.broadcastSentAt = performance.timeOrigin + now();
      result.broadcastStatus = await postBroadcast();
    }
    try {
      await waitFor(() => stats.bcastN >= n, 60000, "the broadcast");
    } catch {
      /* reported as received < opened */
    }
    result.broadcast = { received: stats.bcastN, first: stats.bcastFirst, last: stats.bcastLast };
  }
  result.errors = stats.errors;
  result.closes = stats.closes;
  return result;
}

// -- main -----------------------------------------------------------------------------------

const hardLimit = setTimeout(
  () => {
    log("hard time limit reached");
    process.exit(3);
  },
  (cfg.maxSeconds ?? 300) * 1000,
);

async function stormWorkload() {
  // `base` clients connect, join and heartbeat every hbMs; then `clients` more connect and join
  // all at once (as after a deploy). Join time = connect start to join reply, per storm client.
  const base = cfg.base ?? 1000;
  const n = cfg.clients ?? 10000;
  const hbMs = cfg.hbMs ?? 1000;
  const result = { workload: "storm", proto: PROTO, base, clients: n, hbMs };
  result.baseOpen = await openAll(base, { join: true, concurrency: 100 });
  const live = conns.filter((c) => c && c.open);
  const timers = live.map((c, i) => {
    const t = { id: null };
    setTimeout(() => (t.id = setInterval(() => c.heartbeat(), hbMs)), (i * hbMs) / live.length);
    return t;
  });
  await sleep(2 * hbMs);
  stats.hbRtt = new Float64Array(2_000_000);
  stats.hbRttN = 0;
  const missed0 = stats.hbMissed;
  const joinMs = new Float64Array(n);
  const joinOnlyMs = new Float64Array(n); // phx_join sent to its reply
  let joined = 0;
  let failed = 0;
  const meter = new Meter();
  meter.start();
  // This process's own event-loop delay during the storm: a heartbeat reply that arrives while the
  // loop is busy with storm clients is read late, and its round trip includes that wait.
  const loopDelay = monitorEventLoopDelay({ resolution: 5 });
  loopDelay.enable();
  const t0 = now();
  // scale.py: `topicPerClient` gives every storm client a topic of its own (each join subscribes a
  // new topic on its worker); `stormConcurrency` > 0 lets only that many clients connect at a time.
  const topicOf = (k) => (cfg.topicPerClient ? `${TOPIC}:${base + k}` : TOPIC);
  const slots = cfg.stormConcurrency > 0 ? cfg.stormConcurrency : n;
  let nextK = 0;
  const one = async (k) => {
    const c = new PhxConn(base + k);
    conns[base + k] = c;
    const start = now();
    for (let tries = 0; ; tries++) {
      try {
        await c.connect();
        const sent = now();
        await c.join(topicOf(k));
        joinOnlyMs[joined] = now() - sent;
        joinMs[joined++] = now() - start;
        return;
      } catch (err) {
        if (tries >= 5 || now() - t0 > 120000) {
          failed++;
          return;
        }
        await sleep(50 * (tries + 1));
        if (c.ws) c.ws.terminate();
      }
    }
  };
  await Promise.all(
    Array.from({ length: Math.min(slots, n) }, async () => {
      while (nextK < n) await one(nextK++);
    }),
  );
  const seconds = (now() - t0) / 1000;
  const m = meter.stop();
  loopDelay.disable();
  result.clientLoopDelayMs = { p50: loopDelay.percentile(50) / 1e6, p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 };
  const hbN = stats.hbRttN;
  await sleep(hbMs);
  for (const t of timers) clearInterval(t.id);
  result.stormSeconds = seconds;
  result.joined = joined;
  result.failed = failed;
  result.joinsPerSec = joined / seconds;
  result.joinMs = percentiles(joinMs, joined);
  result.joinOnlyMs = percentiles(joinOnlyMs, joined);
  result.hbRttMs = percentiles(stats.hbRtt, hbN);
  result.hbMissed = stats.hbMissed - missed0;
  result.serverCpu = m.serverCpu;
  result.serverCpuSeconds = m.serverCpuSeconds;
  result.clientCpu = m.clientCpu;
  result.clientSaturated = m.clientSaturated;
  result.serverUsPerJoin = (m.serverCpuSeconds * 1e6) / Math.max(1, joined);
  result.otherCpu = m.otherCpu;
  result.rssKb = serverRssKb();
  log(`storm: ${joined}/${n} joined in ${seconds.toFixed(2)}s (${Math.round(result.joinsPerSec)}/s), join p99 ${result.joinMs.p99?.toFixed(0)} ms, heartbeat p99 ${result.hbRttMs.p99?.toFixed(0)} ms, ${result.hbMissed} missed`);
  result.errors = stats.errors;
  return result;
}

async function presenceWorkload() {
  // N users join one presence-tracked room ({"presence": true}); converged when every client lists
  // all N. Then half of them leave (close); converged when each remaining client lists N/2.
  const n = cfg.users ?? 1000;
  const result = { workload: "presence", users: n };
  const meter = new Meter();
  meter.start();
  const t0 = now();
  result.open = await openAll(n, { join: true, concurrency: cfg.openConcurrency ?? 100 });
  const live = conns.filter((c) => c && c.open);
  const progress = (want, cs) => cs.filter((c) => c.users.size === want).length;
  try {
    await waitFor(() => progress(n, live) === live.length, 120000, "presence to converge after the joins");
  } catch (err) {
    result.joinError = `${err.message}: ${progress(n, live)}/${live.length} see ${n}`;
  }
  const j = meter.stop();
  result.join = {
    seconds: (now() - t0) / 1000,
    frames: stats.presenceFrames,
    kbytes: stats.presenceBytes / 1024,
    serverCpuSeconds: j.serverCpuSeconds,
    clientCpu: j.clientCpu,
  };
  const f0 = stats.presenceFrames;
  const b0 = stats.presenceBytes;
  const leaving = live.slice(0, Math.floor(live.length / 2));
  const staying = live.slice(leaving.length);
  const m2 = new Meter();
  m2.start();
  const t1 = now();
  stopping = true; // the leavers' closes are not errors
  for (const c of leaving) c.close();
  try {
    await waitFor(() => progress(staying.length, staying) === staying.length, 120000, "presence after the leaves");
  } catch (err) {
    result.leaveError = `${err.message}: ${progress(staying.length, staying)}/${staying.length}`;
  }
  const l = m2.stop();
  result.leave = {
    left: leaving.length,
    seconds: (now() - t1) / 1000,
    frames: stats.presenceFrames - f0,
    kbytes: (stats.presenceBytes - b0) / 1024,
    serverCpuSeconds: l.serverCpuSeconds,
  };
  log(`presence: ${n} joined, converged in ${result.join.seconds.toFixed(1)}s (${result.join.frames} frames); half left, converged in ${result.leave.seconds.toFixed(1)}s (${result.leave.frames} frames)`);
  result.errors = stats.errors;
  return result;
}

const workloads = { presence: presenceWorkload, fanout, pushreply, conns: connsWorkload, storm: stormWorkload };

try {
  const result = await workloads[cfg.workload]();
  result.config = cfg;
  process.stdout.write(JSON.stringify(result) + "\n");
  stopping = true;
  for (const c of conns) if (c) c.close();
  agent.destroy();
  clearTimeout(hardLimit);
  process.exit(0);
} catch (err) {
  log(`failed: ${err.stack || err}`);
  process.stdout.write(JSON.stringify({ workload: cfg.workload, proto: PROTO, error: String(err) }) + "\n");
  process.exit(2);
}
