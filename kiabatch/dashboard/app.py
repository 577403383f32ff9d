"""The dashboard's web application (Starlette): pages, live fragments, downloads, ``/metrics``, actions.

Security, by default:

* everything from items, results and logs goes through Jinja2's autoescaping, with
  control characters (ANSI escapes, bidirectional overrides) shown as ``\\x1b``-style
  text; a strict Content-Security-Policy allows only this server's own script and
  style, so even a missed escape could not run a script;
* without ``--allow-actions`` no route that writes exists, and the store is the
  read-only one (it refuses every write command before sending it);
* with it, each action is a POST carrying this server's random form token, from a
  page of the same origin (``Origin``/``Sec-Fetch-Site``), and nothing else;
* bound to a loopback address, requests must name a loopback host (no DNS rebinding);
* with a token (``KIABATCH_DASHBOARD_TOKEN``, e.g. from a Kubernetes Secret) every
  route but ``/healthz`` wants ``Authorization: Bearer TOKEN`` or the cookie the
  login form sets.

Pages update themselves: ``static/app.js`` fetches the page's ``?fragment=1`` form
(just the live part) at the interval the server names in ``X-Kiabatch-Refresh`` —
never more than once a second — and stops when it says 0 (a finished batch).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import items as items_mod
from ..cli.output import outcome_dict
from ..errors import KiabatchError, NotFoundError
from ..model import FailedItem, ItemResult, validate_batch_id
from ..schedules import validate_schedule_name
from ..text import printable, when
from .data import CELL_STATES, STATES, Actions, Dashboard
from .metrics import KiabatchCollector, registry_for

#: Environment variable holding the bearer token the dashboard requires (unset: none).
ENV_TOKEN = "KIABATCH_DASHBOARD_TOKEN"  # noqa: S105 - the variable's name
COOKIE = "kiabatch_dashboard"
#: Milliseconds between live updates (the script never goes below 1000).
REFRESH_LIVE, REFRESH_IDLE = 1000, 5000
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
#: Characters shown of an item or result in a table cell (the download has everything).
_CELL = 300
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
_MESSAGES = {"login": "signed in"}


@dataclass(frozen=True)
class Settings:
    """How the application behaves (from the command's options)."""

    allow_actions: bool = False
    token: str | None = None
    #: Only loopback Host headers are accepted (the server is bound to a loopback address).
    loopback_only: bool = True
    read_only_store: bool = True


def block(text: str) -> str:
    """Multi-line text (stderr, logs) with its lines kept and every control character escaped."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def argv_text(argv: list[str]) -> str:
    """A command template as a shell would quote it (argument boundaries visible), control characters escaped."""
    return printable(shlex.join(argv))


def item_text(item: Any, limit: int = _CELL) -> str:
    """An item on one line (as a worker sees it), cut to ``limit`` characters."""
    text = printable(items_mod.text(item))
    return text if len(text) <= limit else text[:limit] + "…"


def result_text(result: bytes, limit: int = _CELL) -> str:
    """A result on one line: text with control characters escaped, or a byte count for binary."""
    try:
        text = result.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(result)} bytes, binary>"
    text = printable(text.rstrip("\n"))
    return text if len(text) <= limit else text[:limit] + "…"


def seconds(value: float | None) -> str:
    """``3.2s``, ``4m 10s``, ``2h 5m``, ``3d 4h``, or '-'."""
    if value is None or not math.isfinite(value):
        return "-"
    if value < 60:
        return f"{value * 1000:.0f}ms" if value < 1 else (f"{value:.1f}s" if value < 10 else f"{value:.0f}s")
    minutes, secs = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"


def size(value: int | float) -> str:
    """Bytes as ``12.3 MiB``."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def bar(total: int, done: int, failed: int, running: int) -> list[tuple[str, float, float]]:
    """The progress bar's segments as (class, x, width) in percent (numbers only: no style attribute)."""
    if total <= 0:
        return []
    parts, x = [], 0.0
    for name, count in (("done", done), ("failed", failed), ("running", running)):
        width = 100.0 * min(count, total) / total
        if width > 0:
            parts.append((name, round(x, 3), round(min(width, 100.0 - x), 3)))
            x += width
    return parts


def _environment() -> jinja2.Environment:
    loader = jinja2.PackageLoader("kiabatch.dashboard", "templates")
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.filters.update(printable=printable, block=block, item=item_text, argv=argv_text, result=result_text, when=when,
                       seconds=seconds, size=size)  # fmt: skip
    env.globals.update(bar=bar, CELL_STATES=CELL_STATES, STATES=[str(s) for s in STATES],
                       is_result=lambda o: isinstance(o, ItemResult),
                       is_failed=lambda o: isinstance(o, FailedItem), query=query_with)  # fmt: skip
    return env


class _Guard:
    """ASGI middleware: security headers on every answer, loopback Host names, and the bearer token."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await _with_headers(refusal)(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in _SECURITY_HEADERS:
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> Response | None:
        if self.settings.loopback_only:
            host = (request.headers.get("host") or "").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in _LOOPBACK:
                return PlainTextResponse("this dashboard only answers requests for a loopback host name\n", 421)
        token = self.settings.token
        path = request.url.path
        if token is None or path == "/healthz" or path == "/login" or path.startswith("/static/"):
            return None
        given = request.headers.get("authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return None
        if hmac.compare_digest(request.cookies.get(COOKIE, ""), session_value(token)):
            return None
        if path == "/metrics" or "text/html" not in request.headers.get("accept", ""):
            return PlainTextResponse("a bearer token is required\n", 401, {"WWW-Authenticate": "Bearer"})
        return RedirectResponse("/login", 303)


_SECURITY_HEADERS = [
    ("Content-Security-Policy", _CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on form posts.
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]


def _with_headers(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS:
        response.headers.setdefault(name, value)
    return response


def session_value(token: str) -> str:
    """The login cookie: derived from the token (the token itself is never stored in the browser)."""
    return hmac.new(token.encode(), b"kiabatch-dashboard-session", hashlib.sha256).hexdigest()


def build_app(dashboard: Dashboard, settings: Settings, *, retention: float = 900.0) -> Starlette:
    """The application: read-only routes, plus the action routes only with ``settings.allow_actions``."""
    env = _environment()
    collector = KiabatchCollector(dashboard, retention)
    collector.take_baseline()
    registry = registry_for(collector)
    actions = Actions(dashboard) if settings.allow_actions else None
    form_token = secrets.token_urlsafe(32)

    def render(request: Request, template: str, *, live: int = 0, status: int = 200, **context: Any) -> Response:
        fragment = request.query_params.get("fragment") == "1"
        page = env.get_template(template)
        values = {"request": request, "actions": actions is not None, "form_token": form_token,
                  "read_only": settings.read_only_store, "message": _MESSAGES.get(request.query_params.get("m", "")),
                  "live": live, **context}  # fmt: skip
        text = "".join(page.blocks["live"](page.new_context(values))) if fragment else page.render(values)
        headers = {"X-Kiabatch-Refresh": str(live)}
        return Response(text.encode("utf-8", "replace"), status, headers, media_type="text/html; charset=utf-8")

    def failure(request: Request, exc: Exception) -> Response:
        code = 404 if isinstance(exc, NotFoundError) else (503 if isinstance(exc, redis.RedisError) else 400)
        message = f"Redis: {exc}" if isinstance(exc, redis.RedisError) else str(exc)
        return render(request, "error.html", status=code, error=message)

    def page(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            try:
                return handler(request)
            except (KiabatchError, redis.RedisError) as exc:
                return failure(request, exc)

        return endpoint

    @page
    def batches(request: Request) -> Response:
        state = request.query_params.get("state") or None
        schedule = request.query_params.get("schedule") or None
        view = dashboard.batches(state=state if state in {str(s) for s in STATES} else None, schedule=schedule,
                                 page=_int(request.query_params.get("page"), 0))  # fmt: skip
        return render(request, "batches.html", view=view, live=REFRESH_LIVE if view.live else REFRESH_IDLE)

    @page
    def batch(request: Request) -> Response:
        batch_id = validate_batch_id(request.path_params["batch_id"])
        view = dashboard.batch(batch_id, grid_page=_int(request.query_params.get("grid"), 0),
                               results_page=_int(request.query_params.get("results"), 0))  # fmt: skip
        return render(request, "batch.html", view=view, live=REFRESH_LIVE if view.live else 0)

    @page
    def logs(request: Request) -> Response:
        batch_id = validate_batch_id(request.path_params["batch_id"])
        index = _int(request.query_params.get("index"), 0)
        spec = dashboard.store.spec(batch_id)
        if not 0 <= index < spec.tasks:
            raise KiabatchError(f"bad index {index} for batch {batch_id}: it has tasks 0 to {spec.tasks - 1}")
        return render(request, "logs.html", batch_id=batch_id, index=index, spec=spec,
                      chunks=dashboard.logs(batch_id, index))  # fmt: skip

    def results(request: Request) -> Response:
        try:
            batch_id = validate_batch_id(request.path_params["batch_id"])
            outcomes = dashboard.outcomes(batch_id)
        except (KiabatchError, redis.RedisError) as exc:
            return failure(request, exc)

        def lines() -> Iterator[bytes]:
            for outcome in outcomes:
                yield (json.dumps(outcome_dict(outcome), ensure_ascii=False, default=str) + "\n").encode(
                    "utf-8", "replace"
                )

        disposition = f'attachment; filename="{batch_id}-results.jsonl"'
        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": disposition})  # fmt: skip

    @page
    def queues(request: Request) -> Response:
        return render(request, "queues.html", queues=dashboard.queues(), live=2000)

    @page
    def schedules(request: Request) -> Response:
        views, problem = dashboard.schedules()
        return render(request, "schedules.html", schedules=views, problem=problem, live=REFRESH_IDLE)

    @page
    def redis_page(request: Request) -> Response:
        return render(request, "redis.html", view=dashboard.redis_info(), live=2000)

    def metrics(request: Request) -> Response:
        del request
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(request: Request) -> Response:
        del request
        return PlainTextResponse("ok\n")

    async def login(request: Request) -> Response:
        if settings.token is None:
            return RedirectResponse("/", 303)
        if request.method == "POST":
            form = await _form(request)
            if hmac.compare_digest(form.get("token", "").encode(), settings.token.encode()):
                response = RedirectResponse("/?m=login", 303)
                response.set_cookie(COOKIE, session_value(settings.token), httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")  # fmt: skip
                return response
            await asyncio.sleep(0.5)  # slows guessing a little; the server keeps serving others
            return render(request, "login.html", status=401, failed=True)
        return render(request, "login.html", failed=False)

    routes = [
        Route("/", batches),
        Route("/batches/{batch_id}", batch),
        Route("/batches/{batch_id}/logs", logs),
        Route("/batches/{batch_id}/results.jsonl", results),
        Route("/queues", queues),
        Route("/schedules", schedules),
        Route("/redis", redis_page),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/login", login, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(_static_dir())), name="static"),
    ]
    if actions is not None:
        routes += _action_routes(actions, form_token, failure)
    return Starlette(routes=routes, middleware=[Middleware(_Guard, settings=settings)])


def _action_routes(actions: Actions, form_token: str,
                   failure: Callable[[Request, Exception], Response]) -> list[Route]:  # fmt: skip
    """POST routes that change batches and schedules (only with ``--allow-actions``)."""

    def action(run: Callable[[Request, dict[str, str]], tuple[str, str]]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            form = await _form(request)
            if not _same_origin(request) or not hmac.compare_digest(form.get("csrf", "").encode(),
                                                                     form_token.encode()):  # fmt: skip
                return PlainTextResponse("refused: this form did not come from this dashboard\n", 403)
            from starlette.concurrency import run_in_threadpool

            try:
                where, note = await run_in_threadpool(run, request, form)
            except (KiabatchError, redis.RedisError) as exc:
                return failure(request, exc)
            return RedirectResponse(f"{where}?{urlencode({'done': note})}", 303)

        return endpoint

    def batch_id(request: Request) -> str:
        return validate_batch_id(request.path_params["batch_id"])

    def delete(request: Request, form: dict[str, str]) -> tuple[str, str]:
        return "/", actions.delete(batch_id(request))

    def resume(request: Request, form: dict[str, str]) -> tuple[str, str]:
        return f"/batches/{batch_id(request)}", actions.resume(batch_id(request))

    def scale(request: Request, form: dict[str, str]) -> tuple[str, str]:
        parallel = _int(form.get("parallel"), -1)
        return f"/batches/{batch_id(request)}", actions.scale(batch_id(request), parallel)

    def suspend(value: bool) -> Callable[[Request, dict[str, str]], tuple[str, str]]:
        def run(request: Request, form: dict[str, str]) -> tuple[str, str]:
            name = validate_schedule_name(request.path_params["name"])
            return "/schedules", actions.suspend(name, value)

        return run

    return [
        Route("/batches/{batch_id}/delete", action(delete), methods=["POST"]),
        Route("/batches/{batch_id}/resume", action(resume), methods=["POST"]),
        Route("/batches/{batch_id}/scale", action(scale), methods=["POST"]),
        Route("/schedules/{name}/suspend", action(suspend(True)), methods=["POST"]),
        Route("/schedules/{name}/resume", action(suspend(False)), methods=["POST"]),
    ]


def _same_origin(request: Request) -> bool:
    """A browser's form post from a page of this server (Origin, else Sec-Fetch-Site, must say so)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        parts = urlsplit(origin)
        return parts.netloc.lower() == (request.headers.get("host") or "").lower()
    return request.headers.get("sec-fetch-site", "same-origin") == "same-origin"


async def _form(request: Request) -> dict[str, str]:
    """A small url-encoded form (at most 64 KiB), first value of each field."""
    body = await request.body()
    if len(body) > 65536:
        return {}
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


def _int(value: str | None, default: int) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        return default
    return number if -(10**12) < number < 10**12 else default


def query_with(request: Request, **changes: Any) -> str:
    """The current page's query string with ``changes`` (None removes a key; ``fragment`` never kept)."""
    params = {key: value for key, value in request.query_params.items() if key not in ("fragment", "done", "m")}
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    return "?" + urlencode(params) if params else request.url.path


def _static_dir() -> Path:
    return Path(str(resources.files("kiabatch.dashboard").joinpath("static")))
