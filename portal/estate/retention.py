"""Data retention: security logs are kept at least six months, personal data goes when its purpose has ended.

:func:`purge` applies a :class:`Policy` (the config's ``retention`` section, docs/retention.md) to a store in bounded
chunks: each chunk selects at most ``chunk_rows`` rows past a cursor and deletes or anonymises them in one short
transaction, so the portal's writer (or anyone else) never waits long for the write lock. The portal runs it daily
on its store's writer (:func:`daily`); ``python -m portal purge`` runs it on demand (:func:`cli`). Each run writes
one ``retention.purge`` audit row with its counts, which is also what lets the audit chain's start move forward
verifiably (:mod:`portal.store.audit`). A dry run selects the same rows and changes nothing.

What stays consistent: a former resident's people row is anonymised, not deleted, so residencies, passes and the
access log still point at a row ("former resident"); an event is kept while its access-log row is; the newest row of
a table with reused row ids (events per gateway, incidents, visitors, passes) is never deleted, so no id comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from portal.config import SECURITY_LOG_KEYS, SECURITY_LOG_MIN_DAYS, PortalConfig
from portal.estate import registry as reg
from portal.store import (
    SCHEMA_VERSION,
    Conn,
    Postgres,
    Store,
    StoreError,
    audit,
    connect,
    db,
    open_db,
    schema_version,
    ts_text,
)
from portal.store.storekey import StoreKeyError

log = logging.getLogger("portal.retention")

SYSTEM_ACTOR = "system:retention"
FORMER_RESIDENT = "前住户 (former resident)"  # what a purged person's name reads everywhere it is shown
DAY_S = 86_400
MAX_PAUSE_S = 1.0
# resident phone sessions (portal/estate/service.py: RESIDENT_IDLE_S, RESIDENT_ABSOLUTE_S); kept here so the purge does
# not pull in the web stack
RESIDENT_IDLE_S = 14 * DAY_S
RESIDENT_ABSOLUTE_S = 30 * DAY_S
COUNT_KEYS = (
    "sessions",
    "resident_sessions",
    "signin_codes",
    "former_residents",
    "work_items",
    "visitor_names",
    "guard_visitors",
    "visitor_passes",
    "access_log",
    "events",
    "incident_log",
    "incidents",
    "door_commands",
    "console_commands",
    "care_contacts",
    "care_alerts",
    "patrol_visits",
    "patrol_scans",
    "patrol_rounds",
    "audit",
)


@dataclass(frozen=True, slots=True)
class Policy:
    """Days are counted back from the run's ``now``. Security logs below six months are refused here too, so no
    caller can ask for less than the config allows."""

    audit_days: int = 365
    access_log_days: int = 365
    events_days: int = 365
    incidents_days: int = 365
    commands_days: int = 365
    former_residents_days: int = 30
    visitors_days: int = 30
    work_items_days: int = 90
    session_idle_s: int = 30 * 60
    session_absolute_s: int = 12 * 3600
    timezone: str = "Asia/Shanghai"  # move-out dates are site-local days
    chunk_rows: int = 2000

    def __post_init__(self) -> None:
        for k in SECURITY_LOG_KEYS:
            if getattr(self, k) < SECURITY_LOG_MIN_DAYS:
                raise ValueError(
                    f"{k} is {getattr(self, k)}: security logs are kept at least {SECURITY_LOG_MIN_DAYS} days"
                )
        if self.chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")

    @classmethod
    def from_config(cls, cfg: PortalConfig) -> Policy:
        r = cfg.retention
        return cls(
            audit_days=r.audit_days,
            access_log_days=r.access_log_days,
            events_days=r.events_days,
            incidents_days=r.incidents_days,
            commands_days=r.commands_days,
            former_residents_days=r.former_residents_days,
            visitors_days=r.visitors_days,
            work_items_days=r.work_items_days,
            session_idle_s=cfg.sessions.idle_timeout_s,
            session_absolute_s=cfg.sessions.absolute_timeout_s,
            timezone=cfg.timezone,
            chunk_rows=r.chunk_rows,
        )


@dataclass(slots=True)
class Report:
    counts: dict[str, int]  # rows deleted or anonymised per kind (a dry run: that would be)
    dry_run: bool
    transactions: int = 0  # chunks run (write transactions unless a dry run)
    longest_chunk_s: float = 0.0
    seconds: float = 0.0
    audit_id: int | None = None  # the retention.purge audit row

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------- steps: one cursor over one table each


class _Range:
    """Rows of ``table`` with ``key < cut`` (and ``where``), walked in (key, ident) order past a cursor, then deleted
    (``set_`` empty) or updated with ``set_``. Without ``key`` the walk is by ``ident`` alone."""

    def __init__(
        self,
        name: str,
        table: str,
        ident: str,
        *,
        key: str = "",
        cut: Any = None,
        where: str = "",
        args: Sequence[Any] = (),
        set_: str = "",
        keep_top: bool = False,
    ) -> None:
        self.name, self.table, self.ident, self.key, self.cut = name, table, ident, key, cut
        self.where, self.args, self.set_, self.keep_top = where, tuple(args), set_, keep_top
        self.cursor: tuple[Any, Any] | None = None
        self.top: Any = None

    def select(self) -> str:
        return f"{self.key}, {self.ident}" if self.key else f"NULL, {self.ident}"

    def collect(self, conn: Conn, limit: int) -> tuple[list[Any], bool]:
        t, k, i = self.table, self.key, self.ident
        conds: list[str] = []
        args: list[Any] = []
        if k:
            conds.append(f"{k} < ?")
            args.append(self.cut)
        if self.cursor is not None:
            if k:
                conds.append(f"{k} >= ? AND ({k} > ? OR {i} > ?)")
                args += [self.cursor[0], self.cursor[0], self.cursor[1]]
            else:
                conds.append(f"{i} > ?")
                args.append(self.cursor[1])
        if self.where:
            conds.append(f"({self.where})")
            args += self.args
        order = f"{k}, {i}" if k else i
        rows = conn.execute(
            f"SELECT {self.select()} FROM {t} WHERE {' AND '.join(conds) or 'TRUE'} ORDER BY {order} LIMIT ?",
            (*args, limit),
        ).fetchall()
        if rows:
            self.cursor = (rows[-1][0], rows[-1][1])
        if self.keep_top and self.top is None:
            self.top = conn.execute(f"SELECT max({i}) FROM {t}").fetchone()[0]
        return self.pick(conn, rows), len(rows) == limit

    def pick(self, conn: Conn, rows: list[Any]) -> list[Any]:
        return [r[1] for r in rows if not (self.keep_top and r[1] == self.top)]

    def apply(self, conn: Conn, ids: list[Any], now: str) -> int:
        inside = db.in_values(conn, self.ident)
        if self.set_:
            return conn.execute(f"UPDATE {self.table} SET {self.set_} WHERE {inside}", (db.values(conn, ids),)).rowcount
        return conn.execute(f"DELETE FROM {self.table} WHERE {inside}", (db.values(conn, ids),)).rowcount


class _Events(_Range):
    """Events, except each gateway's newest (the portal numbers its own events from it; a gateway's seq bookkeeping
    stays readable) and those whose access-log row is still kept."""

    def __init__(self, cut: str, access_cut: str) -> None:
        super().__init__(
            "events",
            "events",
            "pk",
            key="ts",
            cut=cut,
            keep_top=True,
            args=(access_cut,),
            where="NOT EXISTS (SELECT 1 FROM access_log a WHERE a.event_pk = events.pk AND a.ts >= ?)",
        )
        self.newest: dict[tuple[str, str], int] = {}

    def select(self) -> str:
        return "ts, pk, site, gateway"

    def pick(self, conn: Conn, rows: list[Any]) -> list[Any]:
        for r in rows:
            g = (r[2], r[3])
            if g not in self.newest:
                self.newest[g] = conn.execute(
                    "SELECT pk FROM events WHERE site = ? AND gateway = ? ORDER BY seq DESC LIMIT 1", g
                ).fetchone()[0]
        keep = set(self.newest.values())
        return [pk for pk in super().pick(conn, rows) if pk not in keep]


class _Incidents(_Range):
    """Closed incidents; deleted only once their step log is gone (the incident_log step runs first)."""

    def apply(self, conn: Conn, ids: list[Any], now: str) -> int:
        return conn.execute(
            f"DELETE FROM incidents WHERE {db.in_values(conn, 'id')} AND NOT EXISTS"
            " (SELECT 1 FROM incident_log l WHERE l.incident_id = incidents.id)",
            (db.values(conn, ids),),
        ).rowcount


class _IncidentLog(_Range):
    """The step logs of the incidents :class:`_Incidents` will delete, walked by (incident, log id)."""

    def __init__(self, cut: str) -> None:
        super().__init__("incident_log", "incident_log", "id")
        self.inc_cut = cut

    def collect(self, conn: Conn, limit: int) -> tuple[list[Any], bool]:
        if self.top is None:
            self.top = conn.execute("SELECT coalesce(max(id), 0) FROM incidents").fetchone()[0]
        c = self.cursor or (-1, -1)
        rows = conn.execute(
            "SELECT l.incident_id, l.id FROM incidents i JOIN incident_log l ON l.incident_id = i.id"
            " WHERE i.created_at < ? AND i.state = 'closed' AND i.closed_at < ? AND i.id < ?"
            " AND i.id >= ? AND (i.id > ? OR l.id > ?) ORDER BY l.incident_id, l.id LIMIT ?",
            (self.inc_cut, self.inc_cut, self.top, c[0], c[0], c[1], limit),
        ).fetchall()
        if rows:
            self.cursor = (rows[-1][0], rows[-1][1])
        return [r[1] for r in rows], len(rows) == limit


class _FormerResidents(_Range):
    """People none of whose residencies is current or pending, the last of which ended ``days`` ago or more:
    name and phone replaced, password and sign-in code dropped, phone sessions ended. Their residency rows stay."""

    def __init__(self, last_day: str) -> None:
        super().__init__("former_residents", "reg_people", "id", where="purged_at IS NULL")
        self.last_day = last_day  # the latest end day that is purged (site-local)

    def pick(self, conn: Conn, rows: list[Any]) -> list[Any]:
        people = [r[1] for r in rows]
        ends: dict[int, list[str | None]] = defaultdict(list)
        for r in conn.execute(
            "SELECT person_id, status, move_out, role, lease_end, decided_at FROM reg_residents"
            f" WHERE {db.in_values(conn, 'person_id')}",
            (db.values(conn, people),),
        ):
            ends[int(r[0])].append(self._ended(r[1], r[2], r[3], r[4], r[5]))
        return [p for p in people if ends.get(p) and all(d is not None and d <= self.last_day for d in ends[p])]

    def _ended(
        self, status: str, move_out: str | None, role: str, lease_end: str | None, decided_at: str | None
    ) -> str | None:
        """The day a residency ended, or None while it is current or pending."""
        if status == "rejected":
            return decided_at[:10] if decided_at else None
        # has_ended on the purge's own last day would miss a move-out after it; ended_on is the real day
        if status == "inactive" or (status == "active" and (move_out or (role == "tenant" and lease_end))):
            day = reg.ended_on(status, move_out, role, lease_end, decided_at)
            return day if day != "9999-12-31" else None
        return None

    def apply(self, conn: Conn, ids: list[Any], now: str) -> int:
        conn.execute(f"DELETE FROM resident_sessions WHERE {db.in_values(conn, 'person_id')}", (db.values(conn, ids),))
        return conn.execute(
            "UPDATE reg_people SET name = ?, phone = 'purged:' || id, password_hash = NULL, otc_hash = NULL,"
            f" otc_expires = NULL, purged_at = ? WHERE purged_at IS NULL AND {db.in_values(conn, 'id')}",
            (FORMER_RESIDENT, now, db.values(conn, ids)),
        ).rowcount


class _WorkItems(_Range):
    """Finished help calls and problem reports: the resident's text and photo and the notes' free text go; the
    workflow (who, when, which status) stays for the reports."""

    # whether a row's notes hold any free text (or anything but a list of objects), in each engine's JSON
    NOTES_TEXT: ClassVar[dict[str, str]] = {
        db.SQLITE: "NOT json_valid(notes) OR EXISTS (SELECT 1 FROM json_each(notes) n"
        " WHERE json_type(n.value) != 'object' OR coalesce(json_extract(n.value, '$.note'), '') != '')",
        db.POSTGRESQL: "jsonb_typeof(notes::jsonb) != 'array' OR EXISTS (SELECT 1 FROM jsonb_array_elements("
        "notes::jsonb) n WHERE jsonb_typeof(n) != 'object' OR coalesce(n ->> 'note', '') != '')",
    }

    def __init__(self, cut: str) -> None:
        super().__init__("work_items", "work_items", "id", args=(cut,))
        self.cut = cut

    def collect(self, conn: Conn, limit: int) -> tuple[list[Any], bool]:
        self.where = (
            "status IN ('resolved', 'closed') AND updated_at < ? AND (text != '' OR photo IS NOT NULL"
            f" OR photo_type IS NOT NULL OR {self.NOTES_TEXT[db.dialect_of(conn)]})"
        )
        return super().collect(conn, limit)

    def apply(self, conn: Conn, ids: list[Any], now: str) -> int:
        n = 0
        for wid, notes in conn.execute(
            f"SELECT id, notes FROM work_items WHERE {db.in_values(conn, 'id')}", (db.values(conn, ids),)
        ).fetchall():
            try:
                steps = json.loads(notes)
            except ValueError:
                steps = []
            kept = (
                [{**s, "note": ""} if "note" in s else s for s in steps if isinstance(s, dict)]
                if isinstance(steps, list)
                else []
            )
            n += conn.execute(
                "UPDATE work_items SET text = '', photo = NULL, photo_type = NULL, notes = ? WHERE id = ?",
                (json.dumps(kept, ensure_ascii=False), wid),
            ).rowcount
        return n


class _CareContacts(_Range):
    """Households no longer under care, ``former_residents_days`` after the end: the contact's name and number and
    who was cared for go; the consent (who gave it, how, when) and the alerts' history stay."""

    def __init__(self, cut: str) -> None:
        super().__init__(
            "care_contacts",
            "care_households",
            "id",
            key="ended_at",
            cut=cut,
            where="status = 'ended' AND (contact_phone != '' OR EXISTS (SELECT 1 FROM care_people p"
            " WHERE p.care_id = care_households.id))",
        )

    def apply(self, conn: Conn, ids: list[Any], now: str) -> int:
        conn.execute(f"DELETE FROM care_people WHERE {db.in_values(conn, 'care_id')}", (db.values(conn, ids),))
        return conn.execute(
            "UPDATE care_households SET contact_name = '', contact_relation = '', contact_phone = '',"
            f" last_activity = '' WHERE {db.in_values(conn, 'id')}",
            (db.values(conn, ids),),
        ).rowcount


# ---------------------------------------------------------------- one run


Chunk = Callable[[Conn], Any]


class _Run:
    def __init__(self, policy: Policy, now: datetime, *, dry_run: bool, actor: str) -> None:
        if now.tzinfo is None:
            raise ValueError("now must carry a time zone")
        self.policy, self.now, self.dry_run, self.actor = policy, now.astimezone(UTC), dry_run, actor
        self.report = Report({k: 0 for k in COUNT_KEYS}, dry_run)

    def ago(self, days: int) -> str:
        return ts_text(self.now - timedelta(days=days))

    def steps(self) -> list[_Range]:
        p, now_s = self.policy, self.now.timestamp()
        today = self.now.astimezone(ZoneInfo(p.timezone)).date()
        visitors_cut = int(now_s) - p.visitors_days * DAY_S
        passes_cut = int(now_s) - p.access_log_days * DAY_S
        return [
            _Range(
                "sessions",
                "sessions",
                "id_hash",
                where="created < ? OR last_seen < ?",
                args=(now_s - p.session_absolute_s, now_s - p.session_idle_s),
            ),
            _Range(
                "resident_sessions",
                "resident_sessions",
                "id_hash",
                where="created < ? OR last_seen < ?",
                args=(now_s - RESIDENT_ABSOLUTE_S, now_s - RESIDENT_IDLE_S),
            ),
            _Range(
                "signin_codes",
                "reg_people",
                "id",
                where="otc_expires < ?",
                args=(now_s,),
                set_="otc_hash = NULL, otc_expires = NULL",
            ),
            _FormerResidents((today - timedelta(days=p.former_residents_days)).isoformat()),
            _WorkItems(self.ago(p.work_items_days)),
            _Range(
                "visitor_names",
                "guard_visitors",
                "id",
                key="not_after",
                cut=visitors_cut,
                where="name != '' OR note != ''",
                set_="name = '', note = ''",
            ),
            _Range("guard_visitors", "guard_visitors", "id", key="not_after", cut=passes_cut, keep_top=True),
            _Range("visitor_passes", "visitor_passes", "id", key="not_after", cut=passes_cut, keep_top=True),
            _Range("access_log", "access_log", "event_pk", key="ts", cut=self.ago(p.access_log_days)),
            _Events(self.ago(p.events_days), self.ago(p.access_log_days)),
            _IncidentLog(self.ago(p.incidents_days)),
            _Incidents(
                "incidents",
                "incidents",
                "id",
                key="created_at",
                cut=self.ago(p.incidents_days),
                keep_top=True,
                where="state = 'closed' AND closed_at < ?",
                args=(self.ago(p.incidents_days),),
            ),
            _Range("door_commands", "door_commands", "id", key="sent_at", cut=self.ago(p.commands_days)),
            _Range("console_commands", "console_commands", "id", key="sent_at", cut=self.ago(p.commands_days)),
            # care (portal/care): an ended household's contact like a former resident's; alerts with their incidents
            _CareContacts(self.ago(p.former_residents_days)),
            _Range(
                "care_alerts",
                "care_alerts",
                "id",
                key="raised_at",
                cut=self.ago(p.incidents_days),
                where="NOT EXISTS (SELECT 1 FROM incident_keys k JOIN incidents i ON i.id = k.incident_id"
                " WHERE k.key = care_alerts.incident_key AND i.state != 'closed')",
            ),
            # patrols (portal/patrol): security logs like the access log (a scan's visits first, then the scan; a
            # round once no visit names it)
            _Range("patrol_visits", "patrol_visits", "scan_id", key="at", cut=self.ago(p.access_log_days)),
            _Range(
                "patrol_scans",
                "patrol_scans",
                "id",
                key="at",
                cut=self.ago(p.access_log_days),
                where="NOT EXISTS (SELECT 1 FROM patrol_visits v WHERE v.scan_id = patrol_scans.id)",
            ),
            _Range(
                "patrol_rounds",
                "patrol_rounds",
                "(route_id || '|' || round_at)",
                key="late_at",
                cut=self.ago(p.access_log_days),
                where="NOT EXISTS (SELECT 1 FROM patrol_visits v WHERE v.route_id = patrol_rounds.route_id"
                " AND v.round_at = patrol_rounds.round_at)",
            ),
        ]

    def detail(self, audit_rows: int) -> str:
        return json.dumps({**self.report.counts, "audit": audit_rows}, separators=(",", ":"))

    def script(self) -> Generator[Chunk, Any, None]:
        """The run as a sequence of chunks, each for one transaction; the driver sends each one's result back."""
        limit, nowt = self.policy.chunk_rows, ts_text(self.now)
        for step in self.steps():
            while True:

                def chunk(conn: Conn, step: _Range = step) -> tuple[int, bool]:
                    ids, more = step.collect(conn, limit)
                    if self.dry_run or not ids:
                        return len(ids), more
                    return step.apply(conn, ids, nowt), more

                n, more = yield chunk
                self.report.counts[step.name] += n
                if not more:
                    break
        before = self.ago(self.policy.audit_days)
        if self.dry_run:
            self.report.counts["audit"] = yield lambda c: audit.plan(c, before).pruned - audit.epoch(c).pruned
            return
        upto, planned, self.report.audit_id = yield lambda c: audit.claim(c, self.actor, before, self.detail)
        while planned > 0:
            n = yield lambda c: audit.prune(c, upto, limit)
            self.report.counts["audit"] += n
            if n < limit:
                break


def _timed(fn: Chunk, report: Report) -> Chunk:
    def run(conn: Conn) -> Any:
        t0 = time.monotonic()
        try:
            return fn(conn)
        finally:
            report.transactions += 1
            report.longest_chunk_s = max(report.longest_chunk_s, time.monotonic() - t0)

    return run


def purge(conn: Conn, policy: Policy, now: datetime, *, dry_run: bool = False, actor: str = SYSTEM_ACTOR) -> Report:
    """Apply ``policy`` as of ``now`` on a migrated connection in autocommit mode (:func:`portal.store.connect`),
    one ``BEGIN IMMEDIATE`` transaction per chunk, each followed by a pause as long as itself (a dry run: read
    transactions, rolled back)."""
    run = _Run(policy, now, dry_run=dry_run, actor=actor)
    t0 = time.monotonic()
    gen = run.script()
    try:
        fn = next(gen)
        while True:
            t1 = time.monotonic()
            if dry_run:
                db.begin_read(conn)
            else:
                conn.begin()
            try:
                result = _timed(fn, run.report)(conn)
                conn.execute("ROLLBACK" if dry_run else "COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if not dry_run:
                # Other connections (the running portal's writer) wait in SQLite's busy handler, which polls at up
                # to 100 ms intervals: leave the lock free as long as the chunk held it, or they may never get in.
                time.sleep(min(time.monotonic() - t1, MAX_PAUSE_S))
            fn = gen.send(result)
    except StopIteration:
        pass
    run.report.seconds = time.monotonic() - t0
    return run.report


async def purge_store(
    store: Store, policy: Policy, now: datetime, *, dry_run: bool = False, actor: str = SYSTEM_ACTOR
) -> Report:
    """:func:`purge` through a running store: each chunk is one op on its writer (a dry run: on its reader), so
    the ingest's and the web's writes take turns with the purge's chunks."""
    run = _Run(policy, now, dry_run=dry_run, actor=actor)
    t0 = time.monotonic()
    gen = run.script()
    try:
        fn = next(gen)
        while True:
            timed = _timed(fn, run.report)
            result = await (store.read(timed) if dry_run else store.run_write(timed))
            fn = gen.send(result)
    except StopIteration:
        pass
    run.report.seconds = time.monotonic() - t0
    return run.report


async def daily(
    store: Store,
    policy: Policy,
    *,
    start_delay_s: float,
    period_s: float = DAY_S,
    wall: Callable[[], float] = time.time,
) -> None:
    """The portal's task: a purge ``start_delay_s`` after start-up, then every ``period_s``; a failed run is
    logged and tried again at the next."""
    await asyncio.sleep(start_delay_s)
    while True:
        try:
            rep = await purge_store(store, policy, datetime.fromtimestamp(wall(), UTC))
            done = {k: v for k, v in rep.counts.items() if v}
            log.info("retention purge: %s in %d chunks, %.1f s", done or "nothing due", rep.transactions, rep.seconds)
        except Exception:
            log.exception("retention purge failed")
        await asyncio.sleep(period_s)


# ---------------------------------------------------------------- python -m portal purge

# What fails the command (mypy cannot read a starred except clause).
_PURGE_FAILED: tuple[type[Exception], ...] = (*db.Error, OSError, ValueError, StoreError, StoreKeyError)


def cli(cfg: PortalConfig, *, dry_run: bool) -> int:
    """Exit 0 with the report as JSON; 2 when there is no store; 1 when the purge failed (nothing half-done: every
    chunk is whole, and the next run goes on from there)."""
    from portal.estate.registry_cli import cli_actor

    target = cfg.store_target
    if not isinstance(target, Postgres) and not target.exists():
        print(f"purge: no store at {target} (has the portal run with {cfg.source}?)", file=sys.stderr)
        return 2
    try:
        policy = Policy.from_config(cfg)
        if dry_run:  # read only: not even a schema migration
            conn = connect(target, readonly=True)
            version = schema_version(conn)
            if version != SCHEMA_VERSION:
                conn.close()
                print(
                    f"purge: the store is at schema {version}, this portal at {SCHEMA_VERSION}: run the portal"
                    " (or purge without --dry-run) once to migrate it",
                    file=sys.stderr,
                )
                return 1
        else:
            conn = open_db(target, cfg.store_key())  # the purge writes a retention.purge row to the chain
        try:
            rep = purge(conn, policy, datetime.now(UTC), dry_run=dry_run, actor=cli_actor())
        finally:
            conn.close()
    except _PURGE_FAILED as e:
        print(f"purge: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rep.as_dict(), ensure_ascii=False))
    return 0
