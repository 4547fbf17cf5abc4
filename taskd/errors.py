"""Domain errors raised by the stores and services; the API maps each to one HTTP status."""
from __future__ import annotations


class StoreError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(StoreError):
    status = 400


class Forbidden(StoreError):
    status = 403


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


class TooMany(StoreError):
    """Too many of something at once (ad-hoc runs of one org); retry later."""

    status = 429
