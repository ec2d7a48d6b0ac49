"""Prompt templates: ``"Tweet text : {Tweet text} Label : "`` filled from a data row.

Placeholders are column names in braces (spaces allowed); ``{{`` and ``}}`` are literal braces.
A missing column is an error that lists the columns the row does have.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


class Template:
    """A string with ``{column}`` placeholders."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields: list[str] = [m.group(1) for m in _FIELD.finditer(text) if m.group(1)]

    def render(self, row: Mapping[str, Any]) -> str:
        """Fill every placeholder from ``row`` (values are turned into strings)."""

        def fill(match: re.Match) -> str:
            token = match.group(0)
            if token == "{{":
                return "{"
            if token == "}}":
                return "}"
            key = match.group(1)
            if key not in row:
                raise KeyError(
                    f"template {self.text!r} needs column {key!r}, but the row has only "
                    f"{sorted(row)}"
                )
            value = row[key]
            return "" if value is None else str(value)

        return _FIELD.sub(fill, self.text)

    def missing(self, columns: set[str] | list[str]) -> list[str]:
        """Placeholders that are not among ``columns``."""
        have = set(columns)
        return [f for f in self.fields if f not in have]

    def __repr__(self) -> str:
        return f"Template({self.text!r})"
