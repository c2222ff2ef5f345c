// The Node.js peer: the `ws` package with the usual broadcast loop (one ws.send per client).
//
// What a user would write instead of phx_gevent in Node: an http server, a
// WebSocketServer on /socket/websocket, a Map topic -> Set of sockets, and
// `POST /broadcast` {topic, event, payload} that serialises the Phoenix V2
// frame once and calls `ws.send(text)` for every subscriber. It speaks the
// same subset of the Phoenix V2 protocol as raw_server.py: phx_join (ok, adds
// the socket to the topic), phx_leave, heartbeats, and any other push answered
// with its own payload. TCP_NODELAY on every connection (ws sets it by
// default), no compression, no logging.
//
// Usage: node ws_server.mjs [--host 127.0.0.1] [--port 0] [--backlog 2048]; prints "LISTENING <port>".
// `ws` is pinned in benchmarks/package.json (`cd benchmarks && npm ci`).

import http from "node:http";
import { WebSocketServer } from "ws";

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

const host = arg("--host", "127.0.0.1");
const port = Number(arg("--port", "0"));
const backlog = Number(arg("--backlog", "2048"));

/** topic -> Set of sockets */
const topics = new Map();

function reply(ws, joinRef, ref, topic, response) {
  ws.send(JSON.stringify([joinRef, ref, topic, "phx_reply", { status: "ok", response }]));
}

const server = http.createServer((req, res) => {
  if (req.method === "POST" && req.url === "/broadcast") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      let data;
      try {
        data = JSON.parse(Buffer.concat(chunks));
      } catch {
        res.writeHead(400).end();
        return;
      }
      const text = JSON.stringify([null, null, data.topic, data.event, data.payload]);
      const subs = topics.get(data.topic);
      if (subs) for (const ws of subs) ws.send(text);
      res.writeHead(204).end();
    });
    return;
  }
  res.writeHead(404, { "content-type": "text/plain" }).end("not found");
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, clientTracking: false });

server.on("upgrade", (req, socket, head) => {
  if (!req.url.startsWith("/socket/websocket")) {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    socket.setNoDelay(true);
    const joined = [];
    ws.on("message", (raw) => {
      let msg;
      try {
        msg = JSON.parse(raw);
      } catch {
        ws.close(1011);
        return;
      }
      const [joinRef, ref, topic, event, payload] = msg;
      if (event === "heartbeat") {
        reply(ws, null, ref, "phoenix", {});
      } else if (event === "phx_join") {
        let subs = topics.get(topic);
        if (!subs) topics.set(topic, (subs = new Set()));
        subs.add(ws);
        joined.push(topic);
        reply(ws, joinRef, ref, topic, {});
      } else if (event === "phx_leave") {
        topics.get(topic)?.delete(ws);
        reply(ws, joinRef, ref, topic, {});
      } else {
        reply(ws, joinRef, ref, topic, payload);
      }
    });
    ws.on("error", () => {});
    ws.on("close", () => {
      for (const topic of joined) topics.get(topic)?.delete(ws);
    });
  });
});

server.keepAliveTimeout = 0;
server.listen(port, host, backlog, () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
