# A twistd application (twistd -n -y ops_harness.tac) for the operations
# tests: the real rexecpf service tree from rexecpf.tap.build, plus two kinds
# of live connection the proxy and the listeners will provide for real:
#
# * GET /slow/{seconds}?user=NAME: a drainable tracked request that answers
#   after {seconds} (a proxied request in flight);
# * a relay listener on $HARNESS_RELAY_PORT that splices every accepted
#   connection to 127.0.0.1:$HARNESS_TARGET_PORT with rexecpf.relay, tracked
#   as kind "listener" for user alice (a local_port connection).
#
# Both are tracked under the first forward that exists.
import os

from twisted.application.internet import TCPServer
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web import server
from twisted.web.resource import Resource

from rexecpf.config import load_config
from rexecpf.ops import forget_exit_signal, notifier_from_environ
from rexecpf.relay import TCPEnd, splice_to_endpoint
from rexecpf.tap import build

config_path = os.environ["HARNESS_CONFIG"]
components = build(
    load_config(config_path), reactor, config_path=config_path,
    notifier=notifier_from_environ(os.environ), install_signals=True,
)
reactor.addSystemEventTrigger("after", "shutdown", forget_exit_signal, reactor)
forwards = components.forwards


def forward_id():
    existing = forwards.forwards()
    return existing[0].id if existing else "pf_none"


class SlowRequest:
    kind = "proxy"

    def __init__(self, request, seconds):
        self.request = request
        self.done = Deferred()
        user = request.args.get(b"user", [b"alice"])[0].decode()
        self.untrack = forwards.track(forward_id(), self, user=user)
        self.call = reactor.callLater(seconds, self.finish)
        request.notifyFinish().addBoth(self.ended)

    def finish(self):
        self.request.write(b"finished\n")
        self.request.finish()

    def ended(self, _):
        if self.call.active():
            self.call.cancel()
        self.untrack()
        self.done.callback(None)

    def drain(self):
        return self.done

    def shutdown(self, reason):
        self.request.channel.transport.abortConnection()


class Slow(Resource):
    isLeaf = True

    def render_GET(self, request):
        seconds = float(request.postpath[0].decode())
        request.setHeader(b"content-type", b"text/plain")
        request.write(b"started\n")
        SlowRequest(request, seconds)
        return server.NOT_DONE_YET


class HarnessRoot(Resource):
    def __init__(self, root):
        super().__init__()
        self.root = root

    def getChildWithDefault(self, path, request):
        if path == b"slow":
            return Slow()
        return self.root.getChildWithDefault(path, request)


components.site.resource = HarnessRoot(components.site.resource)


class Accepted(TCPEnd):
    kind = "listener"

    def connectionMade(self):
        super().connectionMade()
        self.fid = forward_id()
        self.spliced = None
        self.untrack = forwards.track(self.fid, self, user="alice")
        target = TCP4ClientEndpoint(reactor, "127.0.0.1", int(os.environ["HARNESS_TARGET_PORT"]))
        splice_to_endpoint(reactor, target, self, on_end=self.ended).addCallbacks(
            self.started, lambda failure: self.untrack()
        )

    def started(self, relay):
        self.spliced = relay

    def ended(self, stats):
        self.untrack()
        forwards.relay_ended("listener", self.fid, "alice", stats)

    def shutdown(self, reason):
        if self.spliced is not None:
            self.spliced.close(1001, reason)
        else:
            self.transport.abortConnection()


application = Application("rexecpf-ops-harness")
components.service.setServiceParent(application)
TCPServer(int(os.environ["HARNESS_RELAY_PORT"]), Factory.forProtocol(Accepted),
          interface="127.0.0.1").setServiceParent(application)
