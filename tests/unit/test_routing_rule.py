"""The capability rule of docs/routing.md."""
from __future__ import annotations

import random

import pytest

from taskd.routing import Candidate, can_run, covers, pick


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



def test_selects_by_ids_names_listed_agents_only():
    from taskd.routing import BY_IDS, selects
    assert selects(BY_IDS, [1, 5], [], 1, agent())
    assert not selects(BY_IDS, [5], [], 1, agent())


def test_selects_by_ids_only_agents_the_tasks_org_may_see_now():
    """Checked at use: another org's agent listed when it was public stops being selected
    once it is private."""
    from taskd.routing import BY_IDS, selects
    assert selects(BY_IDS, [1], [], 9, agent(org=2, public=True))
    assert not selects(BY_IDS, [1], [], 9, agent(org=2, public=False))
    assert selects(BY_IDS, [1], [], 2, agent(org=2, public=False))  # its own


def test_selects_by_tags_needs_the_tasks_org_and_a_shared_tag():
    from taskd.routing import BY_TAGS, selects
    tagged = Candidate(1, 1, False, True, frozenset({"dc1"}), frozenset())
    assert selects(BY_TAGS, [], ["dc1", "dc2"], 1, tagged)
    assert not selects(BY_TAGS, [], ["dc1"], 2, tagged)
    assert not selects(BY_TAGS, [], ["dc3"], 1, tagged)


def test_routes_to_needs_online_and_covering_catalog():
    from taskd.routing import BY_IDS, routes_to
    assert routes_to(BY_IDS, [1], [], 1, {}, agent())
    assert not routes_to(BY_IDS, [1], [], 1, {}, agent(online=False))
    assert not routes_to(BY_IDS, [1], [], 1, {"/a/*": 0}, agent(catalog=[("/x/y", 1)]))


@pytest.mark.parametrize("pattern, namespace, expected", [
    ("/raintank/apps/http/*", "/raintank/apps/http/*/status_code", True),  # the task's trailing * takes the rest
    ("/intel/proc/a/load", "/intel/proc/*/load", True),    # a dynamic element is one element...
    ("/intel/proc/a/b/load", "/intel/proc/*/load", False),  # ...not several
    ("/intel/*", "/intel/proc/*/load", True),
    ("/a/*", "/b/*/c", False),
    ("/x/*/z", "/x/*/z", True),
    ("/x/y/z", "/x/*", False),
    ("/example-task/*", "/example-task/x/y", True),        # literal namespaces: the task's fnmatch pattern
    ("/a/[bc]", "/a/b", True),
])
def test_agent_namespaces_match_element_wise_and_are_never_patterns(pattern, namespace, expected):
    from taskd.routing import _pattern_matches
    assert _pattern_matches(pattern, namespace) is expected
    assert covers([(namespace, 1)], {pattern: 0}) is expected


def test_a_namespace_is_not_compiled_as_a_pattern(monkeypatch):
    """fnmatch compiles its *pattern* argument: an agent's namespace must never be one."""
    import taskd.routing as routing
    compiled: list[str] = []
    real = routing.fnmatchcase
    monkeypatch.setattr(routing, "fnmatchcase", lambda name, pat: compiled.append(pat) or real(name, pat))
    covers([("/agent/*/ns", 1), ("/agent/literal", 1)], {"/agent/x/ns": 0, "/agent/lit*": 0})
    assert "/agent/*/ns" not in compiled and "/agent/literal" not in compiled
