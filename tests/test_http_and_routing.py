"""Routing, the socket struct, query params, origin checks, auth token and connect_info."""

import base64

import pytest

from phx_gevent import Channel, Socket, SocketState, channel
from phx_gevent.transports.http import (
    URI,
    check_origin,
    compile_origins,
    connect_info,
    decode_auth_token,
    parse_params,
)


class A(Channel):
    pass


class B(Channel):
    pass


def test_routes_first_match_wins_and_star_is_a_prefix():
    class S(Socket):
        channels = [channel("room:lobby", A, assigns={"k": 1}), channel("room:*", B), channel("*", A)]

    s = S()
    assert s.route("room:lobby").channel is A and s.route("room:lobby").assigns == {"k": 1}
    assert s.route("room:42").channel is B
    assert s.route("room:").channel is B
    assert s.route("other").channel is A


def test_route_without_star_is_exact():
    class S(Socket):
        channels = [channel("exact", A)]

    assert S().route("exact") is not None
    assert S().route("exactly") is None


@pytest.mark.parametrize("pattern", ["ro*om", "*x", "", "a**"])
def test_star_only_allowed_last(pattern):
    with pytest.raises(ValueError):
        channel(pattern, A)


def test_route_needs_a_channel_class():
    with pytest.raises(TypeError):
        channel("x", object)


def test_intercept_must_be_a_list_of_names():
    with pytest.raises(TypeError):

        class Bad(Channel):
            intercept = "announce"


def test_socket_struct_assign_and_per_channel_copy():
    s = SocketState()
    assert s.assign(user="a") is s and s.assign("k", 1) is s and s.assign({"m": 2}) is s
    assert s.assigns == {"user": "a", "k": 1, "m": 2}
    c = s.copy_for_channel("room:1", A, "7", {"extra": True})
    c.assigns["user"] = "changed"
    assert s.assigns["user"] == "a"
    assert (c.topic, c.join_ref, c.channel, c.joined, c.assigns["extra"]) == ("room:1", "7", A, False, True)
    for field in (
        "id",
        "assigns",
        "channel",
        "channel_pid",
        "endpoint",
        "handler",
        "joined",
        "join_ref",
        "ref",
        "pubsub_server",
        "topic",
        "transport",
        "transport_pid",
        "serializer",
    ):
        assert hasattr(c, field)


def test_params_nested_syntax_and_limits():
    assert parse_params("user=bob&vsn=2.0.0") == {"user": "bob", "vsn": "2.0.0"}
    assert parse_params("a[b][c]=1&a[d]=2&l[]=x&l[]=y") == {"a": {"b": {"c": "1"}, "d": "2"}, "l": ["x", "y"]}
    assert parse_params("t=%2F%C3%A9") == {"t": "/é"}
    with pytest.raises(ValueError):
        parse_params("&".join(f"k{i}=v" for i in range(1001)))
    with pytest.raises(ValueError):
        parse_params("a" + "[x]" * 20 + "=1")


def env(origin=None, host="example.com:4000"):
    e = {"HTTP_HOST": host}
    if origin is not None:
        e["HTTP_ORIGIN"] = origin
    return e


def test_origin_default_compares_hosts_without_ports():
    assert check_origin(env(), True)
    assert check_origin(env("https://example.com"), True)
    assert check_origin(env("http://EXAMPLE.com:9999"), True)
    assert not check_origin(env("https://evil.com"), True)
    assert not check_origin(env("null"), True)
    assert not check_origin(env("https://evil.com"), True, "other.org")
    assert check_origin(env("https://other.org", host="internal:80"), True, "other.org:443")


def test_origin_lists_and_callables():
    rules = compile_origins(["//example.com", "https://*.other.com", "//another.com:888"])
    assert check_origin(env("http://example.com:1"), rules)
    assert check_origin(env("https://other.com"), rules)
    assert check_origin(env("https://a.b.other.com"), rules)
    assert not check_origin(env("http://a.other.com"), rules)
    assert check_origin(env("https://another.com:888"), rules)
    assert not check_origin(env("https://another.com"), rules)
    assert not check_origin(env("null"), rules)
    assert check_origin(env("https://evil.com"), False)
    assert check_origin(env("https://x.com"), lambda origin, environ: origin.endswith("x.com"))
    with pytest.raises(ValueError):
        compile_origins(["https://"])


def test_auth_token_decoding_accepts_both_alphabets_and_padding():
    token = "a+b/c?d=="
    std = base64.b64encode(token.encode()).decode().rstrip("=")
    url = base64.urlsafe_b64encode(token.encode()).decode()
    assert decode_auth_token("base64url.bearer.phx." + std) == token
    assert decode_auth_token("base64url.bearer.phx." + url) == token
    assert decode_auth_token("base64url.bearer.phx.!!!") is None


def test_connect_info_only_has_the_keys_asked_for():
    environ = {
        "REMOTE_ADDR": "10.0.0.1",
        "REMOTE_PORT": "5555",
        "HTTP_USER_AGENT": "ua",
        "HTTP_X_FORWARDED_FOR": "1.2.3.4",
        "HTTP_TRACEPARENT": "00-abc",
        "HTTP_COOKIE": "secret=1",
        "HTTP_HOST": "h:4000",
        "wsgi.url_scheme": "http",
        "PATH_INFO": "/socket/websocket",
        "QUERY_STRING": "vsn=2.0.0",
        "HTTP_SEC_WEBSOCKET_KEY": "k",
    }
    assert connect_info(environ, []) == {}
    info = connect_info(
        environ,
        [
            "peer_data",
            "x_headers",
            "uri",
            "user_agent",
            "trace_context_headers",
            "sec_websocket_headers",
            {"static": 1},
        ],
        {"auth_token": None},
    )
    assert info["peer_data"] == {"address": "10.0.0.1", "port": 5555, "ssl_cert": None}
    assert info["x_headers"] == [("x-forwarded-for", "1.2.3.4")]
    assert info["trace_context_headers"] == [("traceparent", "00-abc")]
    assert info["sec_websocket_headers"] == [("sec-websocket-key", "k")]
    assert info["uri"] == URI("http", "h", 4000, "/socket/websocket", "vsn=2.0.0")
    assert info["user_agent"] == "ua" and info["static"] == 1 and info["auth_token"] is None
    assert "secret=1" not in repr(info)
