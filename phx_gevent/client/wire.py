"""The client's side of Phoenix's V2 wire format (PROTOCOL.md 2.3, 2.4): the mirror of the server serializer.

Text frames are JSON arrays ``[join_ref, ref, topic, event, payload]`` both
ways. Binary frames: a client sends only kind 0 (push, with a ref); it
receives kind 0 (push, no ref), 1 (reply) and 2 (broadcast). Pure functions,
no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ujson

from ..serializers import DecodeError, EncodeError, Message, decode_server_binary, dumps, encode_client_push

__all__ = ["DecodeError", "EncodeError", "Message", "decode", "encode", "query_params", "REPLY"]

REPLY = "phx_reply"
_BINARY = (bytes, bytearray, memoryview)


def encode(join_ref: Any, ref: Any, topic: str, event: str, payload: Any) -> str | bytes:
    """One client frame: a JSON text frame, or a binary kind-0 push when ``payload`` is bytes.

    Raises :class:`EncodeError` for a binary field over 255 bytes, ``TypeError``
    or ``OverflowError`` for a payload JSON cannot carry.
    """
    if isinstance(payload, _BINARY):
        return encode_client_push(join_ref, ref, topic, event, bytes(payload))
    return dumps([join_ref, ref, topic, event, payload])


def decode(data: str | bytes) -> Message:
    """One server frame as a :class:`Message`; raises :class:`DecodeError` for anything malformed.

    A binary reply becomes ``event="phx_reply"``, ``payload={"status": s,
    "response": <bytes>}``, as phoenix.js decodes it; empty binary refs
    become ``None`` (:func:`phx_gevent.serializers.decode_server_binary`).
    """
    if isinstance(data, _BINARY):
        return decode_server_binary(bytes(data))
    try:
        frame = ujson.loads(data)
    except (ValueError, OverflowError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if type(frame) is not list or len(frame) < 5:
        raise DecodeError("a V2 frame must be a JSON array of at least five elements")
    join_ref, ref, topic, event, payload = frame[:5]
    if not isinstance(topic, str) or not isinstance(event, str):
        raise DecodeError("topic and event must be strings")
    return Message(join_ref, ref, topic, event, payload)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as JavaScript's String(true)
    if isinstance(value, (str, int, float)):
        return str(value)
    raise EncodeError(
        f"connect params hold strings, numbers, booleans, None, dicts and lists; got {type(value).__name__}"
    )


def _flatten(key: str, value: Any, out: list[tuple[str, str]]) -> None:
    if value is None:
        return  # phoenix.js's serialize leaves out null values
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{key}[{k}]", v, out)
    elif isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            out.extend((f"{key}[]", _scalar(v)) for v in value if v is not None)
        else:
            for i, v in enumerate(value):
                _flatten(f"{key}[{i}]", v, out)
    else:
        out.append((key, _scalar(value)))


def query_params(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Connect params as query pairs, nested the way Plug (and phx_gevent's server) decodes them.

    ``{"user": {"id": 7, "tags": ["a", "b"]}}`` gives ``user[id]=7``,
    ``user[tags][]=a``, ``user[tags][]=b``: the server sees
    ``{"user": {"id": "7", "tags": ["a", "b"]}}``. As with phoenix.js, the
    values arrive as strings (``True`` as ``"true"``) and ``None`` is left
    out; a list holding dicts or lists is sent by index (``a[0][b]=c``, as
    phoenix.js sends every list), arriving as a dict keyed ``"0"``, ``"1"``...
    Raises :class:`EncodeError` for a value of another type (bytes, objects).
    """
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        _flatten(str(key), value, out)
    return out
