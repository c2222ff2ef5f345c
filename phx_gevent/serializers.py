"""Phoenix wire serializers: V1 JSON objects, V2 JSON arrays and V2 binary frames.

A serializer turns client frames into :class:`Message` objects and server-side
messages into wire data. Encoded data is ``str`` for a text frame and ``bytes``
for a binary frame, so transports can tell the two apart without a flag.

Refs and join_refs are echoed exactly as the client sent them: a ref ``0``
stays the number ``0`` and ``"0"`` stays a string (PROTOCOL.md 1.1).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import ujson

from .errors import PhxError

__all__ = [
    "FastlaneEncoder",
    "DecodeError",
    "EncodeError",
    "Message",
    "Serializer",
    "V1JSONSerializer",
    "V2JSONSerializer",
    "V1",
    "V2",
    "negotiate",
    "binary_reply_address",
    "decode_server_frame",
    "dumps",
    "loads",
    "check_encodable",
]


class DecodeError(PhxError, ValueError):
    """A client frame could not be decoded (the connection closes with 1011)."""


class EncodeError(PhxError, ValueError):
    """A server message cannot be put on the wire (wrong payload type, oversize field)."""


def dumps(obj: Any) -> str:
    """Encode ``obj`` as compact JSON the way Phoenix (Jason) would.

    ujson's defaults differ from JSON as browsers expect it: it escapes ``/``
    and non-ASCII text, and writes the invalid literal ``NaN``. We turn all
    three off (STACK_NOTES.md). Raises ``TypeError`` for values JSON cannot
    hold (bytes, arbitrary objects) and ``OverflowError`` for NaN/Infinity.
    """
    return _dumps(obj, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)


_dumps = ujson.dumps
_loads = ujson.loads


def check_encodable(obj: Any, text: str | bytes) -> None:
    """Raise ``ValueError`` unless ``obj`` (just decoded from the JSON ``text``) can be encoded again.

    JSON decoders accept what no encoder of ours may write: ``NaN``,
    ``Infinity``, numbers too large for a float (``1e400`` becomes infinity)
    and escaped lone surrogates (``"\\ud800"``). Let in, such a value breaks
    whoever encodes it later: another client's delivery, a long-poll
    response. Encoding once is the exact test and runs at C speed; the
    surrogate test (UTF-8 encoding) runs only when the text has an escape.
    """
    try:
        out = _dumps(obj, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False)
        if (b"\\u" in text) if isinstance(text, bytes) else ("\\u" in text):
            out.encode("utf-8")
    except (OverflowError, UnicodeEncodeError, ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"not re-encodable JSON ({type(exc).__name__}: {exc})") from None


def loads(text: str | bytes) -> Any:
    """Decode JSON, refusing (``ValueError``) what cannot be encoded again (see :func:`check_encodable`)."""
    try:
        obj = _loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    check_encodable(obj, text)
    return obj


class Message:
    """One decoded client frame: ``[join_ref, ref, topic, event, payload]``.

    ``payload`` is whatever JSON value the client sent, or ``bytes`` for a
    binary push.
    """

    __slots__ = ("join_ref", "ref", "topic", "event", "payload")

    def __init__(self, join_ref: Any, ref: Any, topic: str, event: str, payload: Any) -> None:
        self.join_ref = join_ref
        self.ref = ref
        self.topic = topic
        self.event = event
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"Message(join_ref={self.join_ref!r}, ref={self.ref!r}, topic={self.topic!r}, "
            f"event={self.event!r}, payload={self.payload!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.join_ref, self.ref, self.topic, self.event, self.payload) == (
            other.join_ref,
            other.ref,
            other.topic,
            other.event,
            other.payload,
        )


def _check_payload(payload: Any) -> None:
    # Phoenix requires push and broadcast payloads to be a map or binary
    # (PROTOCOL.md 2.5); anything else raises in the channel, like here.
    if not isinstance(payload, (dict, bytes, bytearray, memoryview)):
        raise EncodeError(f"push and broadcast payloads must be a dict or bytes, got {type(payload).__name__}")


def _ref_bytes(value: Any, field: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, int) and not isinstance(value, bool):
        data = str(value).encode("ascii")
    else:
        raise EncodeError(f"{field} must be a string to go in a binary frame, got {type(value).__name__}")
    if len(data) > 255:
        raise EncodeError(f"{field} is {len(data)} bytes; binary frames allow at most 255")
    return data


def _field_bytes(value: str, field: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 255:
        raise EncodeError(f"{field} is {len(data)} bytes; binary frames allow at most 255")
    return data


def _fields(data: bytes, start: int, lengths: tuple[int, ...]) -> list[str]:
    # Consecutive UTF-8 fields of a binary frame's head, after checking the frame holds them.
    if len(data) < start + sum(lengths):
        raise DecodeError("binary frame shorter than its declared fields")
    out = []
    for n in lengths:
        try:
            out.append(data[start : start + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise DecodeError("binary frame fields are not valid UTF-8") from None
        start += n
    return out


def decode_server_binary(data: bytes) -> Message:
    """A V2 binary frame the server sent, decoded as phoenix.js decodes it (PROTOCOL.md 2.4).

    Kind 0 (push, no ref), 1 (reply: ``event="phx_reply"``, ``payload={"status":
    s, "response": <bytes>}``) or 2 (broadcast); empty refs become ``None``.
    Raises :class:`DecodeError` for an empty, short or unknown frame, or
    fields that are not UTF-8.
    """
    data = bytes(data)
    if not data:
        raise DecodeError("empty binary frame")
    kind = data[0]
    head = {0: 4, 1: 5, 2: 3}.get(kind)
    if head is None:
        raise DecodeError(f"unknown binary frame kind {kind}")
    if len(data) < head:
        raise DecodeError(f"binary frame of kind {kind} shorter than its {head}-byte header")
    lengths = tuple(data[1:head])
    fields = _fields(data, head, lengths)
    body = data[head + sum(lengths) :]
    if kind == 0:
        join_ref, topic, event = fields
        return Message(join_ref or None, None, topic, event, body)
    if kind == 1:
        join_ref, ref, topic, status = fields
        return Message(join_ref or None, ref or None, topic, "phx_reply", {"status": status, "response": body})
    topic, event = fields
    return Message(None, None, topic, event, body)


def encode_client_push(join_ref: Any, ref: Any, topic: str, event: str, payload: bytes) -> bytes:
    """A client's V2 binary push (kind 0 with a ref, PROTOCOL.md 2.4): what :meth:`V2JSONSerializer.decode` reads.

    Raises :class:`EncodeError` for a field over 255 bytes or of another type than str (or int refs).
    """
    jr, r = _ref_bytes(join_ref, "join_ref"), _ref_bytes(ref, "ref")
    t, e = _ref_bytes(topic, "topic"), _ref_bytes(event, "event")
    return b"".join((bytes((0, len(jr), len(r), len(t), len(e))), jr, r, t, e, bytes(payload)))


def decode_server_frame(frame: Any) -> Message:
    """A frame the server sent, decoded as a client would (V1/V2 JSON text, or a V2 binary frame).

    For the test helpers and for transports that must re-address a binary
    frame; the binary layout is known only in this module. Raises
    :class:`DecodeError` for a malformed binary frame.
    """
    if isinstance(frame, str):
        data = json.loads(frame)
        if isinstance(data, list):
            return Message(*data[:5])
        return Message(None, data.get("ref"), data["topic"], data["event"], data["payload"])
    return decode_server_binary(frame)


def binary_reply_address(data: bytes) -> tuple[str | None, str | None, str] | None:
    """``(join_ref, ref, topic)`` of a V2 binary reply frame; ``None`` for any other frame.

    For a transport that cannot carry binary (long-poll) and answers the same
    ref another way. Refs come back as strings: the binary format has no other type.
    """
    if data[:1] != b"\x01" or len(data) < 5:
        return None
    try:
        msg = decode_server_binary(data)
    except DecodeError:
        return None  # not a frame of ours
    return msg.join_ref, msg.ref or None, msg.topic


class Serializer:
    """Base class: turns frames into :class:`Message` and messages into wire data."""

    #: The ``vsn`` requirement this serializer answers, as (major, minor).
    version: tuple[int, int] = (0, 0)
    #: Whether binary frames exist in this format.
    supports_binary = False

    def decode(self, data: str | bytes) -> Message:
        """Decode one client frame. Raises :class:`DecodeError` on any malformed input."""
        raise NotImplementedError

    def encode_push(self, join_ref: Any, topic: str, event: str, payload: Any) -> str | bytes:
        """Encode a server push ``[join_ref, null, topic, event, payload]``."""
        raise NotImplementedError

    def encode_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: Any) -> str | bytes:
        """Encode a ``phx_reply`` with ``{"status": status, "response": response}``."""
        raise NotImplementedError

    def encode_broadcast(self, topic: str, event: str, payload: Any) -> str | bytes:
        """Encode a fastlane broadcast ``[null, null, topic, event, payload]``."""
        raise NotImplementedError

    def encode_broadcast_ref(self, topic: str, event: str, payload: Any, ref: str) -> str | bytes:
        """A broadcast carrying ``ref`` (a history offset) in its ref slot.

        Binary V2 broadcasts have no ref slot: they come out as
        :meth:`encode_broadcast` makes them (no offset).
        """
        raise NotImplementedError

    def encode_control(self, join_ref: Any, topic: str, event: str) -> str:
        """Encode ``phx_close``/``phx_error``: ``[join_ref, join_ref, topic, event, payload]``."""
        raise NotImplementedError


def _check_topic_event(topic: Any, event: Any) -> None:
    if type(topic) is not str:
        raise DecodeError(f"topic must be a string, got {type(topic).__name__}")
    if type(event) is not str:
        raise DecodeError(f"event must be a string, got {type(event).__name__}")


# phx_error carries {"reason": "channel_crash"} since Phoenix 1.8.10; phx_close carries {}.
_CONTROL_PAYLOADS: dict[str, dict[str, str]] = {"phx_error": {"reason": "channel_crash"}}


class V2JSONSerializer(Serializer):
    """The V2 format phoenix.js speaks: JSON arrays in text frames, binary frames for bytes."""

    version = (2, 0)
    supports_binary = True

    def decode(self, data: str | bytes) -> Message:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return self._decode_binary(bytes(data))
        try:
            frame = _loads(data)
            check_encodable(frame, data)
        except (ValueError, OverflowError, RecursionError) as exc:
            raise DecodeError(f"invalid JSON: {exc}") from None
        if type(frame) is not list or len(frame) < 5:
            raise DecodeError("a V2 frame must be a JSON array of at least five elements")
        join_ref, ref, topic, event, payload = frame[0], frame[1], frame[2], frame[3], frame[4]
        _check_topic_event(topic, event)
        return Message(join_ref, ref, topic, event, payload)

    @staticmethod
    def _decode_binary(data: bytes) -> Message:
        # Kind 0 (push) is the only binary frame a client may send (PROTOCOL.md 2.4).
        if len(data) < 5:
            raise DecodeError("binary frame shorter than its 5-byte header")
        if data[0] != 0:
            raise DecodeError(f"unknown binary frame kind {data[0]}")
        jl, rl, tl, el = data[1], data[2], data[3], data[4]
        end = 5 + jl + rl + tl + el
        if len(data) < end:
            raise DecodeError("binary frame shorter than its declared fields")
        try:
            p = 5
            join_ref = data[p : p + jl].decode("utf-8")
            p += jl
            ref = data[p : p + rl].decode("utf-8")
            p += rl
            topic = data[p : p + tl].decode("utf-8")
            p += tl
            event = data[p : p + el].decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("binary frame fields are not valid UTF-8") from None
        return Message(join_ref, ref, topic, event, data[end:])

    def encode_push(self, join_ref: Any, topic: str, event: str, payload: Any) -> str | bytes:
        if type(payload) is dict or isinstance(payload, dict):
            return dumps([join_ref, None, topic, event, payload])
        _check_payload(payload)
        jr = _ref_bytes(join_ref, "join_ref")
        t = _field_bytes(topic, "topic")
        e = _field_bytes(event, "event")
        return b"".join((bytes((0, len(jr), len(t), len(e))), jr, t, e, payload))

    def encode_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: Any) -> str | bytes:
        if not isinstance(response, (bytes, bytearray, memoryview)):
            return dumps([join_ref, ref, topic, "phx_reply", {"status": status, "response": response}])
        jr = _ref_bytes(join_ref, "join_ref")
        r = _ref_bytes(ref, "ref")
        t = _field_bytes(topic, "topic")
        s = _field_bytes(status, "status")
        return b"".join((bytes((1, len(jr), len(r), len(t), len(s))), jr, r, t, s, response))

    def encode_broadcast(self, topic: str, event: str, payload: Any) -> str | bytes:
        if type(payload) is dict or isinstance(payload, dict):
            return dumps([None, None, topic, event, payload])
        _check_payload(payload)
        t = _field_bytes(topic, "topic")
        e = _field_bytes(event, "event")
        return b"".join((bytes((2, len(t), len(e))), t, e, payload))

    def encode_broadcast_ref(self, topic: str, event: str, payload: Any, ref: str) -> str | bytes:
        if type(payload) is dict or isinstance(payload, dict):
            return dumps([None, ref, topic, event, payload])
        return self.encode_broadcast(topic, event, payload)

    def encode_control(self, join_ref: Any, topic: str, event: str) -> str:
        return dumps([join_ref, join_ref, topic, event, _CONTROL_PAYLOADS.get(event, {})])


class V1JSONSerializer(Serializer):
    """The legacy V1 format: one JSON object per text frame, no join_ref on output, no binary."""

    version = (1, 0)
    supports_binary = False

    def decode(self, data: str | bytes) -> Message:
        if isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError("the V1 serializer has no binary frames")
        try:
            frame = _loads(data)
            check_encodable(frame, data)
        except (ValueError, OverflowError, RecursionError) as exc:
            raise DecodeError(f"invalid JSON: {exc}") from None
        if type(frame) is not dict:
            raise DecodeError("a V1 frame must be a JSON object")
        try:
            topic, event, payload, ref = frame["topic"], frame["event"], frame["payload"], frame["ref"]
        except KeyError as exc:
            raise DecodeError(f"a V1 frame needs the key {exc.args[0]!r}") from None
        _check_topic_event(topic, event)
        return Message(frame.get("join_ref"), ref, topic, event, payload)

    def encode_push(self, join_ref: Any, topic: str, event: str, payload: Any) -> str | bytes:
        if not isinstance(payload, dict):
            _check_payload(payload)
            raise EncodeError("the V1 serializer cannot send binary payloads")
        return dumps({"topic": topic, "event": event, "payload": payload, "ref": None})

    def encode_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: Any) -> str | bytes:
        if isinstance(response, (bytes, bytearray, memoryview)):
            raise EncodeError("the V1 serializer cannot send binary payloads")
        return dumps(
            {"topic": topic, "event": "phx_reply", "payload": {"status": status, "response": response}, "ref": ref}
        )

    def encode_broadcast(self, topic: str, event: str, payload: Any) -> str | bytes:
        return self.encode_push(None, topic, event, payload)

    def encode_broadcast_ref(self, topic: str, event: str, payload: Any, ref: str) -> str | bytes:
        if not isinstance(payload, dict):
            _check_payload(payload)
            raise EncodeError("the V1 serializer cannot send binary payloads")
        return dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})

    def encode_control(self, join_ref: Any, topic: str, event: str) -> str:
        return dumps({"topic": topic, "event": event, "payload": _CONTROL_PAYLOADS.get(event, {}), "ref": join_ref})


#: Shared serializer instances; they hold no state.
V1 = V1JSONSerializer()
V2 = V2JSONSerializer()

_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\+[0-9A-Za-z.-]+)?$")


def negotiate(vsn: Any, serializers: tuple[Serializer, ...] = (V1, V2)) -> Serializer | None:
    """Pick the serializer for a client's ``vsn`` query parameter (PROTOCOL.md 2.1).

    A missing vsn means ``"1.0.0"``. Each serializer answers ``~> major.minor.0``
    (``>= major.minor.0 and < major.(minor+1).0``), so ``2.1.0`` matches
    nothing. Pre-releases match nothing either. Returns ``None`` when the value
    is not a string, does not parse, or matches no serializer: the handshake is
    then refused with 403.
    """
    if vsn is None:
        vsn = "1.0.0"
    if not isinstance(vsn, str):
        return None
    m = _SEMVER.match(vsn)
    if m is None:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    for serializer in serializers:
        if serializer.version == (major, minor):
            return serializer
    return None


class FastlaneEncoder:
    """Turns a broadcast into the ready frame of one transport kind, for one serializer.

    The fan-out encodes each broadcast once per distinct encoder and hands
    the same result to every connection that uses it (PROTOCOL.md 5.7), so
    there is one instance per (encoder class, serializer): get it with
    :meth:`of`. Subclasses implement :meth:`broadcast`.
    """

    __slots__ = ("serializer",)
    _instances: ClassVar[dict[Serializer, FastlaneEncoder]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._instances = {}

    def __init__(self, serializer: Serializer) -> None:
        self.serializer = serializer

    @classmethod
    def of(cls, serializer: Serializer) -> Any:
        """The shared instance of this encoder class for ``serializer``."""
        enc = cls._instances.get(serializer)
        if enc is None:
            enc = cls._instances[serializer] = cls(serializer)
        return enc

    def broadcast(self, topic: str, event: str, payload: Any) -> Any:
        """The frame for ``[null, null, topic, event, payload]``, or ``None`` to skip these connections.

        Raises what the serializer raises for a payload it cannot encode.
        """
        raise NotImplementedError

    def broadcast_ref(self, topic: str, event: str, payload: Any, ref: str) -> Any:
        """The frame for ``[null, ref, topic, event, payload]`` (a history offset in the ref slot).

        Used only on history topics, for connections that asked for offsets.
        """
        return self.wrap(self.serializer.encode_broadcast_ref(topic, event, payload, ref))

    def wrap(self, data: str | bytes) -> Any:
        """Turn serialized data into this transport's ready frame (``None`` to skip)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {type(self.serializer).__name__}>"
