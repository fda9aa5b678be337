"""The OpenAPI 3.1 description of the portal's JSON API, served (public) at ``GET /api/openapi.json``.

Built from the same constants the handlers check against, so a new action, role or limit shows up here.
Every JSON route must be described (``tests/test_openapi_fuzz.py`` compares this with the router), and the
test suite fuzzes the API from this description with schemathesis. Response schemas name the fields clients
rely on and leave objects open: a new field is not a breaking change.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from aiohttp import web

from gateway import wire
from portal.alarms import incidents as alarms
from portal.doors import access_log
from portal.estate.registry_views import IMPORT_MAX_BYTES
from portal.estate.service import RESIDENT_COOKIE
from portal.grid import contract as grid_contract
from portal.web import api, limits
from portal.web.auth import CSRF_HEADER, MAX_PASSWORD, MIN_PASSWORD, SESSION_COOKIE, USER_NAME_RE, public

routes = web.RouteTableDef()
PATH = "/api/openapi.json"

Schema = dict[str, Any]

NAME: Schema = {"type": "string", "pattern": wire.NAME_RE.pattern}
ID_DIGITS: Schema = {"type": "string", "pattern": r"^\d{1,12}$"}
OBJ: Schema = {"type": "object"}
ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "detail": {"type": "string"},
        "message": {"type": "string"},
        "max_bytes": {"type": "integer"},
    },
}

GUARDS = "admin, guard"
STAFF = "admin, guard, installer"


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Schema]:
    text = {
        400: "Bad request (a parameter or the body is not what this operation takes)",
        401: "Not signed in",
        403: "Signed in without the role, a missing/wrong CSRF token or Origin, or a password change is due",
        404: "No such object",
        409: "Conflict with the current state",
        413: "Body over this operation's cap",
        422: "The upload has bad lines",
        429: "Too many requests",
        503: "Could not be sent to the gateway",
    }
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    p: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        p["description"] = description
    return p


def _path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _op(
    summary: str,
    roles: str | None,
    responses: dict[str, Schema],
    *,
    post: bool = False,
    params: list[Schema] | None = None,
    body: Schema | None = None,
    body_required: bool = True,
    body_limit: int = limits.DEFAULT_LIMIT,
    security: list[Schema] | None = None,
) -> Schema:
    op: Schema = {"summary": summary, "responses": responses}
    if roles is not None:
        op["description"] = f"Roles: {roles}."
    if params:
        op["parameters"] = params
    if security is not None:
        op["security"] = security
    elif post:
        op["security"] = [{"session": [], "csrf": []}]
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": body, "description": f"At most {body_limit} bytes."}
    return op


# ---------------------------------------------------------------- schemas


def _schemas() -> dict[str, Schema]:
    string_or_null: Schema = {"type": ["string", "null"]}
    command: Schema = {
        "type": "object",
        "required": ["id", "site", "door", "status"],
        "properties": {
            "id": {"type": "string"},
            "site": {"type": "string"},
            "gateway": {"type": "string"},
            "door": {"type": "string"},
            "key": {"type": "string"},
            "reason": {"type": "string"},
            "by": {"type": "string"},
            "sent_at": {"type": "string"},
            "sent_local": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "ok", "failed", "timeout", "unsent"]},
            "detail": {"type": "string"},
            "answered_at": string_or_null,
        },
    }
    incident: Schema = {
        "type": "object",
        "required": ["id", "state", "kind", "priority", "place"],
        "properties": {
            "id": {"type": "integer"},
            "state": {"type": "string", "enum": list(alarms.STATES)},
            "kind": {"type": "string"},
            "priority": {"type": "integer"},
            "place": OBJ,
            "data": OBJ,
            "checks": {},
            "level": {"type": "string"},
            "title": OBJ,
            "where": OBJ,
            "owner": string_or_null,
        },
    }
    arm_command: Schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    return {
        "Error": ERROR,
        "Event": {
            "type": "object",
            "required": ["id", "site", "gateway", "seq", "ts", "type"],
            "properties": {
                "id": {"type": "string"},
                "site": {"type": "string"},
                "gateway": {"type": "string"},
                "seq": {"type": "integer"},
                "ts": {"type": "string"},
                "type": {"type": "string"},
                "device": {"type": "string"},
                "point": {"type": "string"},
                "priority": {"type": "integer"},
                "place": OBJ,
                "data": OBJ,
                "received_at": {"type": ["string", "number"]},
            },
        },
        "DoorCommand": command,
        "Incident": incident,
        "ArmCommand": arm_command,
        "ImportResult": {
            "type": "object",
            "required": ["rows", "errors", "imported"],
            "properties": {
                "rows": {"type": "integer", "minimum": 0},
                "imported": {"type": "boolean"},
                "counts": OBJ,
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["line", "reason", "message"],
                        "properties": {
                            "line": {"type": "integer"},
                            "reason": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
        },
    }


# ---------------------------------------------------------------- operations


def _paths() -> dict[str, Schema]:
    ref = {
        k: {"$ref": f"#/components/schemas/{k}"}
        for k in ("Event", "DoorCommand", "Incident", "ArmCommand", "ImportResult")
    }
    json_body = "application/json"
    signed_in = (401, 403)
    names3 = ("site", "gateway", "group")
    return {
        PATH: {"get": _op("This description", None, {"200": _json(OBJ, "OpenAPI 3.1")}, security=[])},
        "/api/health": {
            "get": _op(
                'Health: to the public only {"status": "ok"}; store, broker and gateway details to staff and the '
                "scrape token",
                None,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {
                                "status": {"type": "string", "enum": ["ok", "degraded"]},
                                "store": OBJ,
                                "broker": OBJ,
                                "acks": OBJ,
                                "gateways": {"type": "array", "items": OBJ},
                                "gaps_open": {"type": "integer"},
                                "rejections": OBJ,
                                "websocket_clients": {"type": "integer"},
                            },
                        },
                        "Health",
                    )
                },
                security=[{}, {"session": []}, {"scrape": []}],
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics (staff, or the scrape token)",
                None,
                {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
                security=[{"session": []}, {"scrape": []}],
            )
        },
        "/api/events": {
            "get": _op(
                "Stored events: newest first, or forward from a cursor",
                STAFF,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["events", "order"],
                            "properties": {
                                "events": {"type": "array", "items": ref["Event"]},
                                "order": {"type": "string", "enum": ["asc", "desc"]},
                                "next": OBJ,
                            },
                        },
                        "A page of events",
                    ),
                    **_errors(400, *signed_in),
                },
                params=[
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": api.LIMIT_MAX}),
                    _query("before", {"type": "string", "maxLength": 64}, "an event id: page back from it"),
                    _query("after", {"type": "string", "maxLength": 64}, "an event id: read forward from it"),
                    _query(
                        "after_seq",
                        {"type": "integer", "minimum": 0, "maximum": 2**62},
                        "read one gateway's events forward by sequence number (needs gateway)",
                    ),
                    _query("site", {"type": "string", "maxLength": 64}),
                    _query("gateway", {"type": "string", "maxLength": 64}),
                    {
                        **_query(
                            "type", {"type": "array", "maxItems": 20, "items": {"type": "string", "maxLength": 64}}
                        ),
                        "style": "form",
                        "explode": True,
                    },
                ],
            )
        },
        "/api/users": {
            "post": _op(
                "Create a guard or installer account (must change the password at first sign-in)",
                "admin",
                {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["id", "name", "role", "must_change"],
                            "properties": {
                                "id": {"type": "integer"},
                                "name": {"type": "string"},
                                "role": {"type": "string"},
                                "must_change": {"type": "boolean"},
                            },
                        },
                        "Created",
                    ),
                    **_errors(400, *signed_in, 409, 413),
                },
                post=True,
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": ["name", "role", "password"],
                            "properties": {
                                "name": {"type": "string", "pattern": USER_NAME_RE.pattern},
                                "role": {"type": "string", "enum": ["guard", "installer"]},
                                "password": {"type": "string", "minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD},
                            },
                        }
                    }
                },
            )
        },
        "/api/registry/import": {
            "post": _op(
                "Import the estate CSV in one transaction (?dry_run=1 only checks)",
                "admin",
                {
                    "200": _json(ref["ImportResult"], "Checked (and imported unless dry_run)"),
                    "422": _json(ref["ImportResult"], "Bad lines; nothing imported"),
                    **_errors(400, *signed_in, 413),
                },
                post=True,
                body_limit=IMPORT_MAX_BYTES,
                params=[_query("dry_run", {"type": "string", "enum": ["0", "1"]})],
                body={
                    "text/csv": {"schema": {"type": "string"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "contentMediaType": "text/csv"}},
                        }
                    },
                },
            )
        },
        "/api/passes/public-key": {
            "get": _op(
                "The pass-signing public key (PEM); its key id in X-Key-Id",
                "admin, installer",
                {
                    "200": {
                        "description": "PEM",
                        "headers": {"X-Key-Id": {"schema": {"type": "string"}}},
                        "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
                    },
                    **_errors(*signed_in),
                },
            )
        },
        "/api/registry/revocations": {
            "get": _op(
                "Signed revocation lists per site and each gateway's copy",
                "admin, installer",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["lists", "gateways"],
                            "properties": {"lists": OBJ, "gateways": {}},
                        },
                        "Revocation lists",
                    ),
                    **_errors(400, *signed_in),
                },
                params=[_query("site", NAME)],
            )
        },
        "/api/doors": {
            "get": _op(
                "Every door with its state",
                STAFF,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["doors", "states"],
                            "properties": {
                                "doors": {"type": "array", "items": OBJ},
                                "states": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                        "Doors",
                    ),
                    **_errors(*signed_in),
                },
            )
        },
        "/api/doors/{site}/{door}/unlock": {
            "post": _op(
                "Remote unlock (a reason is required; audited)",
                GUARDS,
                {
                    "202": _json(
                        {"type": "object", "required": ["command"], "properties": {"command": ref["DoorCommand"]}},
                        "Sent to the gateway",
                    ),
                    "503": _json(
                        {
                            "type": "object",
                            "required": ["error", "command"],
                            "properties": {"error": {"type": "string"}, "command": ref["DoorCommand"]},
                        },
                        "Could not be sent (broker down)",
                    ),
                    **_errors(400, *signed_in, 404, 413),
                },
                post=True,
                params=[_path("site", NAME), _path("door", NAME)],
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": ["reason"],
                            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 500}},
                        }
                    }
                },
            )
        },
        "/api/doors/commands": {
            "get": _op(
                "Recent unlock commands",
                STAFF,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["commands"],
                            "properties": {"commands": {"type": "array", "items": ref["DoorCommand"]}},
                        },
                        "Commands",
                    ),
                    **_errors(*signed_in),
                },
            )
        },
        "/api/doors/commands/{id}": {
            "get": _op(
                "One unlock command",
                STAFF,
                {
                    "200": _json(
                        {"type": "object", "required": ["command"], "properties": {"command": ref["DoorCommand"]}},
                        "The command",
                    ),
                    **_errors(*signed_in, 404),
                },
                params=[_path("id", {"type": "string", "maxLength": 40})],
            )
        },
        "/api/visitors/{id}": {
            "get": _op(
                "A registered visitor and the pass issued",
                GUARDS,
                {
                    "200": _json(
                        {"type": "object", "required": ["visitor"], "properties": {"visitor": OBJ}}, "Visitor"
                    ),
                    **_errors(*signed_in, 404),
                },
                params=[_path("id", ID_DIGITS)],
            )
        },
        "/api/visitors/house": {
            "get": _op(
                "Look a house up while registering a visitor",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["found"],
                            "properties": {
                                "found": {"type": "boolean"},
                                "error": {"type": "string"},
                                "site": {"type": "string"},
                                "address": {},
                                "address_en": {},
                                "residents": {"type": "array"},
                                "doors": {"type": "array"},
                            },
                        },
                        "Found, or why not",
                    ),
                    **_errors(*signed_in),
                },
                params=[
                    _query("house", {"type": "string", "maxLength": 64}, "3-2-301, 3/2/301 or 3幢2单元301室"),
                    _query("site", {"type": "string", "maxLength": 64}),
                ],
            )
        },
        "/api/access-log": {
            "get": _op(
                "Search door openings and refusals, newest first",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["rows"],
                            "properties": {
                                "rows": {"type": "array", "items": OBJ},
                                "next": {"type": "object", "properties": {"before": {"type": "string"}}},
                            },
                        },
                        "A page of rows",
                    ),
                    **_errors(400, *signed_in),
                },
                params=[
                    _query("site", NAME),
                    _query("door", {"type": "string", "maxLength": 80}),
                    _query("house", {"type": "string", "maxLength": 80}),
                    _query("person", {"type": "string", "maxLength": 80}),
                    _query("result", {"type": "string", "enum": list(access_log.RESULTS)}),
                    _query("kind", {"type": "string", "enum": list(access_log.KINDS)}),
                    _query("from", {"type": "string", "maxLength": 16}, "site-local YYYY-MM-DD[THH:MM]"),
                    _query("to", {"type": "string", "maxLength": 16}, "site-local YYYY-MM-DD[THH:MM]"),
                    _query(
                        "before",
                        {"type": "string", "pattern": access_log.CURSOR_RE.pattern},
                        "the cursor given in next",
                    ),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": access_log.PAGE_MAX}),
                ],
            )
        },
        "/api/board": {
            "get": _op(
                "The alarm board: open and recently closed incidents, arm groups, commands",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["incidents", "closed", "groups", "commands", "waiting_s"],
                            "properties": {
                                "incidents": {"type": "array", "items": ref["Incident"]},
                                "closed": {"type": "array", "items": ref["Incident"]},
                                "groups": {"type": "array", "items": OBJ},
                                "commands": {"type": "array", "items": OBJ},
                                "waiting_s": {"type": "object", "additionalProperties": {"type": "number"}},
                            },
                        },
                        "Board",
                    ),
                    **_errors(*signed_in),
                },
            )
        },
        "/api/centre": {
            "get": _op(
                "The centre's overview: every estate of the caller's sites, online or not, with its open alarms by"
                " priority, unacknowledged and escalated counts, the WAN link and faulty gateways",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["estates", "buckets", "totals"],
                            "properties": {
                                "estates": {"type": "array", "items": OBJ},
                                "buckets": {"type": "array", "items": {"type": "string"}},
                                "totals": {"type": "object", "additionalProperties": {"type": "integer"}},
                            },
                        },
                        "Centre",
                    ),
                    **_errors(*signed_in),
                },
            )
        },
        "/api/incidents/{id}": {
            "get": _op(
                "One incident with its log, checklist and the flat's residents (viewing them is audited)",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["incident", "log", "residents", "checklist", "address"],
                            "properties": {
                                "incident": ref["Incident"],
                                "log": {"type": "array", "items": OBJ},
                                "residents": {
                                    "type": ["array", "null"],
                                    "description": "null when the place is not a flat",
                                },
                                "checklist": {},
                                "address": {"type": "string"},
                            },
                        },
                        "Incident",
                    ),
                    **_errors(*signed_in, 404),
                },
                params=[_path("id", ID_DIGITS)],
            )
        },
        "/api/incidents/{id}/{action}": {
            "post": _op(
                "Move an incident along (ack, dispatch, on_scene, resolve, close), add a note, tick a check",
                GUARDS,
                {
                    "200": _json(
                        {"type": "object", "required": ["incident"], "properties": {"incident": ref["Incident"]}},
                        "The incident after the action",
                    ),
                    "409": _json(
                        {
                            "type": "object",
                            "required": ["error", "state", "incident"],
                            "properties": {
                                "error": {"type": "string"},
                                "state": {"type": "string"},
                                "owner": {},
                                "incident": ref["Incident"],
                                "winner": {
                                    "description": "the last step a person took: actor, action, at (null when none)"
                                },
                            },
                        },
                        "Someone else moved it first, or the state does not allow this action",
                    ),
                    **_errors(400, *signed_in, 404, 413),
                },
                post=True,
                body_required=False,
                params=[_path("id", ID_DIGITS), _path("action", {"type": "string", "enum": list(alarms.ACTIONS)})],
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "guard": {"type": "string", "maxLength": alarms.GUARD_MAX},
                                "cause": {"type": "string", "enum": list(alarms.CAUSES)},
                                "text": {"type": "string", "maxLength": alarms.NOTE_MAX},
                                "step": {"type": "integer", "minimum": 0, "description": "check: the step"},
                                "done": {"type": "boolean"},
                                "flags": {
                                    "type": "array",
                                    "items": {"type": "string", "enum": list(alarms.FLAGS)},
                                    "description": "resolve and finish: damage done, police called",
                                },
                            },
                        }
                    }
                },
            )
        },
        "/api/board/ack": {
            "post": _op(
                "Acknowledge every unacknowledged incident of one kind or one zone, up to the newest id the guard saw"
                " (one transaction, one audit row)",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["incidents"],
                            "properties": {"incidents": {"type": "array", "items": ref["Incident"]}},
                        },
                        "The incidents acknowledged now",
                    ),
                    **_errors(400, *signed_in, 413),
                },
                post=True,
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": ["upto"],
                            "properties": {
                                "kind": {"type": "string", "enum": list(alarms.KINDS)},
                                "zone": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 200,
                                    "description": "<site>/<zone name> (see alarms.zone_of)",
                                },
                                "upto": {"type": "integer", "minimum": 0, "maximum": 10**12 - 1},
                            },
                        }
                    }
                },
            )
        },
        "/api/incidents/{id}/phones": {
            "post": _op(
                "The flat's residents with their whole phone numbers, to call them (audited with the reason)",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["residents"],
                            "properties": {
                                "residents": {
                                    "type": ["array", "null"],
                                    "items": OBJ,
                                    "description": "null when the place is not a flat",
                                }
                            },
                        },
                        "Residents",
                    ),
                    **_errors(400, *signed_in, 404, 413),
                },
                post=True,
                params=[_path("id", ID_DIGITS)],
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": ["reason"],
                            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 200}},
                        }
                    }
                },
            )
        },
        "/api/care/incidents/{id}/contact": {
            "post": _op(
                "The care contact of an incident at a flat under care, with the whole number to call (audited with the"
                " reason, logged on the incident); 404 when the incident is not about a flat under care",
                GUARDS,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["rows"],
                            "properties": {
                                "rows": {
                                    "type": "array",
                                    "items": {"type": "array", "items": {"type": "string"}},
                                    "description": '[label, value] or [label, number, "tel"]',
                                }
                            },
                        },
                        "The contact",
                    ),
                    **_errors(400, *signed_in, 404, 413),
                },
                post=True,
                params=[_path("id", ID_DIGITS)],
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": ["reason"],
                            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 200}},
                        }
                    }
                },
            )
        },
        "/api/board/arm": {
            "post": _op(
                "Arm or disarm an alarm group on a gateway",
                GUARDS,
                {
                    "202": _json(
                        {"type": "object", "required": ["command"], "properties": {"command": ref["ArmCommand"]}},
                        "Sent",
                    ),
                    "503": _json(
                        {"type": "object", "required": ["command"], "properties": {"command": ref["ArmCommand"]}},
                        "Could not be sent",
                    ),
                    **_errors(400, *signed_in, 413),
                },
                post=True,
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": [*names3, "action"],
                            "properties": {
                                **{n: NAME for n in names3},
                                "action": {"type": "string", "enum": ["arm", "disarm"]},
                                "mode": {"type": "string", "enum": ["away", "stay"]},
                                "force": {"type": "boolean"},
                            },
                        }
                    }
                },
            )
        },
        "/api/grid/callback": {
            "post": _op(
                "The grid platform reports a case's status (signed; applied once per callback_id)",
                None,
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["number", "callback_id", "duplicate"],
                            "properties": {
                                "number": {"type": "string"},
                                "callback_id": {"type": "string"},
                                "duplicate": {"type": "boolean"},
                                "current": {"type": "boolean"},
                            },
                        },
                        "Taken (duplicate: it had come before and changed nothing)",
                    ),
                    **_errors(400, 401, 404, 413),
                    "503": _json({"$ref": "#/components/schemas/Error"}, "The portal cannot read its grid key"),
                },
                security=[{"gridSignature": []}],
                body={
                    json_body: {
                        "schema": {
                            "type": "object",
                            "required": ["schema", "v", "callback_id", "number", "status", "at"],
                            "properties": {
                                "schema": {"const": grid_contract.SCHEMA_STATUS},
                                "v": {"const": 1},
                                "callback_id": {"type": "string"},
                                "number": {"type": "string"},
                                "case_id": {"type": "string"},
                                "status": {"type": "string", "enum": list(grid_contract.STATUSES)},
                                "at": {"type": "string", "format": "date-time"},
                                "by": {"type": "string"},
                                "note": {"type": "string"},
                            },
                        }
                    }
                },
            )
        },
        "/p/{code}/mypass.json": {
            "get": _op(
                "A fresh resident pass (SVG QR) for the house of this plate",
                "a resident of the house",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["svg", "not_after", "life_s", "pass_id"],
                            "properties": {
                                "svg": {"type": "string"},
                                "not_after": {"type": "integer"},
                                "life_s": {"type": "integer"},
                                "pass_id": {"type": "string"},
                            },
                        },
                        "Pass",
                    ),
                    **_errors(401, 403, 404, 429),
                },
                params=[_path("code", {"type": "string", "maxLength": 64})],
                security=[{"resident": []}],
            )
        },
    }


@cache
def document() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Gatehouse portal API",
            "version": "1",
            "description": (
                "The guardroom portal's JSON API. Sign in through the /login form: the session is the "
                f"`{SESSION_COOKIE}` cookie. Every state-changing request must come from an allowed Origin "
                f"(an `Origin` or `Referer` header naming the portal) and carry the session's CSRF token in the "
                f'`{CSRF_HEADER}` header (the console pages hold it in `<meta name="csrf-token">`). Errors are '
                "JSON objects with an `error` code. Request bodies are capped per operation (413 past the cap)."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"session": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "Staff session from the /login form",
                },
                "csrf": {
                    "type": "apiKey",
                    "in": "header",
                    "name": CSRF_HEADER,
                    "description": "The session's CSRF token (state-changing requests)",
                },
                "resident": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": RESIDENT_COOKIE,
                    "description": "A resident's phone session from /m/login",
                },
                "gridSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": grid_contract.SIG_HEADER,
                    "description": "The grid platform's HMAC-SHA256 signature (docs/grid.md), with "
                    f"{grid_contract.TS_HEADER} and {grid_contract.KEY_HEADER}",
                },
                "scrape": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The scrape token: the file scrape_token_file, or data_dir/scrape.token",
                },
            },
        },
    }


@cache
def _body() -> bytes:
    return json.dumps(document(), ensure_ascii=False, separators=(",", ":")).encode()


def operations() -> set[tuple[str, str]]:
    """(METHOD, path template) of every described operation."""
    return {(m.upper(), p) for p, item in document()["paths"].items() for m in item}


@routes.get(PATH)
@public
async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_body(), content_type="application/json", charset="utf-8")
