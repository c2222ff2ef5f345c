"""The command line: broadcast to, or disconnect, the clients of phx_gevent servers through Redis.

::

    python -m phx_gevent broadcast --redis redis://localhost:6379/0 room:lobby new_msg '{"body": "hi"}'
    python -m phx_gevent disconnect --redis redis://localhost:6379/0 user_socket:alice

Prints nothing on success (exit 0 once Redis accepted the message, even if
no server was subscribed). Exit 1 when Redis could not be reached or
refused the message, with one line on stderr; exit 2 for a usage error
(missing arguments, a payload that is not a JSON object), found before
anything connects. It runs in a plain interpreter: it monkey-patches
nothing and needs no Flask app (see :class:`phx_gevent.Emitter`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["main"]

# A call gives up after TIMEOUT seconds of retrying; one attempt takes at most
# CONNECT + SOCKET seconds: the command ends within 10 s whatever Redis does.
TIMEOUT = 3.0
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 2.0


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m phx_gevent",
        description="Talk to the clients of phx_gevent servers (Endpoint(pubsub='redis://...')) through Redis.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--redis", required=True, metavar="URL", help="the servers' Redis (redis://host:6379/0)")
        sub.add_argument("--prefix", default="phx", help="the endpoint's pubsub_prefix (default: phx)")
        sub.add_argument(
            "--routing",
            choices=("topic", "broadcast", "dual"),
            default=None,
            help="the servers' Redis routing (default: the URL's routing= parameter, else topic)",
        )

    b = commands.add_parser(
        "broadcast",
        help="send EVENT with PAYLOAD_JSON to every client joined to TOPIC",
        description="Send EVENT with PAYLOAD_JSON (a JSON object) to every client joined to TOPIC, on every server.",
    )
    common(b)
    b.add_argument("topic", metavar="TOPIC")
    b.add_argument("event", metavar="EVENT")
    b.add_argument("payload", metavar="PAYLOAD_JSON", help='a JSON object, e.g. \'{"body": "hi"}\'')
    d = commands.add_parser(
        "disconnect",
        help="close every connection whose socket id is SOCKET_ID",
        description="Close every connection and long-poll session whose Socket.id() is SOCKET_ID, on every server.",
    )
    common(d)
    d.add_argument("socket_id", metavar="SOCKET_ID", help="the full id, e.g. user_socket:alice")
    return parser, {"broadcast": b, "disconnect": d}


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (Python's json module accepts them by default).
    raise ValueError(f"{name} is not valid JSON")


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Usage errors exit through ``SystemExit(2)`` (argparse's convention).
    """
    parser, subs = _parser()
    args = parser.parse_args(argv)
    sub = subs[args.command]
    payload: Any = {}
    if args.command == "broadcast":
        try:
            payload = json.loads(args.payload, parse_constant=_no_constant)
        except ValueError as exc:
            sub.error(f"PAYLOAD_JSON is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            sub.error(f"PAYLOAD_JSON must be a JSON object, got {type(payload).__name__}")
    elif not args.socket_id:
        sub.error("SOCKET_ID must not be empty")

    # Imported after the arguments are checked: a usage error costs nothing.
    from .emitter import Emitter
    from .errors import EmitterError, PayloadError

    try:
        emitter = Emitter(
            args.redis,
            args.prefix,
            routing=args.routing,
            timeout=TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            max_connections=1,
        )
    except ValueError as exc:
        sub.error(f"bad --redis or --prefix: {exc}")
    try:
        with emitter:
            if args.command == "broadcast":
                emitter.broadcast(args.topic, args.event, payload)
            else:
                emitter.disconnect(args.socket_id)
    except PayloadError as exc:
        # Found while encoding, before anything was sent or connected.
        sub.error(str(exc))
    except EmitterError as exc:
        print(f"phx_gevent {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
