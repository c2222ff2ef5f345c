"""The example app with the history of ``room:*`` turned off (docs/recovery.md), for ``run.py workers --history``."""

from gevent import monkey

monkey.patch_all()

import app_example  # noqa: E402

for _route in app_example.UserSocket.channels:
    _route.history = None

app, endpoint = app_example.create_app()
