// The reconnect-storm client: N Phoenix V2 clients that join with `since`, all lose their
// connection, and all come back at once asking for what they missed.
//
//   node storm.mjs '<json config>'      (driven by benchmarks/storm.py through stdin/stdout)
//
// Phases (each line on stdout is a JSON event for the runner; it answers on stdin):
//   1. open N connections (200 at a time), join `topic` with {"since": null}; -> {"ev":"joined"}
//   2. the runner broadcasts `before` messages; every client records the offset (ref) of each
//      new_msg; -> {"ev":"synced"} once every client has all of them
//   3. every connection is dropped (TCP reset); -> {"ev":"down"}; the runner broadcasts `during`
//      messages, then sends "go"
//   4. all N reconnect at once and join with {"since": <offset>}: the last one they saw, or with
//      `spread`, the offset of message (i mod before), so recoveries do not share reads; with
//      `plain`, a join without since (the baseline: no recovery);
//      -> {"ev":"result", ...}: time until every join reply, time until every client has every
//      missed message, recovered counts, duplicates, and this process's CPU.
// Every phase has a deadline.

import { performance } from "node:perf_hooks";
import readline from "node:readline";
import WebSocket from "ws";

const cfg = JSON.parse(process.argv[2] || "{}");
const N = cfg.clients ?? 5000;
const TOPIC = cfg.topic ?? "room:storm";
const now = () => performance.now();
const out = (ev) => process.stdout.write(JSON.stringify(ev) + "\n");
const log = (...a) => process.stderr.write(`[storm] ${a.join(" ")}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const lines = [];
let wake = null;
readline.createInterface({ input: process.stdin }).on("line", (l) => {
  lines.push(l.trim());
  if (wake) wake();
});
async function command() {
  while (!lines.length) await new Promise((r) => (wake = r));
  return lines.shift();
}

let progress = () => "";
async function waitFor(pred, ms, what) {
  const end = now() + ms;
  let next = now() + 5000;
  while (!pred()) {
    if (now() > end) throw new Error(`timeout waiting for ${what}: ${progress()}`);
    if (now() > next) {
      log(`still waiting for ${what}: ${progress()}`);
      next = now() + 5000;
    }
    await sleep(10);
  }
}

class Client {
  constructor(i) {
    this.i = i;
    this.ref = 0;
    this.offsets = []; // every new_msg offset, in arrival order
    this.joined = null; // reply of the current join
    this.joinAt = 0;
  }

  connect(since) {
    return new Promise((resolve, reject) => {
      const ws = (this.ws = new WebSocket(`ws://127.0.0.1:${cfg.port}/socket/websocket?user=s${this.i}&vsn=2.0.0`, {
        perMessageDeflate: false,
        handshakeTimeout: 60000,
      }));
      this.joined = null;
      ws.on("open", () => {
        this.joinRef = String(++this.ref);
        const payload = since === undefined ? {} : { since };
        ws.send(JSON.stringify([this.joinRef, this.joinRef, TOPIC, "phx_join", payload]));
        resolve();
      });
      ws.on("message", (data) => this.onMessage(data));
      ws.on("error", (e) => reject(e));
      ws.on("close", () => reject(new Error("closed")));
    });
  }

  onMessage(data) {
    const [, ref, , event, payload] = JSON.parse(data);
    if (event === "new_msg") this.offsets.push(ref);
    else if (event === "phx_reply" && ref === this.joinRef) {
      this.joined = payload;
      this.joinAt = now();
    }
  }

  drop() {
    this.ws.removeAllListeners("close");
    this.ws.on("close", () => {});
    this.ws.on("error", () => {});
    this.ws.terminate();
  }
}

function cpu() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

async function openAll(clients, since, concurrency) {
  let next = 0;
  const work = async () => {
    while (next < clients.length) {
      const c = clients[next++];
      await c.connect(since(c));
    }
  };
  await Promise.all(Array.from({ length: concurrency }, work));
}

const seqOf = (offset) => Number(offset.split("-")[1]);

async function main() {
  const clients = Array.from({ length: N }, (_, i) => new Client(i));
  progress = () => {
    const joined = clients.filter((c) => c.joined).length;
    const rec = clients.filter((c) => c.joined && c.joined.response && c.joined.response.recovered).length;
    return `${joined} joined, ${rec} recovered, sample ${JSON.stringify(clients[0].joined)} offsets ${clients[0].offsets.length}`;
  };
  await openAll(clients, () => null, 200);
  await waitFor(() => clients.every((c) => c.joined), 120000, "first joins");
  if (!clients.every((c) => c.joined.status === "ok" && c.joined.response.recovered === true)) throw new Error("bad first join");
  out({ ev: "joined" });
  const before = Number(await command());
  await waitFor(() => clients.every((c) => c.offsets.length >= before), 120000, "the first messages");
  const last = clients[0].offsets[before - 1];
  out({ ev: "synced", last });
  for (const c of clients) c.drop();
  out({ ev: "down" });
  const during = Number(await command());
  const cpu0 = cpu();
  const t0 = now();
  for (const c of clients) c.mark = c.offsets.length;
  const sinceOf = (c) => (cfg.plain ? undefined : cfg.spread ? c.offsets[c.i % before] : c.offsets[before - 1]);
  await openAll(clients, sinceOf, cfg.reconnectConcurrency ?? N);
  const opened = now() - t0;
  await waitFor(() => clients.every((c) => c.joined), 300000, "the rejoins");
  const joinedMs = Math.max(...clients.map((c) => c.joinAt)) - t0;
  // Every client must end with the offsets after its since, each once, in order.
  const want = (c) => (cfg.plain ? 0 : seqOf(last) + during - seqOf(sinceOf(c)));
  progress = () => {
    const lag = clients.filter((c) => c.offsets.length - c.mark < want(c));
    const c = lag[0];
    return `${lag.length} lagging; e.g. #${c && c.i}: ${c && c.offsets.length - c.mark}/${c && want(c)} ${c && JSON.stringify(c.offsets.slice(c.mark).map(seqOf))}`;
  };
  await waitFor(() => clients.every((c) => cfg.plain || !c.joined.response.recovered || c.offsets.length - c.mark >= want(c)), 300000, "the replays");
  const doneMs = now() - t0;
  let recovered = 0, replayed = 0, bad = 0;
  for (const c of clients) {
    if (c.joined.response.recovered) recovered++;
    const got = c.offsets.slice(c.mark).map(seqOf);
    replayed += got.length;
    if (cfg.plain) continue;
    const first = seqOf(sinceOf(c)) + 1;
    if (c.joined.response.recovered && !got.every((s, k) => s === first + k)) bad++;
  }
  out({ ev: "result", clients: N, opened_ms: opened, joined_ms: joinedMs, done_ms: doneMs, recovered, replayed, out_of_order_or_duplicate: bad, client_cpu_s: cpu() - cpu0 });
  for (const c of clients) c.drop();
  process.exit(0);
}

main().catch((e) => {
  out({ ev: "error", error: String(e && e.stack || e) });
  process.exit(1);
});
