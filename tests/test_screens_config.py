"""What the installer sets for the screens: ``public_url`` (plates printed from the web refuse, with the reason and
what to do, until it is set; ``python -m portal check`` warns), and ``sites:`` (the office's phone and hours and the
emergency numbers each plate's page shows), checked strictly at load."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.configfile import ConfigError
from portal.config import load, parse
from tests.portal_support import ROOT, devices, portal_process, write_config
from tests.registry_support import estate_csv
from tests.screens_support import ADMIN_PW

REFUSAL = "门牌暂不能打印：门户配置中还没有设置 public_url"


def check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portal", "check", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_portal_check_warns_about_public_url_and_the_office_phone(tmp_path: Path) -> None:
    bare = write_config(tmp_path / "bare", None)
    r = check(bare)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and len(out["warnings"]) == 2
    assert "warning: public_url is not set: plates cannot be printed" in r.stderr
    assert "warning: no site lists an office_phone" in r.stderr
    done = write_config(
        tmp_path / "done",
        None,
        extra=("public_url: https://wy.example.cn\nsites: [{site: s1, office_phone: '0571-8888 1234'}]\n"),
    )
    r = check(done)
    assert r.returncode == 0 and json.loads(r.stdout)["warnings"] == [] and r.stderr == "", r.stderr


def test_sites_are_checked_at_load_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "portal.yaml"
    bad = """site_name: x
sites:
  - site: s1
    office_phone: "0571-8888 1234"
    emergency: [{kind: other, number: "96777"}]
  - site: s1
"""
    with pytest.raises(ConfigError) as e:
        parse(path, bad)
    text = "\n".join(e.value.problems)
    assert re.search(r"portal.yaml:6: site s1 is listed twice", text), text
    assert re.search(r"portal.yaml:5: an emergency number of kind other needs a label", text), text
    for wrong, where in (
        ("office_phone: call us", "office_phone"),
        ("emergency: [{kind: pizza, number: '1'}]", "kind"),
        ("emergency: [{kind: fire, number: '11a'}]", "number"),
        ("hours: 9-5", "hours"),
    ):
        with pytest.raises(ConfigError) as e:
            parse(path, f"sites:\n  - site: s1\n    {wrong}\n")
        assert where in str(e.value), (wrong, str(e.value))
    cfg = parse(path, "sites: [{site: s1, office_phone: '0571-8888 1234'}]\n")
    assert [n.number for n in cfg.site_info("s1").emergency] == ["110", "119", "120"]  # the national ones
    assert cfg.site_info("elsewhere").office_phone == ""


async def test_plates_are_not_printed_from_the_web_without_public_url(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, None)
    assert load(cfg).public_url == ""
    with portal_process(cfg) as pp:
        assert pp.first_admin is not None
        url = pp.url.rstrip("/")
        async with devices(url) as new:
            office = new()
            first = Path(pp.first_admin["password_file"]).read_text(encoding="utf-8").strip()
            r = await office.sign_in("admin", first)
            assert r.status == 303
            assert (
                await office.post("/password", {"current": first, "new": ADMIN_PW, "confirm": ADMIN_PW})
            ).status == 303
            csrf = await office.csrf("/admin/registry")
            r = await office.http.post(
                "/api/registry/import",
                data=estate_csv().encode(),
                headers={**office.headers(), "X-CSRF-Token": csrf, "Content-Type": "text/csv"},
            )
            assert r.status == 200
            html = await (await office.get("/admin/registry")).text()
            bid = re.findall(r'href="/admin/registry/buildings/(\d+)">3幢<', html)[0]
            page = await (await office.get(f"/admin/registry/buildings/{bid}")).text()
            assert REFUSAL in page and 'id="sheet-pdf"' not in page  # said up front; no links that would fail
            hid = re.findall(r'data-house="(\d+)"', page)[0]
            for path in (
                f"/admin/registry/buildings/{bid}/sheet.pdf",
                f"/admin/registry/buildings/{bid}/sheet",
                f"/admin/registry/plates/house/{hid}.png",
                f"/admin/registry/plates/house/{hid}.svg",
            ):
                r = await office.get(path)
                body = await r.text()
                assert r.status == 409 and REFUSAL in body and "127.0.0.1" in body, path
                assert r.content_type == "text/html", path
            # The address this browser used is printed nowhere: no plate was rendered, no print was audited.
            audit = await (await office.get("/admin/registry/audit")).text()
            assert 'data-action="plates.print"' not in audit
