"""The OpenAPI 3.0 document of the admin API, served at /admin/openapi.json.

Kept true by tests/control/test_openapi.py, which runs schemathesis against a live gateway: every
documented route, parameter and answer is exercised, and an undocumented status fails it.
"""

from __future__ import annotations

import copy
from typing import Any

_ERROR = {"$ref": "#/components/responses/Error"}
_AUTH_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
}
_RANGE = {
    "type": "object",
    "required": ["start", "end"],
    "properties": {"start": {"type": "string", "example": "10.0.0.0"}, "end": {"type": "string", "example": "10.0.0.99"}},
    "additionalProperties": False,
}
_FAMILY = {"name": "family", "in": "query", "required": False,
           "description": "Only IPv4 (4) or IPv6 (6) ranges; leave it out for both (given twice: 400).",
           "schema": {"type": "string", "enum": ["4", "6"]}}
_FORMAT = {"name": "format", "in": "query", "required": False,
           "description": "json (default) or cidr: text/plain, one CIDR per line, ranges split into prefixes.",
           "schema": {"type": "string", "enum": ["json", "cidr"]}}
_IP = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}], "example": "10.0.0.5"}
_LIMIT = {"name": "limit", "in": "query", "required": False, "description": "At most this many (1 to 1000; default 100).",
          "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
_REQUEST_ID = {"X-Request-Id": {"description": "The request id, as the command record carries it.",
                               "schema": {"type": "string"}}}
_LISTING = {
    "200": {
        "description": "The ranges, in address order (IPv4 first); streamed.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Ranges"}},
            "text/plain": {"schema": {"type": "string", "example": "10.0.0.0/25\n10.0.0.128/27\n"}},
        },
    },
    "400": _ERROR,
    **_AUTH_ERRORS,
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "gateway admin API",
        "version": "1",
        "description": (
            "The blacklist of one gateway: queries read its view, commands go to the command topic "
            "(CQRS). Every /admin/* route needs `Authorization: Bearer <token>` (401 without, 403 wrong); a "
            "named token (--admin-token NAME=TOKEN) records NAME as the actor of the commands it publishes. "
            "Errors are JSON: {\"error\": \"what is wrong and what to do\"}."
        ),
    },
    "security": [{"bearer": []}],
    "paths": {
        "/admin/ranges": {"get": {
            "summary": "The blacklisted ranges of this gateway's view",
            "operationId": "listRanges",
            "parameters": [_FAMILY, _FORMAT],
            "responses": _LISTING,
        }},
        "/admin/lookup": {"get": {
            "summary": "Whether an address is blocked here, and the range that blocks it",
            "operationId": "lookup",
            "parameters": [{"name": "ip", "in": "query", "required": True, "description": "IPv4 or IPv6 address; "
                            "IPv4-mapped IPv6 is looked up as IPv4.", "schema": {"anyOf": [
                                {"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}],
                                "example": "10.0.0.5"}}],
            "responses": {
                "200": {"description": "The verdict.", "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["ip", "blocked", "range"],
                    "properties": {
                        "ip": {"type": "string"},
                        "blocked": {"type": "boolean"},
                        "range": {**_RANGE, "nullable": True},
                    },
                }}}},
                "400": _ERROR,
                **_AUTH_ERRORS,
            },
        }},
        "/admin/commands": {"get": {
            "summary": "The command log, newest first, with who published each command and why; or the command"
                       " sent with a request id or Idempotency-Key",
            "description": "With request_id or idempotency_key: the command(s) sent with it (the other filters do not "
                           "combine with them). Otherwise the log listing, newest first: `since` (a command offset or "
                           "an ISO 8601 time; timestamps taken in log order), `actor` (one that published something: "
                           "an unknown actor is a 400 that lists the known ones), `ip` (commands whose range holds "
                           "the address), `limit` (1 to 1000, default 100). Poison records are listed with "
                           "`poison: true` (they changed nothing).",
            "operationId": "findCommand",
            "parameters": [
                {"name": "request_id", "in": "query", "required": False,
                 "description": "The X-Request-Id POST /admin/commands echoed (give this or idempotency_key).",
                 "schema": {"type": "string"}},
                {"name": "idempotency_key", "in": "query", "required": False,
                 "description": "The Idempotency-Key the command was sent with.", "schema": {"type": "string"}},
                {"name": "since", "in": "query", "required": False,
                 "description": "From this command offset, or this ISO 8601 time (no zone: UTC), on.",
                 "schema": {"anyOf": [{"type": "string", "pattern": "^[0-9]+$"},
                                      {"type": "string", "format": "date-time"}], "example": "2024-05-01T12:00:00Z"}},
                {"name": "actor", "in": "query", "required": False,
                 "description": "Only commands published by this actor (an admin token's name, `admin-api` for the "
                                "bare token, the OS user or --actor of `gateway ctl`).",
                 "schema": {"type": "string", "minLength": 1}},
                {"name": "ip", "in": "query", "required": False,
                 "description": "Only commands whose range holds this address.", "schema": _IP},
                _LIMIT,
            ],
            "responses": {
                "200": {"description": "The matching commands, newest first (an empty list: none).",
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["commands"],
                            "properties": {"commands": {"type": "array", "items": {
                                "$ref": "#/components/schemas/Published"}},
                                "count": {"type": "integer", "minimum": 0},
                                "log_end_offset": {"type": "integer", "description": "Last offset read of the log."},
                                "note": {"type": "string", "description": "The log could not be read to its end "
                                                                          "just now: newer commands may be missing."}}}}}},
                "400": _ERROR,
                **_AUTH_ERRORS,
                "503": {"description": "The command topic could not be read.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }, "post": {
            "summary": "Publish a BLACKLIST or WHITELIST command to the command topic",
            "operationId": "publishCommand",
            "parameters": [
                {"name": "wait", "in": "query", "required": False,
                 "description": "1: answer once this gateway (and each of its workers) has applied the command.",
                 "schema": {"type": "string", "enum": ["0", "1", "true", "false"]}},
                {"name": "timeout", "in": "query", "required": False,
                 "description": "Seconds to wait with wait=1 (default 10, at most 60).",
                 "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 60}},
                {"name": "X-Request-Id", "in": "header", "required": False,
                 "description": "Carried to the command record's request-id header and echoed in the answer "
                                "(a new id when absent).", "schema": {"type": "string"}},
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 "description": "The record's key. A key already in the command log answers 200 with that command "
                                "and publishes nothing: retry with it after a 503 or a lost answer.",
                 "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object",
                "required": ["command"],
                "properties": {
                    "command": {"type": "string", "example": "BLACKLIST 10.0.0.0/24",
                                "pattern": "^ *(BLACKLIST|WHITELIST|blacklist|whitelist) +[0-9A-Fa-f.:/]+ *$",
                                "description": "`BLACKLIST <cidr>` or `WHITELIST <cidr>`; a bare address is a /32 "
                                               "or /128; host bits must be zero."},
                    "reason": {"type": "string", "maxLength": 1024, "description": "Kept in the record's headers."},
                    "force": {"type": "boolean", "description": "Publish even a BLACKLIST wider than the gateway's "
                                                                "--max-prefix (/8 IPv4, /32 IPv6 by default)."},
                },
                "additionalProperties": False,
            }}}},
            "responses": {
                "200": {"description": "Idempotency-Key seen before: that command, published earlier; nothing new.",
                        "headers": _REQUEST_ID, "content": {"application/json": {"schema": {
                            "$ref": "#/components/schemas/Published"}}}},
                "202": {"description": "Published (and applied, with wait=1).", "headers": _REQUEST_ID,
                        "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["offset", "command", "request_id"],
                            "properties": {
                                "offset": {"type": "integer", "minimum": 0},
                                "command": {"type": "string"},
                                "request_id": {"type": "string"},
                                "applied": {"type": "boolean"},
                            },
                        }}}},
                "400": _ERROR,
                **_AUTH_ERRORS,
                "413": _ERROR,
                "422": {"description": "The Idempotency-Key was used for another command; or the broad-change "
                                       "guard refused a BLACKLIST wider than --max-prefix (`addresses`: how many "
                                       "it would block; send \"force\": true if you mean it). Nothing published.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "503": {"description": "The broker did not confirm the command: `published` false (it could not be "
                                       "reached: nothing sent) or null (it may have been published; look it up "
                                       "by request id, or retry with the same Idempotency-Key).",
                        "headers": _REQUEST_ID,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "504": {"description": "Published, but not applied here within the timeout.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }},
        "/admin/explain": {"get": {
            "summary": "Who blocked an address and why: this gateway's answer and the command that decided it",
            "description": "`decided_by` is the last command in the log whose range holds the address (its verb is "
                           "the address's state by the log; null when no command ever covered it). `blocked` is "
                           "this gateway's view. When they differ, or the deciding command is not applied here yet, "
                           "`lag` says so. Answered from an index the gateway keeps of the command log.",
            "operationId": "explain",
            "parameters": [{"name": "ip", "in": "query", "required": True, "description": "IPv4 or IPv6 address; "
                            "IPv4-mapped IPv6 is taken as IPv4.", "schema": _IP}],
            "responses": {
                "200": {"description": "The verdict and its cause.", "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["ip", "blocked", "range", "decided_by", "blocked_by_log", "agrees"],
                    "properties": {
                        "ip": {"type": "string"},
                        "blocked": {"type": "boolean", "description": "This gateway's view."},
                        "range": {**_RANGE, "nullable": True},
                        "decided_by": {"allOf": [{"$ref": "#/components/schemas/Published"}], "nullable": True},
                        "blocked_by_log": {"type": "boolean"},
                        "agrees": {"type": "boolean"},
                        "applied_command": {"type": "integer", "nullable": True},
                        "log_end_offset": {"type": "integer"},
                        "lag": {"type": "string", "description": "Present when the view and the log disagree."},
                        "note": {"type": "string"},
                    },
                }}}},
                "400": _ERROR,
                **_AUTH_ERRORS,
                "503": {"description": "The command log is still being read for the first time, or cannot be read.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }},
        "/admin/top": {"get": {
            "summary": "The view ranges refusing the most requests, summed over every worker",
            "description": "`ranges`: the busiest since the gateway started; `last_minute`: the busiest over the "
                           "last 60 seconds. Counted in --mode shadow too (would-be refusals). Workers report once "
                           "a second. `in_view`: the range is still in the view as counted.",
            "operationId": "top",
            "parameters": [_LIMIT],
            "responses": {
                "200": {"description": "The counts.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["mode", "ranges", "last_minute", "workers"],
                    "properties": {
                        "mode": {"type": "string", "enum": ["enforce", "shadow"]},
                        "ranges": {"type": "array", "items": {"$ref": "#/components/schemas/Refusing"}},
                        "last_minute": {"type": "array", "items": {"$ref": "#/components/schemas/Refusing"}},
                        "workers": {"type": "integer", "minimum": 0},
                        "unmatched": {"type": "integer", "minimum": 0},
                    },
                }}}},
                "400": _ERROR,
                **_AUTH_ERRORS,
            },
        }},
        "/admin/status": {"get": {
            "summary": "Readiness, offsets, lag, staleness and counts of this gateway",
            "operationId": "status",
            "responses": {
                "200": {"description": "Status.", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Status"}}}},
                **_AUTH_ERRORS,
            },
        }},
        "/admin/adopt": {"post": {
            "summary": "Adopt the log the view topic holds now (after a reset or a foreign log held the view static)",
            "description": "The operator's word of invariant 7: this gateway (every worker) drops the view it holds "
                           "and bootstraps the log the view topic holds now. Until then it keeps enforcing its last "
                           "view and reports `static` in /admin/status.",
            "operationId": "adopt",
            "responses": {
                "202": {"description": "Adopting: the view is swapped once the new log is read to its end.",
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["adopting", "static", "log_id"],
                            "properties": {"adopting": {"type": "boolean"},
                                           "static": {"type": "string", "nullable": True},
                                           "log_id": {"type": "string", "nullable": True}}}}}},
                **_AUTH_ERRORS,
            },
        }},
        "/admin/history": {"get": {
            "summary": "The time machine: the ranges as they were after a command offset, or at a time",
            "operationId": "history",
            "parameters": [
                {"name": "at", "in": "query", "required": True,
                 "description": "A command offset N (the fold of commands 0..N) or an ISO 8601 time "
                                "(commands published at or before it; no zone means UTC).",
                 "schema": {"anyOf": [{"type": "string", "pattern": "^[0-9]+$"},
                                      {"type": "string", "format": "date-time"}],
                            "example": "2024-05-01T12:00:00Z"}},
                _FAMILY,
                _FORMAT,
            ],
            "responses": {
                **_LISTING,
                "200": {
                    "description": "The ranges then, in address order; streamed.",
                    "content": {
                        "application/json": {"schema": {"allOf": [
                            {"$ref": "#/components/schemas/Ranges"},
                            {"type": "object", "required": ["at", "commands", "next_offset", "poison_records"],
                             "properties": {"at": {"type": "string"}, "commands": {"type": "integer"},
                                            "next_offset": {"type": "integer"},
                                            "poison_records": {"type": "integer"}}},
                        ]}},
                        "text/plain": {"schema": {"type": "string"}},
                    },
                },
                "503": {"description": "The command topic could not be read.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }},
        "/admin/openapi.json": {"get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.0", "content": {"application/json": {
                "schema": {"type": "object"}}}}, **_AUTH_ERRORS},
        }},
        "/healthz": {"get": {
            "summary": "Liveness (no token)",
            "operationId": "healthz",
            "security": [],
            "responses": {"200": {"description": "Alive.", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}}}}},
        }},
        "/readyz": {"get": {
            "summary": "Readiness (no token): 503 until the view is bootstrapped here and in every worker",
            "operationId": "readyz",
            "security": [],
            "responses": {
                "200": {"description": "Ready.", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Ready"}}}},
                "503": {"description": "Not ready yet.", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Ready"}}}},
            },
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics of every worker (no token)",
            "operationId": "metrics",
            "security": [],
            "responses": {"200": {"description": "Prometheus text format 0.0.4.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Range": _RANGE,
            "Published": {
                "type": "object",
                "required": ["offset", "command", "time", "idempotency_key", "request_id", "actor", "reason"],
                "properties": {
                    "offset": {"type": "integer", "minimum": 0},
                    "command": {"type": "string"},
                    "time": {"type": "string", "description": "When the broker took it (UTC)."},
                    "idempotency_key": {"type": "string", "nullable": True},
                    "request_id": {"type": "string", "nullable": True},
                    "actor": {"type": "string", "nullable": True},
                    "reason": {"type": "string", "nullable": True},
                    "replayed": {"type": "boolean"},
                    "poison": {"type": "boolean", "description": "A record that does not parse: it changed nothing."},
                },
            },
            "Refusing": {
                "type": "object", "required": ["start", "end", "blocked", "blocked_last_minute", "in_view"],
                "properties": {"start": {"type": "string"}, "end": {"type": "string"},
                               "blocked": {"type": "integer", "minimum": 0},
                               "blocked_last_minute": {"type": "integer", "minimum": 0},
                               "in_view": {"type": "boolean"}},
            },
            "Ranges": {
                "type": "object",
                "required": ["ranges", "count"],
                "properties": {
                    "ranges": {"type": "array", "items": {"$ref": "#/components/schemas/Range"}},
                    "count": {"type": "integer", "minimum": 0},
                },
            },
            "Ready": {"type": "object", "required": ["ready"],
                      "properties": {"ready": {"type": "boolean"}, "error": {"type": "string"}}},
            "Status": {
                "type": "object",
                "required": ["ready", "ranges", "addresses", "applied_offsets", "end_offsets", "lag", "age_seconds",
                             "seconds_since_contact", "applied_command", "poison_records", "commands_topic",
                             "ranges_topic"],
                "properties": {
                    "ready": {"type": "boolean"},
                    "mode": {"type": "string", "enum": ["enforce", "shadow"],
                             "description": "shadow: requests the blacklist would refuse are forwarded and counted."},
                    "ranges": {"$ref": "#/components/schemas/PerFamily"},
                    "addresses": {"$ref": "#/components/schemas/PerFamily"},
                    "applied_offsets": {"type": "object", "additionalProperties": {"type": "integer"},
                                        "description": "Next view offset to apply, per partition."},
                    "end_offsets": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "lag": {"type": "integer", "nullable": True, "description": "View records not applied yet."},
                    "age_seconds": {"type": "number", "description": "Since the view was last known current."},
                    "seconds_since_contact": {"type": "number", "nullable": True},
                    "applied_command": {"type": "integer", "nullable": True},
                    "poison_records": {"type": "integer"},
                    "commands_topic": {"type": "string"},
                    "ranges_topic": {"type": "string"},
                    "stale_records": {"type": "integer",
                                      "description": "View records of a fenced writer skipped (invariant 6)."},
                    "unenforced_commands": {"type": "integer", "nullable": True,
                                            "description": "Commands in the command log this view does not reflect yet."},
                    "log_id": {"type": "string", "nullable": True, "description": "The log this view was read from."},
                    "writer_claim": {"type": "integer", "nullable": True,
                                     "description": "Offset of the latest writer claim read (the writer's fencing token)."},
                    "static": {"type": "string", "nullable": True,
                               "description": "Why this gateway holds its view static on a reset or foreign log "
                                              "(null: it follows the log). POST /admin/adopt to adopt the new log."},
                    "kafka_problem": {"type": "string", "nullable": True,
                                      "description": "Why the broker cannot be used now, in one line (unreachable, "
                                                     "untrusted certificate, refused credentials); the gateway retries "
                                                     "and serves its last view meanwhile. Null when connected."},
                    "workers": {"type": "array", "items": {"type": "object", "properties": {
                        "worker": {"type": "integer"}, "ready": {"type": "boolean"},
                        "applied_command": {"type": "integer"}}}},
                },
            },
            "PerFamily": {"type": "object", "required": ["4", "6"],
                          "properties": {"4": {"type": "integer"}, "6": {"type": "integer"}}},
        },
        "responses": {
            "Error": {"description": "Bad input; the message says what to fix.",
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "Unauthorized": {"description": "No bearer token.",
                             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "Forbidden": {"description": "Wrong token, or the admin API is disabled (no --admin-token).",
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    },
}


def document() -> dict[str, Any]:
    """A copy of the document (callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)
