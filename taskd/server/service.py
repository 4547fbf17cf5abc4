"""Assembles the task-server: one MultiService whose children start and stop in order.

(Stub: filled in by the DB/API work. The twistd plugin calls make_service().)
"""
from __future__ import annotations

from twisted.application.service import IService, MultiService


def make_service(settings) -> IService:  # settings: taskd.server.settings.ServerSettings
    return MultiService()
