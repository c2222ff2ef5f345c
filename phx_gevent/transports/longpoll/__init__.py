"""The long-poll transport: phoenix.js's ``LongPoll`` over plain HTTP (PROTOCOL.md section 4).

Three modules: :mod:`.session` (a session and its buffers), :mod:`.view`
(the Flask view) and :mod:`.tokens` (signed session tokens); the
node-to-node requests are the PubSub layer's (:mod:`phx_gevent.pubsub.request`).

A long-poll *session* plays the part of a WebSocket connection: it owns a
:class:`~phx_gevent.connection.Connection` (so the same connect, join,
reply, push, broadcast and disconnect rules apply) and buffers what the
server sends until the client's next ``GET`` takes it. ``POST`` carries the
client's messages (ndjson: JSON text lines, base64 lines for binary).

A session lives in the process that created it. Its token, signed with the
app's ``SECRET_KEY``, names that process's node and the session id, so a
request that lands on another gunicorn worker or machine reaches the owner
through the PubSub adapter (``register``/``send_direct``), with a
correlation id and ``pubsub_timeout_ms``: no sticky sessions. In the owning
process the request is served directly.

Every handled request is answered HTTP 200 with a JSON envelope whose
``status`` is one phoenix.js knows (PROTOCOL.md 4.9): 410 (session created,
or gone), 200/204 (poll), 403 (refused), 408 (POST not acknowledged in
time). Limits that cannot be expressed with those are plain, non-JSON HTTP
errors (400, 413, 503), which the client treats as a transport error and
retries with backoff.

phoenix.js cannot decode binary frames sent to a long-poll client: binary
pushes and broadcasts are not sent to it (logged), and a binary reply
becomes an error reply. Binary *from* the client works.
"""

from .session import BINARY_REFUSED, GONE, MISSING, LongPollEncoder, LongPollSession
from .tokens import SessionTokens
from .view import DEFAULTS, LongPoll

__all__ = [
    "LongPoll",
    "LongPollSession",
    "LongPollEncoder",
    "SessionTokens",
    "BINARY_REFUSED",
    "DEFAULTS",
    "GONE",
    "MISSING",
]
