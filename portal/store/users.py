"""Staff accounts and their sessions (plain SQL on either engine)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway import wire
from portal.store.basics import now_text
from portal.store.engine import Conn, IntegrityError
from portal.store.errors import StoreConflict

ROLES = ("admin", "guard", "installer")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    role: str
    password_hash: str
    must_change: bool
    created_at: str
    sites: tuple[str, ...] | None = None  # None: every site
    disabled: bool = False  # switched off by an administrator: cannot sign in

    def sees_site(self, site: str) -> bool:
        return self.sites is None or site in self.sites


@dataclass(frozen=True, slots=True)
class Session:
    id_hash: str
    user: User
    csrf_token: str
    created: float
    last_seen: float
    station_id: int | None = None  # a guard station's session (portal/web/stations.py): it lasts a shift


def _user(row: Any) -> User:
    sites = row["sites"]
    return User(
        row["id"],
        row["name"],
        row["role"],
        row["password_hash"],
        bool(row["must_change"]),
        row["created_at"],
        None if sites is None else tuple(json.loads(sites)),
        row["disabled_at"] is not None,
    )


def insert_user(
    conn: Conn, name: str, role: str, password_hash: str, must_change: bool, sites: Sequence[str] | None = None
) -> int:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    try:
        row = conn.execute(
            "INSERT INTO users (name, role, password_hash, must_change, created_at, sites) VALUES (?, ?, ?, ?, ?, ?)"
            " RETURNING id",
            (name, role, password_hash, int(must_change), now_text(), _sites_json(sites)),
        ).fetchone()
    except IntegrityError:
        raise StoreConflict(f"user {name!r} exists") from None
    return int(row[0])


def _sites_json(sites: Sequence[str] | None) -> str | None:
    return None if sites is None else json.dumps(sorted(set(sites)))


def set_user_sites(conn: Conn, name: str, sites: Sequence[str] | None) -> bool:
    """Scope a user to ``sites`` (None: every site); False when there is no such user."""
    cur = conn.execute("UPDATE users SET sites = ? WHERE name = ?", (_sites_json(sites), name))
    return cur.rowcount == 1


class SitesError(ValueError):
    """A bad list of sites; ``key`` is an i18n key, ``sites`` the offending ids."""

    def __init__(self, key: str, sites: Sequence[str] = ()) -> None:
        super().__init__(f"{key}: {', '.join(sites)}")
        self.key = key
        self.sites = tuple(sites)


def parse_sites(raw: str, known: Sequence[str]) -> tuple[str, ...] | None:
    """``north,south`` → ("north", "south"); blank → None (every site). Ids must be wire names, and one of
    ``known`` when the registry knows any sites (an empty registry accepts any, to be filled in later)."""
    parts = [p.strip() for p in raw.replace("，", ",").split(",")]
    ids = tuple(dict.fromkeys(p for p in parts if p))
    if not ids:
        return None
    bad = [i for i in ids if not wire.NAME_RE.match(i)]
    if bad:
        raise SitesError("users.bad_sites", bad)
    unknown = [i for i in ids if known and i not in known]
    if unknown:
        raise SitesError("users.unknown_sites", unknown)
    return ids


def registry_site_codes(conn: Conn) -> list[str]:
    """The site codes the estate registry knows (empty before any import)."""
    return [r[0] for r in conn.execute("SELECT code FROM reg_sites ORDER BY code")]


def get_user(conn: Conn, name: str) -> User | None:
    row = conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
    return _user(row) if row else None


def list_users(conn: Conn) -> list[User]:
    return [_user(r) for r in conn.execute("SELECT * FROM users ORDER BY name")]


def count_users(conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


def count_admins(conn: Conn) -> int:
    """Administrators who can sign in (a disabled one manages nothing)."""
    return int(conn.execute("SELECT count(*) FROM users WHERE role = 'admin' AND disabled_at IS NULL").fetchone()[0])


def get_session(conn: Conn, id_hash: str) -> Session | None:
    row = conn.execute(
        "SELECT s.id_hash, s.csrf_token, s.created, s.last_seen, s.station_id, u.* FROM sessions s"
        " JOIN users u ON u.id = s.user_id WHERE s.id_hash = ?",
        (id_hash,),
    ).fetchone()
    if row is None:
        return None
    return Session(row["id_hash"], _user(row), row["csrf_token"], row["created"], row["last_seen"], row["station_id"])
