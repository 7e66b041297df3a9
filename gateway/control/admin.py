"""The admin listener (--admin-listen): the blacklist's query and command API, health and metrics.

It runs in the supervisor process of `gateway serve`, with its own follower, away from the
request path: listing a million ranges or replaying the command log never delays a bid.
Queries (/admin/ranges, /admin/lookup, /admin/status) read that follower's view; commands
go to the command topic and return their offset (CQRS). `?wait=1` answers once the command
is applied here and, through `progress.WorkerProgress`, in every worker: read-your-writes for the
proxy too. /healthz, /readyz and /metrics need no token; every /admin/* route does.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaConnectionError

from ..blacklist.addresses import BITS, format_address, parse_address
from ..blacklist.cidrs import range_to_cidrs
from ..blacklist.commands import CommandError, parse_command
from ..blacklist.guard import Limits, TooBroad, check_command
from ..http.config import ServeConfig
from ..http.proxy import ACCESS
from ..kafka.history import replay
from ..kafka.topics import TopicError
from . import openapi
from . import top as top_counts
from .commandlog import CommandIndex, Published
from .metrics import ENV as METRICS_DIR_ENV
from .metrics import METRICS_REGISTRY, handle_metrics, healthz, view_state
from .progress import WorkerProgress

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 10
DEFAULT_WAIT_S = 10.0
MAX_WAIT_S = 60.0
CHUNK = 4096  # ranges formatted per write of a streamed listing
PUBLISH_TIMEOUT_S = 10.0

FOLLOWER = web.AppKey("follower", object)
PUBLISHER = web.AppKey("publisher", object)
CONFIG = web.AppKey("config", ServeConfig)
PROGRESS = web.AppKey("progress", object)
BASELINE = web.AppKey("baseline", float)
COMMAND_INDEX = web.AppKey("command_index", CommandIndex)
PUBLISHING = web.AppKey("publishing", dict)  # Idempotency-Key -> the task publishing it, until it settles
KEYED = web.AppKey("keyed", asyncio.Lock)
PUBLISH_TIMEOUT = web.AppKey("publish_timeout", float)
LAST_PUBLISHED = web.AppKey("last_published", list)  # [the highest offset this process published]
MAX_KEY_LENGTH = 200


# -- errors and auth -------------------------------------------------------------------------


class ApiError(Exception):
    """An answer with an error status: {"error": message, ...fields} as JSON."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.status, self.headers, self.body = status, headers, {"error": message, **fields}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every error is JSON with a message a person can act on, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such route: {request.method} {request.path} (see /admin/openapi.json)",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"request body too large (at most {MAX_BODY_BYTES} bytes)",
        }.get(exc.status, exc.reason)
        kept = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}  # 405 must say what is
        return web.json_response({"error": message}, status=exc.status, headers=kept)
    except Exception:
        log.exception("admin: %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error; the gateway log has the details"}, status=500)


BARE_ACTOR = "admin-api"  # the actor recorded for commands published with the bare (unnamed) token
# The name of the token that authenticated the request (a typed key where aiohttp has them: 3.12+).
ACTOR: Any = web.RequestKey("actor", str) if hasattr(web, "RequestKey") else "actor"


def bearer_auth(token: str | None, named: tuple[tuple[str, str], ...] = ()):
    """Require `Authorization: Bearer <token>` on /admin/*: 401 when absent or malformed, 403 when wrong.

    Tokens are the bare one (actor "admin-api") and named ones (--admin-token NAME=TOKEN): the
    name of the token that matched is the actor of the commands that request publishes. Every
    token is compared in constant time, all of them each time (no early exit telling which)."""
    tokens = [(name, secret.encode()) for name, secret in named]
    if token:
        tokens.append((BARE_ACTOR, token.encode()))
    challenge = {"WWW-Authenticate": 'Bearer realm="gateway-admin"'}

    @web.middleware
    async def middleware(request: web.Request, handler):
        if not request.path.startswith("/admin/"):
            return await handler(request)
        if not tokens:
            raise ApiError(403, "the admin API is disabled: start the gateway with --admin-token (or GATEWAY_ADMIN_TOKEN)")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <admin token>'", headers=challenge)
        offered = given.strip().encode()
        actor = None
        for name, secret in tokens:
            if hmac.compare_digest(offered, secret) and actor is None:
                actor = name
        if actor is None:
            raise ApiError(403, "wrong admin token")
        request[ACTOR] = actor
        return await handler(request)

    return middleware


QUERY_PARAMETERS = {
    "/admin/ranges": {"family", "format"},
    "/admin/lookup": {"ip"},
    "/admin/commands": {"wait", "timeout", "request_id", "idempotency_key", "since", "actor", "ip", "limit"},
    "/admin/explain": {"ip"},
    "/admin/top": {"limit"},
    "/admin/history": {"at", "family", "format"},
}


@web.middleware
async def known_query_parameters(request: web.Request, handler):
    """Refuse query parameters a route does not take: a typo (?famly=4) must not silently list everything."""
    allowed = QUERY_PARAMETERS.get(request.path, set())
    unknown = sorted(set(request.query) - allowed)
    if unknown and request.path.startswith("/admin/"):
        takes = ", ".join(sorted(allowed)) or "none"
        raise ApiError(400, f"unknown query parameter(s) {', '.join(unknown)} for {request.path} (it takes: {takes})")
    return await handler(request)


# -- handlers: health --------------------------------------------------------------------------


async def readyz(request: web.Request) -> web.Response:
    """200 once the view is bootstrapped here and in every worker; 503 until then."""
    follower, progress = request.app[FOLLOWER], request.app.get(PROGRESS)
    if not follower.ready.is_set():
        return web.json_response({"ready": False, "error": "bootstrapping the view from the ranges topic"}, status=503)
    if progress is not None and not progress.ready():
        return web.json_response({"ready": False, "error": "a worker is still bootstrapping its view"}, status=503)
    return web.json_response({"ready": True})


# -- handlers: queries -------------------------------------------------------------------------


def _family(request: web.Request) -> int | None:
    given = request.query.getall("family", [])
    if not given:
        return None
    if len(given) > 1:  # never silently the first one: leave it out for both families
        raise ApiError(400, f"family given {len(given)} times: give one of 4 or 6, or leave it out for both")
    family = given[0]
    if family not in ("4", "6"):
        raise ApiError(400, f"family must be 4 or 6, got {family!r}")
    return int(family)


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "cidr"):
        raise ApiError(400, f"format must be json or cidr, got {fmt!r}")
    return fmt


def _follow_ranges(follower: Any, family: int | None) -> Iterator[tuple[int, int, int] | None]:
    """The follower's ranges in order; yields None where the caller may pause (it then resumes safely).

    The view changes while a long listing is written; after a pause during which the follower
    applied records, iteration restarts past the last range yielded, so every range listed was
    in the view when it was read.
    """
    last: tuple[int, int] | None = None
    while True:
        view, applied = follower.view, follower.records_applied
        count = 0
        for version, start, end in view.ranges(family):
            if last is not None and (version, start) <= last:
                continue
            yield version, start, end
            last = (version, start)
            count += 1
            if count % CHUNK == 0:
                yield None
                if follower.view is not view or follower.records_applied != applied:
                    break
        else:
            return


async def _stream_ranges(
    request: web.Request, ranges: Iterator[tuple[int, int, int] | None], fmt: str, extra: dict[str, Any]
) -> web.StreamResponse:
    """Write ranges as JSON ({"ranges": [...], "count": N, ...extra}) or CIDR lines, a chunk at a time."""
    response = web.StreamResponse(
        headers={"Content-Type": "application/json" if fmt == "json" else "text/plain; charset=utf-8"}
    )
    response.enable_compression()  # only when the client accepts it
    await response.prepare(request)
    text = format_address
    parts: list[str] = ['{"ranges":['] if fmt == "json" else []
    count = 0
    for item in ranges:
        if item is None:
            await response.write("".join(parts).encode())
            parts.clear()
            continue
        version, start, end = item
        if fmt == "json":
            parts.append(f'{"," if count else ""}{{"start":"{text(version, start)}","end":"{text(version, end)}"}}')
        else:
            parts.extend(f"{text(version, net)}/{length}\n" for net, length in range_to_cidrs(start, end, BITS[version]))
        count += 1
    if fmt == "json":
        tail = "".join(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in extra.items())
        parts.append(f'],"count":{count}{tail}}}')
    await response.write("".join(parts).encode())
    await response.write_eof()
    return response


async def ranges(request: web.Request) -> web.StreamResponse:
    """The blacklisted ranges of this gateway's view, streamed."""
    family, fmt = _family(request), _format(request)
    return await _stream_ranges(request, _follow_ranges(request.app[FOLLOWER], family), fmt, {})


def _address(request: web.Request, route: str) -> tuple[int, int]:
    """The ip query parameter as (version, value); an IPv4-mapped IPv6 address is taken as IPv4."""
    text = request.query.get("ip")
    if not text:
        raise ApiError(400, f"missing query parameter ip, e.g. {route}?ip=10.0.0.5")
    try:
        if "%" in text:
            raise ValueError("scoped address")
        version, value = parse_address(text.strip())
    except ValueError:
        raise ApiError(400, f"ip must be an IPv4 or IPv6 address, got {text!r}") from None
    if version == 6 and (mapped := ipaddress.IPv6Address(value).ipv4_mapped) is not None:
        version, value = 4, int(mapped)  # looked up as IPv4, like the request path does
    return version, value


async def lookup(request: web.Request) -> web.Response:
    """Whether an address is blocked here, and the range that blocks it."""
    version, value = _address(request, "/admin/lookup")
    found = request.app[FOLLOWER].view.find(version, value)
    return web.json_response({
        "ip": format_address(version, value),
        "blocked": found is not None,
        "range": None if found is None else {"start": format_address(version, found[0]),
                                             "end": format_address(version, found[1])},
    })


async def status(request: web.Request) -> web.Response:
    """Readiness, offsets, lag, staleness and counts of this gateway (and its workers' progress)."""
    state = view_state(request.app[FOLLOWER], request.app[BASELINE])
    progress = request.app.get(PROGRESS)
    body = {
        "ready": state.ready,
        "mode": request.app[CONFIG].mode,
        "ranges": {str(f): n for f, n in state.ranges.items()},
        "addresses": {str(f): n for f, n in state.addresses.items()},
        "applied_offsets": {str(p): o for p, o in state.offsets.items()},
        "end_offsets": {str(p): o for p, o in state.end_offsets.items()},
        "lag": state.lag,
        "age_seconds": round(state.age_seconds, 3),
        "seconds_since_contact": None if state.since_contact is None else round(state.since_contact, 3),
        "applied_command": state.applied_command,
        "poison_records": state.poison,
        "stale_records": state.stale,
        "unenforced_commands": state.unenforced_commands,
        "log_id": state.log_id,
        "writer_claim": state.claim_offset,
        "static": state.static,
        "kafka_problem": state.kafka_problem,
        "commands_topic": request.app[CONFIG].kafka.commands_topic,
        "ranges_topic": request.app[CONFIG].kafka.ranges_topic,
    }
    if progress is not None:
        body["workers"] = [{"worker": i, "ready": s > WorkerProgress.NOT_READY, "applied_command": max(s, -1)}
                           for i, s in enumerate(progress.slots)]
    return web.json_response(body)


def _parse_at(text: str | None) -> tuple[int | None, datetime | None]:
    if not text:
        raise ApiError(400, "missing query parameter at: an ISO 8601 time (2024-05-01T12:00:00Z) or a command offset")
    if text.isascii() and text.isdigit():
        return int(text), None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApiError(400, f"at must be an ISO 8601 time (2024-05-01T12:00:00Z) or a command offset, got {text!r}") from None
    return None, when if when.tzinfo else when.replace(tzinfo=timezone.utc)


async def history(request: web.Request) -> web.StreamResponse:
    """The time machine: the ranges after the commands up to an offset (inclusive) or a time, folded."""
    offset, until = _parse_at(request.query.get("at"))
    family, fmt = _family(request), _format(request)
    try:
        result = await replay(request.app[CONFIG].kafka, offset=None if offset is None else offset + 1, until=until)
    except Exception as exc:  # noqa: BLE001 - the broker's trouble, told to the caller
        raise ApiError(503, f"cannot read the command topic: {exc!r}") from None
    extra = {"at": request.query["at"], "commands": result.commands, "next_offset": result.next_offset,
             "poison_records": result.poison}
    listing = (item for item in result.view.ranges(family))
    return await _stream_ranges(request, listing, fmt, extra)


# -- handlers: commands ------------------------------------------------------------------------


async def commands(request: web.Request) -> web.Response:
    """Publish one command to the command topic: 202 {"offset": N}; with ?wait=1, once applied here.

    The request id (X-Request-Id, else a new one) is echoed and goes into the record's headers.
    With an Idempotency-Key (the record's key), a key already in the command log answers 200
    with that command instead of publishing again, so a retry after an unclear answer is safe."""
    wait = request.query.get("wait", "0")
    if wait not in ("0", "1", "true", "false"):
        raise ApiError(400, f"wait must be 1 or 0, got {wait!r}")
    timeout = _timeout(request)
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    echo = {"X-Request-Id": request_id}
    key = _idempotency_key(request, echo)
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 'body must be JSON: {"command": "BLACKLIST 10.0.0.0/24", "reason": "..."}') from None
    if not isinstance(body, dict):
        raise ApiError(400, 'body must be a JSON object: {"command": "BLACKLIST 10.0.0.0/24"}')
    unknown = sorted(set(body) - {"command", "reason", "force"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}: only command, reason and force are accepted")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise ApiError(400, "force must be true or false")
    text, reason = body.get("command"), body.get("reason")
    if not isinstance(text, str):
        raise ApiError(400, 'command must be a string such as "BLACKLIST 10.0.0.0/24" or "WHITELIST 2001:db8::/32"')
    if "reason" in body and (not isinstance(reason, str) or len(reason) > 1024):
        raise ApiError(400, "reason must be a string of at most 1024 characters")
    try:
        command = parse_command(text)
    except CommandError as exc:
        raise ApiError(400, str(exc)) from None
    if not force:
        config = request.app[CONFIG]
        try:
            check_command(command, Limits(max_prefix_v4=config.max_prefix_v4, max_prefix_v6=config.max_prefix_v6))
        except TooBroad as exc:
            raise ApiError(422, f'{exc} ("force": true)', headers=echo, addresses=exc.addresses) from None
    actor = request.get(ACTOR, BARE_ACTOR)
    if key is None:
        offset = await _publish(request.app, command, None, reason, request_id, echo, actor)
    else:
        async with request.app[KEYED]:  # look up, then publish, as one step in this process
            earlier = await _published_before(request.app, key, str(command), echo)
            if earlier is not None:
                return web.json_response({**earlier.as_json(), "replayed": True}, status=200, headers=echo)
            offset = await _publish(request.app, command, key, reason, request_id, echo, actor)
    answer = {"offset": offset, "command": str(command), "request_id": request_id}
    if wait in ("1", "true"):
        if not await _wait_applied(request.app, offset, timeout):
            raise ApiError(504, f"published at offset {offset} but not applied here within {timeout:g} s; "
                             "is the materializer running? (see /admin/status)", headers=echo, offset=offset)
        answer["applied"] = True
    return web.json_response(answer, status=202, headers=echo)


def _idempotency_key(request: web.Request, echo: dict[str, str]) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters", headers=echo)
    return key


async def _published_before(app: web.Application, key: str, command: str, echo: dict[str, str]) -> Published | None:
    """The command this key already published (this process's, or any in the log), else None."""
    limit = app[PUBLISH_TIMEOUT]
    pending = app[PUBLISHING].get(key)
    if pending is not None:  # an earlier try still in this process's producer: it may land any moment
        try:
            await asyncio.wait_for(asyncio.shield(pending), limit)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError(503, "the command with this Idempotency-Key is still unconfirmed by the broker: it may"
                                " have been published; nothing was published again. Retry with the same key later.",
                           headers=echo, idempotency_key=key) from None
        except Exception:  # noqa: BLE001 - it failed: the log says whether it landed
            pass
    index = app[COMMAND_INDEX]
    if key not in index.by_key:
        try:
            await asyncio.wait_for(index.catch_up(), limit)
        except Exception as exc:  # noqa: BLE001 - the broker's trouble: nothing decided, nothing sent
            raise ApiError(503, f"cannot look the Idempotency-Key up in the command log ({exc!r}); nothing was"
                                " published. Retry with the same key.", headers=echo, idempotency_key=key) from None
    earlier = index.by_key.get(key)
    if earlier is not None and earlier.command != command:
        raise ApiError(422, f"Idempotency-Key {key!r} was used for {earlier.command!r} (offset {earlier.offset});"
                            " use a new key for a new command", headers=echo, offset=earlier.offset)
    return earlier


async def _publish(app: web.Application, command: Any, key: str | None, reason: str | None, request_id: str,
                   echo: dict[str, str], actor: str = BARE_ACTOR) -> int:
    """Publish and wait a bounded time. The send is never cancelled (the producer would deliver the
    record anyway): past the time the answer says so, and a keyed send stays known until it settles."""
    task = asyncio.ensure_future(
        app[PUBLISHER].publish(command, key=key, actor=actor, reason=reason, request_id=request_id))
    task.add_done_callback(lambda t: _settled(app, t, key, str(command), reason, request_id, actor))
    if key is not None:
        app[PUBLISHING][key] = task
    limit = app[PUBLISH_TIMEOUT]
    try:
        offset = await asyncio.wait_for(asyncio.shield(task), limit)
    except Exception as exc:  # noqa: BLE001 - said below: not sent, or unknown
        never_sent = isinstance(exc, (KafkaConnectionError, TopicError)) and not getattr(app[PUBLISHER], "started", True)
        _unconfirmed(command, exc, never_sent, key, limit, request_id, echo)
    log.info("admin: published %s", command, extra={"offset": offset, "request_id": request_id, "reason": reason})
    return offset


def _unconfirmed(command: Any, exc: Exception, never_sent: bool, key: str | None, limit: float, request_id: str,
                 echo: dict[str, str]) -> None:
    """Raise the 503 that says what is known: nothing sent (the producer never started), or unknown."""
    log.warning("admin: publishing %s unconfirmed: %r", command, exc, extra={"request_id": request_id})
    if never_sent:
        raise ApiError(503, f"the broker cannot be reached ({exc!r}): not published, safe to retry",
                       headers=echo, request_id=request_id, published=False)
    how = f"did not confirm the command within {limit:g} s" if isinstance(exc, asyncio.TimeoutError) else f"failed ({exc!r})"
    retry = "retry with the same Idempotency-Key (it never publishes twice)" if key else \
        "send an Idempotency-Key next time to retry safely"
    raise ApiError(503, f"the broker {how}: the command may have been published (it can still land). Look it up"
                        f" with GET /admin/commands?request_id={request_id}, or {retry}.",
                   headers=echo, request_id=request_id, published=None)


def _settled(app: web.Application, task: asyncio.Future, key: str | None, command: str, reason: str | None,
             request_id: str, actor: str) -> None:
    if key is not None and app[PUBLISHING].get(key) is task:
        del app[PUBLISHING][key]
    if task.cancelled() or task.exception() is not None:
        return
    app[LAST_PUBLISHED][0] = max(app[LAST_PUBLISHED][0], task.result())
    app[COMMAND_INDEX].add(Published(task.result(), command, int(time.time() * 1000), key, request_id,
                                     actor, reason))


async def command_lookup(request: web.Request) -> web.Response:
    """GET /admin/commands?request_id=R | ?idempotency_key=K: the command(s) the log holds for it.
    Without either: the log listing (command_log)."""
    request_id, key = request.query.get("request_id"), request.query.get("idempotency_key")
    if request_id is None and key is None:
        return await command_log(request)
    if request_id is not None and key is not None:
        raise ApiError(400, "give request_id=ID (from X-Request-Id) or idempotency_key=KEY, not both")
    listing = sorted({"since", "actor", "ip", "limit"} & set(request.query))
    if listing:
        raise ApiError(400, f"{', '.join(listing)} filter the log listing; they do not combine with"
                            " request_id or idempotency_key")
    index = request.app[COMMAND_INDEX]
    try:
        await asyncio.wait_for(index.catch_up(), request.app[PUBLISH_TIMEOUT])
    except Exception as exc:  # noqa: BLE001 - the broker's trouble, told to the caller
        raise ApiError(503, f"cannot read the command topic: {exc!r}") from None
    found = index.by_request.get(request_id, []) if request_id is not None else \
        [e for e in (index.by_key.get(key),) if e is not None]
    return web.json_response({"commands": [entry.as_json() for entry in found]})


# -- handlers: explain, the log, top ---------------------------------------------------------

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CATCH_UP_S = 2.0  # how long explain and the log listing wait for the log's newest records


async def _read_log(app: web.Application, follower: Any) -> tuple[CommandIndex, str | None]:
    """The command index, read at least up to every command this gateway has applied or published.

    A background task reads the log's new records every half second (CommandIndex.keep_up), so a
    request normally reads nothing from the broker (a catch-up costs a round trip and a drain of
    ~50 ms). It catches up here only when the index is behind what this gateway knows exists: then
    the answer never names an older command than the view enforces. 503 while the log has never
    been read to its end; a note when the broker did not answer the catch-up in time."""
    index = app[COMMAND_INDEX]
    needed = max(follower.applied_command if follower.applied_command is not None else -1, app[LAST_PUBLISHED][0])
    if index.end_offset is not None and index.next_offset > needed:
        return index, None
    try:
        await asyncio.wait_for(index.catch_up(), min(CATCH_UP_S, app[PUBLISH_TIMEOUT]))
        return index, None
    except Exception as exc:  # noqa: BLE001 - the broker's trouble, or the first long read still running
        if index.end_offset is None:
            raise ApiError(503, f"the command log is still being read ({len(index.table)} commands so far) or the"
                                f" broker does not answer ({exc!r}); retry shortly") from None
        return index, (f"the command log could not be read past offset {index.next_offset - 1} just now ({exc!r}):"
                       " newer commands may be missing")


def _entry(index: CommandIndex, position: int) -> dict[str, Any]:
    row = index.table.row(position)
    entry = Published(row.offset, row.command, row.timestamp_ms, row.key, row.request_id, row.actor,
                      row.reason).as_json()
    if not row.valid:
        entry["poison"] = True  # skipped by every reader: it changed nothing
    return entry


async def explain(request: web.Request) -> web.Response:
    """GET /admin/explain?ip=A: this gateway's answer for A and the command that decided it.

    The deciding command is the last one in the log whose network holds A: its verb is A's state
    by the log. When that differs from this gateway's view, or the view has not applied it yet,
    the answer says so (lag)."""
    version, value = _address(request, "/admin/explain")
    ip = format_address(version, value)
    follower = request.app[FOLLOWER]
    found = follower.view.find(version, value)
    index, note = await _read_log(request.app, follower)
    position = index.table.deciding(version, ip)
    decided = None if position is None else _entry(index, position)
    by_log = position is not None and index.table.blocks(position)
    applied = follower.applied_command
    body: dict[str, Any] = {
        "ip": ip,
        "blocked": found is not None,
        "range": None if found is None else {"start": format_address(version, found[0]),
                                             "end": format_address(version, found[1])},
        "decided_by": decided,
        "blocked_by_log": by_log,
        "applied_command": applied,
        "log_end_offset": index.next_offset - 1,
        "agrees": by_log == (found is not None),
    }
    if decided is not None and (applied is None or applied < decided["offset"]):
        body["lag"] = (f"this gateway has applied commands up to offset {applied}; the deciding command"
                       f" (offset {decided['offset']}) is not enforced here yet")
    elif not body["agrees"]:
        body["lag"] = ("the view here and the command log disagree on this address: the view may be behind"
                       " the log, or built from another log (see /admin/status and `gateway ctl verify`)")
    if note:
        body["note"] = note
    return web.json_response(body)


def _limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIMIT}, got {text!r}")
    return int(text)


def _since(index: CommandIndex, text: str | None) -> int:
    if text is None:
        return 0
    if text.isascii() and text.isdigit():
        return index.table.first_at_or_after(offset=int(text))
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApiError(400, f"since must be a command offset or an ISO 8601 time (2024-05-01T12:00:00Z),"
                            f" got {text!r}") from None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return index.table.first_at_or_after(time_ms=int(when.timestamp() * 1000))


async def command_log(request: web.Request) -> web.Response:
    """GET /admin/commands?since=&actor=&ip=&limit=: the command log, newest first, with its headers."""
    limit = _limit(request)
    actor = request.query.get("actor")
    if actor is not None and not actor:
        raise ApiError(400, "actor must not be empty")
    address = None
    if "ip" in request.query:
        version, value = _address(request, "/admin/commands")
        address = (version, format_address(version, value))
    index, note = await _read_log(request.app, request.app[FOLLOWER])
    if actor is not None and actor not in index.table.actors:
        known = sorted(index.table.actors)
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise ApiError(400, f"no command in the log was published by actor {actor!r} (actors: {shown or 'none'})")
    since = _since(index, request.query.get("since"))
    entries = []
    for position in index.table.newest_first(since=since, actor=actor, address=address):
        entries.append(_entry(index, position))
        if len(entries) >= limit:
            break
    body: dict[str, Any] = {"commands": entries, "count": len(entries), "log_end_offset": index.next_offset - 1}
    if note:
        body["note"] = note
    return web.json_response(body)


async def top(request: web.Request) -> web.Response:
    """GET /admin/top?limit=N: the view ranges that refused the most requests, summed over every worker."""
    limit = _limit(request)
    summary = top_counts.summed(os.environ.get(METRICS_DIR_ENV), limit)
    view = request.app[FOLLOWER].view

    def listed(items: list[top_counts.Ranked]) -> list[dict[str, Any]]:
        return [item.as_json(view.get(item.version, item.first) == item.last) for item in items]

    return web.json_response({
        "mode": request.app[CONFIG].mode,
        "ranges": listed(summary.by_total),
        "last_minute": listed(summary.by_minute),
        "workers": summary.workers,
        "unmatched": summary.unmatched,
    })


def _timeout(request: web.Request) -> float:
    text = request.query.get("timeout")
    if text is None:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_WAIT_S:
        raise ApiError(400, f"timeout must be a number of seconds in (0, {MAX_WAIT_S:g}], got {text!r}")
    return value


async def _wait_applied(app: web.Application, offset: int, timeout: float) -> bool:
    """Until this gateway's follower, and every worker, has applied the command at `offset`."""
    deadline = time.monotonic() + timeout
    if not await app[FOLLOWER].wait_applied(offset, timeout):
        return False
    progress = app.get(PROGRESS)
    while progress is not None and progress.applied() < offset:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.002)
    return True


async def adopt(request: web.Request) -> web.Response:
    """Invariant 7, the operator's word: this gateway and its workers adopt the log the view topic holds now."""
    follower, progress = request.app[FOLLOWER], request.app.get(PROGRESS)
    log.warning("admin: adopting the log the view topic holds now", extra={"held_log": follower.log_id,
                                                                           "static": follower.static})
    follower.adopt()
    if progress is not None:
        progress.adopt()
    return web.json_response({"adopting": True, "static": follower.static, "log_id": follower.log_id}, status=202)


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


# -- the app -----------------------------------------------------------------------------------


def make_admin_app(
    config: ServeConfig,
    follower: Any,
    publisher: Any,
    *,
    progress: WorkerProgress | None = None,
    registry: Any = None,
    baseline: float | None = None,
    publish_timeout: float = PUBLISH_TIMEOUT_S,
) -> web.Application:
    """The admin web app. `follower`: a gateway.follower.Follower (its task running); `publisher`: a
    started gateway.publisher.Publisher; `progress`: the workers' shared progress (None: no workers
    to wait for); `registry`: the metrics registry to serve when not in multiprocess mode;
    `baseline`: wall time the view was last known current at start (its snapshot's time, else now);
    `publish_timeout`: how long POST /admin/commands waits for the broker before it says so."""
    app = web.Application(middlewares=[json_errors, bearer_auth(config.admin_token, config.admin_tokens), known_query_parameters], client_max_size=MAX_BODY_BYTES)
    app[CONFIG], app[FOLLOWER], app[PUBLISHER] = config, follower, publisher
    app[BASELINE] = time.time() if baseline is None else baseline
    app[COMMAND_INDEX], app[PUBLISHING], app[KEYED] = CommandIndex(config.kafka), {}, asyncio.Lock()
    app[PUBLISH_TIMEOUT] = publish_timeout
    app[LAST_PUBLISHED] = [-1]
    app.on_cleanup.append(_close_index)
    if progress is not None:
        app[PROGRESS] = progress
    if registry is not None:
        app[METRICS_REGISTRY] = registry
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", handle_metrics, allow_head=False)
    app.router.add_get("/admin/openapi.json", openapi_document, allow_head=False)
    app.router.add_get("/admin/ranges", ranges, allow_head=False)
    app.router.add_get("/admin/lookup", lookup, allow_head=False)
    app.router.add_post("/admin/commands", commands)
    app.router.add_get("/admin/commands", command_lookup, allow_head=False)
    app.router.add_get("/admin/status", status, allow_head=False)
    app.router.add_get("/admin/history", history, allow_head=False)
    app.router.add_post("/admin/adopt", adopt)
    app.router.add_get("/admin/explain", explain, allow_head=False)
    app.router.add_get("/admin/top", top, allow_head=False)
    app.on_startup.append(_keep_index)
    return app


async def _keep_index(app: web.Application) -> None:
    """Read the command log in the background once the view is read: explain and the listing never
    wait for a first read of a long log inside a request.

    Not before the view: the view decides readiness, and the supervisor forks its workers from
    its heap as it is when the view is in; an index read meanwhile would take CPU from the
    bootstrap and be copied into every worker (a 1M-command index is ~0.3 GB)."""
    async def keep() -> None:
        await app[FOLLOWER].ready.wait()
        await app[COMMAND_INDEX].keep_up(interval=0.5)

    task = asyncio.ensure_future(keep())

    async def stop(app: web.Application) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.on_cleanup.insert(0, stop)


async def _close_index(app: web.Application) -> None:
    await app[COMMAND_INDEX].close()


async def start_admin(app: web.Application, host: str, port: int, *, access_log: bool = False) -> web.AppRunner:
    """Listen on host:port; stop with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=ACCESS if access_log else None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
