"""The example app plus ``feed:*``: the example's room channel with a longer history (1,000 messages).

For the recovery tests under gunicorn: a 5 s cut at 100 messages/s is 500
messages, more than the example's rooms keep (100), which would rightly
answer ``recovered: false``. ``room:*`` is served exactly as by the example.
"""

from gevent import monkey

monkey.patch_all()

import app_example  # noqa: E402
from phx_gevent import channel  # noqa: E402

FEED_HISTORY = {"size": 1000, "ttl": 300, "events": ["new_msg"]}

app, endpoint = app_example.create_app()
_handler = endpoint.mounts[0].handler
_handler.channels = [*_handler.channels, channel("feed:*", app_example.RoomChannel, history=FEED_HISTORY)]
endpoint.pubsub.keep_history("feed:*", FEED_HISTORY)
