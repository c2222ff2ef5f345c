"""Property-based fuzzing of every decoder (hypothesis), issue 17.

Each target feeds generated input to one decoder and checks that it either
succeeds with the right result or fails with the documented error, never
with anything else:

* WebSocket frames: the transport's reader against an independent model of
  RFC 6455 written here (messages delivered, and the close code);
* V1/V2 JSON and V2 binary messages: a Message or ``DecodeError``, and a
  decoded message can always be encoded again;
* long-poll POST bodies and requests, WebSocket handshakes (headers, query
  strings): no 500, no traceback;
* query strings: a dict or ``ParamsError``;
* Redis envelopes: an envelope or ``EnvelopeError``, and an accepted one can
  be encoded again.

``make test`` runs a few hundred examples per target (``FUZZ_EXAMPLES``,
default 200); ``make fuzz`` runs the same targets with far more (see
docs/reliability.md for the figures).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
from typing import Any

import gevent
import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phx_gevent import Endpoint, Socket, channel
from phx_gevent.pubsub import codec
from phx_gevent.serializers import V1, V2, DecodeError, EncodeError, dumps
from phx_gevent.transports import frames
from phx_gevent.transports import http as phx_http
from phx_gevent.transports.websocket import _EOF, ENVIRON_HANDLER, WebSocketOptions, WebSocketTransport
from tests.handlers import EchoChannel

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    database=None,
)

#: How many inputs each target ran in this process (``make fuzz`` prints them).
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


# -- an independent model of RFC 6455 (server side, no extensions) -------------------------------

# RFC 6455 7.4.1 and the IANA registry it created (1012-1014 were registered later): what a
# peer may send. 1004-1006 and 1015 are reserved, 1016-2999 unassigned.
_VALID_CLOSE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


def model_read(data: bytes, max_size: int) -> tuple[list[tuple[int, bytes]], set[Any]]:
    """What a conforming server makes of ``data``: the messages, and how it ends.

    The end is ``{"eof"}`` (the input ran out), ``{"close"}`` (a valid close
    frame) or the set of close codes that each apply to the first bad frame
    (the RFC does not rank violations, so any of them is right).
    """
    msgs: list[tuple[int, bytes]] = []
    pos = 0
    frag_op: int | None = None
    frag: list[bytes] = []
    frag_len = 0
    n = len(data)
    while True:
        if n - pos < 2:
            return msgs, {"eof"}
        b0, b1 = data[pos], data[pos + 1]
        fin, rsv, op = b0 >> 7, (b0 >> 4) & 7, b0 & 15
        masked, ln = b1 >> 7, b1 & 127
        errors: set[Any] = set()
        if rsv:
            errors.add(1002)
        if not masked:
            errors.add(1002)
        head = 2
        if ln == 126:
            if n - pos < 4:
                return msgs, errors or {"eof"}
            ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
            head = 4
        elif ln == 127:
            if n - pos < 10:
                return msgs, errors or {"eof"}
            ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
            head = 10
        control = op >= 8
        if control and (not fin or ln > 125):
            errors.add(1002)
        if not control and (ln > max_size or frag_len + ln > max_size):
            errors.add(1009)
        if op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15):
            errors.add(1002)
        if op in (1, 2) and frag_op is not None:
            errors.add(1002)
        if op == 0 and frag_op is None:
            errors.add(1002)
        if errors:
            # Checks that need only the header end the connection before the payload;
            # ours may also read the payload first (then input running out is an end too).
            return msgs, errors | {"eof"} if n - pos < head + 4 + ln else errors
        if n - pos < head + 4 + ln:
            return msgs, {"eof"}
        key = data[pos + head : pos + head + 4]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(data[pos + head + 4 : pos + head + 4 + ln]))
        pos += head + 4 + ln
        if op in (1, 2):
            if not fin:
                frag_op, frag, frag_len = op, [payload], ln
                continue
            whole, kind = payload, op
        elif op == 0:
            frag.append(payload)
            frag_len += ln
            if not fin:
                continue
            whole, kind = b"".join(frag), frag_op
            frag_op, frag, frag_len = None, [], 0
        elif op == 8:
            if len(payload) == 1:
                return msgs, {1002}
            if len(payload) >= 2:
                code = int.from_bytes(payload[:2], "big")
                if code not in _VALID_CLOSE:
                    return msgs, {1002}
                try:
                    payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    return msgs, {1007}
            return msgs, {"close"}
        else:  # ping (answered) and pong (ignored): no message
            continue
        if kind == 1:
            try:
                whole.decode("utf-8")
            except UnicodeDecodeError:
                return msgs, {1007}
        msgs.append((kind, whole))


class _ChunkedSocket:
    """Returns the input in the given chunk sizes, then EOF; records what the server sends."""

    def __init__(self, data: bytes, chunks: list[int]) -> None:
        self.data = data
        self.pos = 0
        self.chunks = chunks or [len(data) or 1]
        self.i = 0
        self.sent = bytearray()

    def recv(self, n: int) -> bytes:
        if self.pos >= len(self.data):
            return b""
        size = max(1, min(n, self.chunks[self.i % len(self.chunks)]))
        self.i += 1
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def settimeout(self, t: Any) -> None:
        pass

    def shutdown(self, how: int) -> None:
        pass

    def fileno(self) -> int:
        return -1


class _Recorder:
    """Stands in for the serializer and the connection: records each message."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes]] = []

    def decode(self, data: Any) -> Any:
        if isinstance(data, str):
            self.got.append((1, data.encode("utf-8")))
        else:
            self.got.append((2, bytes(data)))
        return None

    def handle(self, msg: Any) -> None:
        pass


def ws_frame(opcode: int, payload: bytes, fin: bool, rsv: int, mask: bool, key: bytes, length_form: int) -> bytes:
    """A client frame; ``length_form`` 0/1/2 picks the shortest, 16-bit or 64-bit length encoding."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if length_form == 0 and n < 126:
        head = bytes((b0, mbit | n))
    elif length_form <= 1 and n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


_text = st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))
_payloads = st.one_of(_text, st.binary(max_size=300))
_frame = st.builds(
    ws_frame,
    opcode=st.sampled_from([0, 1, 2, 8, 9, 10, 1, 2, 9, 3, 11]),
    payload=_payloads,
    fin=st.booleans() | st.just(True),
    rsv=st.sampled_from([0, 0, 0, 0, 1, 4]),
    mask=st.just(True) | st.booleans(),
    key=st.binary(min_size=4, max_size=4),
    length_form=st.sampled_from([0, 0, 0, 1, 2]),
)
_close = st.builds(
    lambda code, reason, key: ws_frame(8, code + reason, True, 0, True, key, 0),
    code=st.one_of(st.just(b""), st.integers(0, 65535).map(lambda c: c.to_bytes(2, "big")), st.binary(max_size=1)),
    reason=st.binary(max_size=10) | st.just(b"bye"),
    key=st.binary(min_size=4, max_size=4),
)
_stream = st.one_of(
    st.lists(st.one_of(_frame, _frame, _frame, _close), max_size=8).map(b"".join),
    st.binary(max_size=200),
    # A valid stream with one random byte flipped.
    st.tuples(st.lists(_frame, min_size=1, max_size=5).map(b"".join), st.integers(0, 10_000), st.integers(0, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes((t[2],)) + t[0][t[1] % len(t[0]) + 1 :]
    ),
)


@FUZZ
@given(data=_stream, chunks=st.lists(st.integers(1, 64), max_size=4), max_size=st.sampled_from([100, 1000, 1 << 20]))
def test_fuzz_websocket_frames_match_the_rfc_6455_model(data, chunks, max_size):
    _count("websocket frames")
    sock = _ChunkedSocket(data, chunks)
    opts = WebSocketOptions(max_frame_size=max_size, max_message_rate=None)
    transport = WebSocketTransport(sock, opts, V2)
    recorder = _Recorder()
    transport.serializer = recorder
    transport.conn = recorder
    end: Any
    try:
        transport._loop()
        end = "close"
    except _EOF:
        end = "eof"
    except frames.ProtocolError as exc:
        end = exc.code
    finally:
        transport.finish()
    expected_msgs, expected_end = model_read(data, max_size)
    assert recorder.got == expected_msgs
    assert end in expected_end, (end, expected_end)


# -- serializers ---------------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_poison = st.sampled_from(
    ["NaN", "-Infinity", "Infinity", "1e400", "-1e999", '"\\ud800"', '"\\udfff"', '"a\\ud83d"', "[" * 50 + "]" * 50]
)


def _message_text(draw_value: Any, poison: str | None, shape: str) -> str:
    value = json.dumps(draw_value)
    if poison is not None:
        value = value.replace("null", poison, 1) if "null" in value else poison
    if shape == "v2":
        return f'["1","2","room:1","ev",{value}]' if not value.startswith("[") else f'[{value},"2","t","e",{{}}]'
    if shape == "v1":
        return f'{{"topic":"room:1","event":"ev","payload":{value},"ref":"1"}}'
    return value


def _check_decoded(serializer: Any, text: Any) -> None:
    try:
        msg = serializer.decode(text)
    except DecodeError:
        return
    # Whatever decodes can be put on the wire again: nothing of it breaks another client's delivery.
    dumps([msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload]).encode("utf-8")
    try:
        out = serializer.encode_reply(msg.join_ref, msg.ref, msg.topic, "ok", msg.payload)
    except EncodeError:
        return
    if isinstance(out, str):
        out.encode("utf-8")


@FUZZ
@given(
    value=_json,
    poison=st.none() | _poison,
    shape=st.sampled_from(["v2", "v1", "raw"]),
    noise=st.text(max_size=30) | st.just(""),
)
def test_fuzz_json_messages_decode_or_fail_cleanly(value, poison, shape, noise):
    _count("V1/V2 JSON messages")
    text = _message_text(value, poison, shape)
    for candidate in (text, text + noise, noise, text[: len(text) // 2]):
        for serializer in (V1, V2):
            _check_decoded(serializer, candidate)
            _check_decoded(serializer, candidate.encode("utf-8", "surrogatepass"))


@FUZZ
@given(
    head=st.lists(st.integers(0, 255), min_size=0, max_size=6),
    fields=st.lists(st.binary(max_size=12), min_size=4, max_size=4),
    payload=st.binary(max_size=50),
    cut=st.integers(0, 100),
)
def test_fuzz_binary_messages_decode_or_fail_cleanly(head, fields, payload, cut):
    _count("V2 binary messages")
    well_formed = bytes([0, *[len(f) for f in fields]]) + b"".join(fields) + payload
    for data in (bytes(head) + payload, well_formed, well_formed[:cut]):
        try:
            msg = V2.decode(data)
        except DecodeError:
            continue
        assert isinstance(msg.payload, bytes)
        for value in (msg.join_ref, msg.ref, msg.topic, msg.event):
            value.encode("utf-8")


# -- HTTP: query strings, handshakes, long-poll bodies -------------------------------------------

_query = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.tuples(
            st.text("ab[]%=&+", max_size=12) | st.just("a[b][c]") | st.just("x[]"),
            st.text(max_size=10),
        ),
        max_size=12,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs)),
    st.integers(1, 40).map(lambda d: "a" + "[x]" * d + "=1"),
)


@FUZZ
@given(query=_query)
def test_fuzz_query_strings(query):
    _count("query strings")
    try:
        params = phx_http.parse_params(query)
    except phx_http.ParamsError:
        return
    assert isinstance(params, dict)
    json.dumps(params)


class FuzzSocket(Socket):
    channels = [channel("room:*", EchoChannel)]

    def connect(self, params, socket, connect_info):
        return socket

    def id(self, socket):
        return None


@pytest.fixture(scope="module")
def fuzz_app():
    app = Flask("fuzz")
    app.config["SECRET_KEY"] = "fuzz"
    endpoint = Endpoint(app)
    endpoint.socket("/socket", FuzzSocket, longpoll={"window_ms": 50, "max_body_bytes": 4096}, auth_token=True)
    return app


class _TracebackCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def tracebacks():
    handler = _TracebackCatcher()
    logger = logging.getLogger("phx_gevent")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


_header_value = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.sampled_from(["websocket", "13", "8", "phoenix", "dGhlIHNhbXBsZSBub25jZQ==", "http://evil.example", "null"]),
)


@FUZZ
@given(
    query=_query | st.just("vsn=2.0.0") | st.just("vsn=1.0.0&x=1"),
    upgrade=st.sampled_from(["websocket", "WebSocket", "", "h2c"]),
    key=_header_value,
    version=_header_value,
    protocol=st.none()
    | _header_value
    | st.just("phoenix, base64url.bearer.phx.dG9r")
    | st.just("base64url.bearer.phx.%%"),
    origin=st.none() | _header_value,
    extensions=st.none() | _header_value | st.just("permessage-deflate; client_max_window_bits"),
    method=st.sampled_from(["GET", "GET", "POST", "OPTIONS"]),
)
def test_fuzz_websocket_handshakes(
    fuzz_app, tracebacks, query, upgrade, key, version, protocol, origin, extensions, method
):
    _count("handshakes")
    headers = {"Upgrade": upgrade, "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": version}
    for name, value in (
        ("Sec-WebSocket-Protocol", protocol),
        ("Origin", origin),
        ("Sec-WebSocket-Extensions", extensions),
    ):
        if value is not None:
            headers[name] = value
    client = fuzz_app.test_client()
    resp = client.open(
        "/socket/websocket",
        method=method,
        headers=headers,
        environ_overrides={
            ENVIRON_HANDLER: object(),
            # As a WSGI server puts it: the raw bytes, as latin-1.
            "QUERY_STRING": query.encode("utf-8", "surrogatepass").decode("latin-1"),
        },
    )
    assert resp.status_code in (101, 400, 403, 426), resp.status_code
    assert not tracebacks, [r.getMessage() for r in tracebacks]


_line = st.one_of(
    st.builds(lambda v, p: _message_text(v, p, "v2"), _json, st.none() | _poison),
    st.just('["1","1","room:1","phx_join",{}]'),
    st.just('[null,"9","phoenix","heartbeat",{}]'),
    st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=30),
)


@FUZZ
@given(
    lines=st.lists(_line, max_size=6),
    ndjson=st.booleans(),
    raw=st.none() | st.binary(max_size=100),
    token_ok=st.booleans() | st.just(True),
)
def test_fuzz_long_poll_bodies(fuzz_app, tracebacks, lines, ndjson, raw, token_ok):
    _count("long-poll bodies")
    client = fuzz_app.test_client()
    created = client.get("/socket/longpoll?vsn=2.0.0").get_json()
    token = created["token"] if token_ok else "garbage"
    body = raw if raw is not None else "\n".join(lines).encode("utf-8", "surrogatepass")
    ctype = "application/x-ndjson" if ndjson else "text/plain"
    resp = client.post(f"/socket/longpoll?vsn=2.0.0&token={token}", data=body, content_type=ctype)
    assert resp.status_code in (200, 400, 413), resp.status_code
    if resp.status_code == 200:
        assert resp.get_json()["status"] in (200, 408, 410)
    poll = client.get(f"/socket/longpoll?vsn=2.0.0&token={token}")
    assert poll.status_code == 200
    gevent.sleep(0)
    assert not tracebacks, [r.getMessage() for r in tracebacks]


# -- Redis envelopes -----------------------------------------------------------------------------

_envelope_body = st.fixed_dictionaries(
    {},
    optional={
        "k": st.sampled_from(["b", "d", "x"]) | _json_leaf,
        "t": st.text(max_size=10) | _json_leaf,
        "e": st.text(max_size=10) | _json_leaf,
        "x": st.none() | st.integers() | _json_leaf,
        "to": st.text(max_size=10) | _json_leaf,
        "p": _json,
        "pb": st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=10),
        "nb": st.sampled_from([1, 0, None]),
    },
)


@FUZZ
@given(
    body=_envelope_body,
    poison=st.none() | _poison,
    node=st.text(max_size=10),
    junk=st.binary(max_size=60),
    cut=st.integers(0, 200),
)
def test_fuzz_redis_envelopes(body, poison, node, junk, cut):
    _count("Redis envelopes")
    text = json.dumps(body)
    if poison is not None:
        text = text.replace("null", poison, 1) if "null" in text else text[:-1] + ', "z": ' + poison + "}"
    data = b"phx1\n" + node.encode("utf-8", "surrogatepass") + b"\n" + text.encode("utf-8", "surrogatepass")
    for candidate in (data, data[:cut], junk, b"phx1\n" + junk, data + junk):
        try:
            env = codec.decode(candidate)
        except codec.EnvelopeError:
            continue
        # Accepted: it can be delivered (encoded for clients) and sent on again.
        if env["k"] == "b" and isinstance(env["p"], dict):
            V2.encode_broadcast(env["t"], env["e"], env["p"]).encode("utf-8")
        codec.encode(env)


def test_fuzz_report(request):
    """Last in the module: prints how many inputs each target ran (``make fuzz`` reads it)."""
    if COUNTS:
        total = sum(COUNTS.values())
        lines = [f"  {name}: {n}" for name, n in sorted(COUNTS.items())]
        print("\nFUZZ COUNTS\n" + "\n".join(lines) + f"\n  total: {total}")
