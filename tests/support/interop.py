"""The Go captures the interop tests compare against (tests/interop/captures, made by a Go run)."""

from __future__ import annotations

from pathlib import Path

INTEROP_DIR = Path(__file__).resolve().parent.parent / "interop" / "captures"


def capture(name: str) -> str:
    """The text of capture ``name``; it is part of the repository, so a missing one is a failure."""
    path = INTEROP_DIR / name
    assert path.exists(), f"interop capture {path} is missing from the repository"
    return path.read_text()
