"""Per-gateway sequence tracking: which seqs are stored, the gaps noticed and closed (pure; the writer keeps it)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from portal.store.engine import Conn


@dataclass(slots=True)
class GatewayState:
    """Per-gateway bookkeeping, owned by the writer thread; :meth:`snapshot` copies it for the loop."""

    site: str
    gateway: str
    contiguous_seq: int = 0
    max_seq: int = 0
    islands: list[list[int]] = field(default_factory=list)
    open_gaps: list[list[int]] = field(default_factory=list)
    gaps_noticed: int = 0
    gaps_closed: int = 0
    events_stored: int = 0
    last_event_at: str | None = None
    status: str = "unknown"
    status_ts: str | None = None
    status_changed_at: str | None = None
    version: str = ""

    def snapshot(self) -> GatewaySnapshot:
        return GatewaySnapshot(
            site=self.site,
            gateway=self.gateway,
            contiguous_seq=self.contiguous_seq,
            max_seq=self.max_seq,
            missing=tuple((lo, hi) for lo, hi in missing_ranges(self.contiguous_seq, self.islands)),
            open_gaps=tuple((lo, hi) for lo, hi in self.open_gaps),
            gaps_noticed=self.gaps_noticed,
            gaps_closed=self.gaps_closed,
            events_stored=self.events_stored,
            last_event_at=self.last_event_at,
            status=self.status,
            status_changed_at=self.status_changed_at,
            version=self.version,
        )

    def copy(self) -> GatewayState:
        return GatewayState(
            self.site,
            self.gateway,
            self.contiguous_seq,
            self.max_seq,
            [list(i) for i in self.islands],
            [list(g) for g in self.open_gaps],
            self.gaps_noticed,
            self.gaps_closed,
            self.events_stored,
            self.last_event_at,
            self.status,
            self.status_ts,
            self.status_changed_at,
            self.version,
        )


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    site: str
    gateway: str
    contiguous_seq: int
    max_seq: int
    missing: tuple[tuple[int, int], ...]
    open_gaps: tuple[tuple[int, int], ...]
    gaps_noticed: int
    gaps_closed: int
    events_stored: int
    last_event_at: str | None
    status: str
    status_changed_at: str | None
    version: str


def missing_ranges(contiguous: int, islands: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    out = []
    prev = contiguous
    for lo, hi in islands:
        if lo > prev + 1:
            out.append((prev + 1, lo - 1))
        prev = hi
    return out


def add_seq(st: GatewayState, seq: int) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """Record a newly stored seq. Returns (the gap it opened or None, the gaps it closed)."""
    opened: tuple[int, int] | None = None
    if seq > st.max_seq + 1:
        opened = (st.max_seq + 1, seq - 1)
        st.open_gaps.append([opened[0], opened[1]])
        st.gaps_noticed += 1
    st.max_seq = max(st.max_seq, seq)
    if seq <= st.contiguous_seq:
        return opened, []
    isl = st.islands
    i = bisect.bisect_left(isl, [seq, seq])
    if i > 0 and isl[i - 1][1] >= seq - 1:  # touches or overlaps the run before
        i -= 1
        isl[i][1] = max(isl[i][1], seq)
    else:
        isl.insert(i, [seq, seq])
    while i + 1 < len(isl) and isl[i + 1][0] <= isl[i][1] + 1:  # merge runs that now touch
        isl[i][1] = max(isl[i][1], isl.pop(i + 1)[1])
    while isl and isl[0][0] <= st.contiguous_seq + 1:
        st.contiguous_seq = max(st.contiguous_seq, isl.pop(0)[1])
    closed: list[tuple[int, int]] = []
    if st.open_gaps:
        holes = missing_ranges(st.contiguous_seq, isl)
        still = []
        for lo, hi in st.open_gaps:
            if any(h_lo <= hi and lo <= h_hi for h_lo, h_hi in holes):
                still.append([lo, hi])
            else:
                closed.append((lo, hi))
        st.open_gaps = still
        st.gaps_closed += len(closed)
    return opened, closed


def gateway_state(r: Any) -> GatewayState:
    """A ``gateways`` row as a :class:`GatewayState`."""
    return GatewayState(
        r["site"],
        r["gateway"],
        r["contiguous_seq"],
        r["max_seq"],
        json.loads(r["islands"]),
        json.loads(r["open_gaps"]),
        r["gaps_noticed"],
        r["gaps_closed"],
        r["events_stored"],
        r["last_event_at"],
        r["status"],
        r["status_ts"],
        r["status_changed_at"],
        r["version"],
    )


def load_gateways(conn: Conn) -> dict[tuple[str, str], GatewayState]:
    return {(r["site"], r["gateway"]): gateway_state(r) for r in conn.execute("SELECT * FROM gateways")}
