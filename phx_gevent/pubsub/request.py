"""Request/response between nodes, over the adapter's direct messages.

:meth:`PubSub.requests <phx_gevent.pubsub.PubSub.requests>` gives a
:class:`NodeRequests` for one name: :meth:`NodeRequests.ask` sends a request
to one node and waits for its answer; the node's ``serve`` callback gets every
request sent to it, with a :class:`Responder` to acknowledge and answer.

Two waits, so that a slow answer is not mistaken for a dead node: the target
acknowledges (or answers) within ``timeout``, or it is taken as gone
(:attr:`Silence.NOBODY`); after an acknowledgement the answer may take the
``work`` time the caller allows, plus ``timeout``, after which it is lost
(:attr:`Silence.LOST`). A correlation id ties answers to requests.

On the wire (direct messages, so every version of a rolling deploy must
agree): a request is the caller's dict plus ``"cid"``; the answers are
``{"op": "ack", "cid": ...}`` and ``{"op": "res", "cid": ..., **answer}``. A
request's own ``"op"`` must therefore be neither ``"ack"`` nor ``"res"``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from gevent.queue import Empty, Queue

if TYPE_CHECKING:  # pragma: no cover
    from .local import PubSub

__all__ = ["NodeRequests", "Responder", "Silence"]

log = logging.getLogger(__name__)


class Silence(Enum):
    """Why :meth:`NodeRequests.ask` has no answer."""

    #: Nothing came back within the timeout (or there is no other node): the target is gone.
    NOBODY = "nobody"
    #: The target acknowledged, then its answer never came.
    LOST = "lost"


class Responder:
    """Answers one request (given to the ``serve`` callback); usable from any greenlet."""

    __slots__ = ("requests", "node", "cid")

    def __init__(self, requests: NodeRequests, node: str, cid: int) -> None:
        self.requests = requests
        #: The node that asked.
        self.node = node
        self.cid = cid

    def ack(self) -> None:
        """Tell the caller the request is being served (the answer may take its ``work`` time)."""
        self.requests._send(self.node, {"op": "ack", "cid": self.cid})

    def answer(self, message: dict[str, Any]) -> None:
        """Send the answer (a JSON-compatible dict)."""
        self.requests._send(self.node, {**message, "op": "res", "cid": self.cid})


class NodeRequests:
    """Requests named ``name`` between the nodes of one PubSub (see the module doc).

    ``serve(request, responder)`` runs in the adapter's receiving greenlet for
    every request another node sends here: it must not block (spawn a
    greenlet for real work) and answers through ``responder``.
    """

    def __init__(
        self, pubsub: PubSub, name: str, serve: Callable[[dict[str, Any], Responder], None], timeout: float
    ) -> None:
        self.pubsub = pubsub
        self.name = name
        self.serve = serve
        #: Seconds an acknowledgement (or an answer) may take before the target counts as gone.
        self.timeout = timeout
        self._pending: dict[int, Queue] = {}
        self._cids = itertools.count(1)
        pubsub.register(name, self._on_direct)

    def ask(self, node: str, message: dict[str, Any], work: float) -> dict[str, Any] | Silence:
        """Send ``message`` to ``node`` and wait for its answer (the ``"res"`` message), or why there is none.

        ``work``: seconds the answer may take after the acknowledgement. Never
        raises for a node that cannot be reached (:attr:`Silence.NOBODY`).
        """
        pubsub = self.pubsub
        if pubsub.adapter is None:
            return Silence.NOBODY  # one process: there is no other node
        pubsub.start()
        cid = next(self._cids)
        inbox: Queue = Queue()
        self._pending[cid] = inbox
        try:
            try:
                pubsub.send_direct(node, self.name, {**message, "cid": cid})
            except Exception:
                log.exception("phx_gevent: could not reach node %r (%s)", node, self.name)
                return Silence.NOBODY
            try:
                answer = inbox.get(timeout=self.timeout)
            except Empty:
                return Silence.NOBODY
            if answer.get("op") == "ack":
                try:
                    answer = inbox.get(timeout=work + self.timeout)
                except Empty:
                    return Silence.LOST
            return answer
        finally:
            self._pending.pop(cid, None)

    def _on_direct(self, payload: Any, sender: str) -> None:
        # Called by the adapter's receiving greenlet: never block here.
        if not isinstance(payload, dict):
            return
        cid = payload.get("cid")
        if not isinstance(cid, int):
            return
        if payload.get("op") in ("ack", "res"):
            inbox = self._pending.get(cid)
            if inbox is not None:
                inbox.put(payload)
            return
        try:
            self.serve(payload, Responder(self, sender, cid))
        except Exception:
            log.exception("phx_gevent: serving a request from node %r (%s) failed", sender, self.name)

    def _send(self, node: str, message: dict[str, Any]) -> None:
        try:
            self.pubsub.send_direct(node, self.name, message)
        except Exception:
            log.exception("phx_gevent: could not answer node %r (%s)", node, self.name)
