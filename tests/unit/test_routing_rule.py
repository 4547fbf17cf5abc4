"""The capability rule of docs/routing.md."""
from __future__ import annotations

import random

from taskd.server.routing import Candidate, can_run, covers, pick


def agent(id=1, org=1, public=False, online=True, catalog=()):
    return Candidate(id, org, public, online, frozenset(), frozenset(catalog))


def test_an_agent_without_catalog_covers_everything():
    assert covers([], {"/example-task/*": 0})


def test_wildcard_pattern_matches_namespaces():
    assert covers([("/example-task/foo", 3)], {"/example-task/*": 0})
    assert not covers([("/other/foo", 3)], {"/example-task/*": 0})


def test_every_pattern_must_be_covered():
    catalog = [("/a/x", 1), ("/b/y", 1)]
    assert covers(catalog, {"/a/*": 0, "/b/*": 0})
    assert not covers(catalog, {"/a/*": 0, "/c/*": 0})


def test_version_zero_is_any_other_versions_must_match():
    assert covers([("/a/x", 4)], {"/a/x": 0})
    assert covers([("/a/x", 4)], {"/a/x": 4})
    assert not covers([("/a/x", 4)], {"/a/x": 3})


def test_wildcards_in_agent_namespaces_match_concrete_task_metrics():
    assert covers([("/intel/proc/*/load", 1)], {"/intel/proc/cpu0/load": 0})


def test_a_task_without_metrics_is_covered_by_any_catalog():
    assert covers([("/a/x", 1)], {})


def test_can_run_needs_online_visible_and_capable():
    assert can_run(agent(), 1, {})
    assert not can_run(agent(online=False), 1, {})
    assert not can_run(agent(org=2), 1, {})
    assert can_run(agent(org=2, public=True), 1, {})
    assert not can_run(agent(catalog=[("/x/y", 1)]), 1, {"/a/*": 0})


def test_pick_is_random_among_candidates_and_none_when_empty():
    assert pick([]) is None
    rng = random.Random(7)
    chosen = {pick([agent(1), agent(2), agent(3)], rng).id for _ in range(50)}
    assert chosen == {1, 2, 3}

