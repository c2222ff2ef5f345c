"""``flask phx run``: the development server from Flask's command line.

Flask's own ``flask run`` uses Werkzeug's server, which cannot hand a
WebSocket to phx_gevent (the socket URL answers 500). An app with an
:class:`~phx_gevent.Endpoint` gets this command instead::

    flask --app app phx run --port 4000 --reload

It serves with :func:`~phx_gevent.serve`. The app module is imported by
Flask's command line before the command runs, so it must monkey-patch first
thing itself (``from gevent import monkey; monkey.patch_all()``), as for
``python app.py``; otherwise :func:`~phx_gevent.serve` warns.
"""

from __future__ import annotations

import click
from flask.cli import ScriptInfo, pass_script_info
from flask.helpers import get_debug_flag

__all__ = ["phx"]


@click.group("phx", help="phx_gevent: serve Phoenix Channels (WebSocket and long-poll) in development.")
def phx() -> None:
    """The ``flask phx`` command group."""


@phx.command("run", help="Serve the app with phx_gevent's server (flask run cannot serve its WebSockets).")
@click.option("--host", "-h", default="127.0.0.1", show_default=True, help="The interface to bind to.")
@click.option("--port", "-p", default=4000, show_default=True, type=int, help="The port (0: any free port).")
@click.option(
    "--reload/--no-reload",
    default=None,
    help="Restart when a Python file changes. Default: on with --debug (or FLASK_DEBUG=1).",
)
@pass_script_info
def run(info: ScriptInfo, host: str, port: int, reload: bool | None) -> None:
    """Load the app as ``flask run`` would and serve it with :func:`~phx_gevent.serve` until interrupted."""
    from .server import serve

    app = info.load_app()
    serve(app, host, port, reload=get_debug_flag() if reload is None else reload)
