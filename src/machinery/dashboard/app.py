"""The dashboard's ASGI app: pages, the htmx partials they poll, and the dead-letter actions."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import MissingExtra, UnsupportedOperation
from ..server import Server
from .views import NOT_AVAILABLE, Dashboard, describe

try:
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtra(f"the dashboard needs Starlette and Jinja2: pip install 'machinery[dashboard]' ({exc})") from exc

HERE = Path(__file__).resolve().parent
TOKEN_COOKIE = "machinery_dashboard_token"
#: How often the pages poll their partials.
REFRESH = "2s"


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = max(0.0, (datetime.now(timezone.utc) - moment).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


class _TokenGate(BaseHTTPMiddleware):
    """With a token: every request must carry it (``?token=``, which sets a cookie, the cookie,
    or ``Authorization: Bearer``)."""

    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = (
            request.query_params.get("token")
            or request.cookies.get(TOKEN_COOKIE)
            or request.headers.get("authorization", "").removeprefix("Bearer ")
        )
        if not given or not hmac.compare_digest(given, self.token):
            return PlainTextResponse("a token is needed: open the dashboard's URL with ?token=...", status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


def create_app(server: Server, token: str | None = None, queues: Iterable[str] = ()) -> Starlette:
    """The dashboard of ``server`` as an ASGI app; ``queues`` are shown beside the default
    queue and the queues of live workers. With ``token``, requests must carry it."""
    dashboard = Dashboard(server, queues)
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
    templates.filters["ago"] = _ago
    templates.filters["when"] = _when
    templates.filters["describe"] = describe
    templates.globals.update(refresh=REFRESH, not_available=NOT_AVAILABLE)

    def render(name: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(**context))

    async def index(request: Request) -> Response:
        return render("index.html", title="machinery")

    async def overview(request: Request) -> Response:
        return render("overview.html", **await dashboard.overview())

    async def task(request: Request) -> Response:
        uuid = request.path_params["uuid"]
        return render("task.html", title=uuid, **await dashboard.task(uuid))

    async def task_partial(request: Request) -> Response:
        return render("task_body.html", **await dashboard.task(request.path_params["uuid"]))

    async def dead(request: Request) -> Response:
        return render("dead.html", title="dead letters")

    async def dead_partial(request: Request) -> Response:
        return render("dead_body.html", queues=await dashboard.dead(), message=request.query_params.get("message", ""))

    async def dead_action(request: Request) -> Response:
        form = await request.form()
        queue = str(form.get("queue", ""))
        broker = server.broker
        try:
            if request.url.path.endswith("/requeue"):
                count = await broker.requeue_dead(queue)
                message = f"Requeued {count} dead letter(s) to {queue}"
            else:
                count = await broker.purge_dead(queue)
                message = f"Purged {count} dead letter(s) from {queue}"
        except UnsupportedOperation as exc:
            message = f"{queue}: {exc}"
        return render("dead_body.html", queues=await dashboard.dead(), message=message)

    routes = [
        Route("/", index),
        Route("/partials/overview", overview),
        Route("/tasks/{uuid}", task),
        Route("/partials/tasks/{uuid}", task_partial),
        Route("/dead", dead),
        Route("/partials/dead", dead_partial),
        Route("/dead/requeue", dead_action, methods=["POST"]),
        Route("/dead/purge", dead_action, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(_TokenGate, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware)
