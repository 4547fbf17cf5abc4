"""Waiting for something to become true, with a deadline, without blocking the reactor.

The one place tests poll: a condition (`until`) or a value (`value_of`), sync or async, every
`interval` s until it holds; an AssertionError naming `what` and the last value seen after
`timeout` s. An exception raised by the condition ends the wait at once (use it for "the
process died"). tests/unit/test_test_hygiene.py keeps hand-written deadline loops and fixed
sleeps out of the other test files."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater



def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


async def value_of(fetch: Callable[[], Any], check: Callable[[Any], Any] = bool, timeout: float = 10.0,
                   what: str | Callable[[], str] = "condition", interval: float = 0.02) -> Any:
    """Call `fetch` (sync, or returning an awaitable) every `interval` s until `check` of
    its result is truthy; return that result. `what` (a string, or a callable evaluated on
    failure, e.g. to add a log) names it in the AssertionError raised after `timeout` s."""
    deadline = reactor.seconds() + timeout
    while True:
        value = fetch()
        if inspect.isawaitable(value):
            value = await value
        if check(value):
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"{_describe(what)} not met within {timeout}s (last: {value!r})")
        await deferLater(reactor, interval, lambda: None)


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str | Callable[[], str] = "condition",
                interval: float = 0.02) -> Any:
    """Poll `cond` (sync or async) every `interval` s until it is truthy; return its value.
    AssertionError after `timeout` s."""
    return await value_of(cond, bool, timeout, what, interval)

