"""The shared fakes stand for real interfaces: if a real method's signature changes, the
fake must change with it, or tests would keep passing against an interface that no longer
exists."""
from __future__ import annotations

import inspect

import pytest

from taskd.server.amqp import AmqpTransport
from taskd.server.agentsession import SessionTransport
from tests.fakes.transport import FakeTransport

# (real class, method names the fake stands in for)
STANDS_FOR = [
    (SessionTransport, ["send_frame", "close", "pause_reading", "resume_reading"]),
    (AmqpTransport, ["publish"]),
]


def params(fn) -> list[tuple[str, inspect._ParameterKind]]:
    """Names and kinds of the parameters (annotations are strings under `from __future__
    import annotations` on one side and maybe not the other: compared by name and kind)."""
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("real, method", [(r, m) for r, ms in STANDS_FOR for m in ms],
                         ids=lambda x: getattr(x, "__name__", x))
def test_fake_transport_method_matches_the_real_one(real, method):
    assert params(getattr(FakeTransport, method)) == params(getattr(real, method))


def test_session_transport_methods_are_all_faked():
    """Every method the Protocol declares is in the fake (a new one must be added there)."""
    declared = {n for n, v in vars(SessionTransport).items()
                if callable(v) and not n.startswith("_")}
    assert declared <= set(dir(FakeTransport)), declared - set(dir(FakeTransport))


def test_the_exchange_state_a_test_flips_exists_on_the_real_transport():
    """`connected` (a property) and `connections` (set in __init__) are read by the agent
    cache and the dispatcher; the fake has both."""
    fake = FakeTransport()
    assert isinstance(inspect.getattr_static(AmqpTransport, "connected"), property)
    assert "self.connections = " in inspect.getsource(AmqpTransport.__init__)
    assert fake.connected is True and fake.connections == 1


# -- FakeDatabase's call machinery (its stores' behaviour: tests/integration/test_fakedb_contract.py)

def answer(d):
    """What `d` has fired with so far (a failure is consumed)."""
    from twisted.python.failure import Failure

    box: list = []
    d.addBoth(lambda r: box.append(r) or (None if isinstance(r, Failure) else r))
    return box[-1] if box else "waiting"


def test_fake_store_calls_are_bound_to_the_real_signature_and_recorded_with_defaults():
    from tests.fakes.fakedb import FakeDatabase

    db = FakeDatabase()
    with pytest.raises(TypeError):
        db.routes.assign_unassigned(agent_id=[1])  # the real store has no such parameter
    with pytest.raises(TypeError):
        db.sessions.open(1, 1, "ip", "A")  # keyword-only in the real store
    db.routes.assign_unassigned()
    db.status.for_task(3)
    assert db.called(db.routes.assign_unassigned) == [(None,)]
    assert db.called(db.status.for_task) == [(3, None)]
    assert db.calls_to(db.status.for_task, db.routes.assign_unassigned) == [
        db.routes.assign_unassigned, db.status.for_task]


def test_a_held_call_runs_when_called_or_when_released_and_a_failed_one_never_runs():
    from taskd.db.tasks import Route, TaskSpec
    from tests.fakes.fakedb import FakeDatabase

    db = FakeDatabase()
    early = db.hold(db.routes.snapshot, calls=1)
    task = answer(db.tasks.create(1, TaskSpec("t", "", {}, 60, Route("any"), {}, True)))
    read = db.routes.snapshot(task.id)
    db.drop_task(task.id)
    assert answer(read) == "waiting" and early.args() == [(task.id,)]
    assert early.release() == (task, set()) and answer(read) == (task, set())  # read before the drop
    assert answer(db.routes.snapshot(task.id)) == (None, set())  # only one call was held

    late = db.hold(db.agents.create, early=False)
    first = db.agents.create(1, "a", enabled=True, public=False, tags=[])
    second = db.agents.create(1, "b", enabled=True, public=False, tags=[])
    assert answer(db.agents.get_by_name(1, "a")) is None  # not written yet
    late.fail(RuntimeError("database down"))
    assert answer(first).check(RuntimeError) and answer(db.agents.get_by_name(1, "a")) is None
    assert late.release().name == "b" and answer(second).name == "b"

    db.fail_next(db.agents.get, RuntimeError("gone away"))
    assert answer(db.agents.get(1)).check(RuntimeError)
    assert answer(db.agents.get(1)) is None
