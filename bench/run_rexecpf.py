"""
rexecpf for the bench, in the foreground: ``python bench/run_rexecpf.py CONFIG [PROFILE_OUT]``.

With PROFILE_OUT, runs under cProfile and writes the stats there on SIGTERM.
"""

import signal
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner

from rexecpf.config import load_config
from rexecpf.tap import build, freeze_startup_objects

globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
components = build(load_config(sys.argv[1]), reactor)
components.site.log = lambda request: None  # no access log in the bench
freeze_startup_objects()  # as makeService does
components.service.privilegedStartService()
components.service.startService()
profile_out = sys.argv[2] if len(sys.argv) > 2 else None
if profile_out:
    import cProfile

    profiler = cProfile.Profile()

    def stop(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(profile_out)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    profiler.enable()
    reactor.run(installSignalHandlers=False)
else:
    reactor.run()
