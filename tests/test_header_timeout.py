"""``header_timeout``: one option for serve()/make_server() and the gunicorn worker (``PHX_HEADER_TIMEOUT``)."""

from __future__ import annotations

import socket

import pytest

from phx_gevent import make_server
from phx_gevent.options import ConfigurationError
from phx_gevent.server import DEFAULT_HEADER_TIMEOUT, header_timeout_from_env
from tests.servers import gunicorn  # noqa: F401  (a fixture)


def test_the_environment_variable_is_read_and_checked_like_the_options():
    assert header_timeout_from_env({}) == DEFAULT_HEADER_TIMEOUT
    assert header_timeout_from_env({"PHX_HEADER_TIMEOUT": " "}) == DEFAULT_HEADER_TIMEOUT
    assert header_timeout_from_env({"PHX_HEADER_TIMEOUT": "7.5"}) == 7.5
    for off in ("off", "None", "0"):
        assert header_timeout_from_env({"PHX_HEADER_TIMEOUT": off}) is None
    with pytest.raises(ConfigurationError, match="PHX_HEADER_TIMEOUT is 20000.0 seconds.*milliseconds"):
        header_timeout_from_env({"PHX_HEADER_TIMEOUT": "20000"})
    with pytest.raises(ConfigurationError, match="PHX_HEADER_TIMEOUT='20s' must be a number of seconds"):
        header_timeout_from_env({"PHX_HEADER_TIMEOUT": "20s"})
    with pytest.raises(ConfigurationError, match="PHX_HEADER_TIMEOUT must be a positive number of seconds"):
        header_timeout_from_env({"PHX_HEADER_TIMEOUT": "-1"})


@pytest.mark.parametrize(
    ("value", "message"),
    [(20_000, "header_timeout is 20000 seconds.*milliseconds"), (-1, "positive"), ("20", "number of seconds")],
)
def test_make_server_refuses_implausible_header_timeouts(value, message):
    app = object()
    with pytest.raises(ConfigurationError, match=message) as info:
        make_server(app, "127.0.0.1", 0, header_timeout=value)
    assert isinstance(info.value, ValueError)  # as documented before
    for off in (None, 0):
        make_server(app, "127.0.0.1", 0, header_timeout=off).close()


def test_the_gunicorn_worker_takes_phx_header_timeout(gunicorn):  # noqa: F811
    server = gunicorn(workers=1, env={"PHX_HEADER_TIMEOUT": "0.5"})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1")  # never the blank line
        assert sock.recv(1024) == b""  # closed by the worker long before the 20 s default (recv would time out)
    finally:
        sock.close()
