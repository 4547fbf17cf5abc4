from __future__ import annotations

import pytest_twisted

from tests.integration.harness import start_server, stop_server


@pytest_twisted.async_yield_fixture
async def api(db_config):
    """A running task-server on each real database."""
    running = await start_server(*db_config)
    yield running
    await stop_server(running)


import pytest


@pytest.fixture
def sqlite_only(tmp_path):
    """For agent-side tests where the server's database does not matter."""
    return "sqlite3", str(tmp_path / "task-server.db")
