"""Guard stations: the guardroom PC the console runs on all night, and the shifts of the guards who sign on to it.

An administrator binds a browser to a station once, on the PC itself (``POST /stations``): the browser gets a
station cookie (random, HttpOnly, kept for years; only its SHA-256 is stored). A guard or administrator who signs
in from that browser gets a *station session*: bound to the cookie (the session cookie alone is worth nothing
elsewhere), it lasts a shift (``sessions.station_timeout_s``) however quiet the night is, where an ordinary
session ends after its idle timeout.

Each sign-on at a station is a shift (``station_shifts``). When another guard signs on, the shift on duty is handed
over in the same transaction: it ends with ``handover``, who took over, the handover note the new guard wrote
and the number of open incidents at that moment; the previous guard's station sessions end (their console
sockets close at the next beat). Signing out ends the shift with ``signout``. Every step is in the audit trail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from portal.store import Conn, Row, Session, User, audit, now_text
from portal.web.auth import STATION_COOKIE, hash_token
from portal.web.services import SERVICES

log = logging.getLogger("portal.stations")
STATION_ROLES = ("admin", "guard")
NOTE_MAX = 500
NAME_MAX = 40
COOKIE_AGE_S = 10 * 365 * 86400
SHIFTS_SHOWN = 100


@dataclass(frozen=True, slots=True)
class Station:
    id: int
    name: str


async def station_of(request: web.Request) -> Station | None:
    """The station this browser is bound to (a valid, unrevoked station cookie), if any."""
    token = request.cookies.get(STATION_COOKIE, "")
    if not token or len(token) > 100:
        return None
    h = hash_token(token)
    row = await request.app[SERVICES].store.read(
        lambda c: c.execute(
            "SELECT id, name FROM stations WHERE token_hash = ? AND revoked_at IS NULL", (h,)
        ).fetchone()
    )
    return Station(int(row["id"]), str(row["name"])) if row else None


def on_duty(conn: Conn, station_id: int) -> Row | None:
    return conn.execute(
        "SELECT * FROM station_shifts WHERE station_id = ? AND ended_at IS NULL ORDER BY id DESC LIMIT 1", (station_id,)
    ).fetchone()


def _open_count(conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) FROM incidents WHERE state != 'closed'").fetchone()[0])


def sign_on(station: Station, user: User, note: str, remote: str) -> Callable[[Conn], None]:
    """The shift bookkeeping of a sign-in at ``station`` (run inside the new session's transaction)."""
    text = " ".join(note.split())[:NOTE_MAX]

    def run(conn: Conn) -> None:
        now = now_text()
        open_now = _open_count(conn)
        current = on_duty(conn, station.id)
        actor = f"{user.role}:{user.name}"
        if current is not None and str(current["user_name"]).lower() == user.name.lower():
            audit.write(conn, actor, "station.signon", f"station:{station.name}", "same shift", remote)
            return  # the same guard signing in again carries on with the shift
        if current is not None:
            conn.execute(
                "UPDATE station_shifts SET ended_at = ?, ended_how = 'handover', handed_to = ?, note = ?,"
                " open_at_end = ? WHERE id = ?",
                (now, user.name, text, open_now, current["id"]),
            )
            conn.execute(
                "DELETE FROM sessions WHERE station_id = ? AND user_id IN (SELECT id FROM users WHERE name = ?)",
                (station.id, current["user_name"]),
            )
            audit.write(
                conn,
                actor,
                "station.handover",
                f"station:{station.name}",
                f"from {current['user_name']} to {user.name}; {open_now} open; {text}",
                remote,
            )
        else:
            audit.write(conn, actor, "station.signon", f"station:{station.name}", text, remote)
        conn.execute(
            "INSERT INTO station_shifts (station_id, user_name, started_at, open_at_start) VALUES (?, ?, ?, ?)",
            (station.id, user.name, now, open_now),
        )

    return run


def sign_off(session: Session) -> Callable[[Conn], None] | None:
    """End the signing-out guard's shift at their station (inside the sign-out's transaction)."""
    if session.station_id is None:
        return None
    sid, name = session.station_id, session.user.name

    def run(conn: Conn) -> None:
        conn.execute(
            "UPDATE station_shifts SET ended_at = ?, ended_how = 'signout', open_at_end = ?"
            " WHERE station_id = ? AND ended_at IS NULL AND user_name = ?",
            (now_text(), _open_count(conn), sid, name),
        )

    return run


async def login_context(request: web.Request) -> dict[str, Any]:
    """What the sign-in page shows at a station: its name and who is on duty (to hand over from)."""
    st = await station_of(request)
    if st is None:
        return {"station": None, "on_duty": None}
    row = await request.app[SERVICES].store.read(lambda c: on_duty(c, st.id))
    return {"station": st, "on_duty": row["user_name"] if row else None}
