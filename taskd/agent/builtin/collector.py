"""The collector contract, the point type publishers take, and entry-point discovery.

A collector is selected by a task's ``taskType`` (its ``name``) and reads its settings
from ``task.config[<namespace>]`` (as the original ng agent read
``config["/raintank/apps/ns1"]``). Third parties add collectors by declaring a class in
the ``taskd.collectors`` entry-point group; the entry-point name is the ``taskType``.

Errors a task can cause are exceptions with a message meant for the operator:
`ConfigError` when the task's config is unusable (reported as the task's error, the task
is not scheduled), `CollectError` when a run fails (reported, the next run still happens).
Anything else a collector raises is reported the same way, with its type name.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Mapping

from twisted.logger import Logger

ENTRY_POINT_GROUP = "taskd.collectors"

log = Logger(namespace="taskd.agent.collectors")


class ConfigError(ValueError):
    """The task's config for this collector is unusable; the message says what to fix."""


class CollectError(RuntimeError):
    """One run failed; the message says why (shown as the task's error). `samples`: what
    the run did measure (an assertion that failed still has a status code, a `success`
    of 0), published with the failure."""

    def __init__(self, message: str, samples: "list[Sample] | None" = None) -> None:
        super().__init__(message)
        self.samples = list(samples or ())


@dataclass(frozen=True)
class TaskInfo:
    """What a collector may know about the task it runs for."""

    id: int
    name: str
    org_id: int
    interval: int


@dataclass(frozen=True)
class Sample:
    """One measured value, as a collector returns it (the executor adds time/org/interval).

    ``name`` is the full dotted series name, e.g. ``raintank.apps.http.<slug>.status_code``;
    ``tags`` are ``key=value`` strings.
    """

    name: str
    value: float
    unit: str = ""
    mtype: str = "gauge"
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Point:
    """A sample stamped for publishing: what publishers take."""

    org_id: int
    name: str
    value: float
    time: int          # Unix seconds
    interval: int      # seconds
    unit: str = ""
    mtype: str = "gauge"
    tags: tuple[str, ...] = ()


class Collector:
    """Base class for collectors. Subclasses set the class attributes and implement both methods.

    ``name``: the taskType it serves. ``namespace``: the ``task.config`` key it reads.
    ``catalog``: metric records (``{"namespace": "/raintank/apps/http/*/status_code",
    "version": 1}``...) the agent advertises so capability routing works.

    Instances are created once per agent with ``reactor`` (for timers and connections,
    so tests can pass a Clock or MemoryReactor) and ``settings`` (the AgentSettings; e.g.
    the ns1 collector reads ``settings.ns1_api_url``).
    """

    name: ClassVar[str] = ""
    namespace: ClassVar[str] = ""
    catalog: ClassVar[tuple[dict, ...]] = ()
    #: The agent's `blocked-nets` (a taskd.agent.builtin.netpolicy.NetPolicy), set by
    #: `load_collectors`; a collector that connects where a task says checks it.
    netpolicy: Any = None

    def __init__(self, *, reactor: Any, settings: Any) -> None:
        self.reactor = reactor
        self.settings = settings

    def parse_config(self, config: Mapping[str, Any], task: TaskInfo) -> Any:
        """Validate ``task.config[self.namespace]`` ({} if absent); return what `collect` needs.

        Raise ConfigError naming the bad key.
        """
        raise NotImplementedError

    async def collect(self, config: Any, task: TaskInfo) -> list[Sample]:
        """Run once with the parsed config; return the samples or raise CollectError.

        The executor never cancels a run: a collector must time out its own I/O (every
        built-in one takes a ``timeout`` key), or each later slot is skipped while it hangs.
        """
        raise NotImplementedError


def load_collectors(*, reactor: Any, settings: Any, group: str = ENTRY_POINT_GROUP,
                    netpolicy: Any = None) -> dict[str, Collector]:
    """Instantiate every collector registered in ``group``, keyed by taskType.

    A plug-in that fails to import or construct is logged (naming it) and left out, so
    one broken third-party package cannot stop the agent.
    """
    found: dict[str, Collector] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            cls = ep.load()
            collector = cls(reactor=reactor, settings=settings)
        except Exception as exc:  # noqa: BLE001 - a third-party plug-in may raise anything
            log.error("collector {name} ({value}) could not be loaded: {err}", name=ep.name, value=ep.value,
                      err=f"{type(exc).__name__}: {exc}")
            continue
        if ep.name in found:
            log.warn("collector {name} registered twice; keeping the first", name=ep.name)
            continue
        collector.netpolicy = netpolicy
        found[ep.name] = collector
    return found
