"""The RabbitMQ restart chaos scenario (issue 11, items 7 and 8): a real broker restart,
on a private RabbitMQ node this scenario starts itself (tests/integration/private_rabbit.py),
while two servers publish task events.

Why a private node: the machine's RabbitMQ (5672) is shared and must never be stopped,
and cutting connections in front of it (the old FaultProxy variant) leaves the queues in
the broker's memory; a real restart makes the node stop (`rabbitmqctl stop`: the Erlang
VM exits) and start again on the same port and data dir, so the servers' durable queues
and persistent messages must come back from disk and the servers must find the broker
again by themselves.

Three servers on one database of the shared MariaDB; S1 and S2 create and update tasks
through their own APIs at `RATE` events/s, each task routed byIds to two agents held by
each of the three servers; the periodic taskList is off (600 s), so only events can
bring an agent a change made on another server. The node is stopped at event `CUT_AT`
and started again at once (its start-up is the outage); the stream runs until every
server is connected again and then `AFTER` more events. The test asserts on the `Run`,
bench/chaos.py reports it as figures: the same experiment.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from tests.chaos.cluster import BUILTIN_AGENTS, TASK, Cluster, start_settled
from tests.chaos.frames import duplicate_pushes, same_task, view_of
from tests.chaos.scenarios import CONVERGE, Run, converge, finish
from tests.integration.private_rabbit import PrivateRabbit
from tests.waiting import until, value_of

RATE = 50.0  # task events per s, alternating between the two publishers (issue 11)
CUT_AT = 60  # the node is stopped when this many events have been sent
AFTER = 100  # events sent after every server is connected again
MAX_EVENTS = 3000  # a stream that never sees the servers reconnect stops here (the test then fails)
AGENTS = 150
EXCHANGE = "taskd-chaos"  # the node is the scenario's own: no name to keep apart

EVENT_LINE = re.compile(r"\[taskd\.server\.events\.EventBus#debug\] event (task\.\w+)(?: from (\S+))?$", re.M)
REPEAT_LINE = re.compile(r"\[taskd\.server\.events\.EventBus#debug\] event task\.\w+ \w+ from \S+ seen before", re.M)
UNCONFIRMED = re.compile(r"amqp: connection lost .*; reconnecting, (\d+) events unconfirmed")
TO_SEND = re.compile(r"amqp: connected to \S+, exchange '\S+', (\d+) events to send")


def creates(total: int) -> int:
    """How many of `total` stream events are creates (every third is an update)."""
    return sum(1 for k in range(total) if k % 3 != 2)


async def broker_gauges(base: str) -> dict[str, float]:
    """broker.connected / buffered / dropped from the server's GET /metrics."""
    resp = await treq.get(base + "/metrics", timeout=10)
    text = (await resp.content()).decode()
    found = re.findall(r"^taskd_server_broker_(connected|buffered|dropped)(?:_total)? (\S+)$", text, re.M)
    return {name: float(value) for name, value in found}


async def all_gauges(cluster: Cluster) -> dict[str, dict[str, float]]:
    return {s.name: await broker_gauges(s.base) for s in cluster.servers}


def all_connected(gauges: dict[str, dict[str, float]]) -> bool:
    return all(v.get("connected") == 1 for v in gauges.values())


class EventStream:
    """Task events at `rate` per s, alternating between `publishers` (each through its own
    API): two creates (a task byIds to `targets`) then an update (a new config) of one of
    that server's earlier tasks. Open-ended, since how long the broker takes to come back
    is what is measured: `finish_after(n)` ends it n events later; `done` fires when every
    call sent has been answered."""

    def __init__(self, cluster: Cluster, publishers: list[Any], targets: list[int], rate: float) -> None:
        self.cluster, self.publishers, self.targets = cluster, publishers, targets
        self.interval = 1 / rate
        self.total = MAX_EVENTS
        self.sent = self.answered = 0
        self.failed: list[str] = []
        self.made: dict[str, list[dict]] = {p.name: [] for p in publishers}  # created bodies, with ids
        self.done: Deferred = Deferred()
        self._loop = LoopingCall(self._fire)

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def finish_after(self, more: int) -> None:
        self.total = min(self.total, self.sent + more)

    def _fire(self) -> None:
        if self.sent >= self.total:
            self._loop.stop()
            self._maybe_done()
            return
        k = self.sent
        self.sent += 1
        server = self.publishers[k % len(self.publishers)]
        made = self.made[server.name]
        config = {"/chaos": {"v": str(k)}}
        if k % 3 == 2 and made:
            body = {**made[(k // 3) % len(made)], "config": config}
            d = Deferred.fromCoroutine(self.cluster.call("PUT", "/api/v1/tasks", body, server.base))
        else:
            body = {**TASK, "name": f"ev{k:04d}", "config": config,
                    "route": {"type": "byIds", "config": {"ids": self.targets}}}
            d = Deferred.fromCoroutine(self.cluster.call("POST", "/api/v1/tasks", body, server.base))
            d.addCallback(self._created, server.name, body)
        d.addCallbacks(self._answered, lambda f: self._answered((0, f.getErrorMessage())), callbackArgs=(k,))

    def _created(self, answer: tuple[int, Any], publisher: str, body: dict) -> tuple[int, Any]:
        code, got = answer
        if code == 200:
            self.made[publisher].append({**body, "id": got["id"]})
            self.cluster.tasks.append(got["id"])
        return answer

    def _answered(self, answer: tuple[int, Any], k: int = -1) -> None:
        if answer[0] != 200:
            self.failed.append(f"event {k}: {answer}")
        self.answered += 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.sent >= self.total and self.answered == self.sent and not self.done.called:
            self.done.callback(None)


def bus_counts(cluster: Cluster) -> dict[str, Any]:
    """From the servers' debug logs: task events each published, and each received from
    each other server (repeats already dropped), the repeats dropped, and the events
    unconfirmed when a broker connection was lost (resent afterwards), and the events
    waiting at each connect (the first is start-up's 0)."""
    published, received, repeats, unconfirmed, to_send = {}, {}, {}, {}, {}
    for s in cluster.servers:
        log = s.log()
        lines = EVENT_LINE.findall(log)
        published[s.name] = sum(1 for _, source in lines if not source)
        received[s.name] = Counter(source for _, source in lines if source)
        repeats[s.name] = len(REPEAT_LINE.findall(log))
        unconfirmed[s.name] = [int(n) for n in UNCONFIRMED.findall(log)]
        to_send[s.name] = [int(n) for n in TO_SEND.findall(log)]
    lost = {f"{src}->{dst}": published[src] - received[dst][src]
            for src in published for dst in published if src != dst}
    return {"published": published, "lost": lost, "repeats": repeats, "unconfirmed": unconfirmed, "to_send": to_send}


async def restart_node(rabbit: PrivateRabbit, cluster: Cluster, marks: dict[str, float],
                       buffered: dict[str, float]) -> None:
    """Stop the node, wait until every server has noticed, note what each has buffered
    just before the node is started again (it is down: nothing can be flushed), start it
    on the same port and data dir (durable queues recovered from disk)."""
    marks["cut"] = reactor.seconds()
    await rabbit.stop_node()
    marks["stopped"] = reactor.seconds()
    await value_of(lambda: all_gauges(cluster), lambda g: not any(all_connected({n: v}) for n, v in g.items()),
                   30, interval=0.1, what="every server noticed the broker gone")
    buffered.update({n: g.get("buffered", 0) for n, g in (await all_gauges(cluster)).items()})
    await rabbit.start()
    marks["restored"] = reactor.seconds()


async def broker_restart(workdir: Path, dbs: Any, n_agents: int = AGENTS, n_builtin: int = BUILTIN_AGENTS) -> Run:
    """`dbs`: tests.conftest.MySQLDatabases (the shared MariaDB; only the private broker
    is faulted)."""
    run = Run("broker restart")
    rabbit = await PrivateRabbit().start()
    # A long task-list-interval: no periodic taskList repairs what a lost event missed.
    cluster = Cluster(workdir, dbs.create("chaos"), EXCHANGE, n_agents=n_agents, n_builtin=n_builtin,
                      **{"rabbitmq-url": rabbit.url, "task-list-interval": "600s"})
    marks: dict[str, float] = {}
    try:
        _, held = await start_settled(cluster)
        await value_of(lambda: all_gauges(cluster), all_connected, 30, interval=0.2,
                       what="every server connected to the broker")
        sockets = dict(cluster.fleet.clients)
        targets = [cluster.agent_ids[name] for s in cluster.servers for name in sorted(held[s.name] & set(cluster.fleet.names))[:2]]
        buffered: dict[str, float] = {}
        stream = EventStream(cluster, cluster.servers[:2], targets, RATE)
        marks["stream"] = reactor.seconds()
        stream.start()
        await until(lambda: stream.sent >= CUT_AT, 30, interval=0.01, what="the events before the restart")
        await restart_node(rabbit, cluster, marks, buffered)
        await value_of(lambda: all_gauges(cluster), all_connected, CONVERGE, interval=0.2,
                       what=lambda: f"every server connected again:\n{cluster.logs()}")
        marks["connected"] = reactor.seconds()
        stream.finish_after(AFTER)
        await stream.done
        marks["streamed"] = reactor.seconds()
        gauges = await value_of(lambda: all_gauges(cluster), lambda g: all(
            v.get("connected") == 1 and v.get("buffered") == 0 for v in g.values()), CONVERGE, interval=0.2,
            what="every server connected with nothing left to send")
        marks["reconnected"] = reactor.seconds()
        stream_ids = [t["id"] for made in stream.made.values() for t in made]
        by_id = {v: k for k, v in cluster.agent_ids.items()}

        async def undelivered() -> list[str]:
            shown = await cluster.task_details(stream_ids, cluster.servers[2].base)
            views = {a: view_of(cluster.fleet.clients[by_id[a]].frames) or {} for a in targets}
            return [f"task {t['id']} on {by_id[a]}" for t in shown for a in targets
                    if a not in views or t["id"] not in views[a] or not same_task(views[a][t["id"]], t)]

        try:
            await value_of(undelivered, lambda missing: not missing, CONVERGE, interval=0.5, what="every event delivered")
            marks["delivered"] = reactor.seconds()
            missing: list[str] = []
        except AssertionError:
            missing = await undelivered()
        await converge(cluster, marks["reconnected"], run)
        run.facts.update(
            events=stream.sent, failed_calls=stream.failed, rate=stream.sent / (marks["streamed"] - marks["stream"]),
            outage=marks["restored"] - marks["cut"], node_stop=marks["stopped"] - marks["cut"],
            node_start=marks["restored"] - marks["stopped"], buffered_at_restore=buffered,
            connected=marks["connected"] - marks["restored"], reconnect=marks["reconnected"] - marks["restored"],
            delivered=marks.get("delivered", float("nan")) - marks["restored"],
            undelivered=missing, dropped={n: g.get("dropped", 0) for n, g in gauges.items()},
            duplicates=[f"{name}: {d}" for name, c in cluster.fleet.clients.items() for d in duplicate_pushes(c.frames)],
            reconnected_agents=sorted(n for n, c in sockets.items() if cluster.fleet.clients[n] is not c),
            targets=len(targets), tasks=len(stream_ids), **bus_counts(cluster), **await cluster.builtin.end_facts())
    finally:
        try:
            await cluster.stop()
        finally:
            await rabbit.stop()
    return finish(cluster, run)
