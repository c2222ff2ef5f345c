"""CPU time per push/reply through ``Connection.handle`` and the channel runtime, in memory (no sockets).

Usage: ``python benchmarks/micro_pushreply.py <repository root> <rounds>``; prints microseconds
of this process's CPU per push/reply. Pass another tree's root (a ``git archive`` of an older
commit) to compare code versions; alternate the two several times and compare medians
(results/tuning/parity-pushreply.md).
"""

import sys
import time


def main(root: str, rounds: int) -> float:
    sys.path.insert(0, root)  # the tree under test, before any phx_gevent import
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from flask import Flask

    from phx_gevent import Channel, Endpoint, Socket, channel, ok
    from phx_gevent.serializers import Message
    from phx_gevent.testing import ChannelTest

    class Echo(Channel):
        def join(self, topic, payload, socket):
            return ok({})

        def handle_in(self, event, payload, socket):
            return ok(payload)

    class EchoSocket(Socket):
        channels = [channel("r:*", Echo)]

    endpoint = Endpoint(Flask("micro"))
    endpoint.socket("/socket", EchoSocket, log=False)
    rooms = [ChannelTest(endpoint).connect().join("r:1") for _ in range(50)]
    payload = {"t": 1, "s": 2, "p": "x" * 40}

    def run(n: int) -> None:
        for i in range(n):
            for room in rooms:
                room.client.conn.handle(Message(room.join_ref, str(i), "r:1", "ping", payload))
            gevent.sleep(0)  # the channels answer
            if i % 50 == 0:
                for room in rooms:
                    room.client.transport.frames.clear()

    run(200)  # warm-up
    start = time.process_time()
    run(rounds)
    return (time.process_time() - start) / (rounds * len(rooms)) * 1e6


if __name__ == "__main__":
    print(f"{main(sys.argv[1], int(sys.argv[2])):.3f}")
