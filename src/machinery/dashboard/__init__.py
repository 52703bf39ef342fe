"""A web dashboard: ``machinery dashboard`` or ``create_app(server)`` (an ASGI app).

Install with ``pip install 'machinery[dashboard]'``. Built on Starlette with Jinja2 templates
and htmx (shipped in the package: no JavaScript build step, nothing fetched at run time).
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
