"""The grid link over HTTPS with mutual TLS, against the stub serving TLS and requiring a client certificate from
the estate's CA: with the portal's certificate the record goes up; without one, or against a platform whose
certificate is not from the configured CA, nothing goes and nothing is lost (the record waits, the link says why).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portal.alarms.board import BOARD
from portal.grid import GRID
from tests.grid_support import grid_stub, grid_yaml, records
from tests.portal_support import Portal, running_portal, wait_for, write_config
from tests.registry_support import admin_session, estate_csv, form, import_csv, plate_code


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]) if issuer else name
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        p = folder / f"{name}.key"
        p.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        p.chmod(0o600)


def _pki(folder: Path) -> None:
    """Two CAs (the platform's, the estate's), the platform's server certificate for 127.0.0.1, the portal's
    client certificate, and a stranger's server certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("platform-ca", "estate-ca", "stranger-ca"):
        k = _key()
        _write(folder, ca, _cert(ca, k, None, ca=True), k)
    for name, ca, ip in (
        ("platform", "platform-ca", "127.0.0.1"),
        ("portal", "estate-ca", None),
        ("stranger", "stranger-ca", "127.0.0.1"),
    ):
        ca_key = serialization.load_pem_private_key((folder / f"{ca}.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        k = _key()
        _write(folder, name, _cert(name, k, (ca, ca_key), ip=ip), k)


async def _sos(p: Portal) -> None:
    csrf = await admin_session(p)
    assert (await import_csv(p, csrf, estate_csv()))[0] == 200
    code = await plate_code(p, "3", "2", "301")
    page = await (await p.client.get(f"/p/{code}")).text()
    r = await form(p, f"/p/{code}/sos", {}, page.split('name="csrf" value="')[1].split('"')[0])
    assert r.status == 303
    await p.client.app[BOARD].feed_now()


async def test_mutual_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    _pki(pki)
    stub = await grid_stub(
        tmp_path / "platform",
        "--tls-cert",
        str(pki / "platform.pem"),
        "--tls-key",
        str(pki / "platform.key"),
        "--client-ca",
        str(pki / "estate-ca.pem"),
    )
    stranger = await grid_stub(
        tmp_path / "stranger", "--tls-cert", str(pki / "stranger.pem"), "--tls-key", str(pki / "stranger.key")
    )
    try:
        url = stub.info["url"]
        assert url.startswith("https://127.0.0.1:")
        mtls = f"  ca_file: {pki / 'platform-ca.pem'}\n"
        client = f"  client_cert_file: {pki / 'portal.pem'}\n  client_key_file: {pki / 'portal.key'}\n"
        # Without the portal's certificate: the platform ends the handshake; the record waits.
        folder = tmp_path / "no-client-cert"
        async with running_portal(write_config(folder, None, extra=grid_yaml(folder, url, more=mtls)), last=False) as p:
            await _sos(p)
            link = p.client.app[GRID].link
            assert link is not None
            await wait_for(lambda: link.fails >= 1, what="a refused handshake")
            assert await records(stub) == {}
            pending = await p.services.store.read(
                lambda c: c.execute("SELECT count(*) FROM grid_outbox WHERE state = 'pending'").fetchone()[0]
            )
            assert pending == 1
        # A platform whose certificate is not from grid.ca_file: refused by the portal.
        folder = tmp_path / "stranger-platform"
        async with running_portal(
            write_config(folder, None, extra=grid_yaml(folder, stranger.info["url"], more=mtls + client)), last=False
        ) as p:
            await _sos(p)
            link = p.client.app[GRID].link
            assert link is not None
            await wait_for(lambda: link.fails >= 1, what="a certificate refused")
            assert "certificate" in link.last_error.lower() or "SSL" in link.last_error, link.last_error
            assert await records(stranger) == {}
        # With it: the record goes up over mutual TLS.
        folder = tmp_path / "mtls"
        async with running_portal(write_config(folder, None, extra=grid_yaml(folder, url, more=mtls + client))) as p:
            await _sos(p)
            got = await wait_for(lambda: records(stub), what="the record over mutual TLS")
            [rec] = got.values()
            assert rec["last"]["source_code"] == "resident"
    finally:
        for s in (stub, stranger):
            await s.stop()
            await s.session.close()
