"""The publisher contract: where the built-in executor's points go.

A publisher is a Twisted service: `add` never blocks and never raises (points beyond the
publisher's bound are dropped and counted), and `stopService` makes a final flush.
``tsdbgw`` (:mod:`taskd.agent.builtin.tsdbgw`) and ``graphite``
(:mod:`taskd.agent.builtin.graphite`) implement it, both on the bounded queue of
:mod:`taskd.agent.builtin.queueing`.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from taskd.agent.builtin.collector import Point


class Publisher(Protocol):
    name: str
    dropped: int    # points dropped because the queue was full, since start
    published: int  # points the destination accepted, since start

    def add(self, points: Sequence[Point]) -> None:
        """Queue points for sending; never blocks, never raises."""
