"""Which agents may run a task: the routing rule, once, for every layer that applies it.

Neutral ground: imports nothing of taskd's, so the database layer (which pre-filters in
SQL and finishes here) and the server's in-memory path (routing a just-created task from
the sessions it holds) apply the same rule. Kept pure so it is easy to test.

An agent qualifies for a task when it is online, routed to (by id, by tag, or holding the
task's `any` assignment), and either advertises no catalog at all or advertises a metric
matching every metric pattern of the task. The "no catalog" clause keeps the notes'
walkthrough working (its agent advertises nothing, the task asks for `/example-task/*`)
while catalogs still steer tasks once agents send them. Capability never decides whether
a task is *accepted* by the API, only who runs it. See docs/routing.md.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Candidate:
    """An agent as routing sees it."""

    id: int
    org_id: int
    public: bool
    online: bool
    tags: frozenset[str]  # its owner's
    catalog: frozenset[tuple[str, int]]  # (namespace, version) it advertises
    org_tags: frozenset[tuple[int, str]] = frozenset()  # (org, tag) other orgs set on it


def _pattern_matches(pattern: str, namespace: str) -> bool:
    """`*` in either side is a wildcard: task patterns (`/example-task/*`, any characters)
    and Snap namespaces with dynamic elements (`/intel/proc/*/load`, one element each).
    Only the task's pattern (the org's own, bounded by the API) is ever compiled by
    fnmatch; an agent's namespace is compared element by element, so what an agent
    advertises cannot cost pattern compilation (or a pattern cache flush) per task."""
    if pattern == namespace:
        return True
    if "*" not in namespace:
        return fnmatchcase(namespace, pattern)
    return _dynamic_matches(pattern.split("/"), namespace.split("/"))


def _dynamic_matches(pattern: list[str], namespace: list[str]) -> bool:
    """Element-wise: a `*` element of the namespace matches any one element; a task
    pattern's last element `*` also matches every element left."""
    if len(namespace) > len(pattern) and pattern[-1] == "*":
        pattern = pattern[:-1] + ["*"] * (len(namespace) - len(pattern) + 1)
    if len(pattern) != len(namespace):
        return False
    return all(n == "*" or p == "*" or fnmatchcase(n, p) for p, n in zip(pattern, namespace))


def covers(catalog: Iterable[tuple[str, int]], metrics: Mapping[str, int]) -> bool:
    """True when the catalog is empty or provides every (pattern, version) of the task;
    version 0 means any version."""
    catalog = list(catalog)
    if not catalog:
        return True
    return all(
        any(_pattern_matches(pattern, ns) and (version == 0 or version == v) for ns, v in catalog)
        for pattern, version in metrics.items()
    )


ANY = "any"
BY_IDS = "byIds"
BY_TAGS = "byTags"


def visible(agent: Candidate, org_id: int) -> bool:
    """May a task of `org_id` go to `agent`? Its own agents and public ones. Checked on
    every routing read, not only when the task is written: an agent made private (or
    deleted) since stops receiving other orgs' tasks at once."""
    return agent.public or agent.org_id == org_id


def selects(route_type: str, ids: Iterable[int], tags: Iterable[str], org_id: int, agent: Candidate) -> bool:
    """Does a byIds/byTags route (of a task of `org_id`) name `agent`? byIds: the agent's
    id is listed and it is visible to the org; byTags: the agent has one of the tags as
    the task's org set them — its own agent's tags, or the org's own tags on a public
    agent of another org (the owner's tags there route only the owner's tasks). An `any`
    route names no agent by itself (its agent is the one assigned: `can_run`)."""
    if route_type == BY_IDS:
        return agent.id in set(ids) and visible(agent, org_id)
    if route_type == BY_TAGS:
        if agent.org_id == org_id:
            return not set(tags).isdisjoint(agent.tags)
        return agent.public and any((org_id, tag) in agent.org_tags for tag in tags)
    return False


def routes_to(route_type: str, ids: Iterable[int], tags: Iterable[str], org_id: int,
              metrics: Mapping[str, int], agent: Candidate) -> bool:
    """Should `agent` run a byIds/byTags task now (ignoring `enabled`)? Named by the
    route, online, and its catalog covers the task's metrics."""
    return agent.online and selects(route_type, ids, tags, org_id, agent) and covers(agent.catalog, metrics)


def can_run(agent: Candidate, org_id: int, metrics: Mapping[str, int]) -> bool:
    """May `agent` be given an `any` task of `org_id`? Own or public, online, capable."""
    return agent.online and visible(agent, org_id) and covers(agent.catalog, metrics)


def pick(candidates: Sequence[Candidate], rng: random.Random | None = None) -> Candidate | None:
    """The original picked at random, which spreads `any` tasks across agents."""
    if not candidates:
        return None
    return (rng or random).choice(list(candidates))
