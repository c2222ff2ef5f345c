"""The wire format of envelopes between nodes: JSON that executes nothing when decoded.

One message on the bus is::

    b"phx1\\n" + <sender node name, UTF-8> + b"\\n" + <JSON object>

The sender's name comes first so a receiver can drop its own echo with a
prefix comparison, before decoding anything. The JSON object holds the
envelope keys of :mod:`phx_gevent.pubsub.base` except ``n``:

``k``, ``t``, ``e``, ``x``, ``to``
    As in the envelope.
``p``
    The payload when it is JSON (a dict for broadcasts).
``pb``
    Instead of ``p``: a ``bytes`` payload, base64-encoded (binary survives).
``o``
    The offset of a broadcast on a history topic (:mod:`phx_gevent.pubsub.history`).
    Written first, by the Redis script that assigns it, never by :func:`encode`.
``nb``
    Present when ``bytes`` are nested inside ``p`` (direct messages only):
    they are written as ``{"$phx:b64": "<base64>"}`` and turned back into
    ``bytes`` on decoding. A dict of exactly that shape sent by the
    application would come back as ``bytes`` too.

Never pickle: a node that can publish on the bus can make other nodes
deliver messages to their clients, but never run code.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import ujson

from ..errors import PhxError
from ..serializers import check_encodable, dumps

__all__ = ["MAGIC", "EnvelopeError", "decode", "encode", "echo_prefix"]

#: The first bytes of every message; a future format gets a new tag.
MAGIC = b"phx1\n"

_B64_TAG = "$phx:b64"
_BINARY = (bytes, bytearray, memoryview)


class EnvelopeError(PhxError, ValueError):
    """A message from the bus is not an envelope this version understands."""


def _tag_bytes(value: Any) -> Any:
    if isinstance(value, _BINARY):
        return {_B64_TAG: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _untag_bytes(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _B64_TAG in obj and isinstance(obj[_B64_TAG], str):
        return base64.b64decode(obj[_B64_TAG], validate=True)
    return obj


def echo_prefix(node: str) -> bytes:
    """The bytes every message sent by ``node`` starts with."""
    return MAGIC + node.encode("utf-8") + b"\n"


def encode(envelope: dict[str, Any], node: str | None = None) -> bytes:
    """The wire form of ``envelope``, sent by ``node`` (default: its ``n``).

    Raises ``TypeError`` or ``OverflowError`` when the payload cannot be
    carried (not JSON; NaN or infinity), ``ValueError`` for a node name with
    a newline.
    """
    if node is None:
        node = envelope["n"]
    if not isinstance(node, str) or not node or "\n" in node:
        raise ValueError(f"a node name must be a non-empty string without newlines, got {node!r}")
    body: dict[str, Any] = {"k": envelope["k"], "t": envelope["t"], "e": envelope["e"], "x": envelope.get("x")}
    to = envelope.get("to")
    if to is not None:
        body["to"] = to
    payload = envelope["p"]
    if isinstance(payload, _BINARY):
        body["pb"] = base64.b64encode(bytes(payload)).decode("ascii")
        text = dumps(body)
    else:
        body["p"] = payload
        try:
            text = dumps(body)
        except TypeError:
            if envelope["k"] == "b":
                raise  # a broadcast payload with bytes inside could not reach any client either
            # Direct messages may nest bytes (e.g. a long-poll body): tag them.
            body["nb"] = 1
            text = json.dumps(body, default=_tag_bytes, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return echo_prefix(node) + text.encode("utf-8")


def decode(data: bytes) -> dict[str, Any]:
    """The envelope in ``data``; raises :class:`EnvelopeError` for anything else."""
    if not data.startswith(MAGIC):
        raise EnvelopeError("not a phx_gevent envelope (unknown format tag)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise EnvelopeError("truncated envelope")
    try:
        node = data[len(MAGIC) : end].decode("utf-8")
        raw = data[end + 1 :]
        body = ujson.loads(raw)
        # What no encoder of ours may write (NaN, infinity, lone surrogates) is
        # refused here, before it reaches any client's delivery.
        check_encodable(body, raw)
        if isinstance(body, dict) and body.get("nb"):
            body = json.loads(raw, object_hook=_untag_bytes)
    except (UnicodeDecodeError, ValueError, OverflowError, binascii.Error) as exc:
        raise EnvelopeError(f"undecodable envelope: {exc}") from None
    except RecursionError:
        # The stdlib decoder (tagged bytes) recurses per nesting level.
        raise EnvelopeError("undecodable envelope: nested too deep") from None
    if not isinstance(body, dict):
        raise EnvelopeError("envelope is not a JSON object")
    kind = body.get("k")
    topic = body.get("t")
    event = body.get("e")
    exclude = body.get("x")
    if kind not in ("b", "d") or not node or not isinstance(topic, str) or not isinstance(event, str):
        raise EnvelopeError("envelope lacks a valid kind, node, topic or event")
    if exclude is not None and not isinstance(exclude, int):
        raise EnvelopeError("envelope exclusion must be an integer or null")
    if "pb" in body:
        pb = body["pb"]
        if not isinstance(pb, str):
            raise EnvelopeError("binary payload must be base64 text")
        try:
            payload: Any = base64.b64decode(pb, validate=True)
        except (binascii.Error, ValueError):
            raise EnvelopeError("binary payload is not valid base64") from None
    else:
        payload = body.get("p")
    if kind == "b" and not isinstance(payload, (dict, bytes)):
        raise EnvelopeError("a broadcast payload must be an object or bytes")
    envelope = {"k": kind, "n": node, "t": topic, "e": event, "p": payload, "x": exclude}
    offset = body.get("o")
    if offset is not None:
        if kind != "b" or not isinstance(offset, str):
            raise EnvelopeError("an offset must be a string, on a broadcast")
        envelope["o"] = offset
        if body.get("g"):
            envelope["g"] = 1  # a gap marker: takes an offset, carries no message
    if kind == "d":
        to = body.get("to")
        if not isinstance(to, str):
            raise EnvelopeError("a direct message needs a destination node")
        envelope["to"] = to
    return envelope
