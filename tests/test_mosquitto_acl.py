"""The shipped Mosquitto configuration (systemd/mosquitto-gatehouse.conf and systemd/gatehouse.acl) on a
real Mosquitto: only its paths and ports are replaced, TLS included, with users made by
``gatehouse broker add-user`` (mosquitto_passwd underneath).

Negative checks ("this message never arrives") are bounded by ordering, not by sleeping: a marker
the receiver is allowed to get is sent after the forbidden message, over the same broker, and the
broker delivers to one subscriber in order; once the marker is in, the forbidden one would have been.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import ipaddress
import os
import signal
import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import cli
from gateway.tooling.broker import MosquittoProcess, free_port
from gateway.wire import MAX_PAYLOAD_BYTES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "systemd" / "mosquitto-gatehouse.conf"
ACL = ROOT / "systemd" / "gatehouse.acl"
SITE = "estate-a"
OTHER_SITE = "estate-b"

pytestmark = pytest.mark.timeout(60)


def topic(gw: str, suffix: str, site: str = SITE) -> str:
    return f"gatehouse/v1/{site}/{gw}/{suffix}"


def user(gw: str, site: str = SITE) -> str:
    """A gateway's broker user, as `gatehouse broker add-user` takes it: SITE/GATEWAY."""
    return f"{site}/{gw}"


# ---------------------------------------------------------------- the broker, as shipped


def make_certs(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a broker certificate for 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gatehouse test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.pem", "cert": folder / "broker.pem", "key": folder / "broker.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(paths["key"], 0o600)
    return paths


def render_conf(folder: Path, *, plain_port: int, tls_port: int, passwd: Path, certs: dict[str, Path]) -> str:
    text = CONF.read_text(encoding="utf-8")
    subs = {
        "/etc/mosquitto/gatehouse.passwd": str(passwd),
        "/etc/mosquitto/gatehouse.acl": str(ACL),
        "listener 1883 127.0.0.1\n": f"listener {plain_port} 127.0.0.1\n",
        "listener 8883\n": f"listener {tls_port} 127.0.0.1\n",
        "/etc/mosquitto/certs/gatehouse-ca.pem": str(certs["ca"]),
        "/etc/mosquitto/certs/gatehouse-broker.pem": str(certs["cert"]),
        "/etc/mosquitto/certs/gatehouse-broker.key": str(certs["key"]),
    }
    for old, new in subs.items():
        assert old in text, f"{CONF.name} no longer contains {old!r}; update this test with it"
        text = text.replace(old, new)
    # What Debian's /etc/mosquitto/mosquitto.conf adds, here in the test's folder. Mosquitto started as
    # root drops to the user "mosquitto", which could not write a root-owned folder: "user" keeps us.
    return text + (
        f"\npersistence_location {folder}/\nlog_dest file {folder}/mosquitto.log\nuser {getpass.getuser()}\n"
    )


class SiteBroker(MosquittoProcess):
    def __init__(self, folder: Path, conf_text: str, port: int) -> None:
        super().__init__(folder, port)
        self.conf_text = conf_text

    def write_conf(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.conf_text, encoding="utf-8")


def add_user(passwd: Path, user: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``gatehouse broker add-user``; returns the password it printed once."""
    assert cli.main(["broker", "add-user", user, "--passwd-file", str(passwd)]) == 0
    out = capsys.readouterr().out.splitlines()
    i = next(i for i, ln in enumerate(out) if ln.startswith("password (shown once"))
    return out[i + 1].strip()


class Site:
    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.folder = tmp / "broker"
        self.certs = make_certs(tmp / "certs")
        self.passwd = tmp / "gatehouse.passwd"
        self.passwords = {
            u: add_user(self.passwd, u, capsys)
            for u in (user("gw-1"), user("gw-2"), user("gw-1", OTHER_SITE), "portal")
        }
        self.plain_port, self.tls_port = free_port(), free_port()
        conf = render_conf(
            self.folder, plain_port=self.plain_port, tls_port=self.tls_port, passwd=self.passwd, certs=self.certs
        )
        self.broker = SiteBroker(self.folder, conf, self.plain_port)

    def client(
        self,
        name: str | None,
        *,
        password: str | None = None,
        tls: bool = True,
        identifier: str | None = None,
        clean: bool = True,
    ) -> aiomqtt.Client:
        """A client of broker user ``name``: "portal", or a gateway's name on SITE (or SITE/GATEWAY)."""
        ctx = None
        if tls:
            ctx = ssl.create_default_context(cafile=str(self.certs["ca"]))
        username = name if name is None or name == "portal" or "/" in name else user(name)
        return aiomqtt.Client(
            "127.0.0.1",
            self.tls_port if tls else self.plain_port,
            username=username,
            password=password if password is not None else (self.passwords[username] if username else None),
            tls_context=ctx,
            identifier=identifier,
            clean_session=clean,
            timeout=10,
        )


@pytest.fixture
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Site:
    s = Site(tmp_path, capsys)
    s.broker.start()
    try:
        yield s  # type: ignore[misc]
    finally:
        s.broker.stop()


async def collect_until(client: aiomqtt.Client, marker: bytes, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """Messages (topic, payload) up to and including the one whose payload is ``marker``."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            payload = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
            got.append((str(msg.topic), payload))
            if payload == marker:
                return got
    raise AssertionError("the message stream ended")


@asynccontextmanager
async def connected(*clients: aiomqtt.Client) -> AsyncIterator[None]:
    entered: list[aiomqtt.Client] = []
    try:
        for c in clients:
            await c.__aenter__()
            entered.append(c)
        yield
    finally:
        for c in reversed(entered):
            await c.__aexit__(None, None, None)


# ---------------------------------------------------------------- tests


@pytest.mark.process  # mosquitto_passwd, run by gateway.tooling.provision
def test_passwd_file_is_private_and_users_are_not_silently_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwd = tmp_path / "gatehouse.passwd"
    first = add_user(passwd, "estate-a/gw-1", capsys)
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    assert passwd.read_text().startswith("estate-a/gw-1:$7$")  # hashed by mosquitto_passwd, not stored in clear
    assert first not in passwd.read_text()
    assert cli.main(["broker", "add-user", "estate-a/gw-1", "--passwd-file", str(passwd)]) == 2
    err = capsys.readouterr().err
    assert f"broker add-user: {passwd} already has a user 'estate-a/gw-1'; use --force to give it a new password" in err
    pwfile = tmp_path / "pw"
    pwfile.write_text("correct horse battery staple\n")
    assert (
        cli.main(
            [
                "broker",
                "add-user",
                "estate-a/gw-1",
                "--passwd-file",
                str(passwd),
                "--password-file",
                str(pwfile),
                "--force",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "correct horse" not in out  # a password the installer gave is not echoed
    assert [ln.split(":")[0] for ln in passwd.read_text().splitlines()] == ["estate-a/gw-1"]


@pytest.mark.parametrize(
    "name", ["gw-1", "estate-a/", "/gw-1", "estate-a/gw-1/x", "estate-a/+", "#", "a b/gw-1", "estate-a/gw:1", "Portal"]
)
def test_a_broker_user_is_site_slash_gateway_or_the_portal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """A bare gateway name would be one user for every site's gateway of that name; wildcards would match
    topics of others. Both are refused before mosquitto_passwd is run."""
    passwd = tmp_path / "gatehouse.passwd"
    assert cli.main(["broker", "add-user", name, "--passwd-file", str(passwd)]) == 2
    assert "a gateway's user is SITE/GATEWAY" in capsys.readouterr().err
    assert not passwd.exists()


async def test_a_gateway_cannot_publish_on_another_gateways_topics(site: Site) -> None:
    portal = site.client("portal", tls=False)  # a portal on the broker's machine: plain, on loopback
    gw1 = site.client("gw-1")
    gw2 = site.client("gw-2")
    async with connected(portal, gw1, gw2):
        await portal.subscribe([(f"gatehouse/v1/{SITE}/+/events", 1), (f"gatehouse/v1/{SITE}/+/status", 1)])
        # gw-1 tries every topic of gw-2 that a gateway writes, then its own.
        await gw1.publish(topic("gw-2", "events"), b"forged-event", qos=1)
        await gw1.publish(topic("gw-2", "status"), b"forged-status", qos=1, retain=True)
        await gw1.publish(topic("gw-1", "status"), b"gw-1 status", qos=1)
        await gw1.publish(topic("gw-1", "events"), b"gw-1 event", qos=1)
        got = await collect_until(portal, b"gw-1 event")
        assert got == [(topic("gw-1", "status"), b"gw-1 status"), (topic("gw-1", "events"), b"gw-1 event")]
        # gw-2's own publishing still works, and nothing forged was retained under its name.
        await gw2.publish(topic("gw-2", "events"), b"gw-2 event", qos=1)
        assert await collect_until(portal, b"gw-2 event") == [(topic("gw-2", "events"), b"gw-2 event")]
    late = site.client("portal", tls=False)
    async with connected(late):
        await late.subscribe(topic("gw-2", "status"), qos=1)
        await late.subscribe(topic("gw-1", "status"), qos=1)
        await gw_marker(site, "gw-1", b"marker")
        got = await collect_until(late, b"marker")
        assert (topic("gw-2", "status"), b"forged-status") not in got


async def gw_marker(site: Site, gw: str, payload: bytes) -> None:
    async with site.client(gw) as c:
        await c.publish(topic(gw, "status"), payload, qos=1)


async def test_a_gateway_cannot_publish_as_another_sites_gateway_of_the_same_name(site: Site) -> None:
    """estate-a/gw-1 and estate-b/gw-1: one gateway name on two sites, two users. Neither writes the other's
    topics, nor reads the other's commands."""
    portal = site.client("portal", tls=False)
    a = site.client("estate-a/gw-1")
    b = site.client("estate-b/gw-1")
    async with connected(portal, a, b):
        await portal.subscribe([("gatehouse/v1/+/+/events", 1), ("gatehouse/v1/+/+/status", 1)])
        await b.subscribe(topic("gw-1", "cmd", OTHER_SITE), qos=1)
        await a.subscribe(topic("gw-1", "cmd", OTHER_SITE), qos=1)  # refused by the ACL: never delivered
        await a.publish(topic("gw-1", "events", OTHER_SITE), b"forged by estate-a/gw-1", qos=1)
        await a.publish(topic("gw-1", "status", OTHER_SITE), b"forged status", qos=1, retain=True)
        await a.publish(topic("gw-1", "events"), b"a's own event", qos=1)
        await b.publish(topic("gw-1", "events", OTHER_SITE), b"b's own event", qos=1)
        got = await collect_until(portal, b"b's own event")
        assert got == [
            (topic("gw-1", "events"), b"a's own event"),
            (topic("gw-1", "events", OTHER_SITE), b"b's own event"),
        ]
        await portal.publish(topic("gw-1", "cmd", OTHER_SITE), b"cmd for estate-b/gw-1", qos=1)
        assert await collect_until(b, b"cmd for estate-b/gw-1") == [
            (topic("gw-1", "cmd", OTHER_SITE), b"cmd for estate-b/gw-1")
        ]
        await portal.publish(topic("gw-1", "cmd"), b"cmd for estate-a/gw-1", qos=1)
        await a.subscribe(topic("gw-1", "cmd"), qos=1)
        await portal.publish(topic("gw-1", "cmd"), b"marker for a", qos=1)
        assert await collect_until(a, b"marker for a") == [(topic("gw-1", "cmd"), b"marker for a")]
    late = site.client("portal", tls=False)
    async with connected(late):
        await late.subscribe(topic("gw-1", "status", OTHER_SITE), qos=1)
        async with site.client("estate-b/gw-1") as b2:
            await b2.publish(topic("gw-1", "status", OTHER_SITE), b"b marker", qos=1)
        got = await collect_until(late, b"b marker")
        assert (topic("gw-1", "status", OTHER_SITE), b"forged status") not in got


async def test_a_gateway_reads_only_its_own_commands_and_no_events(site: Site) -> None:
    portal = site.client("portal")
    gw1 = site.client("gw-1")
    gw2 = site.client("gw-2")
    async with connected(portal, gw1, gw2):
        await gw1.subscribe(
            [
                (topic("gw-2", "cmd"), 1),
                (topic("gw-2", "ack"), 1),
                ("gatehouse/v1/+/+/events", 1),
                (topic("gw-1", "cmd"), 1),
                (topic("gw-1", "ack"), 1),
            ]
        )
        await gw2.subscribe([(topic("gw-2", "cmd"), 1)])
        await portal.subscribe(topic("gw-2", "events"), qos=1)
        await portal.publish(topic("gw-2", "cmd"), b"cmd for gw-2", qos=1)
        await portal.publish(topic("gw-2", "ack"), b"ack for gw-2", qos=1)
        # gw-2 gets its command (the positive control) ...
        assert await collect_until(gw2, b"cmd for gw-2") == [(topic("gw-2", "cmd"), b"cmd for gw-2")]
        # ... and its event reaches the portal, so the broker has routed it to every subscriber by now.
        await gw2.publish(topic("gw-2", "events"), b"gw-2 event", qos=1)
        await collect_until(portal, b"gw-2 event")
        await portal.publish(topic("gw-1", "ack"), b"ack for gw-1", qos=1)
        await portal.publish(topic("gw-1", "cmd"), b"cmd for gw-1", qos=1)
        got = await collect_until(gw1, b"cmd for gw-1")
        assert got == [(topic("gw-1", "ack"), b"ack for gw-1"), (topic("gw-1", "cmd"), b"cmd for gw-1")]


async def test_a_gateway_cannot_command_another_gateway(site: Site) -> None:
    gw1 = site.client("gw-1")
    gw2 = site.client("gw-2")
    portal = site.client("portal")
    async with connected(gw1, gw2, portal):
        await gw2.subscribe([(topic("gw-2", "cmd"), 1), (topic("gw-2", "ack"), 1)])
        await gw1.publish(topic("gw-2", "cmd"), b"forged-cmd", qos=1)
        await gw1.publish(topic("gw-2", "ack"), b"forged-ack", qos=1)
        await gw1.publish(topic("gw-1", "events"), b"sync", qos=1)  # gw-1's session has been served by now
        await portal.publish(topic("gw-2", "cmd"), b"real cmd", qos=1)
        assert await collect_until(gw2, b"real cmd") == [(topic("gw-2", "cmd"), b"real cmd")]


@pytest.mark.parametrize(
    "user,password,tls",
    [
        (None, None, True),  # anonymous
        (None, None, False),
        ("gw-1", "not the password", True),
        ("gw-9", "no such user", False),
    ],
)
async def test_anonymous_and_wrong_credentials_are_refused(
    site: Site, user: str | None, password: str | None, tls: bool
) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with site.client(user, password=password, tls=tls):
            pass


async def test_tls_listener_needs_the_sites_ca(site: Site) -> None:
    other_ca = make_certs(site.folder.parent / "other")["ca"]
    client = aiomqtt.Client(
        "127.0.0.1",
        site.tls_port,
        username=user("gw-1"),
        password=site.passwords[user("gw-1")],
        tls_context=ssl.create_default_context(cafile=str(other_ca)),
        timeout=10,
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_messages_over_the_size_limit_are_dropped(site: Site) -> None:
    portal = site.client("portal", tls=False)
    gw1 = site.client("gw-1")
    async with connected(portal, gw1):
        await portal.subscribe(topic("gw-1", "events"), qos=1)
        biggest = b"x" * MAX_PAYLOAD_BYTES  # the largest payload the wire contract allows gets through
        await gw1.publish(topic("gw-1", "events"), biggest, qos=1)
        await gw1.publish(topic("gw-1", "events"), b"y" * (1310720 + 1), qos=1)
        await gw1.publish(topic("gw-1", "events"), b"after", qos=1)
        got = await collect_until(portal, b"after")
        assert [len(p) for _, p in got] == [MAX_PAYLOAD_BYTES, len(b"after")]


async def test_queued_messages_survive_a_broker_restart(site: Site) -> None:
    """The broker saves its queues at every stop: a restart (an upgrade, a reboot) loses nothing queued for a portal
    that is away. (A crash loses what came since the last save, every 30 s; the gateways send that again:
    test_durability.py::test_broker_killed_mid_stream.)"""
    payload = b"queued while the portal is away"
    async with site.client("portal", identifier="portal-test", clean=False) as portal:
        await portal.subscribe(topic("gw-1", "events"), qos=1)
    async with site.client("gw-1") as gw1:
        await gw1.publish(topic("gw-1", "events"), payload, qos=1)
    assert site.broker.proc is not None
    site.broker.proc.send_signal(signal.SIGTERM)
    site.broker.proc.wait()
    assert payload in (site.folder / "mosquitto.db").read_bytes()  # Mosquitto keeps payloads as they are
    site.broker.start()
    async with site.client("portal", identifier="portal-test", clean=False) as portal:
        assert await collect_until(portal, payload) == [(topic("gw-1", "events"), payload)]


def test_conf_limits_match_the_wire_contract() -> None:
    text = CONF.read_text(encoding="utf-8")
    settings = dict(
        ln.split(None, 1)
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("#") and not ln.startswith("listener") and len(ln.split(None, 1)) == 2
    )
    assert int(settings["message_size_limit"]) >= MAX_PAYLOAD_BYTES
    assert settings["allow_anonymous"] == "false"
    # Saved at intervals, not after every change (which rewrites the whole store per message under a backlog).
    assert settings["autosave_on_changes"] == "false" and 1 <= int(settings["autosave_interval"]) <= 300
    # Debian's mosquitto.conf sets persistence_location already; Mosquitto refuses a second one.
    assert "persistence_location" not in settings
