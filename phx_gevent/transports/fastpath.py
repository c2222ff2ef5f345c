"""Answering WebSocket upgrades without Flask's full dispatch: a reconnect storm's hot path.

A handshake through Flask's ``wsgi_app`` costs more than the rest of a
connect and join together (benchmarks/README.md, the connect storm): the
request context opens the session (an ``itsdangerous`` signer per request),
the URL map is matched, a werkzeug ``Response`` is built and turned back into
WSGI headers, and hooks and signals are walked. :class:`UpgradeFastPath`
wraps a Flask app's ``wsgi_app`` (innermost, so WSGI middleware still runs
first) and answers an upgrade of a socket mount's exact WebSocket path
itself, when nothing of the app would run differently:

* no ``before_request`` function other than the endpoint's own host and
  proxy check (which it runs), no ``after_request`` or URL value
  preprocessor, no receiver of ``request_started``/``request_finished``;
* the upgrade is a ``GET`` served by phx_gevent's WSGI handler.

The handshake then runs inside a real request context (``request``, ``g``,
``current_app``, ``url_for`` and ``session`` all work in ``connect`` and in
the error handler), whose session is opened only when something reads it.
An accepted connection's 101 goes straight to ``start_response``; any
other answer, and a 101 of a request whose session was opened, goes through
Flask's ``finalize_request`` (after-request handling, session saving) as
before, and exceptions through the app's error handlers. Teardown functions
run as usual when the context is popped. Everything else is served by Flask.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response
from flask.ctx import RequestContext
from flask.sessions import SessionMixin
from flask.signals import request_finished, request_started

from .handshake import accept
from .websocket import ENVIRON_HANDLER

if TYPE_CHECKING:  # pragma: no cover
    from ..mount import SocketMount

__all__ = ["UpgradeFastPath", "install"]

log = logging.getLogger(__name__)

#: The session of an :class:`_UpgradeContext` that nothing has read yet.
_UNOPENED: Any = object()

#: Flask (3.x) keeps the session in ``RequestContext._session`` behind a property and opens it on
#: push only while that is ``None``: the lazy session relies on it. Otherwise no fast path.
_SUPPORTED = isinstance(inspect.getattr_static(RequestContext, "session", None), property)

#: The attribute that marks a ``before_request`` function the fast path runs itself (the endpoint's check).
HOOK_MARK = "phx_gevent_request_check"

_StartResponse = Callable[..., Any]

_EXTENSION = "phx_gevent.fastpath"

#: False: every upgrade goes through Flask's dispatch (apps created afterwards; for comparisons).
ENABLED = True


class _UpgradeContext(RequestContext):
    """A request context whose session is opened the first time something reads it."""

    @property
    def session(self) -> SessionMixin:
        """The request's session, opened now if this is the first use (as Flask does on push)."""
        session = self.open_session()
        session.accessed = True
        return session

    def open_session(self) -> SessionMixin:
        """Open the session if nothing has yet (before Flask's response handling, which reads it)."""
        session: Any = self._session
        if session is _UNOPENED:
            interface = self.app.session_interface
            session = interface.open_session(self.app, self.request)
            if session is None:
                session = interface.make_null_session(self.app)
            self._session = session
        return session


class UpgradeFastPath:
    """The ``wsgi_app`` of a Flask app, with the upgrades of registered socket paths answered directly."""

    def __init__(self, app: Flask, inner: Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]) -> None:
        self.app = app
        self.inner = inner
        #: Exact WebSocket paths (``PATH_INFO``) of socket mounts without path parameters.
        self.paths: dict[str, SocketMount] = {}
        self._mounts = -1  # how many mounts the app's endpoints had when ``paths`` was built

    def __call__(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        if "HTTP_UPGRADE" in environ and environ.get("REQUEST_METHOD") == "GET" and ENVIRON_HANDLER in environ:
            path = environ.get("PATH_INFO", "")
            mount = self.paths.get(path) or self._refresh(path)
            if mount is not None:
                checks = self._checks(mount)
                if checks is not None:
                    return self._serve(mount, checks, environ, start_response)
        return self.inner(environ, start_response)

    def _refresh(self, path: str) -> SocketMount | None:
        # A miss: sockets may have been mounted since the paths were collected (cheap when not).
        from ..endpoint import Endpoint

        endpoints = [e for e in list(self.app.extensions.values()) if isinstance(e, Endpoint)]
        count = sum(len(e.mounts) for e in endpoints)
        if count != self._mounts:
            self._mounts = count
            self.paths = {}
            for endpoint in endpoints:
                for mount in endpoint.mounts:
                    base = "" if mount.path == "/" else mount.path
                    if mount.websocket is not None and ":" not in base:
                        # As Flask's routing: the first socket on a path wins.
                        self.paths.setdefault(base + mount.websocket.path, mount)
        return self.paths.get(path)

    def _checks(self, mount: SocketMount) -> list[Any] | None:
        # The before_request functions Flask would run for this route, when the fast path may run
        # them itself (only the endpoint's check); None when some hook needs Flask's own dispatch.
        # Read per request: an app may add hooks at any time.
        if request_started.receivers or request_finished.receivers:
            return None
        app = self.app
        checks: list[Any] = []
        for key in (None, mount.endpoint.blueprint.name):
            if app.url_value_preprocessors.get(key) or app.after_request_funcs.get(key):
                return None
            for func in app.before_request_funcs.get(key, ()):
                if not getattr(func, HOOK_MARK, False):
                    return None
                checks.append(func)
        return checks

    def _serve(
        self, mount: SocketMount, checks: list[Any], environ: dict[str, Any], start_response: _StartResponse
    ) -> Iterable[bytes]:
        # Flask's wsgi_app and full_dispatch_request, minus what _checks found unused and the
        # Response of an accepted upgrade.
        app = self.app
        ctx = _UpgradeContext(app, environ, session=_UNOPENED)
        error: BaseException | None = None
        try:
            try:
                ctx.push()
                try:
                    rv: Any = None
                    for check in checks:
                        rv = check()
                        if rv is not None:
                            break
                    if rv is None:
                        answer = accept(mount, environ, {})
                        if not isinstance(answer, Response):
                            if ctx._session is _UNOPENED:
                                start_response("101 Switching Protocols", answer)
                                return []
                            answer = Response(status=101, headers=answer)  # the session may need saving
                        rv = answer
                except Exception as exc:
                    ctx.open_session()
                    rv = app.handle_user_exception(exc)
                ctx.open_session()
                response = app.finalize_request(rv)
            except Exception as exc:
                error = exc
                ctx.open_session()
                response = app.handle_exception(exc)
            except BaseException:
                error = sys.exc_info()[1]
                raise
            return response(environ, start_response)
        finally:
            if error is not None and app.should_ignore_error(error):
                error = None
            ctx.pop(error)


def install(app: Flask) -> UpgradeFastPath | None:
    """The fast path of ``app``, wrapping its ``wsgi_app`` on first use; ``None`` where it cannot apply.

    It applies when this Flask has the lazy session it needs, the app's
    ``wsgi_app`` is still Flask's own (WSGI middleware installed before the
    endpoint would otherwise be skipped by upgrades) and the URL map matches
    neither hosts nor subdomains.
    """
    known = app.extensions.get(_EXTENSION)
    if known is not None:
        return known if isinstance(known, UpgradeFastPath) else None
    current = app.wsgi_app
    app.extensions[_EXTENSION] = False  # decided once per app
    if not ENABLED or not _SUPPORTED or getattr(current, "__func__", None) is not Flask.wsgi_app:
        return None
    if app.url_map.host_matching or app.subdomain_matching:
        return None
    fast = UpgradeFastPath(app, current)
    app.wsgi_app = fast  # type: ignore[method-assign]
    app.extensions[_EXTENSION] = fast
    return fast
