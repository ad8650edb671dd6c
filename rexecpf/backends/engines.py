# -*- test-case-name: tests.test_docker_engines,tests.functional.test_docker_engines -*-
"""
Several Docker engines as one :class:`~rexecpf.backends.IContainerBackend`.

:class:`DockerEngines` holds one :class:`~rexecpf.backends.docker.DockerBackend`
per engine (each with its own runtime, event stream, reconnection backoff and
inspection cache) and answers for all of them:

- **Events.**  Every engine's stream is followed; a container that stops on
  any engine is announced to the subscribers, exactly as one engine does.
- **Reconcile.**  One periodic reconcile for all engines (every
  ``reconcile_seconds``), and one each time any engine's stream
  (re)connects; requests during a run start one more run after it.
- **Full ids** (64 hex digits) are unique across engines.  The engine that
  had a container is remembered (bounded), so a later look-up asks only that
  engine; an unknown full id is asked of every engine at once and the first
  that has it answers.  Nothing about engines is stored: after a restart a
  forward's container is found again the same way.
- **Names and short ids** are unique only within an engine, so they are
  asked of every engine.  A reference that matches containers on two engines
  names none of them: 404 Container not found, with a detail saying so (use
  the full id).  It is never resolved while an engine does not answer (that
  engine might have the same name): 503 Backend unavailable.
- **An engine that does not answer** makes the look-ups that it could
  answer 503 Backend unavailable (never 404, so nothing is reaped), naming
  the engine; containers found on the other engines keep working.
  :meth:`DockerEngines.check` (``/healthz``, readiness) fails only when
  every engine is down: a down engine is the same for every node, so taking
  nodes out of a load balancer would not help the other engines' users.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexecpf.backends import IContainerBackend, StoppedCallback
from rexecpf.backends.docker import DockerBackend, OneRunAtATime, is_reference
from rexecpf.model import BACKEND_UNAVAILABLE, CONTAINER_NOT_FOUND, APIError, Container

__all__ = ["DockerEngines", "FULL_ID"]

#: A full container id: unique across engines.
FULL_ID = re.compile(r"[0-9a-f]{64}\Z")

#: How many full id -> engine entries are remembered (then forgotten at once
#: and learnt again by asking every engine).
MAX_REMEMBERED = 65536


@implementer(IContainerBackend)
class DockerEngines(MultiService):
    """
    :param clock: drives the periodic reconcile.
    :param engines: ``(name, backend)`` for each engine, the name (its URL)
        used in logs and error details; each backend is made with
        ``reconcile_seconds=None`` and becomes a child of this service.
    :param reconcile_seconds: how often to call the reconciler.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        engines: Sequence[tuple[str, DockerBackend]],
        reconcile_seconds: float = 30.0,
    ) -> None:
        super().__init__()
        if not engines:
            raise ValueError("DockerEngines needs at least one engine")
        self.names = [name for name, _ in engines]
        self.engines = [backend for _, backend in engines]
        self._subscribers: list[StoppedCallback] = []
        #: full id -> index of the engine that has that container
        self._home: dict[str, int] = {}
        self._reconciler: Callable[[], Deferred[Any]] | None = None
        self._reconcile_runs = OneRunAtATime(self._log, lambda: bool(self.running))
        self._reconcile_seconds = reconcile_seconds
        self._periodic = LoopingCall(self.reconcile)
        self._periodic.clock = clock
        for backend in self.engines:
            backend.setServiceParent(self)
            backend.subscribe(self._stopped)
            backend.set_reconciler(self._reconcile_on_connect)

    @property
    def connected(self) -> bool:
        """Whether every engine's event stream is open now."""
        return all(backend.connected for backend in self.engines)

    # --- lifecycle and reconcile

    def set_reconciler(self, reconciler: Callable[[], Deferred[Any]]) -> None:
        """
        :param reconciler: called every ``reconcile_seconds`` and whenever an
            engine's event stream (re)connects, e.g. ``ForwardService.reconcile``.
        """
        self._reconciler = reconciler

    def startService(self) -> None:
        super().startService()
        self._periodic.start(self._reconcile_seconds, now=False)

    def stopService(self) -> Deferred[None] | None:
        if self._periodic.running:
            self._periodic.stop()
        return super().stopService()  # type: ignore[no-any-return]

    def _reconcile_on_connect(self) -> Deferred[Any]:
        return self.reconcile() or succeed(None)

    def reconcile(self) -> Deferred[Any] | None:
        """
        Call the reconciler now (once at a time: a request during a run
        starts one more run after it).

        :return: a Deferred that fires when the run ends, or None when there
            is no reconciler.
        """
        if self._reconciler is None:
            return None
        return self._reconcile_runs(self._reconciler)

    # --- events

    def _stopped(self, container_id: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(container_id)
            except Exception:
                self._log.failure("a stopped-container subscriber failed")

    # --- IContainerBackend

    def subscribe(self, callback: StoppedCallback) -> None:
        self._subscribers.append(callback)

    def check(self) -> Deferred[None]:
        """:return: fires when at least one engine answers; fails with 503 naming each engine otherwise."""
        done: Deferred[None] = Deferred()
        failures: list[str] = []

        def answered(result: Any, index: int) -> None:
            if done.called:
                return
            if not isinstance(result, Failure):
                done.callback(None)
                return
            failures.append(self._why(index, result))
            if len(failures) == len(self.engines):
                done.errback(BACKEND_UNAVAILABLE("no Docker engine answers: " + "; ".join(failures)))

        for index, backend in enumerate(self.engines):
            backend.check().addBoth(answered, index)
        return done

    def inspect(self, container_id: str) -> Deferred[Container | None]:
        if not is_reference(container_id):
            return succeed(None)
        home = self._home.get(container_id)
        if home is not None:
            return self._ask(home, container_id).addCallback(self._at_home, container_id)
        return self._ask_all(container_id)

    # --- look-ups

    def _at_home(self, container: Container | None, container_id: str) -> Container | None:
        if container is None:
            # Gone from its engine (a full id never moves to another one).
            self._home.pop(container_id, None)
        return container

    def _ask(self, index: int, reference: str) -> Deferred[Container | None]:
        """:return: the answer of one engine, its failures naming it."""

        def named(failure: Failure) -> Failure:
            if isinstance(failure.value, APIError):
                return Failure(BACKEND_UNAVAILABLE(self._why(index, failure)))
            return failure

        return self.engines[index].inspect(reference).addErrback(named)

    def _why(self, index: int, failure: Failure) -> str:
        detail = failure.value.detail if isinstance(failure.value, APIError) else failure.getErrorMessage()
        return f"engine {self.names[index]}: {detail}"

    def _remember(self, container: Container, index: int) -> None:
        if container.id not in self._home and len(self._home) >= MAX_REMEMBERED:
            self._home.clear()
        self._home[container.id] = index

    def _ask_all(self, reference: str) -> Deferred[Container | None]:
        """Ask every engine at once; see the module's docstring for the rules."""
        done: Deferred[Container | None] = Deferred()
        answers: dict[int, Container | None | Failure] = {}
        full_id = bool(FULL_ID.match(reference))

        def answered(result: Any, index: int) -> None:
            answers[index] = result
            if done.called:
                # settled already, or cancelled by the caller
                if isinstance(result, Failure) and not isinstance(result.value, APIError):
                    self._log.failure("inspecting {reference} failed", result, reference=reference)
                return
            if full_id and isinstance(result, Container) and result.id == reference:
                # Unique across engines: no need to wait for the others.
                self._remember(result, index)
                done.callback(result)
            elif len(answers) == len(self.engines):
                self._settle(reference, answers, done)

        for index in range(len(self.engines)):
            self._ask(index, reference).addBoth(answered, index)
        return done

    def _settle(
        self,
        reference: str,
        answers: dict[int, Container | None | Failure],
        done: Deferred[Container | None],
    ) -> None:
        found = [(index, answer) for index, answer in sorted(answers.items()) if isinstance(answer, Container)]
        if len(found) > 1:
            # Docker's own order: an exact name before an id prefix.  An
            # engine that found a container whose id does not start with the
            # reference found it by name; that one wins over prefix matches.
            by_name = [(index, answer) for index, answer in found if not answer.id.startswith(reference)]
            if len(by_name) == 1:
                found = by_name
        failed = [(index, answer) for index, answer in sorted(answers.items()) if isinstance(answer, Failure)]
        if len(found) > 1:
            engines = ", ".join(self.names[index] for index, _ in found)
            done.errback(
                CONTAINER_NOT_FOUND(
                    f"{reference!r} names a container on more than one Docker engine "
                    f"({engines}): use its full id"
                )
            )
            return
        details = []  # each names its engine (see _ask)
        for _index, failure in failed:
            if not isinstance(failure.value, APIError):
                done.errback(failure)  # a bug, not an engine that is down
                return
            details.append(failure.value.detail)
        if failed:
            detail = "; ".join(details)
            if found:
                detail += " (a name or short id is resolved only when every engine answers; the full id works)"
            done.errback(BACKEND_UNAVAILABLE(detail))
            return
        if found:
            index, container = found[0]
            self._remember(container, index)
            done.callback(container)
            return
        done.callback(None)

