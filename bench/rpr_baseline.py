"""
The baseline: a plain ``twisted.web.proxy.ReverseProxyResource`` in front of
``127.0.0.1:BACKEND_PORT``, listening on ``127.0.0.1:PORT``.

    python bench/rpr_baseline.py PORT BACKEND_PORT
"""

import sys

from twisted.internet import reactor
from twisted.web import proxy, server

port, backend = int(sys.argv[1]), int(sys.argv[2])
site = server.Site(proxy.ReverseProxyResource("127.0.0.1", backend, b""))
site.log = lambda request: None  # no access log, as rexecpf in the bench
reactor.listenTCP(port, site, interface="127.0.0.1")
reactor.run()
