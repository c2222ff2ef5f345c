"""The example app on Redis with the adapter's routing from ``PHX_ROUTING``, for ``scale.py joins``.

``PHX_ROUTING=topic`` (per-topic channels) or ``broadcast`` (one channel for
every broadcast, the design before issue 13); unset: the adapter's default.
``room:*`` keeps no history here (plain topics, as in ``run.py storm``), so
a join costs its subscription and nothing else of Redis.
"""

from gevent import monkey

monkey.patch_all()

import inspect  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

import app_example  # noqa: E402
from phx_gevent.pubsub import redis as _redis  # noqa: E402

ROUTING = os.environ.get("PHX_ROUTING") or None
_HAS_ROUTING = "routing" in inspect.signature(_redis.RedisAdapter.__init__).parameters


class RoutedAdapter(_redis.RedisAdapter):
    """The Redis adapter with ``routing=PHX_ROUTING`` (when this tree's adapter has the option)."""

    def __init__(self, url: str, prefix: str = "phx", **kwargs: Any) -> None:
        if ROUTING and _HAS_ROUTING:
            kwargs.setdefault("routing", ROUTING)
        elif ROUTING not in (None, "broadcast"):
            raise SystemExit(f"this tree's RedisAdapter has no routing option (PHX_ROUTING={ROUTING})")
        super().__init__(url, prefix, **kwargs)


# Endpoint(pubsub="redis://...") imports the adapter class from this module when it builds one.
_redis.RedisAdapter = RoutedAdapter  # type: ignore[misc]

for _route in app_example.UserSocket.channels:
    _route.history = None

app, endpoint = app_example.create_app()
