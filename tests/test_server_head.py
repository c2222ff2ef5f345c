"""The request-head reader of phx_gevent's WSGI handler gives what gevent's own (the email parser) gives.

``read_headers`` takes a shortcut for blocks of plain ``Name: value`` lines;
every block here is read both ways and must give the same headers, the same
WSGI environ keys, the same limits and leave the stream at the same place.
"""

from __future__ import annotations

import io
from http import client

import pytest
from gevent import pywsgi

from phx_gevent.transports.head import PlainHeaders, environ_headers, read_headers

BLOCKS = [
    b"Host: a\r\n\r\n",
    b"\r\n",
    b"Host: a\r\nAccept: */*\r\nX-Phoenix-Longpoll-Token: abc.def-_\r\nConnection: keep-alive\r\n\r\nBODY",
    b"Host:a\r\nX-Empty:\r\nX-Blanks: \t lead and trail \t \r\n\r\n",
    b"host: a\nContent-Type: text/plain\nContent-Length: 4\n\nbody",  # bare LF line ends
    b"Host: a\r\nX-Folded: one\r\n  two\r\n\tthree\r\n\r\n",  # obsolete line folding
    b"Host: a\r\nX-CR: in\rside\r\n\r\n",  # a bare CR inside a line
    b"Host: a\r\nno colon here\r\nX-After: 1\r\n\r\n",
    b"Host: a\r\n: empty name\r\n\r\n",
    b"Host : spaced name\r\n\r\n",
    b"From nobody\r\nHost: a\r\n\r\n",
    b"Host: a\r\nX-Latin: caf\xe9 \xff\r\nX_Under: dropped by pywsgi\r\n\r\n",
    b"Host: a\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n",
    b"Host: a\r\nX-Colons: a:b:c\r\n\r\n",
    b"Host: a\r\nX-No-End: eof",  # the stream ends inside the head
    b"",
]


def read_both(block: bytes) -> tuple[tuple[object, ...], tuple[object, ...]]:
    out = []
    for reader in (pywsgi.headers_factory, read_headers):
        fp = io.BytesIO(block)
        msg = reader(fp, 0)
        environ_pairs = list(pywsgi.WSGIHandler._headers(type("H", (), {"headers": msg})()))
        if isinstance(msg, PlainHeaders):  # what phx_gevent's handler yields for the environ
            environ_pairs = list(environ_headers(msg))
        lookups = [(msg.get(n), msg.get(n, "-"), msg[n], n in msg) for n in NAMES]
        del msg["x-dup"]  # as pywsgi deletes content-length of a chunked request
        msg["X-Added"] = "new"
        lookups += [(msg.get(n), n in msg) for n in ("X-Dup", "x-added", "host")]
        out.append((msg.status, list(msg.items()), list(msg.headers), environ_pairs, lookups, fp.read()))
    return tuple(out[0]), tuple(out[1])


# Header lookups (PlainHeaders answers them from an index): any case, missing names, duplicates.
NAMES = ["host", "HOST", "Content-Length", "x-dup", "X-Latin", "x-empty", "X-Blanks", "missing", "x_under"]


@pytest.mark.parametrize("block", BLOCKS)
def test_same_headers_as_gevents_reader(block):
    gevent_reading, ours = read_both(block)
    assert ours == gevent_reading


def test_same_limits():
    long_line = b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n"
    assert read_both(long_line)[1][0] == "Line too long" == read_both(long_line)[0][0]
    many = b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
    for reader in (pywsgi.headers_factory, read_headers):
        with pytest.raises(client.HTTPException, match="more than 100 headers"):
            reader(io.BytesIO(many), 0)
    hundred = b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n"
    assert read_both(hundred)[0] == read_both(hundred)[1]


def test_plain_blocks_skip_the_email_parser(monkeypatch):
    import email.parser

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the email parser ran")

    monkeypatch.setattr(email.parser, "Parser", refuse)
    msg = read_headers(io.BytesIO(BLOCKS[2]), 0)
    assert msg.get("x-phoenix-longpoll-token") == "abc.def-_" and msg.get("Connection") == "keep-alive"
    with pytest.raises(AssertionError, match="email parser"):
        read_headers(io.BytesIO(BLOCKS[5]), 0)  # folded lines take the long way
