from __future__ import annotations

import subprocess
import uuid

import pytest
import pytest_twisted

from tests.integration.harness import start_server, stop_server


@pytest_twisted.async_yield_fixture
async def api(db_config):
    """A running task-server on each real database."""
    running = await start_server(*db_config)
    yield running
    await stop_server(running)


@pytest.fixture
def sqlite_only(tmp_path):
    """For agent-side tests where the server's database does not matter."""
    return "sqlite3", str(tmp_path / "task-server.db")


@pytest.fixture
def exchange():
    """A RabbitMQ topic exchange of this test's own on the machine's broker, deleted after."""
    name = f"taskd-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["rabbitmqctl", "-q", "eval",
                    f'rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, <<"{name}">>), false, <<"test">>).'],
                   capture_output=True, timeout=60)
