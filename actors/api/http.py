"""The HTTP side of the api actor: aiohttp routes under /api/v1/, each one a control op the CLI also sends.

Every route is one row of `ROUTES` (method, path, level, summary, handler); the security middleware applies
policy.decide to each request before its handler runs, and the OpenAPI description is built from the same
table. A handler only translates: query or JSON body → the op's argument record (decoded like the control
plane decodes it, so a wrong field is a 400 naming it), the op's result → JSON. Errors are JSON
`{"error": {"code", "message"}}` with one line of text, never a traceback.

Why aiohttp (not starlette on uvicorn): one dependency that is both the server and the framework, no ASGI
server to run and configure, and server-sent events are a plain `StreamResponse`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web

from core import config as cfg
from core.access import ADMIN, READ, Tokens
from core.state import TimeSpecError, parse_when
from messages.compat import legacy_shapes, legacy_subscriptions, wanted
from messages.control import (
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    UNAVAILABLE,
    ConfigSet,
    ConnectionArgs,
    ConnectionsArgs,
    Controller,
    NoArgs,
    NotificationResponse,
    NotificationsArgs,
    Op,
    RequestFailed,
    RuleAdd,
    RuleMove,
    RuleRef,
    TimeWindow,
    to_plain,
)
from messages.events import HEARTBEAT_TTL
from messages.schema import MessageError, Struct, decode_loose, record, unbatch
from runtime import paths
from runtime.log import EventLog, describe
from runtime.transport import ask

from . import panel, policy

API = "/api/v1"
MAX_BODY_BYTES = 64 * 1024
MAX_SSE_CLIENTS = 32
SSE_KEEPALIVE_SECONDS = 15.0
ASK_TIMEOUT = 3.0
STATUS_OF = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, UNAVAILABLE: 503, INTERNAL: 500}

Handler = Callable[["HttpApi", web.Request], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under /api/v1
    level: str  # read | admin
    summary: str
    handler: Handler
    body: type[Struct] | None = None  # the JSON body's record, for the OpenAPI description
    query: tuple[str, ...] = ()


class HttpApi:
    """The app's state: tokens, sessions, login codes, the failure limiter, and how to reach the actors."""

    def __init__(self, run_dir: Any, tokens: Tokens, log: EventLog, port: int) -> None:
        self.run_dir = run_dir
        self.tokens = tokens
        self.log = log
        self.port = port
        self.sessions = policy.Expiring(policy.SESSION_SECONDS, once=False)
        self.codes = policy.Expiring(policy.LOGIN_CODE_SECONDS, once=True)
        self.limiter = policy.FailureLimiter()
        self.zctx = zmq.asyncio.Context()
        self.sse_clients = 0
        self.requests = 0
        self.refused = 0

    # --- talking to the actors: the control ops the CLI sends -------------------------------------------

    async def ask(self, op: Op[Any, Any], args: Any = None, instance: str = "controller") -> Any:
        """One op to an actor, off the event loop (the client is the CLI's, runtime.transport.ask)."""
        endpoint = paths.actor_endpoint(self.run_dir, instance)
        try:
            result = await asyncio.to_thread(ask, endpoint, op, args, timeout=ASK_TIMEOUT, who=instance)
        except RequestFailed as exc:
            raise HttpError(STATUS_OF.get(exc.code, 502), exc.code, exc.message) from None
        return to_plain(result)

    # --- the app --------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.guard])
        for route in ROUTES:
            app.router.add_route(route.method, API + route.path, self._bind(route))
        app.router.add_get("/ui/login", self.login)
        app.router.add_get("/", self.home)
        app.router.add_get("/panel/{name:.+}", self.asset)
        return app

    def _bind(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await route.handler(self, request)

        handle.route = route  # type: ignore[attr-defined]
        return handle

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Security first (policy.decide), then the handler; every failure becomes a JSON error."""
        self.requests += 1
        route: Route | None = getattr(handler, "route", None)
        needed = route.level if route is not None else READ
        facts = policy.RequestFacts(
            method=request.method,
            host=request.headers.get("Host"),
            origin=request.headers.get("Origin"),
            authorization=request.headers.get("Authorization"),
            session=request.cookies.get(policy.SESSION_COOKIE),
            source=request.remote or "?",
        )
        public = request.path == "/ui/login" and policy.host_allowed(facts.host)  # the code is the credential
        decided = (
            "login" if public else policy.decide(facts, needed, self.tokens, self.sessions, self.limiter, time.time())
        )
        if isinstance(decided, policy.Refusal):
            self.refused += 1
            if decided.log:
                self.log.warning("api.auth_failed", source=facts.source, path=request.path, why=decided.message)
            if decided.status == 401 and request.method == "GET" and request.path == "/":
                return self._panel_file(panel.LOGIN, status=401)  # a browser without a session: how to get one
            return error(decided.status, decided.code, decided.message)
        try:
            response = await handler(request)
        except HttpError as exc:
            return error(exc.status, exc.code, exc.message)
        except web.HTTPException as exc:
            if exc.status == 413:
                return error(413, "too_large", f"request body larger than {MAX_BODY_BYTES} bytes")
            return error(exc.status, "http", exc.reason)
        except Exception as exc:
            self.log.error("api.failed", path=request.path, error=describe(exc))
            return error(500, INTERNAL, f"{request.path} failed: {describe(exc)}")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    # --- browser login ----------------------------------------------------------------------------------

    def login_url(self) -> tuple[str, float]:
        now = time.time()
        code = self.codes.issue(ADMIN, now)
        return f"http://127.0.0.1:{self.port}/ui/login?code={code}", now + policy.LOGIN_CODE_SECONDS

    async def login(self, request: web.Request) -> web.StreamResponse:
        """A one-time code (from `splittun ui`) → a session cookie; the token never enters the browser."""
        now = time.time()
        source = request.remote or "?"
        if self.limiter.blocked(source, now):
            return error(429, "too_many_failures", f"too many failed logins from {source}; wait a minute")
        level = self.codes.level(request.query.get("code", ""), now)
        if level is None:
            if self.limiter.fail(source, now):
                self.log.warning("api.auth_failed", source=source, path=request.path, why="bad login code")
            return error(401, "unauthorized", "login code unknown, used or expired: run splittun ui again")
        session = self.sessions.issue(level, now)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            policy.SESSION_COOKIE,
            session,
            httponly=True,
            samesite="Strict",
            path="/",
            max_age=int(policy.SESSION_SECONDS),
        )
        return response

    async def home(self, request: web.Request) -> web.StreamResponse:
        """The web panel (actors/api/panel/), once logged in; the guard already checked the session."""
        return self._panel_file(panel.INDEX)

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = panel.asset_name(request.match_info["name"])
        if name is None:
            return error(404, NOT_FOUND, f"no panel file {request.match_info['name']!r}")
        return self._panel_file(name)

    def _panel_file(self, name: str, status: int = 200) -> web.StreamResponse:
        data = panel.read_asset(name)
        if data is None:
            return error(404, NOT_FOUND, f"no panel file {name!r}")
        headers = {"Content-Type": panel.content_type(name), "Cache-Control": "no-store", **panel.HEADERS}
        return web.Response(body=data, status=status, headers=headers)


# --- handlers -----------------------------------------------------------------------------------------------


async def body(request: web.Request, record: type[Struct]) -> Any:
    """The JSON body decoded as `record` (400 with the reason when it is not JSON or does not fit)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "too_large", f"request body larger than {MAX_BODY_BYTES} bytes") from None
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, "bad_request", f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "bad_request", "body must be a JSON object")
    try:
        return record.from_wire(data, "body")
    except MessageError as exc:
        raise HttpError(400, INVALID_ARGUMENT, str(exc)) from None


def query_time(request: web.Request, name: str) -> float:
    text = request.query.get(name, "")
    if not text:
        return 0.0
    try:
        return parse_when(text, time.time())
    except TimeSpecError as exc:
        raise HttpError(400, INVALID_ARGUMENT, f"{name}: {exc}") from None


def query_int(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise HttpError(400, INVALID_ARGUMENT, f"{name}: expected a whole number, got {text!r}") from None


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


async def get_status(api: HttpApi, request: web.Request) -> web.StreamResponse:
    actors = await api.ask(Controller.ACTORS)
    config = await api.ask(Controller.CONFIG)
    return ok(
        {
            "actors": actors,
            "policy_version": config["version"],
            "config_error": config["last_error"],
            "enabled": config["config"].get(cfg.ENABLE, False),
            "heartbeat_ttl": HEARTBEAT_TTL,  # an actor not heard from for this long is gone
        }
    )


async def get_actors(api: HttpApi, request: web.Request) -> web.StreamResponse:
    return ok(await api.ask(Controller.ACTORS))


async def get_connections(api: HttpApi, request: web.Request) -> web.StreamResponse:
    args = ConnectionsArgs(
        verdict=request.query.get("verdict", ""),
        app=request.query.get("app", ""),
        limit=query_int(request, "limit", 200),
        since=query_time(request, "since"),
        until=query_time(request, "until"),
    )
    return ok(await api.ask(Controller.CONNECTIONS, args))


async def get_connection(api: HttpApi, request: web.Request) -> web.StreamResponse:
    return ok(await api.ask(Controller.CONNECTION, ConnectionArgs(id=request.match_info["id"])))


async def get_counts(api: HttpApi, request: web.Request) -> web.StreamResponse:
    window = TimeWindow(since=query_time(request, "since"), until=query_time(request, "until"))
    return ok(await api.ask(Controller.COUNTS, window))


async def get_rules(api: HttpApi, request: web.Request) -> web.StreamResponse:
    config = await api.ask(Controller.CONFIG)
    return ok(config["config"].get(cfg.RULES, []))


async def add_rule(api: HttpApi, request: web.Request) -> web.StreamResponse:
    return ok(await api.ask(Controller.ADD_RULE, await body(request, RuleAdd)), status=201)


async def remove_rule(api: HttpApi, request: web.Request) -> web.StreamResponse:
    return ok(await api.ask(Controller.REMOVE_RULE, RuleRef(id=request.match_info["id"])))


@record
class _Position(Struct):
    position: int  # 1 = first


async def move_rule(api: HttpApi, request: web.Request) -> web.StreamResponse:
    pos = await body(request, _Position)
    return ok(await api.ask(Controller.MOVE_RULE, RuleMove(id=request.match_info["id"], position=pos.position)))


async def get_options(api: HttpApi, request: web.Request) -> web.StreamResponse:
    level = request.query.get("level", "user")
    if level not in cfg.LEVELS:
        raise HttpError(400, INVALID_ARGUMENT, f"level: expected one of {', '.join(cfg.LEVELS)}, got {level!r}")
    config = (await api.ask(Controller.CONFIG))["config"]
    return ok(
        [
            {
                "key": o.key,
                "level": o.level,
                "value": config.get(o.key, to_plain(o.default)),
                "default": to_plain(o.default),
                "description": o.description,
            }
            for o in cfg.options_for_level(level)
        ]
    )


@record
class _Value(Struct):
    value: Any  # JSON; a string is taken as typed on the command line


async def set_option(api: HttpApi, request: web.Request) -> web.StreamResponse:
    value = (await body(request, _Value)).value
    text = value if isinstance(value, str) else json.dumps(value)
    return ok(await api.ask(Controller.SET_CONFIG, ConfigSet(key=request.match_info["key"], value=text)))


async def get_interfaces(api: HttpApi, request: web.Request) -> web.StreamResponse:
    snap = await api.ask(Controller.NETENV)
    if snap is None:
        raise HttpError(503, UNAVAILABLE, "no network snapshot yet (netenv has not reported)")
    return ok(snap)


async def get_notifications(api: HttpApi, request: web.Request) -> web.StreamResponse:
    everything = request.query.get("all", "") in ("1", "true", "yes")
    return ok(await api.ask(Controller.NOTIFICATIONS, NotificationsArgs(all=everything)))


@record
class _Action(Struct):
    action: str


async def respond(api: HttpApi, request: web.Request) -> web.StreamResponse:
    action = (await body(request, _Action)).action
    return ok(await api.ask(Controller.RESPOND, NotificationResponse(id=request.match_info["id"], action=action)))


async def reset_notifications(api: HttpApi, request: web.Request) -> web.StreamResponse:
    return ok(await api.ask(Controller.RESET_NOTIFICATIONS, NoArgs()))


async def events(api: HttpApi, request: web.Request) -> web.StreamResponse:
    """Server-sent events: every bus message whose topic starts with one of `?topic=` (all without)."""
    if api.sse_clients >= MAX_SSE_CLIENTS:
        raise HttpError(503, UNAVAILABLE, f"already {MAX_SSE_CLIENTS} event streams open")
    prefixes = request.query.getall("topic", []) or [""]
    sub = api.zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 10_000)
    for prefix in legacy_subscriptions(prefixes):  # the version 1 shapes: conn.verdict travels in conn.new
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sub.connect(paths.bus_out(api.run_dir))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    api.sse_clients += 1
    try:
        await response.prepare(request)
        await response.write(b": splittun events\n\n")
        while True:
            if not await sub.poll(int(SSE_KEEPALIVE_SECONDS * 1000)):
                await response.write(b": keepalive\n\n")
                continue
            frames = await sub.recv_multipart()
            shapes: list[tuple[str, dict[str, Any]]] = []
            try:
                for event in unbatch(frames):  # a bus message may carry several events (wire version 2)
                    with contextlib.suppress(MessageError):
                        shapes += legacy_shapes(*decode_loose(event))
            except MessageError:
                continue
            for topic, data in shapes:
                if wanted(topic, prefixes):
                    line = json.dumps(data, default=lambda b: b.hex() if isinstance(b, bytes) else str(b))
                    await response.write(f"event: {topic}\ndata: {line}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        api.sse_clients -= 1
        sub.close(linger=0)
    return response


async def openapi(api: HttpApi, request: web.Request) -> web.StreamResponse:
    return ok(openapi_document())


ROUTES: tuple[Route, ...] = (
    Route("GET", "/status", READ, "Actors, policy version, whether split tunnelling is on", get_status),
    Route("GET", "/actors", READ, "Every actor instance's last heartbeat", get_actors),
    Route(
        "GET",
        "/connections",
        READ,
        "Live and historical connections, newest first",
        get_connections,
        query=("since", "until", "verdict", "app", "limit"),
    ),
    Route("GET", "/connections/{id}", READ, "One connection, live or from the history", get_connection),
    Route(
        "GET",
        "/counts",
        READ,
        "Connections per verdict (incl. split tunneled) in a window",
        get_counts,
        query=("since", "until"),
    ),
    Route("GET", "/rules", READ, "The split rules in order (first match wins)", get_rules),
    Route(
        "POST", "/rules", ADMIN, "Add a rule (same fields and messages as `splittun rules add`)", add_rule, body=RuleAdd
    ),
    Route("DELETE", "/rules/{id}", ADMIN, "Remove a rule", remove_rule),
    Route("POST", "/rules/{id}/move", ADMIN, "Move a rule to a position (1 = first)", move_rule, body=_Position),
    Route(
        "GET",
        "/options",
        READ,
        "Options up to an expertise level (user, expert, developer)",
        get_options,
        query=("level",),
    ),
    Route(
        "PUT",
        "/options/{key:.+}",
        ADMIN,
        "Set one option (value as JSON or command-line text)",
        set_option,
        body=_Value,
    ),
    Route("GET", "/interfaces", READ, "Interfaces, gateways and uplinks (the last netenv snapshot)", get_interfaces),
    Route(
        "GET",
        "/notifications",
        READ,
        "Notifications showing now (all=1: every stored one)",
        get_notifications,
        query=("all",),
    ),
    Route(
        "POST",
        "/notifications/{id}/respond",
        ADMIN,
        "Answer a notification with one of its actions",
        respond,
        body=_Action,
    ),
    Route(
        "POST", "/notifications/reset-state", ADMIN, "Delete every notification state and marker", reset_notifications
    ),
    Route(
        "GET", "/events", READ, "Server-sent events: bus messages, filtered by topic prefixes", events, query=("topic",)
    ),
    Route("GET", "/openapi.json", READ, "This description", openapi),
)


# --- OpenAPI ----------------------------------------------------------------------------------------------


def _schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if origin is list:
        return {"type": "array"}
    return {}


def _record_schema(record: type[Struct]) -> dict[str, Any]:
    hints = typing.get_type_hints(record)
    fields = dataclasses.fields(record)  # type: ignore[arg-type]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    schema: dict[str, Any] = {"type": "object", "properties": {f.name: _schema(hints[f.name]) for f in fields}}
    if required:
        schema["required"] = required
    return schema


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 from ROUTES: paths, levels (as security), query parameters and JSON bodies."""
    doc_paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        path = API + route.path.replace("{key:.+}", "{key}")
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in ("id", "key")
            if "{" + p in route.path
        ]
        params += [{"name": q, "in": "query", "schema": {"type": "string"}} for q in route.query]
        op: dict[str, Any] = {
            "summary": route.summary,
            "security": [{route.level: []}],
            "parameters": params,
            "responses": {
                "200": {"description": "JSON"},
                "400": {"description": "bad input"},
                "401": {"description": "no or wrong token"},
                "403": {"description": "refused"},
            },
        }
        if route.body is not None:
            op["requestBody"] = {"content": {"application/json": {"schema": _record_schema(route.body)}}}
        doc_paths.setdefault(path, {})[route.method.lower()] = op
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "splittun local API", "version": "1"},
        "servers": [{"url": "http://127.0.0.1:817"}],
        "paths": doc_paths,
        "components": {"securitySchemes": {READ: bearer, ADMIN: bearer}},
    }
