"""The JSON API against its own OpenAPI description: the document is valid OpenAPI 3.1, it names every JSON
route of the app's router, and schemathesis fuzzes every operation in it against a real portal on loopback.

The portal (a real SQLite store, its own Mosquitto, an estate imported and a few alarms ingested over MQTT) runs
on a loop of its own in a thread, since schemathesis sends blocking requests. Every operation is fuzzed three
ways: signed in as an administrator (session cookie, CSRF token and Origin fixed, so state-changing calls reach
their handlers) with valid data, half of it aimed at objects that exist; the same with data that breaks the
schema (negative mode); and with no session at all (schemathesis makes up any cookies and tokens). Each answer
must be no 5xx, a status code and content type the document lists for the operation, a body valid against the
documented schema, and no stack trace; the administrator's valid cases must reach a 2xx, the anonymous ones
must not. Bounded: :data:`EXAMPLES` generated cases per operation and way, derandomized.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway import wire
from gateway.tooling.broker import MosquittoProcess, free_port
from portal import openapi
from portal.app import create_app
from portal.care import model as care_model
from portal.config import load
from portal.web.auth import CSRF_HEADER
from tests.doors_support import DOORS, estate_with_doors
from tests.grid_support import grid_yaml
from tests.portal_support import (
    GATEWAY,
    SITE,
    Portal,
    batch_payload,
    event,
    mqtt,
    page_csrf,
    post_form,
    running_portal,
    wait_for,
    write_config,
)
from tests.registry_support import estate_csv, house_id

EXAMPLES = 25  # generated cases per operation and principal
WHO = ("admin", "admin-negative", "anon")
TRACE_MARKS = ("Traceback (most recent call last)", 'File "/', '.py", line ', "site-packages/")
JSON_PREFIXES = ("/api/",)
JSON_EXTRA = ("/metrics",)  # Prometheus text, served beside the API and described with it

NEEDS_RESIDENT = {"GET /p/{code}/mypass.json"}  # a resident's phone session, not staff
NEEDS_SIGNATURE = {"POST /api/grid/callback"}  # the grid platform's signature (tests/test_grid_callbacks.py)

SCHEMA = schemathesis.openapi.from_dict(openapi.document())
OPERATIONS = {r.ok().label: r.ok() for r in SCHEMA.get_all_operations()}
# Negative mode only where there is something to make invalid (a parameter or a body).
FUZZ_CASES = [
    (label, who)
    for label, op in sorted(OPERATIONS.items())
    for who in WHO
    if who != "admin-negative" or op.definition.raw.get("parameters") or op.definition.raw.get("requestBody")
]


def no_traceback(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    text = response.content.decode("utf-8", "replace")
    for mark in TRACE_MARKS:
        assert mark not in text, f"{mark!r} in the answer to {case.operation.label}: {text[:600]!r}"
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    no_traceback,
]


# ---------------------------------------------------------------- a portal on a loop of its own


@dataclass
class Known:
    """Values of existing objects per operation and place (path, query, JSON body), by parameter name."""

    csrf: str
    path: dict[str, dict[str, list[str]]]
    query: dict[str, dict[str, list[str]]]
    body: dict[str, dict[str, list[str]]]
    text: dict[str, str]  # whole text bodies


@dataclass
class Served:
    url: str
    cookies: dict[str, str]
    known: Known
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    per_op: Counter[tuple[str, str, int]] = field(default_factory=Counter)


async def _seed(p: Portal, broker: MosquittoProcess) -> Known:
    """An estate with doors, alarms ingested the real way (over MQTT), an unlock order and a visitor; the admin
    signed in. Returns the CSRF token and the objects' ids, which the admin's fuzz mixes into its cases."""
    await estate_with_doors(p)
    csrf = await page_csrf(p, "/admin/registry")
    await wait_for(lambda: p.services.ingest.health()["connected"], what="the portal on the broker")
    async with mqtt(broker) as gw:
        await gw.publish(
            wire.topic(SITE, GATEWAY, "events"),
            batch_payload(
                [
                    event(1),
                    event(2, type="access.granted", priority=0),
                    event(3),
                    event(4, building="3", unit="2", house="301", zone="z4"),
                ]
            ),
            qos=1,
        )

    async def stored() -> bool:
        return len(await p.events()) == 4

    await wait_for(stored, what="the seeded events")

    async def opened() -> list[str]:  # the board opens incidents from stored events on its own task
        ids = await p.services.store.read(lambda c: [str(r[0]) for r in c.execute("SELECT id FROM incidents")])
        return ids if len(ids) >= 3 else []

    incidents = await wait_for(opened, what="the seeded incidents")
    r = await p.client.post(
        f"/api/doors/{SITE}/{DOORS[1][0]}/unlock",
        json={"reason": "seed"},
        headers={"Origin": p.origin, CSRF_HEADER: csrf},
    )
    assert r.status == 202, await r.text()
    command = (await r.json())["command"]["id"]
    r = await post_form(
        p,
        "/visitors",
        {"name": "刘访客", "house": "3-2-301", "hours": "4", "uses": "3", "start": "", "note": ""},
        csrf=csrf,
    )
    assert r.status == 303, await r.text()
    visitor = r.headers["Location"].rsplit("/", 1)[1]
    # The flat of event 4 under care: its incident has a care contact to reveal.
    hid = await house_id(p, "3", "2", "301")
    owner = await p.services.store.read(
        lambda c: c.execute(
            "SELECT person_id FROM reg_residents WHERE house_id = ? AND role = 'owner'", (hid,)
        ).fetchone()[0]
    )
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    settings = care_model.Settings(
        (owner,), "李娜", "女儿", "13655556666", 24, False, "00:00", "05:00", "本人", "written", now
    )
    await p.services.store.run_write(lambda c: care_model.enrol(c, hid, SITE, settings, "admin:seed", now))
    path = {
        "GET /api/incidents/{id}": {"id": incidents},
        "POST /api/care/incidents/{id}/contact": {"id": incidents},
        # aimed at an action that succeeds on any open incident (a note), so a valid case can reach a 2xx however
        # the generator draws the other fields
        "POST /api/incidents/{id}/{action}": {"id": incidents, "action": ["note"]},
        "POST /api/doors/{site}/{door}/unlock": {"site": [SITE], "door": [d[0] for d in DOORS]},
        "GET /api/doors/commands/{id}": {"id": [command]},
        "GET /api/visitors/{id}": {"id": [visitor]},
    }
    query = {
        "GET /api/events": {"site": [SITE], "gateway": [GATEWAY]},
        "GET /api/registry/revocations": {"site": [SITE]},
        "GET /api/access-log": {"site": [SITE]},
        "GET /api/visitors/house": {"house": ["3-2-301", "3幢2单元301室", "3-1-102"], "site": [SITE]},
    }
    body = {
        "POST /api/board/arm": {"site": [SITE], "gateway": [GATEWAY]},
        "POST /api/incidents/{id}/{action}": {"text": ["checked by the fuzz"]},
    }
    return Known(csrf, path, query, body, {"POST /api/registry/import": estate_csv()})


@contextlib.contextmanager
def portal_in_thread(config: Path, broker: MosquittoProcess) -> Iterator[Served]:
    handoff: queue.Queue[Any] = queue.Queue()

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            async with running_portal(config) as p:
                known = await _seed(p, broker)
                cookies = {c.key: c.value for c in p.client.session.cookie_jar}
                handoff.put((asyncio.get_running_loop(), stop, Served(p.origin, cookies, known)))
                await stop.wait()
        except BaseException as e:  # raised again in the test's thread
            handoff.put(e)

    thread = threading.Thread(target=lambda: asyncio.run(serve()), name="openapi-fuzz.portal")
    thread.start()
    got = handoff.get(timeout=60)
    if isinstance(got, BaseException):
        thread.join(30)
        raise got
    loop, stop, served = got
    try:
        yield served
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the portal thread did not stop"
        if not handoff.empty():  # the portal failed while stopping
            raise handoff.get()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("openapi-fuzz")
    broker = MosquittoProcess(folder / "broker").start()
    try:
        # The grid link on (its platform is not there): the callback's own checks are what the fuzz meets.
        grid = grid_yaml(folder / "portal", f"http://127.0.0.1:{free_port()}/api/v1")
        with portal_in_thread(write_config(folder / "portal", broker, extra=grid), broker) as s:
            t0 = time.monotonic()
            yield s
            took = time.monotonic() - t0
        total = sum(s.counts.values())
        print(
            f"\nopenapi fuzz: {len(OPERATIONS)} operations, {total} cases "
            f"({', '.join(f'{w} {sum(n for (_, x), n in s.counts.items() if x == w)}' for w in WHO)}) "
            f"in {took:.1f} s; statuses {dict(sorted(s.statuses.items()))}"
        )
    finally:
        broker.stop()


# ---------------------------------------------------------------- the document


def test_the_document_is_valid_openapi_and_is_served(served: Served) -> None:
    SCHEMA.validate()  # the OpenAPI 3.1 meta-schema (raises on the first error)
    r = requests.get(served.url + openapi.PATH, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.json() == openapi.document()
    loaded = schemathesis.openapi.from_url(served.url + openapi.PATH)
    loaded.validate()
    # (schemathesis leaves out the operation that served it the document)
    assert {op.ok().label for op in loaded.get_all_operations()} == set(OPERATIONS) - {f"GET {openapi.PATH}"}
    assert len(OPERATIONS) >= 20
    # Every operation has a success, and every one behind a session says how a refusal looks.
    for label, op in OPERATIONS.items():
        responses = op.definition.raw["responses"]
        assert any(c.startswith("2") for c in responses), label
        if _secured(op):
            assert "401" in responses or label.startswith("GET /p/"), label


def _secured(op: Any) -> bool:
    """Does the operation refuse anonymous callers? (``[]`` or a ``{}`` alternative: anyone may call it.)"""
    security = op.definition.raw.get("security")
    return security != [] and {} not in (security or [])


def _json_routes(config: Path) -> set[tuple[str, str]]:
    app = create_app(load(config))
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        if path is None:
            continue
        if path.startswith(JSON_PREFIXES) or path in JSON_EXTRA or path.endswith(".json"):
            found.add((route.method, path))
    return found


def test_every_json_route_is_described(tmp_path: Path) -> None:
    routes = _json_routes(write_config(tmp_path, None))
    described = openapi.operations()
    assert routes - described == set(), "JSON routes missing from the OpenAPI document"
    assert described - routes == set(), "operations in the OpenAPI document that the app does not serve"
    # The comparison can fail: a route the document does not know is caught.
    assert ("GET", "/api/undocumented") not in described


# ---------------------------------------------------------------- the fuzz


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


def _aim(case: schemathesis.Case, known: Known, label: str, data: st.DataObject) -> None:
    """Point a generated case at existing objects (every parameter stays valid for the schema)."""
    for name, values in known.path.get(label, {}).items():
        case.path_parameters[name] = data.draw(st.sampled_from(values))
    for name, values in known.query.get(label, {}).items():
        if case.query is None:
            case.query = {}
        case.query[name] = data.draw(st.sampled_from(values))
    if isinstance(case.body, dict):
        for name, values in known.body.get(label, {}).items():
            case.body[name] = data.draw(st.sampled_from(values))
    if label in known.text and case.media_type == "text/csv":
        case.body = known.text[label]


@pytest.mark.parametrize(("label", "who"), FUZZ_CASES)
def test_fuzz(served: Served, label: str, who: str) -> None:
    op = OPERATIONS[label]
    secured = _secured(op)
    if who != "anon":
        mode = GenerationMode.NEGATIVE if who == "admin-negative" else GenerationMode.POSITIVE
        strategy = op.as_strategy(mode, cookies=served.cookies)
        headers = {"Origin": served.url, CSRF_HEADER: served.known.csrf}
    else:
        strategy = op.as_strategy()
        headers = {"Origin": served.url}
    with requests.Session() as http:

        @FUZZ_SETTINGS
        @given(case=strategy, data=st.data())
        def run(case: schemathesis.Case, data: st.DataObject) -> None:
            if who != "anon" and data.draw(st.sampled_from((True, False)), label="aim at existing objects"):
                _aim(case, served.known, label, data)
            response = case.call(base_url=served.url, session=http, headers=headers, timeout=10)
            served.counts[label, who] += 1
            served.statuses[response.status_code] += 1
            served.per_op[label, who, response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
            if who == "anon" and secured:  # refused (a body the parser cannot read is refused before the
                # session is looked at: the CSRF check reads forms), or no such plate
                assert response.status_code in (400, 401, 403, 404, 413, 429), (label, response.status_code)

        run()
    assert served.counts[label, who] >= 1
    if who == "admin" and label not in NEEDS_RESIDENT | NEEDS_SIGNATURE:  # past sign-in, CSRF and Origin checks
        reached = {code for (lbl, w, code) in served.per_op if (lbl, w) == (label, who)}
        assert any(200 <= c < 300 for c in reached), (label, sorted(reached))


# ---------------------------------------------------------------- what the fuzz found, pinned


def test_a_multipart_part_header_the_parser_refuses_is_a_400(served: Served) -> None:
    """Found by the fuzz: a control character in a part's Content-Disposition made aiohttp's multipart reader
    raise InvalidHeader (not a ValueError), which the error middleware answered with a 500."""
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="x\x10\t"\r\n\r\n1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\na,b\r\n--{boundary}--\r\n'
    )
    headers = {
        "Origin": served.url,
        CSRF_HEADER: served.known.csrf,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    r = requests.post(
        served.url + "/api/registry/import?dry_run=1",
        data=body.encode(),
        headers=headers,
        cookies=served.cookies,
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "bad-request", "detail": "malformed body"}


def test_an_incident_id_of_unicode_digits_is_a_404(served: Served) -> None:
    """Found by the fuzz (negative mode): "¹" passes ``str.isdigit`` but not ``int()``, a 500."""
    headers = {"Origin": served.url, CSRF_HEADER: served.known.csrf}
    for method, path in (
        ("GET", "/api/incidents/%C2%B9"),
        ("POST", "/api/incidents/%C2%B2/ack"),
        ("GET", "/api/incidents/%D9%A1"),
    ):  # ARABIC-INDIC ONE: \d in a route, but not here
        r = requests.request(method, served.url + path, headers=headers, cookies=served.cookies, json={}, timeout=10)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json() == {"error": "not-found"}
