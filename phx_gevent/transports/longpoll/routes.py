"""The WSGI layer in front of a Flask app that serves live long-poll sessions without Flask's dispatch."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from .answers import plain_answer

if TYPE_CHECKING:  # pragma: no cover
    from flask import Flask

    from ...mount import SocketMount
    from .view import LongPoll

__all__ = ["LongPollRoutes"]

log = logging.getLogger(__name__)


class LongPollRoutes:
    """WSGI middleware in front of a Flask app: the polls and POSTs of live long-poll sessions, without Flask.

    A poll is the long-poll client's "read the next frames", as a WebSocket
    reads a frame: it needs none of the app's request dispatch (request
    context, session cookie, URL routing, ``before_request`` hooks, a
    response object), which cost more than the poll itself. A request to a
    long-poll path whose token names a live session of this process is
    answered here (:meth:`LongPoll.answer` with no path params); everything
    else (new sessions, refusals, preflights, sessions of other processes,
    any other URL) goes to ``wsgi_app`` unchanged. ``Endpoint.init_app``
    installs it as ``app.wsgi_app``. ``admit(environ)`` runs first (the
    endpoint's allowed-hosts and trusted-proxies rules); ``False`` sends the
    request to Flask.
    """

    def __init__(self, app: Flask, wsgi_app: Any, mounts: list[SocketMount], admit: Any) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.mounts = mounts
        self.admit = admit
        self._count = -1
        self._exact: dict[str, LongPoll] = {}
        self._patterns: list[tuple[re.Pattern[str], LongPoll]] = []

    def _routes(self) -> None:
        # Mounts are only ever added: rebuild when their number changed.
        self._count = len(self.mounts)
        self._exact, self._patterns = {}, []
        for mount in self.mounts:
            lp = mount.longpoll
            if lp is None:
                continue
            path = ("" if mount.path == "/" else mount.path) + lp.path
            if "/:" not in path:
                self._exact[path] = lp
                continue
            parts = [("[^/]+" if seg.startswith(":") and len(seg) > 1 else re.escape(seg)) for seg in path.split("/")]
            self._patterns.append((re.compile("/".join(parts)), lp))

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        """Serve ``environ`` (the WSGI call)."""
        if self._count != len(self.mounts):
            self._routes()
        path = environ.get("PATH_INFO", "")
        lp = self._exact.get(path)
        if lp is None and self._patterns:
            lp = next((lp for pattern, lp in self._patterns if pattern.fullmatch(path)), None)
        if lp is not None and self.admit(environ):
            try:
                answer = lp.answer(environ, self.app, None)
            except Exception:
                # What Flask does for a view that raised: logged, a 500, the process goes on.
                log.exception("phx_gevent: serving a long-poll request to %s failed", path)
                answer = plain_answer(500, "Internal Server Error", close=True)
            if answer is not None:
                return answer(environ, start_response)
        return self.wsgi_app(environ, start_response)
