"""What every list endpoint shares: wildcard filters, a checked ORDER BY, and pages.

The original pasted `orderBy` into SQL; here it can only ever name a known column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import sqlalchemy as sa
from sqlalchemy.sql import ColumnElement, Select


@dataclass(frozen=True)
class Page:
    order_by: str           # a key of the store's ORDERABLE map (already validated)
    descending: bool = False
    limit: int = 50
    page: int = 1


def like_pattern(pattern: str) -> str:
    """`*` is the wildcard users type; everything else is matched literally."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def match(column: sa.ColumnElement, pattern: str) -> ColumnElement[bool]:
    if "*" in pattern:
        return column.like(like_pattern(pattern), escape="\\")
    return column == pattern


def paginate(stmt: Select, page: Page, orderable: Mapping[str, sa.ColumnElement], tiebreak: sa.ColumnElement) -> Select:
    column = orderable[page.order_by]
    ordered = column.desc() if page.descending else column.asc()
    return (
        stmt.order_by(ordered, tiebreak)
        .limit(page.limit)
        .offset((page.page - 1) * page.limit)
    )
