// A phoenix.js client in Node for examples/quickstart.py: `node examples/client.mjs [URL]`.
// Node has no browser WebSocket: pass the `ws` package as the transport, and an absolute URL.
import { Socket } from "phoenix";
import WebSocket from "ws";

const url = process.argv[2] ?? "ws://127.0.0.1:4000/socket";
const socket = new Socket(url, { transport: WebSocket, params: { user: "node" } });
socket.onError(() => console.error(`cannot reach ${url}`));
socket.connect();

const room = socket.channel("room:lobby", {});
room.on("new_msg", (msg) => {
  console.log(`${msg.user}: ${msg.body}`);
  socket.disconnect(() => process.exit(0));
});
room.join()
  .receive("ok", () => room.push("new_msg", { body: "hello from Node" }))
  .receive("error", (resp) => {
    console.error("join refused:", resp.reason);
    process.exit(1);
  });
