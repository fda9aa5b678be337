"""The uplink over TLS with a username and password, against a real Mosquitto with a TLS listener and a
password file; certificates are made in the test with `cryptography`."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import subprocess
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.tasks import cancel_and_wait
from gateway import wire
from gateway.config import GatewayConfig, MqttConfig, TlsConfig
from gateway.events import Draft
from gateway.store import Store
from gateway.tooling.broker import MosquittoProcess
from gateway.uplink import Uplink


def _cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name | None = None,
    ca: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return key, b.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, *, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
    return path


def _tls_broker(tmp: Path) -> tuple[MosquittoProcess, Path, int]:
    ca_key, ca = _cert("gatehouse test CA", ca=True)
    srv_key, srv = _cert("127.0.0.1", ca_key, ca.subject)
    ca_pem = _write(tmp / "ca.pem", cert=ca)
    _write(tmp / "server.pem", cert=srv)
    _write(tmp / "server.key", key=srv_key)
    passwd = tmp / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "gw1", "s3cret-gw1-password"], check=True)
    broker = MosquittoProcess(
        tmp / "broker", password_file=passwd, tls=(ca_pem, tmp / "server.pem", tmp / "server.key")
    )
    return broker.start(), ca_pem, broker.port


def _cfg(tmp: Path, port: int, ca: Path, password: str) -> GatewayConfig:
    pw = tmp / f"mqtt-{password}.pass"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    return GatewayConfig(
        site="s1",
        gateway="gw1",
        mqtt=MqttConfig(
            host="127.0.0.1",
            port=port,
            username="gw1",
            password_file=str(pw),
            tls=TlsConfig(ca_file=str(ca)),
            reconnect_min_s=0.05,
            reconnect_max_s=0.3,
        ),
    )


async def test_events_flow_over_tls_with_password(tmp_path: Path) -> None:
    broker, ca, port = _tls_broker(tmp_path)
    try:
        async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
            up = Uplink(_cfg(tmp_path, port, ca, "s3cret-gw1-password"), store)
            task = asyncio.create_task(up.run())
            try:
                ctx = ssl.create_default_context(cafile=str(ca))
                async with aiomqtt.Client(
                    "127.0.0.1", port, username="gw1", password="s3cret-gw1-password", tls_context=ctx
                ) as portal:
                    await portal.subscribe(wire.subscription("events"), qos=1)
                    await store.append([Draft(type="zone.alarm", device="p", place=wire.Place(site="s1"))])
                    async with asyncio.timeout(15):
                        msg = await anext(aiter(portal.messages))
                    batch = wire.decode_batch(bytes(msg.payload), site="s1", gateway="gw1")  # type: ignore[arg-type]
                    assert [e.type for e in batch.events] == ["zone.alarm"]
                assert up.stats.connected
            finally:
                await cancel_and_wait("the test's task", [task])
    finally:
        broker.stop()


async def test_wrong_password_or_untrusted_broker_never_connects(tmp_path: Path) -> None:
    broker, ca, port = _tls_broker(tmp_path)
    _, other_ca = _cert("some other CA", ca=True)
    wrong_ca = _write(tmp_path / "other-ca.pem", cert=other_ca)
    try:
        bad = [_cfg(tmp_path, port, ca, "not-the-password"), _cfg(tmp_path, port, wrong_ca, "s3cret-gw1-password")]
        for cfg in bad:
            async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
                up = Uplink(cfg, store)
                task = asyncio.create_task(up.run())
                await asyncio.sleep(1.5)  # several attempts at the configured backoff
                assert up.stats.connects == 0 and not up.stats.connected
                await cancel_and_wait("the test's task", [task])
    finally:
        broker.stop()


async def test_a_password_file_spoilt_while_running_is_logged_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up check passed, then someone left the password file readable by all (or deleted it): the uplink
    does not end (it used to, out of its task group, taking the daemon down into systemd's restart loop); it says
    why once and retries at its backoff, and connects as soon as the file is right again."""
    broker, ca, port = _tls_broker(tmp_path)
    cfg = _cfg(tmp_path, port, ca, "s3cret-gw1-password")
    assert cfg.mqtt.password_file is not None
    pw = Path(cfg.mqtt.password_file)
    pw.chmod(0o644)
    try:
        async with Store(tmp_path / "gw.db", site="s1", gateway="gw1") as store:
            up = Uplink(cfg, store)
            task = asyncio.create_task(up.run())
            try:
                await asyncio.sleep(1.5)  # several attempts at the configured backoff
                assert not task.done()
                assert up.stats.connects == 0
                said = [r.getMessage() for r in caplog.records if "uplink cannot connect" in r.getMessage()]
                assert said == [
                    f"uplink cannot connect: mqtt.password_file: {pw}: secret file must not be readable by group or "
                    "others (chmod 600); retrying"
                ]
                pw.chmod(0o600)
                async with asyncio.timeout(10):
                    while not up.stats.connected:
                        await asyncio.sleep(0.05)
            finally:
                await cancel_and_wait("the test's task", [task])
    finally:
        broker.stop()
