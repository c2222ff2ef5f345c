"""Reading a request's header block for the WSGI handler: the common case without the email parser.

gevent's pywsgi parses every request's headers with :func:`http.client.parse_headers`,
which runs the :mod:`email` feed parser: for a long-poll client that polls
hundreds of times a second, that parser costs more than the poll itself.
:func:`read_headers` reads the lines with the same limits, and when every line
is a plain ``Name: value`` line (the usual case) builds the same message
directly; any other block (folded lines, odd characters, a bare CR) goes to
the email parser, exactly as before.
"""

from __future__ import annotations

import email.parser
import re
from http import client
from typing import Any

from gevent.pywsgi import OldMessage

__all__ = ["PlainHeaders", "environ_headers", "read_headers"]

# As http.client: longest header line and most header lines.
_MAXLINE = 65536
_MAXHEADERS = 100

# A line the email parser (compat32) reads as one header: a name of printable ASCII without ':' or
# space, then ':', the value without its leading blanks, and the line end; nothing else may hold CR or LF.
_SIMPLE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[ \t]*([^\r\n]*)\r?\n\Z")
_END = (b"\r\n", b"\n", b"")
_NOT_HTTP = ("CONTENT_TYPE", "CONTENT_LENGTH")


class PlainHeaders(OldMessage):
    """A header block of plain ``Name: value`` lines only (what :func:`read_headers` builds itself).

    Lookups by name use an index made on the first one: pywsgi asks for a
    handful of headers per request, and the email message's own ``get``
    lowercases every name each time and re-checks each value for surrogates
    (which a Latin-1 decoded line cannot hold). Results are the message's own:
    the first header of a name wins; a change to the block drops the index.
    """

    _index: dict[str, str] | None = None

    def _lookup(self) -> dict[str, str]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self._headers:
                index.setdefault(name.lower(), value)
            self._index = index
        return index

    def get(self, name: str, failobj: Any = None) -> Any:
        return self._lookup().get(name.lower(), failobj)

    def __getitem__(self, name: str) -> Any:
        return self._lookup().get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __setitem__(self, name: str, val: Any) -> None:
        self._index = None
        super().__setitem__(name, val)

    def __delitem__(self, name: str) -> None:
        self._index = None
        super().__delitem__(name)

    def set_raw(self, name: str, value: Any) -> None:
        self._index = None
        super().set_raw(name, value)

    def replace_header(self, _name: str, _value: Any) -> None:
        self._index = None
        super().replace_header(_name, _value)


def environ_headers(headers: PlainHeaders) -> Any:
    """The ``HTTP_*`` environ pairs of ``headers``, as pywsgi's ``WSGIHandler._headers`` yields them."""
    for key, value in headers._headers:
        if "_" in key:
            continue  # pywsgi drops names with underscores (they could pass for dashes)
        key = key.replace("-", "_").upper()
        if key not in _NOT_HTTP:
            yield "HTTP_" + key, value.strip()


def read_headers(fp: Any, *args: Any) -> Any:
    """The header block of a request read from ``fp``, as pywsgi's ``MessageClass`` returns it.

    Same results and limits as gevent's own factory: a line over 64 KiB
    gives a message whose ``status`` is ``"Line too long"``; more than 100
    lines raise :class:`http.client.HTTPException`.
    """
    lines = []
    while True:
        line = fp.readline(_MAXLINE + 1)
        if len(line) > _MAXLINE:
            msg = OldMessage()
            msg.status = "Line too long"
            return msg
        lines.append(line)
        if len(lines) > _MAXHEADERS:
            raise client.HTTPException(f"got more than {_MAXHEADERS} headers")
        if line in _END:
            break
    pairs = []
    match = _SIMPLE.match
    for line in lines[:-1]:
        m = match(line)
        if m is None:
            # Anything unusual: the email parser, as http.client.parse_headers does.
            text = b"".join(lines).decode("iso-8859-1")
            return email.parser.Parser(_class=OldMessage).parsestr(text)
        pairs.append((m[1].decode("latin-1"), m[2].decode("latin-1")))
    msg = PlainHeaders()
    msg._headers = pairs  # what the email parser fills in for these lines
    return msg
