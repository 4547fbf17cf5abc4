"""The bare-framework ceilings taskd is compared with, each a server process of its own.

    python -m bench.baselines klein --port P
        GET  /agent  -> a fixed agent in the API envelope (the size of taskd's answer)
        POST /echo   -> the JSON body parsed and echoed back in the envelope
    python -m bench.baselines ws --port P
        GET /ws                 -> an Autobahn websocket (via twisted.web, like taskd's upgrade)
        GET /broadcast?name=X   -> one 500-byte binary frame (taskd framing, event taskAdd,
                                   task name X) sent to every open socket, then 200
                                   (&prepared=1: with Autobahn's prepareMessage, for context)

No database, no auth, no logging per request: what Klein and Autobahn cost on their own.
"""
from __future__ import annotations

import argparse
import json
import sys

from taskd.wire import framing

ENVELOPE_META = {"code": 200, "message": "success", "type": "agent"}
AGENT = {
    "id": 1, "name": "bench-00000", "enabled": True, "enabledChange": "2026-01-01T00:00:00.000000Z",
    "public": True, "tags": ["all", "k1", "k5"], "online": True, "onlineChange": "2026-01-01T00:00:00.000000Z",
    "created": "2026-01-01T00:00:00.000000Z", "updated": "2026-01-01T00:00:00.000000Z",
}
FRAME_SIZE = 500


def broadcast_frame(name: str) -> bytes:
    """A taskd-framed taskAdd of exactly FRAME_SIZE bytes whose task is named `name`."""
    base = {"id": 0, "name": name, "pad": ""}
    frame = framing.encode_json(framing.TASK_ADD, base)
    base["pad"] = "x" * max(0, FRAME_SIZE - len(frame))
    return framing.encode_json(framing.TASK_ADD, base)


def klein_resource():
    from klein import Klein

    app = Klein()

    @app.route("/agent", methods=["GET"])
    def get_agent(request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"meta": ENVELOPE_META, "body": AGENT}).encode()

    @app.route("/echo", methods=["POST"])
    def echo(request):
        body = json.loads(request.content.read())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"meta": {**ENVELOPE_META, "type": "task"}, "body": body}).encode()

    @app.route("/", methods=["GET"])
    def root(request):
        return b"ok"

    return app.resource()


def ws_resource():
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.web.resource import Resource

    clients: set = set()

    class Proto(WebSocketServerProtocol):
        def onOpen(self):
            clients.add(self)

        def onClose(self, wasClean, code, reason):
            clients.discard(self)

    factory = WebSocketServerFactory()
    factory.protocol = Proto
    factory.setProtocolOptions(autoPingInterval=20, autoPingTimeout=20)  # as taskd's

    class Broadcast(Resource):
        isLeaf = True

        def render_GET(self, request):
            name = request.args.get(b"name", [b"x"])[0].decode()
            frame = broadcast_frame(name)
            if request.args.get(b"prepared"):  # one frame header built once, for every client
                prepared = factory.prepareMessage(frame, isBinary=True)
                for proto in list(clients):
                    proto.sendPreparedMessage(prepared)
            else:
                for proto in list(clients):
                    proto.sendMessage(frame, isBinary=True)
            return str(len(clients)).encode()

    class Ok(Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"ok"

    root = Resource()
    root.putChild(b"", Ok())
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"broadcast", Broadcast())
    return root


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.baselines")
    ap.add_argument("kind", choices=["klein", "ws"])
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    from twisted.internet import reactor
    from twisted.web.server import Site

    site = Site(klein_resource() if a.kind == "klein" else ws_resource())
    site.noisy = False
    site.log = lambda request: None  # no access log: the bare ceiling
    reactor.listenTCP(a.port, site, interface="127.0.0.1", backlog=50)
    sys.stdout.write(f"listening on {a.port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
