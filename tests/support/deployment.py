"""A deployment for one test: a broker, a result backend and a lock, each served by a harness.

``Deployment`` makes the test's servers (``d.server()``), gives it its own queue, sees every
task, callback and group UUID those servers publish (through ``Events`` middleware), and at the
end removes everything the test made from the shared services. The contract suite only talks to
a deployment; what differs between drivers lives in the harnesses.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from machinery import Config, Middleware, Server
from machinery._sync import run_sync
from machinery.brokers.base import Consumer

from .harnesses import HARNESSES
from .harnesses.base import Harness, make_config
from .recording import Events


class Deployment:
    """One test's broker, backend and lock harnesses, its queue, its servers and their cleanup."""

    def __init__(self, broker: Harness, backend: Harness, lock: Harness, queue: str) -> None:
        self.broker, self.backend, self.lock = broker, backend, lock
        self.queue = queue
        self.events = Events()
        self.servers: list[Server] = []
        self.queues: list[str] = [queue]
        self._ids: set[str] = set()
        self._etas: list[datetime] = []

    @property
    def name(self) -> str:
        """``broker+backend`` (``+lock`` when the lock is a third driver), as in test ids."""
        names = [self.broker.name, self.backend.name]
        if self.lock.name not in names:
            names.append(self.lock.name)
        return "+".join(dict.fromkeys(names))

    @property
    def harnesses(self) -> list[Harness]:
        """Each distinct harness once."""
        unique: dict[int, Harness] = {}
        for harness in (self.broker, self.backend, self.lock):
            unique.setdefault(id(harness), harness)
        return list(unique.values())

    # ------------------------------------------------------------------ configuring

    def other_queue(self, suffix: str = "other") -> str:
        """A second queue of this test's own, cleaned up with the first."""
        name = f"{self.queue}_{suffix}"
        if name not in self.queues:
            self.queues.append(name)
        return name

    def config(self, **overrides: Any) -> Config:
        """The test's Config: its broker, backend and lock, isolated by its queue."""
        fields: dict[str, Any] = {"lock": self.lock.url(self.queue)}
        if self.lock is not self.broker and self.lock is not self.backend:
            fields.update(self.lock.config_overrides(self.queue))
        fields.update(overrides)
        return make_config(self.queue, broker=self.broker, backend=self.backend, **fields)

    def server(self, middleware: Iterable[Middleware] = (), **overrides: Any) -> Server:
        """A Server on this deployment (closed when the test ends); ``overrides`` are Config fields."""
        server = Server(self.config(**overrides), middleware=[self.events, *middleware])
        self.servers.append(server)
        for queue in self.queues:
            self.broker.prepare(server, queue)
        return server

    def track(self, *ids: str) -> None:
        """UUIDs whose states the test wrote without publishing (removed at the end)."""
        self._ids.update(ids)

    def track_delay(self, until: datetime) -> None:
        """A message the test delayed until ``until`` without the servers' middleware seeing it
        (published on the broker directly, or requeued with a delay): cleaned up too."""
        self._etas.append(until)

    # ------------------------------------------------------------------ looking at the broker

    def _first(self, server: Server | None) -> Server:
        if server is not None:
            return server
        if not self.servers:
            self.server()
        return self.servers[0]

    async def apush_raw(self, body: bytes, queue: str | None = None, server: Server | None = None) -> None:
        """Put ``body`` on the queue exactly as given, as a foreign client would."""
        await self.broker.push_raw(self._first(server), queue or self.queue, body)

    async def aqueued_bodies(self, queue: str | None = None, server: Server | None = None) -> list[bytes]:
        return await self.broker.queued_bodies(self._first(server), queue or self.queue)

    async def ataken_count(self, queue: str | None = None, server: Server | None = None) -> int:
        return await self.broker.taken_count(self._first(server), queue or self.queue)

    async def aexpiry(self, task_uuid: str, server: Server | None = None) -> float | None:
        return await self.backend.expiry(self._first(server), task_uuid)

    def push_raw(self, *bodies: bytes, queue: str | None = None) -> None:
        """Put each of ``bodies`` on the queue (the test's own if None), in order."""
        for body in bodies:
            run_sync(self.apush_raw(body, queue))

    def queued_bodies(self, queue: str | None = None) -> list[bytes]:
        """The raw bodies ready on the queue, oldest first, undecodable ones included."""
        return run_sync(self.aqueued_bodies(queue))

    def taken_count(self, queue: str | None = None) -> int:
        """How many messages of the queue some consumer holds unsettled."""
        return run_sync(self.ataken_count(queue))

    def scaled(self, count: int) -> int:
        """``count`` messages for a load test, scaled down for a slow test server (see
        ``Harness.load_scale``)."""
        return max(1, round(count * min(harness.load_scale for harness in self.harnesses)))

    def waiting(self) -> set[str]:
        """UUIDs of the tasks waiting in the queue or for their ETA."""
        server = self._first(None)
        waiting = {s.uuid for s in server.get_pending_tasks()}
        if "delayed_inspection" not in self.broker.gaps:
            waiting |= {s.uuid for s in server.get_delayed_tasks()}
        return waiting

    def abandon(self, consumer: Consumer) -> None:
        """Make ``consumer`` die without closing, as a SIGKILLed worker would."""
        self.broker.abandon(consumer)

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Remove everything the test made from the shared services, then close its servers."""
        ids = sorted(self.events.uuids() | self._ids)
        etas = self._etas + [s.eta for s in self.events.published if s.eta is not None]
        for harness in self.harnesses:
            harness.latest_eta = max(etas, default=None)
        errors: list[BaseException] = []
        try:
            if self.servers:
                server = self.servers[0]
                for harness in self.harnesses:
                    for queue in self.queues:
                        try:
                            run_sync(harness.cleanup(server, queue, ids))
                        except BaseException as exc:  # every harness cleans up; the first error is raised
                            errors.append(exc)
        finally:
            for server in self.servers:
                server.close()
        if errors:
            raise errors[0]


def make_deployment(
    broker: str, backend: str, lock: str | None, request: Any, tmp_path: Path, queue: str
) -> Deployment:
    """Build the harnesses by name (one object per distinct name) and set each up."""
    made: dict[str, Harness] = {}

    def harness(name: str) -> Harness:
        if name not in made:
            made[name] = HARNESSES[name](request, tmp_path)
            made[name].setup()
        return made[name]

    broker_h, backend_h = harness(broker), harness(backend)
    if lock is None:
        lock = backend if backend_h.lock else broker if broker_h.lock else HARNESSES[broker].companion
    return Deployment(broker_h, backend_h, harness(lock), queue)
