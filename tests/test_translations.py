"""Chinese screens speak Chinese, English screens English, every one of them.

The two translation tables have the same keys and, key by key, the same placeholders. Then a real portal process,
filled as its people would fill it (tests/screens_support.py), is walked in a real Chromium: every GET route of the
router that answers with a page is opened, as a person who may see it and with real objects behind it, in zh-CN and
in English. A Chinese page fails on any Latin word outside an allow-list (product names and units such as "QR",
"PDF", "mm"; codes such as a config key, a file path, a URL, an IP address or a time zone; and what people typed in:
names, labels, door and zone codes); an English page fails on any Chinese character or Chinese punctuation outside
what people typed in (names and addresses). Text in an element marked ``translate="no"`` (the audit trail's raw
detail, the CSV column names, a key id) is a record, not a sentence, and is not read. A route that is neither in the
walk nor declared "not a page" fails the test: a new page cannot go in untranslated.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, Page, async_playwright

from gateway.tooling.broker import MosquittoProcess
from portal.app import create_app
from portal.config import PortalConfig, load
from tests.registry_support import HEADER
from tests.screens_support import RESIDENT_PHONE, RESIDENT_PW, SITE, Seeded, seeded_estate

I18N = Path(__file__).resolve().parent.parent / "portal" / "web" / "i18n"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
T = 15_000

#: Routes that answer with something other than a page (JSON, a file, a picture, a redirect, a socket).
NOT_PAGES = {
    "/",
    "/lang/{code}",
    "/ws",
    "/static",
    "/metrics",
    "/api/health",
    "/api/events",
    "/api/openapi.json",
    "/api/board",
    "/api/centre",
    "/api/incidents/{id}",
    "/api/doors",
    "/api/doors/commands",
    "/api/doors/commands/{id}",
    "/centre/estates",  # the centre page's table alone, walked within /centre
    "/api/visitors/{id}",
    "/api/visitors/house",
    "/api/access-log",
    "/api/passes/public-key",
    "/api/registry/revocations",
    "/p/{code}/mypass.json",
    "/m/v/{token}/qr.png",
    "/admin/registry/plates/{kind}/{id}.{fmt}",
    "/admin/registry/buildings/{id}/sheet.pdf",
    "/admin/registry/export.csv",
    "/admin/registry/work/{id}/photo",
    "/access-log.csv",
    "/reports.csv",
    "/board/plan/{site}/image",
    "/patrol/plates.pdf",
    "/patrol/report.csv",
    "/grid/reports.csv",
    "/grid/reports.xlsx",
}


@dataclass(frozen=True)
class Visit:
    route: str  # the router's canonical path
    who: str  # admin | guard | installer | resident | public
    url: Callable[[Seeded], str]
    then: Callable[[Page], Awaitable[None]] | None = None  # something to do on the page first (press a button...)


async def _press_sos(page: Page) -> None:
    page.once("dialog", lambda d: d.accept())
    await page.click("#sos")
    await page.wait_for_url("**/sos")


async def _confirm_reissue(page: Page) -> None:
    await page.locator("button.reissue").first.click()
    await page.wait_for_selector("#consequence")


async def _open_details(page: Page) -> None:
    await page.locator("#incidents li.incident button.more").first.click()
    await page.wait_for_selector("#incidents .detail ol.log li", timeout=T)


async def _import_with_a_bad_line(page: Page) -> None:
    await page.set_input_files(
        "#import-file",
        files=[
            {
                "name": "estate.csv",
                "mimeType": "text/csv",
                "buffer": (HEADER + "s1,阳光花园,7,1,701,王五,12345,owner,2024-01-01,,\n").encode(),
            }
        ],
    )
    await page.click("#import-submit")
    await page.wait_for_selector("#import-errors li", timeout=T)


async def _no_such_page(page: Page) -> None:
    parts = urlsplit(page.url)
    await page.goto(f"{parts.scheme}://{parts.netloc}/no-such-page")


VISITS = [
    Visit("/login", "public", lambda s: "/login"),
    Visit("/password", "admin", lambda s: "/password"),
    Visit("/console", "guard", lambda s: "/console"),
    Visit("/console", "installer", lambda s: "/console"),
    Visit("/users", "admin", lambda s: "/users"),
    Visit("/users/{name}", "admin", lambda s: "/users/guard1"),
    Visit("/users/{name}", "admin", lambda s: "/users/admin"),  # a disabled account
    Visit("/stations", "guard", lambda s: "/stations"),
    Visit("/stations", "admin", lambda s: "/stations"),
    Visit("/p/{code}", "public", lambda s: f"/p/{s.house_code}"),
    Visit("/p/{code}", "resident", lambda s: f"/p/{s.house_code}"),
    Visit("/p/{code}", "resident", lambda s: f"/p/{s.entrance_code}"),
    Visit("/p/{code}", "public", lambda s: f"/p/{s.entrance_code}"),
    Visit("/p/{code}", "public", lambda s: "/p/AAAAAAAAAAAAAAAAAAAAAA"),  # a plate that is not (or no longer) valid
    Visit("/p/{code}/sos", "public", lambda s: f"/p/{s.vacant_code}", then=_press_sos),
    Visit("/p/{code}/report", "public", lambda s: f"/p/{s.house_code}/report"),
    Visit("/p/{code}/register", "public", lambda s: f"/p/{s.house_code}/register"),
    Visit("/p/{code}/register", "resident", lambda s: f"/p/{s.house_code}/register"),
    Visit("/m/v/{token}", "public", lambda s: f"/m/v/{s.visitor_token}"),
    Visit("/m/login", "public", lambda s: "/m/login"),
    Visit("/m/password", "resident", lambda s: "/m/password"),
    Visit("/m", "resident", lambda s: "/m"),
    Visit("/admin/registry", "admin", lambda s: "/admin/registry"),
    Visit("/admin/registry", "admin", lambda s: "/admin/registry", then=_import_with_a_bad_line),
    Visit("/admin/registry", "guard", lambda s: "/admin/registry"),
    Visit("/admin/registry", "installer", lambda s: "/admin/registry"),
    Visit("/admin/registry/buildings/{id}", "admin", lambda s: f"/admin/registry/buildings/{s.building_id}"),
    Visit(
        "/admin/registry/buildings/{id}",
        "admin",
        lambda s: f"/admin/registry/buildings/{s.building_id}",
        then=_confirm_reissue,
    ),  # the confirmation page of a destructive action
    Visit("/admin/registry/buildings/{id}", "installer", lambda s: f"/admin/registry/buildings/{s.building_id}"),
    Visit("/admin/registry/houses/{id}", "admin", lambda s: f"/admin/registry/houses/{s.house_id}"),
    Visit("/admin/registry/houses/{id}", "guard", lambda s: f"/admin/registry/houses/{s.house_id}"),
    Visit("/admin/registry/pending", "admin", lambda s: "/admin/registry/pending"),
    Visit(
        "/admin/registry/buildings/{id}/sheet",
        "installer",
        lambda s: f"/admin/registry/buildings/{s.building_id}/sheet",
    ),
    Visit("/admin/registry/audit", "admin", lambda s: "/admin/registry/audit"),
    Visit("/admin/registry/work", "guard", lambda s: "/admin/registry/work?closed=1"),
    Visit("/doors", "guard", lambda s: "/doors"),
    Visit("/doors", "installer", lambda s: "/doors"),
    Visit("/visitors", "guard", lambda s: "/visitors"),
    Visit("/visitors/{id}", "guard", lambda s: f"/visitors/{s.visitor_id}"),
    Visit("/visitors/{id}", "guard", lambda s: f"/visitors/{s.visitor_id}?paper=58"),
    Visit("/access-log", "guard", lambda s: "/access-log"),
    Visit("/board", "guard", lambda s: "/board"),
    Visit("/centre", "guard", lambda s: "/centre"),
    Visit("/board", "guard", lambda s: f"/board?site={SITE}"),  # the centre's drill-down into one estate
    Visit("/board", "guard", lambda s: "/board", then=_open_details),
    Visit("/board/map", "guard", lambda s: "/board/map"),
    Visit("/sound", "guard", lambda s: "/sound"),
    Visit("/board/notifications", "admin", lambda s: "/board/notifications"),
    Visit("/reports", "guard", lambda s: "/reports"),
    Visit("/admin/sitemap", "installer", lambda s: "/admin/sitemap"),
    Visit("/admin/sitemap/{site}", "installer", lambda s: f"/admin/sitemap/{SITE}"),
    Visit("/admin/sitemap/{site}", "admin", lambda s: f"/admin/sitemap/{SITE}", then=_no_such_page),  # a 404 page
    Visit("/p/{code}/report/status", "resident", lambda s: f"/p/{s.house_code}/report/status"),
    Visit("/p/{code}/visitors", "resident", lambda s: f"/p/{s.house_code}/visitors"),
    Visit("/p/{code}/care", "resident", lambda s: f"/p/{s.house_code}/care"),
    Visit("/revocations", "guard", lambda s: "/revocations?q=3-2-301"),
    Visit("/care", "admin", lambda s: "/care"),
    Visit("/care/new", "admin", lambda s: "/care/new"),
    Visit("/care/{id}", "admin", lambda s: f"/care/{s.extra['care']}"),
    Visit("/patrol", "admin", lambda s: "/patrol"),
    Visit("/patrol/plates", "admin", lambda s: f"/patrol/plates?site={SITE}"),
    Visit("/patrol/routes/{id}", "admin", lambda s: f"/patrol/routes/{s.extra['route']}"),
    Visit("/patrol/report", "guard", lambda s: "/patrol/report"),
    Visit("/g", "guard", lambda s: "/g"),
    Visit("/g/c/{code}", "guard", lambda s: f"/g/c/{s.extra['checkpoint']}"),
    Visit("/g/scans/{id}", "guard", lambda s: f"/g/scans/{s.extra['scan']}"),
    Visit("/grid", "admin", lambda s: "/grid"),
    Visit("/grid/reports", "admin", lambda s: "/grid/reports"),
]

# -- what a Chinese page may show in Latin letters
ALLOWED_WORDS = {
    "QR",
    "PDF",
    "CSV",
    "PNG",
    "SVG",
    "JPG",
    "JPEG",
    "WebP",
    "A4",
    "SOS",
    "ID",
    "UTC",
    "MB",
    "mm",
    "ms",
    "Excel",
    "UTF",
    "GB18030",
    "English",
    "WeCom",
    "DingTalk",
    "SMS",
    "XLSX",
    "owner",
    "family",
    "tenant",
    "active",
    "inactive",
    "YYYY",
    "MM",
    "DD",  # the registry CSV's own words
}
CODE_PATTERNS = [
    r"https?://\S+",  # URLs
    r"\b[\w.-]+/[\w./-]+\.(?:md|yaml|csv|pdf|png|svg)\b",  # file paths (docs/install.md)
    r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b",  # config keys (public_url, site_maps)
    r"\b[a-z]+:(?=\s|$)",  # a config section named with its colon (sites:)
    r"\b[A-Z][a-z]+/[A-Za-z_]+\b",  # time zones (Asia/Shanghai)
    r"\b\d{1,3}(?:\.\d{1,3}){3}\b",  # IP addresses
    rf"\b(?:{'|'.join(PortalConfig.__struct_fields__)})\.[a-z_]+\b",  # a config section's key (grid.url)
]
HAN = re.compile(r"[\u3400-\u9fff\u3000-\u303f\uff00-\uffef]")  # Chinese characters and punctuation


def placeholders(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


def test_both_languages_have_the_same_keys_and_placeholders() -> None:
    zh = json.loads((I18N / "zh-CN.json").read_text(encoding="utf-8"))
    en = json.loads((I18N / "en.json").read_text(encoding="utf-8"))
    assert sorted(set(zh) - set(en)) == [], "keys only in zh-CN.json"
    assert sorted(set(en) - set(zh)) == [], "keys only in en.json"
    differ = {
        k: (sorted(placeholders(zh[k])), sorted(placeholders(en[k])))
        for k in zh
        if placeholders(zh[k]) != placeholders(en[k])
    }
    assert differ == {}, f"placeholders differ: {differ}"
    assert [k for k in zh if not zh[k].strip() or not en[k].strip()] == [], "empty texts"
    latin = {k: v for k, v in zh.items() if leftover_latin(re.sub(r"\{\w+\}", " ", v), [])}
    assert latin == {}, f"zh-CN texts with Latin words outside the allow-list: {latin}"
    han = {k: v for k, v in en.items() if HAN.search(v) and k != "lang.other"}
    assert han == {}, f"en texts with Chinese: {han}"


def leftover_latin(text: str, typed: list[str]) -> list[str]:
    """The Latin words of a zh-CN page that no rule allows."""
    for t in sorted(typed, key=len, reverse=True):
        text = text.replace(t, " ")
    for p in CODE_PATTERNS:
        text = re.sub(p, " ", text)
    return [
        w
        for w in re.findall(r"[A-Za-z][A-Za-z0-9]*", text)
        if sum(c.isalpha() for c in w) >= 2 and w not in ALLOWED_WORDS
    ]


def leftover_han(text: str, typed: list[str]) -> list[str]:
    """The Chinese characters of an English page outside what people typed (and the language switch)."""
    for t in sorted([*typed, "中文"], key=len, reverse=True):
        text = text.replace(t, " ")
    return sorted(set(HAN.findall(text)))


READ_PAGE = """() => {
  const out = [document.title];
  const skip = new Set(["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT"]);
  const walk = (n) => {
    if (n.nodeType === 3) { out.push(n.textContent); return; }
    if (n.nodeType !== 1 || skip.has(n.tagName) || n.getAttribute("translate") === "no") { return; }
    for (const a of ["title", "placeholder", "aria-label", "alt"]) {
      if (n.hasAttribute(a)) { out.push(n.getAttribute(a)); }
    }
    if (n.tagName === "INPUT" && ["submit", "button"].includes(n.type)) { out.push(n.value); }
    for (const c of n.childNodes) { walk(c); }
  };
  walk(document.body);
  return out.join("\\n");
}"""


async def signed_in(browser: Browser, s: Seeded, who: str, lang: str) -> Page:
    ctx = await browser.new_context(
        viewport={"width": 390, "height": 844} if who in ("resident", "public") else {"width": 1280, "height": 900},
        locale="zh-CN" if lang == "zh-CN" else "en-US",
    )
    page = await ctx.new_page()
    await page.goto(f"{s.url}/lang/{lang}?next=/login")
    if who in s.users:
        user, pw = s.users[who]
        await page.fill("#user", user)
        await page.fill("#password", pw)
        await page.click("#submit")
        await page.wait_for_url("**/console")
    elif who == "resident":
        await page.goto(f"{s.url}/m/login")
        await page.fill("#login-phone", RESIDENT_PHONE)
        await page.fill("#login-password", RESIDENT_PW)
        await page.click("#login-submit")
        await page.wait_for_url("**/m")
    return page


@pytest.mark.parametrize("lang", ["zh-CN", "en"])  # one estate each: two workers can walk them side by side
async def test_every_page_speaks_chinese_and_english(
    tmp_path: Path, broker: MosquittoProcess, artifacts: Path, lang: str
) -> None:
    async with seeded_estate(tmp_path, broker) as s, async_playwright() as pw:
        app = create_app(load(s.cfg))  # the router, not started: what pages there are
        gets = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}
        walked = {v.route for v in VISITS}
        assert sorted(gets - walked - NOT_PAGES) == [], "GET routes neither walked nor declared not a page"
        assert sorted((walked | NOT_PAGES) - gets) == [], "routes in the table that the router does not have"

        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        problems: list[str] = []
        shots = artifacts / "pages"  # every page as each role sees it, in both languages
        try:
            pages: dict[str, Page] = {}
            for v in VISITS:
                if v.who not in pages:
                    pages[v.who] = await signed_in(browser, s, v.who, lang)
                page = pages[v.who]
                resp = await page.goto(s.url + v.url(s))
                assert resp is not None and resp.status < 500, (v.url(s), resp and resp.status)
                if v.then is not None:
                    await v.then(page)
                await page.wait_for_load_state("networkidle", timeout=T)
                if await page.evaluate("document.documentElement.lang") != lang:
                    problems.append(f"{lang} {v.who} {page.url.replace(s.url, '')}: <html lang> is not {lang}")
                text = await page.evaluate(READ_PAGE)
                slug = re.sub(r"[^A-Za-z0-9]+", "_", v.url(s).split("?")[0]).strip("_")[:40] or "root"
                shots.mkdir(parents=True, exist_ok=True)
                await page.screenshot(
                    path=str(shots / f"{lang}_{v.who}_{VISITS.index(v):02d}_{slug}.png"), full_page=True
                )
                bad = leftover_latin(text, s.data) if lang == "zh-CN" else leftover_han(text, s.data)
                if bad:
                    problems.append(f"{lang} {v.who} {page.url.replace(s.url, '')}: {sorted(set(bad))}")
            for page in pages.values():
                await page.context.close()
        finally:
            await browser.close()
        assert problems == [], "untranslated words:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("请在门户配置 sites: 中设置 public_url（如 https://wy.example.cn），见 docs/install.md", True),
        ("本页时间均为 Asia/Shanghai (UTC+08:00)", True),
        ("周界 (perimeter) count 1 restored", False),
        ("guard:guard 登记", False),
    ],
)
def test_the_allow_list_lets_codes_through_and_stops_words(text: str, ok: bool) -> None:
    assert (leftover_latin(text, ["guard1"]) == []) is ok
