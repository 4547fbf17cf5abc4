"""The shared fakes stand for real interfaces: if a real method's signature changes, the
fake must change with it, or tests would keep passing against an interface that no longer
exists."""
from __future__ import annotations

import inspect

import pytest

from taskd.server.amqp import AmqpTransport
from taskd.server.sessions import SessionTransport
from tests.fakes.transport import FakeTransport

# (real class, method names the fake stands in for)
STANDS_FOR = [
    (SessionTransport, ["send_frame", "close"]),
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
