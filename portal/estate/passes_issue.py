"""Pass issuing for residents' phones, and the signed revocation lists the gateways judge by.

The portal's pass-signing key lives in ``data_dir/pass_signing_key.pem`` (mode 0600, generated at
the first start); its public half in ``pass_signing_key.pub.pem`` is what installers give gateways
(``GET /api/passes/public-key``). Passes use the format of :mod:`gateway.wire.passes`.

Revocation lists: one per site, rebuilt from the registry and the revocations and blocks made by hand
(:mod:`portal.estate.revocations`). Whenever its contents change (a move-out, a lease end, a deactivation, a pass
revoked, a person blocked or let in again), and at least every ``resign_s`` so a gateway's copy never looks stale
(gateways refuse visitor passes once their list is older than ``access.revocation_max_age_s``, 24 h by default),
the version goes up, the list is signed, stored, and sent to every gateway of the site as a
``credentials.sync`` command (``args: {"revocations": <signed text>}``). It is sent again when a
gateway comes online and on the timer until the gateway confirms it with an ``ok`` command result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ulid import ULID

from gateway import wire
from gateway.wire.passes import (
    PassFields,
    RevocationList,
    generate_keypair,
    key_id,
    load_private_key,
    save_private_key,
    save_public_key,
    sign_pass,
    sign_revocations,
)
from portal.estate import revocations
from portal.estate.registry import revoked_for_site, today_in
from portal.store import Conn

log = logging.getLogger("portal.passes")

KEY_FILE = "pass_signing_key.pem"
PUBLIC_KEY_FILE = "pass_signing_key.pub.pem"
RESIDENT_LIFE_S = 60
VISITOR_MAX_S = 7 * 86400
VISITOR_MAX_USES = 20
RESIGN_S = 6 * 3600
COMMAND_LIFE_S = 3600


def load_or_create_key(data_dir: Path) -> Ed25519PrivateKey:
    """The portal's signing key, created (0600) with its public half on first use. Blocking: run in a thread."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        private, public = generate_keypair()
        save_private_key(path, private)
        pub = data_dir / PUBLIC_KEY_FILE
        save_public_key(pub, public, overwrite=True)
        log.warning("created the pass-signing key %s (kid %s); give gateways %s", path, key_id(public), pub)
        return private
    key = load_private_key(path)
    pub = data_dir / PUBLIC_KEY_FILE
    if not pub.exists():
        save_public_key(pub, key.public_key())
    return key


class PassIssuer:
    """Signs passes. ``now`` is the portal's wall clock (UTC seconds)."""

    def __init__(self, key: Ed25519PrivateKey, *, now: Callable[[], float] = time.time) -> None:
        self._key = key
        self._now = now
        self.kid = key_id(key.public_key())

    @property
    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def resident_pass(self, site: str, subject: str, unit_ref: str, house_ref: str) -> tuple[str, PassFields]:
        """A pass for the resident's unit entrance(s) and the site gates, valid from now for about a minute."""
        now = int(self._now())
        fields = PassFields(
            kind="resident",
            site=site,
            subject=subject,
            house=house_ref,
            units=(unit_ref,),
            gates=True,
            not_before=now,
            not_after=now + RESIDENT_LIFE_S,
            uses=1,
        )
        return sign_pass(self._key, fields), fields

    def visitor_pass(
        self, site: str, subject: str, unit_ref: str, house_ref: str, valid_s: int, uses: int
    ) -> tuple[str, PassFields]:
        if not 60 <= valid_s <= VISITOR_MAX_S or not 1 <= uses <= VISITOR_MAX_USES:
            raise ValueError("visitor pass validity or uses out of range")
        now = int(self._now())
        fields = PassFields(
            kind="visitor",
            site=site,
            subject=subject,
            house=house_ref,
            units=(unit_ref,),
            gates=True,
            not_before=now,
            not_after=now + valid_s,
            uses=uses,
        )
        return sign_pass(self._key, fields), fields

    def sign_list(self, rl: RevocationList) -> str:
        return sign_revocations(self._key, rl)


# ---------------------------------------------------------------- revocation lists


@dataclass(slots=True)
class SiteList:
    site: str
    version: int
    issued_at: int
    digest: str
    signed: str


@dataclass(slots=True)
class GatewaySync:
    sent: dict[str, int] = field(default_factory=dict)  # command id → version
    confirmed: int = 0
    last_error: str = ""


def _digest(subjects: list[str], passes: list[bytes], blocked: list[str]) -> str:
    h = hashlib.sha256()
    for s in subjects:
        h.update(b"s" + s.encode() + b"\0")
    for p in passes:
        h.update(b"p" + p + b"\0")
    for b in blocked:
        h.update(b"b" + b.encode() + b"\0")
    return h.hexdigest()


def rebuild_list(
    conn: Conn, issuer: PassIssuer, site: str, tz: Any, wall: float, resign_s: int = RESIGN_S
) -> SiteList | None:
    """Writer thread: a new signed version when the contents changed or the current one is old; else the current."""
    row = conn.execute("SELECT id FROM reg_sites WHERE code = ?", (site,)).fetchone()
    if row is None:
        return None
    now = int(wall)
    subjects, passes = revoked_for_site(conn, int(row["id"]), today_in(tz, wall), now)
    by_hand, blocked = revocations.listed(conn, site, now)
    passes = sorted(set(passes) | set(by_hand))
    digest = _digest(subjects, passes, blocked)
    cur = conn.execute(
        "SELECT version, issued_at, digest, signed FROM revocation_state WHERE site = ?", (site,)
    ).fetchone()
    if cur is not None and cur["digest"] == digest and now - int(cur["issued_at"]) < resign_s:
        return SiteList(site, int(cur["version"]), int(cur["issued_at"]), digest, cur["signed"])
    version = (int(cur["version"]) if cur else 0) + 1
    rl = RevocationList(version=version, issued_at=now, site=site, passes=passes, subjects=subjects, blocked=blocked)
    signed = issuer.sign_list(rl)
    conn.execute(
        "INSERT INTO revocation_state (site, version, issued_at, digest, signed) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (site) DO UPDATE SET version = excluded.version, issued_at = excluded.issued_at,"
        " digest = excluded.digest, signed = excluded.signed",
        (site, version, now, digest, signed),
    )
    log.info(
        "revocation list for %s: version %d, %d subjects, %d passes, %d blocked",
        site,
        version,
        len(subjects),
        len(passes),
        len(blocked),
    )
    return SiteList(site, version, now, digest, signed)


def current_list(conn: Conn, site: str) -> SiteList | None:
    r = conn.execute("SELECT * FROM revocation_state WHERE site = ?", (site,)).fetchone()
    return SiteList(site, r["version"], r["issued_at"], r["digest"], r["signed"]) if r else None


def sync_command(signed: str, version: int, by: str = "portal") -> wire.Command:
    now = datetime.now(UTC)
    return wire.Command(
        v=wire.COMMAND_VERSION,
        id=str(ULID()),
        type="credentials.sync",
        ts=now,
        expires=now + timedelta(seconds=COMMAND_LIFE_S),
        by=by,
        args={"revocations": signed, "version": version},
    )


class Publisher:
    """Keeps every gateway of every site on the newest revocation list.

    ``rebuild(site)`` runs :func:`rebuild_list` on the store's writer; ``send(site, gw, cmd)`` is
    ``Ingest.send_command``. A failed send (broker down) is retried on the timer or when the gateway
    comes back online.
    """

    def __init__(
        self,
        gateways: list[tuple[str, str]],
        rebuild: Callable[[str], Any],
        send: Callable[[str, str, wire.Command], Any],
    ) -> None:
        self._gateways = gateways
        self._rebuild = rebuild
        self._send = send
        self.state: dict[tuple[str, str], GatewaySync] = {k: GatewaySync() for k in gateways}
        self.lists: dict[str, SiteList] = {}
        self._lock = asyncio.Lock()

    @property
    def sites(self) -> list[str]:
        return sorted({s for s, _ in self._gateways})

    async def refresh(self, site: str | None = None, *, force_gateway: tuple[str, str] | None = None) -> None:
        """Rebuild the lists (of one site or all) and send each to every gateway not yet confirmed on it."""
        async with self._lock:
            for s in [site] if site else self.sites:
                try:
                    sl: SiteList | None = await self._rebuild(s)
                except Exception:
                    log.exception("rebuilding the revocation list of %s failed", s)
                    continue
                if sl is None:
                    continue
                self.lists[s] = sl
                for key in self._gateways:
                    if key[0] != s:
                        continue
                    st = self.state[key]
                    if st.confirmed >= sl.version and key != force_gateway:
                        continue
                    await self._push(key, sl)

    async def _push(self, key: tuple[str, str], sl: SiteList) -> None:
        st = self.state[key]
        cmd = sync_command(sl.signed, sl.version)
        try:
            await self._send(key[0], key[1], cmd)
        except Exception as e:  # BrokerUnavailable, an unknown gateway: try again later
            if st.last_error != str(e):
                log.info("revocation list v%d to %s/%s not sent: %s", sl.version, key[0], key[1], e)
            st.last_error = str(e)
            return
        st.last_error = ""
        if len(st.sent) > 64:
            st.sent.clear()
        st.sent[cmd.id] = sl.version

    def on_result(self, site: str, gateway: str, command_id: str, ok: bool) -> None:
        st = self.state.get((site, gateway))
        if st is None:
            return
        version = st.sent.pop(command_id, None)
        if version is not None and ok:
            st.confirmed = max(st.confirmed, version)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for (s, g), st in sorted(self.state.items()):
            sl = self.lists.get(s)
            out.append(
                {
                    "site": s,
                    "gateway": g,
                    "version": sl.version if sl else 0,
                    "confirmed": st.confirmed,
                    "error": st.last_error,
                }
            )
        return out
