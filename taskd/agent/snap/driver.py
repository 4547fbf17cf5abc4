"""The Snap driver (its loops, and when to reconcile; requests go through
:class:`taskd.agent.snap.client.SnapClient`, one reconcile pass is
:class:`taskd.agent.snap.reconcile.SnapReconciler`): runs the agent's tasks as tasks of the
local Snap daemon (REST API v1).

Behaviour of the Go task-agent (docs/snap.md, docs/snap-api.md §8),
with its gaps closed. Three loops, all on the injected clock and each guarded so that a
failure is logged and retried on the next tick instead of stopping the loop:

* every ``supervise_interval`` (1 s): ``GET /v1/plugins////config`` (the global plugin
  config, literally four slashes). A failed probe marks Snap unreachable. If
  ``raintank_agent_name`` is missing the three keys are ``PUT`` one per request (as the
  Go agent did) and, since that means a fresh snapd, the tasks are re-indexed as on a
  reconnection; if it is present but one of the keys differs from this agent's settings
  (say, a new api-key), that key is ``PUT`` again. On the unreachable → reachable edge:
  reconcile and send the catalog. A reconcile that failed is retried from this loop with
  a backoff (supervise interval doubling up to the sweep interval).
* every ``catalog_interval`` (5 min): ``GET /v1/metrics`` → ``send_catalog(records)``.
* every ``sweep_interval`` (60 s): remove ``raintank-apps:*`` tasks that Snap ``Disabled``
  (too many failed runs), then reconcile, which creates them afresh.

Reconcile compares Snap's ``raintank-apps:<taskId>`` tasks with the desired set given to
:meth:`SnapDriver.set_tasks` (what one pass does: taskd/agent/snap/reconcile.py). Requests
for it are coalesced here: one pass at a time, run once more if asked meanwhile.

The api key is sent to Snap only in the body of one PUT and never logged.
"""
from __future__ import annotations

from typing import Any, Callable, Coroutine, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskd.agent.snap.wire import (
    AGENT_NAME_KEY,
    API_KEY_KEY,
    CONFIG_PATH,
    TSDB_URL_KEY,
    SnapError,
    SnapUnreachable,
    catalog_record,
)
from taskd.agent.contract import TaskStatus, desired_tasks
from taskd.agent.snap.client import SnapClient
from taskd.agent.snap.reconcile import SnapReconciler
from taskd.agent.snap.status import SnapStatusTracker
from taskd.stats import NULL_STATS
from taskd.timers import RepeatingTimer

__all__ = ["SnapDriver"]


class SnapDriver(Service):
    """Keeps the local Snap daemon running exactly the desired ``raintank-apps`` tasks.

    The ``snap`` executor (its contract: taskd/agent/contract.py). Every ``status_interval`` (and after
    every reconcile) it reads the tasks' counters off Snap's task list and reports their
    status (taskd/agent/snap/status.py).

    ``snap_reachable`` says whether the last global-config probe got an answer;
    ``last_catalog`` is the last catalog fetched from Snap (None before the first).
    """

    name = "snap"
    log = Logger()

    def __init__(self, *, snap_url: str, agent_name: str, tsdb_url: str, api_key: str,
                 clock: IReactorTime, send_catalog: Callable[[list[dict]], None],
                 http: Any = None, supervise_interval: float = 1.0,
                 catalog_interval: float = 300.0, sweep_interval: float = 60.0,
                 request_timeout: float = 10.0, stop_timeout: float = 5.0,
                 stop_poll: float = 0.25, stats: Any = NULL_STATS,
                 report_status: Callable[[TaskStatus], None] = lambda status: None,
                 status_interval: float = 10.0) -> None:
        self.stats = stats
        self.report_status = report_status
        self.status_interval = status_interval
        self._status = SnapStatusTracker()
        self.snap_url = snap_url.rstrip("/")  # as the Go agent: <url>/v1/...
        self.agent_name, self.tsdb_url, self._api_key = agent_name, tsdb_url, api_key
        self.clock = clock
        self.send_catalog = send_catalog
        self.supervise_interval = supervise_interval
        self.catalog_interval = catalog_interval
        self.sweep_interval = sweep_interval
        self.request_timeout = request_timeout
        self.stop_timeout = stop_timeout
        self.stop_poll = stop_poll
        self.client = SnapClient(url=snap_url, api_key=api_key, clock=clock,
                                 request_timeout=request_timeout, stop_timeout=stop_timeout,
                                 stop_poll=stop_poll, is_running=lambda: self.running, http=http)
        self.snap_reachable = False
        self.last_catalog: list[dict] | None = None
        self._reach_logged: bool | None = None  # the reachability last logged
        self._desired: dict[int, dict] | None = None  # None: no task list from the server yet
        self.reconciler = SnapReconciler(
            client=self.client, problem=self._problem, solved=self._solved, stats=stats,
            on_listing=self._report_statuses,
            on_unrunnable=lambda tid, why: self.report_status(self._status.unrunnable(tid, why)))
        self._loops: list[RepeatingTimer] = []
        self._inflight: set[Deferred] = set()
        self._reconciling = False
        self._pending = self._pending_sweep = False
        self._retry_at: float | None = None
        self._retry_sweep = False
        self._backoff = supervise_interval
        self._problems: dict[Any, str] = {}  # key -> the last problem logged about it

    # -- public -------------------------------------------------------------------------

    def set_tasks(self, tasks: Mapping[int, dict]) -> None:
        """The full desired set (server task JSON by task id); reconciles soon."""
        self._desired = desired_tasks(tasks, self.log)
        self._want_reconcile()

    def resend_catalog(self) -> None:
        """Send the last catalog fetched from Snap again (e.g. after a reconnection)."""
        if self.last_catalog is not None:
            self._send_catalog(self.last_catalog)

    def idle(self) -> Deferred:
        """Fires once no probe, reconcile or catalog fetch is in progress (for tests)."""
        return Deferred.fromCoroutine(self._idle())

    async def _idle(self) -> None:
        while self._inflight:
            await DeferredList(list(self._inflight))

    def startService(self) -> None:
        super().startService()
        for fn, interval, now in ((self._supervise, self.supervise_interval, True),
                                  (self._catalog_tick, self.catalog_interval, False),
                                  (self._sweep_tick, self.sweep_interval, False),
                                  (self._status_tick, self.status_interval, False)):
            timer = RepeatingTimer(self.clock, interval, lambda fn=fn: self._spawn(fn),
                                   what=f"snap {fn.__name__} loop", now=now, log=self.log)
            timer.startService()
            self._loops.append(timer)

    def stopService(self) -> Deferred:
        super().stopService()
        for timer in self._loops:
            timer.stopService()
        self._loops = []
        self.snap_reachable = False  # a restarted service re-indexes on its first probe
        for d in list(self._inflight):
            d.cancel()
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        await self._idle()
        await self.client.close()

    # -- plumbing -----------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Deferred:
        """Run ``fn()``; the Deferred never fails (a LoopingCall that errbacks stops)."""
        d = Deferred.fromCoroutine(fn())
        self._inflight.add(d)

        def done(result: Any) -> None:
            self._inflight.discard(d)
            if isinstance(result, Failure) and not (result.check(CancelledError) and not self.running):
                self.log.failure("snap driver: unexpected error in {what}", result,
                                 what=getattr(fn, "__name__", fn))
            return None

        d.addBoth(done)
        return d

    def _problem(self, key: Any, message: str) -> None:
        """Warn about a problem once; the same problem again is only a debug line."""
        if self._problems.get(key) != message:
            self._problems[key] = message
            self.log.warn("{message}", message=message)
        else:
            self.log.debug("still: {message}", message=message)

    def _solved(self, key: Any) -> None:
        self._problems.pop(key, None)

    def _set_reachable(self, reachable: bool, why: str = "") -> None:
        self.snap_reachable = reachable
        if reachable != self._reach_logged:
            self._reach_logged = reachable
            self.stats.gauge("snap.reachable", 1 if reachable else 0)
            if reachable:
                self.log.info("Snap at {url} is reachable", url=self.snap_url)
            else:
                self.log.warn("Snap at {url} is unreachable ({why}); retrying every {every:g} s",
                              url=self.snap_url, why=why, every=self.supervise_interval)

    # -- the loops ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            config = await self.client.call("GET", CONFIG_PATH, "config_plugin_item_returned")
            if not isinstance(config, dict):
                raise SnapError(200, "the global plugin config is not an object")
        except (SnapError, SnapUnreachable) as e:
            self._set_reachable(False, str(e))
            return
        edge = not self.snap_reachable
        restarted = AGENT_NAME_KEY not in config  # a fresh snapd: its tasks are gone too
        self._set_reachable(True)
        await self._ensure_global_config(config)
        if edge or restarted:
            self._want_reconcile()
            self._spawn(self._refresh_catalog)
        elif self._retry_at is not None and self.clock.seconds() >= self._retry_at:
            self._want_reconcile(sweep=self._retry_sweep)

    async def _ensure_global_config(self, config: dict[str, Any]) -> None:
        wanted = ((AGENT_NAME_KEY, self.agent_name), (TSDB_URL_KEY, self.tsdb_url),
                  (API_KEY_KEY, self._api_key))
        if AGENT_NAME_KEY in config:  # the Go agent's marker; also repair changed values
            wanted = tuple((k, v) for k, v in wanted if config.get(k) != v)
        if not wanted:
            return
        for key, value in wanted:
            try:
                await self.client.call("PUT", CONFIG_PATH, "config_plugin_item_created", body={key: value})
            except (SnapError, SnapUnreachable) as e:
                self._problem("config", f"setting {key} in Snap's global plugin config failed: "
                                        f"{e}; retrying in {self.supervise_interval:g} s")
                return
        self._solved("config")
        self.log.info("set {keys} in Snap's global plugin config", keys=", ".join(k for k, _ in wanted))

    async def _catalog_tick(self) -> None:
        if self.snap_reachable:
            await self._refresh_catalog()

    async def _sweep_tick(self) -> None:
        if self.snap_reachable:
            self._want_reconcile(sweep=True)

    async def _status_tick(self) -> None:
        if not self.snap_reachable or self._reconciling or self._desired is None:
            return  # a reconcile reports statuses from its own listing
        try:
            listing = await self.client.call("GET", "/v1/tasks", "scheduled_task_list_returned")
        except (SnapError, SnapUnreachable) as e:
            self.log.debug("reading task statuses from Snap failed: {err}", err=str(e))
            return
        tasks = listing.get("ScheduledTasks") if isinstance(listing, dict) else None
        if isinstance(tasks, list):
            self._report_statuses(tasks)

    def _report_statuses(self, tasks: list) -> None:
        for status in self._status.update(tasks, self._desired or {}):
            self.report_status(status)

    async def _refresh_catalog(self) -> None:
        try:
            entries = await self.client.call("GET", "/v1/metrics", "metrics_returned")
            if not isinstance(entries, list):
                raise SnapError(200, "the metric catalog is not an array")
        except (SnapError, SnapUnreachable) as e:
            self._problem("catalog", f"fetching Snap's metric catalog failed: {e}")
            return
        self._solved("catalog")
        records = [r for r in map(catalog_record, entries) if r is not None]
        if len(records) != len(entries):
            self.log.warn("ignored {n} malformed entries of Snap's metric catalog",
                          n=len(entries) - len(records))
        self.last_catalog = records
        self._send_catalog(records)

    def _send_catalog(self, records: list[dict]) -> None:
        try:
            self.send_catalog(list(records))
        except Exception:
            self.log.failure("sending the catalog to the server failed")

    # -- reconcile ----------------------------------------------------------------------

    def _want_reconcile(self, sweep: bool = False) -> None:
        """Coalesce: one reconcile at a time, run once more if asked meanwhile."""
        self._pending = True
        self._pending_sweep = self._pending_sweep or sweep
        if self._reconciling or not self.running or not self.snap_reachable:
            return  # the running one loops again; or the reachability edge will call us
        self._reconciling = True
        self._spawn(self._reconcile_loop)

    async def _reconcile_loop(self) -> None:
        try:
            while self._pending and self.running and self.snap_reachable:
                sweep = self._pending_sweep
                self._pending = self._pending_sweep = False
                try:
                    # never act on "no tasks" before the server has said so
                    ok = self._desired is None or await self.reconciler.once(self._desired, sweep)
                except SnapUnreachable as e:
                    self._problem("reconcile", f"reconciling Snap's tasks interrupted: {e}")
                    ok = False
                except SnapError as e:
                    self._problem("reconcile", f"listing Snap's tasks failed: {e}")
                    ok = False
                except CancelledError:
                    raise
                except Exception:
                    self.log.failure("reconciling Snap's tasks failed")
                    ok = False
                if ok:
                    self._solved("reconcile")
                    self._retry_at, self._retry_sweep = None, False
                    self._backoff = self.supervise_interval
                else:
                    self._retry_at = self.clock.seconds() + self._backoff
                    self._retry_sweep = self._retry_sweep or sweep
                    self._backoff = min(self._backoff * 2, max(self.sweep_interval, self.supervise_interval))
        finally:
            self._reconciling = False
