"""Structural rules of the package: exception hierarchy, options, runtime ownership, typed seams."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import phx_gevent
from phx_gevent.errors import PhxError


def _modules():
    for info in pkgutil.walk_packages(phx_gevent.__path__, "phx_gevent."):
        if info.name.endswith("__main__"):
            continue  # running it would parse the test runner's argv
        yield importlib.import_module(info.name)


def test_every_public_library_exception_derives_from_phx_error():
    found = []
    for module in _modules():
        for name, value in vars(module).items():
            if name.startswith("_") or not inspect.isclass(value) or not issubclass(value, BaseException):
                continue
            if not value.__module__.startswith("phx_gevent"):
                continue  # re-exported builtins
            found.append(value)
            assert issubclass(value, PhxError), f"{value.__module__}.{name} does not derive from PhxError"
    names = {cls.__name__ for cls in found}
    assert {"EncodeError", "DecodeError", "ProtocolError", "EnvelopeError", "ParamsError"} <= names


@pytest.mark.parametrize(
    ("path", "base"),
    [
        ("phx_gevent.serializers.EncodeError", ValueError),
        ("phx_gevent.serializers.DecodeError", ValueError),
        ("phx_gevent.pubsub.codec.EnvelopeError", ValueError),
        ("phx_gevent.transports.http.ParamsError", ValueError),
        ("phx_gevent.errors.CallbackReturnError", TypeError),
        ("phx_gevent.testing.ConnectRefused", AssertionError),
    ],
)
def test_exceptions_keep_the_builtin_base_applications_catch(path, base):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, base) and issubclass(cls, PhxError)


def test_push_with_a_list_payload_raises_encode_error_as_documented():
    from phx_gevent.serializers import EncodeError, V2JSONSerializer

    with pytest.raises(EncodeError):
        V2JSONSerializer().encode_push("1", "room:1", "e", [1, 2])


# -- options: one shape, checked at socket() --------------------------------------------------


class _S(phx_gevent.Socket):
    def connect(self, params, socket, connect_info):
        return socket


@pytest.mark.parametrize("group", ["websocket", "longpoll", "drainer"])
def test_unknown_option_names_are_refused_naming_the_known_ones(group):
    from phx_gevent.options import ConfigurationError

    with pytest.raises(ConfigurationError, match=rf"unknown {group} option\(s\) \['nope'\]; known: \["):
        phx_gevent.Endpoint().socket("/s", _S, **{group: {"nope": 1}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"websocket": {"timeout": 60_000}}, "websocket timeout is 60000 seconds.*milliseconds"),
        ({"websocket": {"close_timeout": 5000}}, "websocket close_timeout is 5000 seconds.*milliseconds"),
        ({"drainer": {"shutdown": 30_000}}, "drainer shutdown is 30000 seconds.*milliseconds"),
        ({"drainer": {"batch_interval": 2000}}, "drainer batch_interval is 2000 seconds.*milliseconds"),
        ({"join_timeout": 10_000}, "join_timeout is 10000 seconds.*milliseconds"),
        ({"longpoll": {"window_ms": 10_000_000}}, "longpoll window_ms is 10000000 milliseconds"),
        ({"longpoll": {"max_lines": 1.5}}, "longpoll max_lines must be a whole number of messages"),
        ({"websocket": {"max_frame_size": 0}}, "websocket max_frame_size must be a positive number of bytes"),
        ({"drainer": {"batch_size": "10"}}, "drainer batch_size must be a number of connections"),
    ],
)
def test_implausible_values_are_refused_with_their_unit(kwargs, message):
    from phx_gevent.options import ConfigurationError

    with pytest.raises(ConfigurationError, match=message) as info:
        phx_gevent.Endpoint().socket("/s", _S, **kwargs)
    # Applications written against the older checks catch either builtin.
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_the_mount_holds_typed_options_with_their_defaults():
    from phx_gevent.options import DrainerOptions, LongPollOptions, WebSocketOptions

    mount = phx_gevent.Endpoint().socket("/s", _S, longpoll=True, drainer={"batch_size": 5})
    assert mount.websocket == WebSocketOptions() and mount.websocket.subprotocols == ["phoenix"]
    assert mount.longpoll_options == LongPollOptions()
    assert mount.drainer == DrainerOptions(batch_size=5)
    off = phx_gevent.Endpoint().socket(
        "/t", _S, websocket=False, longpoll=LongPollOptions(window_ms=500), drainer=False
    )
    assert off.websocket is None and off.drainer is None and off.longpoll.window == 0.5


# -- runtime state with one owner -----------------------------------------------------------------


def test_a_second_endpoint_cannot_retune_the_first():
    from phx_gevent.options import ConfigurationError
    from phx_gevent.runtime import runtime

    default = runtime.flow.slow_timeout
    first = phx_gevent.Endpoint(slow_client_timeout=default + 7)
    try:
        assert runtime.flow.slow_timeout == default + 7 and runtime.owner("slow_client_timeout") is first
        with pytest.raises(ConfigurationError, match=r"slow_client_timeout=.* \(this one asks"):
            phx_gevent.Endpoint(slow_client_timeout=default + 8, max_queued_bytes=1234567)
        # Refused as a whole: nothing of the second endpoint's settings was applied.
        assert runtime.flow.slow_timeout == default + 7 and runtime.flow.high_water != 1234567
        # The same value, or none, is fine.
        same = phx_gevent.Endpoint(slow_client_timeout=default + 7)
        phx_gevent.Endpoint()
        assert runtime.owner("slow_client_timeout") is same
    finally:
        runtime.release(first)
        runtime.release(same)
    # Nobody owns it any more: back to the default.
    assert runtime.flow.slow_timeout == default and runtime.owner("slow_client_timeout") is None


def test_settings_end_with_the_endpoint_that_set_them():
    import gc

    from phx_gevent.runtime import runtime

    default = runtime.flow.timeout
    endpoint = phx_gevent.Endpoint(broadcast_timeout=default + 1)
    assert runtime.flow.timeout == default + 1
    del endpoint
    gc.collect()
    assert runtime.flow.timeout == default and runtime.owner("broadcast_timeout") is None
    # Now another endpoint may choose freely.
    other = phx_gevent.Endpoint(broadcast_timeout=default + 2)
    assert runtime.flow.timeout == default + 2
    runtime.release(other)


def test_runtime_settings_are_checked_like_options():
    from phx_gevent.options import ConfigurationError
    from phx_gevent.runtime import runtime

    with pytest.raises(ConfigurationError, match="slow_client_timeout is 5000 seconds.*milliseconds"):
        phx_gevent.Endpoint(slow_client_timeout=5000)
    with pytest.raises(ConfigurationError, match="unknown runtime setting"):
        runtime.claim(_S(), nope=1)
    assert runtime.owner("slow_client_timeout") is None


def test_the_flusher_and_the_sweeper_belong_to_the_runtime_per_hub():
    from phx_gevent.runtime import runtime
    from phx_gevent.transports.sweeper import IdleSweeper
    from phx_gevent.transports.writer import Flusher

    assert isinstance(runtime.flusher(), Flusher) and runtime.flusher() is runtime.flusher()
    assert isinstance(runtime.sweeper(), IdleSweeper) and runtime.sweeper() is runtime.sweeper()
    # The budget of immediate sends: direct_max per direct_period, then refused until the period ends.
    saved = runtime.direct_left, runtime.direct_refill
    try:
        runtime.direct_left, runtime.direct_refill = 0, -1.0
        now = 1000.0
        taken = sum(runtime.direct_budget(now) for _ in range(runtime.direct_max + 5))
        assert taken == runtime.direct_max
        assert not runtime.direct_budget(now + runtime.direct_period / 2)
        assert runtime.direct_budget(now + 2 * runtime.direct_period)
    finally:
        runtime.direct_left, runtime.direct_refill = saved


# -- typed seams -------------------------------------------------------------------------------


def test_the_concrete_classes_meet_the_contracts():
    from phx_gevent import contracts
    from phx_gevent.pubsub.memory import MemoryAdapter, MemoryBus
    from phx_gevent.serializers import V2JSONSerializer
    from phx_gevent.transports.websocket import encoder_for

    adapter = MemoryAdapter(MemoryBus())
    assert isinstance(adapter, contracts.Adapter)
    assert isinstance(encoder_for(V2JSONSerializer(), False), contracts.Encoder)
    # The annotations at the seams name the protocols (mypy checks the rest in `make test`).
    from phx_gevent.connection import Connection
    from phx_gevent.pubsub.local import PubSub

    assert "Transport" in Connection.__init__.__annotations__["transport"]
    assert "Subscriber" in PubSub.subscribe.__annotations__["sub"]


def test_the_core_layers_do_not_import_flask():
    import pathlib
    import re

    root = pathlib.Path(phx_gevent.__file__).parent
    core = [
        root / "connection.py",
        root / "mount.py",
        root / "broadcaster.py",
        root / "serializers.py",
        root / "runtime.py",
        root / "flow.py",
        root / "options.py",
        root / "contracts.py",
        *(root / "channels").glob("*.py"),
        *(root / "pubsub").glob("*.py"),
        *(root / "presence").glob("*.py"),
        root / "transports" / "writer.py",
        root / "transports" / "longpoll" / "session.py",
    ]
    for path in core:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import) (flask|werkzeug)\b", text, re.M), f"{path.name} imports Flask"


#: Most lines a module of phx_gevent/ may have (CONTRIBUTING.md: "each module one job, none much over 500").
MAX_MODULE_LINES = 500
#: Modules still over it, each with who is splitting it. Remove an entry when its module shrinks
#: (the test below fails while an entry is no longer needed, so the list only gets shorter).
OVERSIZED_MODULES: dict[str, str] = {}


def test_modules_stay_under_the_size_limit():
    import pathlib

    root = pathlib.Path(phx_gevent.__file__).parent
    sizes = {
        path.relative_to(root).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in root.rglob("*.py")
    }
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and name not in OVERSIZED_MODULES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by job, see docs/architecture.md): {over}"
    stale = {name: sizes.get(name) for name in OVERSIZED_MODULES if sizes.get(name, 0) <= MAX_MODULE_LINES}
    assert not stale, (
        f"these modules are now within {MAX_MODULE_LINES} lines (or gone): remove them from OVERSIZED_MODULES: {stale}"
    )


#: Private names still imported from another module: (importing module, name) -> why it is left.
PRIVATE_IMPORTS: dict[tuple[str, str], str] = {}


def test_no_module_imports_private_names_of_another():
    import ast
    import pathlib

    root = pathlib.Path(phx_gevent.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        name = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("phx_gevent")):
                for alias in node.names:
                    # Private helpers (``_name``); the mailbox tags of channels/states.py (``_CALL``...) are its API.
                    if alias.name.startswith("_") and not alias.name.startswith("__") and not alias.name.isupper():
                        found.add((name, alias.name))
    unexpected = found - set(PRIVATE_IMPORTS)
    assert not unexpected, f"private names imported across modules (make them public, or move the code): {unexpected}"
    stale = set(PRIVATE_IMPORTS) - found
    assert not stale, f"no longer imported: remove from PRIVATE_IMPORTS: {stale}"
