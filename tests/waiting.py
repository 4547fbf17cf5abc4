"""Waiting for something to become true, with a deadline, without blocking the reactor."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` every 20 ms until it is truthy; AssertionError after `timeout` s."""
    deadline = reactor.seconds() + timeout
    while not cond():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await deferLater(reactor, 0.02, lambda: None)
