"""The contract as docs/grid.md writes it: every example on the page is read by the portal's contract and by the
stub's own (independent) reading of it; the config example is a valid config; the signature is the HMAC the page
describes; the stub imports nothing of the portal."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import hmac
import json
import re
import time
from pathlib import Path

import msgspec
from aiohttp import web

from firmware_stubs import grid_platform as stub
from gateway.tooling.broker import free_port
from portal.config import parse
from portal.grid import contract
from tests.grid_support import KEY, grid_stub
from tests.portal_support import ROOT

DOC = (ROOT / "docs" / "grid.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def test_every_example_on_the_page_is_read_by_both_sides() -> None:
    kinds: dict[str, int] = {}
    for text in _blocks("json"):
        raw = text.encode()
        body = json.loads(raw)
        if body.get("schema") == contract.SCHEMA_EVENT:
            ev = contract.decode_event(raw)
            rec = msgspec.json.decode(raw, type=stub.Record)
            assert stub.check_record(rec) is None
            assert (ev.number, ev.revision, rec.kind) == (rec.number, rec.revision, ev.kind)
            kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
        elif body.get("schema") == contract.SCHEMA_STATUS:
            contract.decode_status(raw)
            kinds["status"] = kinds.get("status", 0) + 1
        elif "history" in body:
            assert len(contract.decode_history(raw).history) == 1
            kinds["history"] = 1
        else:
            contract.decode_answer(raw)
            kinds["answer"] = 1
    assert kinds == {"report": 1, "update": 1, "status": 1, "history": 1, "answer": 1}


def test_the_config_example_is_a_valid_config() -> None:
    yaml_blocks = _blocks("yaml")
    full = next(b for b in yaml_blocks if "url: https://" in b)
    cfg = parse(Path("example.yaml"), full)
    assert cfg.grid.enabled and cfg.grid.site("s1") is not None
    assert cfg.grid.category("fire").subcategory_name == "火灾"
    rules = next(b for b in yaml_blocks if "rules:" in b)
    cfg = parse(Path("rules.yaml"), rules.replace("grid:\n", "grid:\n  url: ''\n"))
    assert [r.on for r in cfg.grid.rules] == ["open", "forward", "close", "open", "lasting"]


def test_the_signature_is_the_hmac_the_page_describes() -> None:
    key, body = b"k" * 20, '{"x":"中"}'.encode()
    expected = "hmac-sha256=" + hmac.new(key, b"1700000000\nPOST\n/api/v1/events\n" + body, hashlib.sha256).hexdigest()
    assert contract.sign(key, "1700000000", "post", "/api/v1/events", body) == expected
    assert stub._signature(key, "1700000000", "POST", "/api/v1/events", body) == expected
    assert not contract.verify(key, "1700000000", "POST", "/api/grid/callback", body, expected)  # not the other way


def test_the_stub_imports_nothing_of_ours_but_its_neighbours() -> None:
    tree = ast.parse((ROOT / "firmware_stubs" / "grid_platform.py").read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in names if m.split(".")[0] in ("portal", "gateway", "devices", "common")}


async def test_the_stub_runs_a_case_by_itself_for_the_demo(tmp_path: Path) -> None:
    """``--auto``: each case is accepted, dispatched and closed after the delays, every n-th record refused; the
    callbacks carry the documented signature (checked here with hmac, not with the stub's code)."""
    got: list[tuple[dict[str, object], bool]] = []

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        ts = request.headers["X-Grid-Timestamp"]
        mac = hmac.new(KEY.encode(), f"{ts}\nPOST\n{request.path}\n".encode() + raw, hashlib.sha256).hexdigest()
        ok = request.headers["X-Grid-Signature"] == "hmac-sha256=" + mac and abs(int(ts) - time.time()) < 300
        got.append((json.loads(raw), ok))
        return web.json_response({"number": "x", "callback_id": "y", "duplicate": False})

    app = web.Application()
    app.router.add_post("/api/grid/callback", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    s = await grid_stub(
        tmp_path,
        "--auto",
        "--accept-after",
        "0.1",
        "--dispatch-after",
        "0.1",
        "--close-after",
        "0.1",
        "--reject-every",
        "2",
        "--callback",
        f"http://127.0.0.1:{port}/api/grid/callback",
    )
    try:
        example = json.loads(_blocks("json")[0])
        answers = []
        for n in range(2):
            body = json.dumps({**example, "number": f"GH-s1-DEMO{n:04d}"}, ensure_ascii=False).encode()
            path = "/api/v1/events"
            headers = contract.headers(KEY.encode(), "gatehouse", int(time.time()), "POST", path, body)
            async with s.session.post(s.info["url"] + "/events", data=body, headers=headers) as r:
                answers.append((r.status, await r.json()))
        assert answers[0][0] == 201 and answers[1][0] == 422 and "n-th" in answers[1][1]["detail"]
        for _ in range(100):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.05)
        assert [(b["status"], ok) for b, ok in got] == [("accepted", True), ("dispatched", True), ("closed", True)]
        assert all(contract.decode_status(json.dumps(b).encode()).number == "GH-s1-DEMO0000" for b, _ in got)
    finally:
        await s.stop()
        await s.session.close()
        await runner.cleanup()
