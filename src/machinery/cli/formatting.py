"""How the commands show things: arguments as ``send`` takes them, times, states, aligned tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import click

from ..state import FAILURE, RETRY, SUCCESS
from ..types import Arg, infer_type

CELL_WIDTH = 60
"""Longest text a table cell shows before it is cut with an ellipsis."""

STATE_COLOURS = {SUCCESS: "green", FAILURE: "red", RETRY: "yellow"}


def one_line(text: object) -> str:
    """``text`` with every run of white space (newlines included) folded into one space."""
    return " ".join(str(text).split())


def json_text(value: Any) -> str:
    """A value as JSON, bytes as the list of their values (as Go's ``[]byte`` results decode)."""
    if isinstance(value, (bytes, bytearray)):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def format_arg(arg: Arg) -> str:
    """An argument as ``send`` accepts it: the JSON value, with ``type:`` when not the default type."""
    text = json_text(arg.value)
    try:
        default = infer_type(arg.value, "") if arg.value is not None else None
    except ValueError:
        default = None
    return text if default == arg.type else f"{arg.type}:{text}"


def format_args(args: Sequence[Arg] | None) -> str:
    return ", ".join(format_arg(a) for a in args or ())


def shorten(text: str, width: int = CELL_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = one_line(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_seconds(seconds: float) -> str:
    """``2.5 ms``, ``3.2 s``, ``4 min``, ``2.1 h``, ``3 days``."""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def relative_time(moment: datetime | None) -> str:
    """``in 4 min`` or ``3.2 s ago``, from now."""
    if moment is None:
        return ""
    delta = (moment - datetime.now(timezone.utc)).total_seconds()
    return f"in {format_seconds(delta)}" if delta > 0 else f"{format_seconds(delta)} ago"


def format_moment(moment: datetime | None, gap: str = " ") -> str:
    """``2030-01-02T15:04:05Z (in 4 min)``: the UTC time, ``gap``, then how far from now."""
    return f"{format_time(moment)}{gap}({relative_time(moment)})"


def style_state(state: str) -> str:
    return click.style(state, fg=STATE_COLOURS.get(state, "cyan"), bold=True)


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 task``, ``2 tasks``; ``words`` is the plural when adding an s will not do."""
    return f"{count} {word}" if count == 1 else f"{count} {words or word + 's'}"


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows under bold headers in aligned columns (plain text when piped)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)).rstrip()

    click.echo(click.style(line(headers), bold=True))
    for row in rows:
        click.echo(line(row))
