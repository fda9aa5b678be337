"""Commands from the portal, judged before anything is carried out: signature, target, life and replay.

A command arrives as the signed envelope of :mod:`gateway.wire.commands`. :meth:`CommandGuard.admit`
returns the verified :class:`gateway.wire.Command`, or a :class:`Refusal`:

==============  ========  =====================================================================
reason          priority  what it means
==============  ========  =====================================================================
unsigned        TAMPER    a bare v1 command: someone (or an old portal) wrote the command topic
malformed       TAMPER    not JSON, or not a command envelope at all
schema          TAMPER    a command envelope with wrong fields
bad-version     TAMPER    a command version this gateway does not speak
too-large       TAMPER    over the wire contract's payload limit
unknown-key     TAMPER    signed with a key this gateway does not hold
bad-signature   TAMPER    the signature does not match (forged, or altered on the way)
wrong-gateway   TAMPER    correctly signed, but for another site or gateway (replayed from there)
too-long        TAMPER    correctly signed, but valid longer than MAX_COMMAND_LIFE_S
replayed        ROUTINE   correctly signed and already carried out (a broker's re-delivery, or a copy)
==============  ========  =====================================================================

Each refusal becomes a ``command.rejected`` event. So that a flood of forgeries cannot fill the SD card,
refusals are folded per reason: the first one is reported at once (``count`` 1), later ones within
``fold_s`` are counted and reported together when that window ends (``count`` n, ``folded`` true). An
expired command is authentic and is answered by the caller with a ``command.result`` (ok false).

Replay: a command's ``id`` is its nonce. It is recorded durably (the store's ``commands_seen``, kept for
the store's retention, at least a day: longer than any command may live) before the command runs, and
in memory as well, so a copy is refused even while the store cannot write.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gateway import wire
from gateway.events import Draft

if TYPE_CHECKING:  # the verifier (libsodium, ~1 MB) is loaded with the first command, not at start
    from gateway.wire.passes import VerifyingKey

log = logging.getLogger(__name__)

FOLD_S = 60.0
REMEMBER_MAX = 4096  # ids kept in memory besides the store (commands live an hour at most)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    detail: str
    claimed: dict[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> int:
        return int(wire.Priority.ROUTINE if self.reason == "replayed" else wire.Priority.TAMPER)


@dataclass(slots=True)
class _Fold:
    until: float  # monotonic end of the window
    count: int = 0  # refusals since the last report
    last: Refusal | None = None


class CommandGuard:
    """Verifies commands for ``site``/``gateway`` with the portal's public keys: a ``{kid: key}`` mapping, or a
    function that loads it (called at the first command, so a gateway that is never commanded never loads
    cryptography; if it raises, every command is refused as ``unknown-key``).

    ``seen(id, ts)`` records an id durably and says whether it was recorded before
    (:meth:`gateway.store.Store.seen_command`)."""

    def __init__(
        self,
        site: str,
        gateway: str,
        public_keys: Mapping[str, VerifyingKey] | Callable[[], Mapping[str, VerifyingKey]],
        *,
        seen: Callable[[str, datetime], Awaitable[bool]],
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        fold_s: float = FOLD_S,
    ) -> None:
        self._site = site
        self._gateway = gateway
        self._load_keys = public_keys if callable(public_keys) else None
        self._keys: dict[str, VerifyingKey] | None = None if callable(public_keys) else dict(public_keys)
        self._seen = seen
        self._wall = wall
        self._mono = mono
        self.fold_s = fold_s
        self._recent: OrderedDict[str, float] = OrderedDict()  # id -> expires (unix)
        self._folds: dict[str, _Fold] = {}
        #: Refusals by reason since start (for /status and /metrics).
        self.refused: dict[str, int] = {}

    def _keyring(self) -> dict[str, VerifyingKey]:
        if self._keys is None:
            assert self._load_keys is not None
            try:
                self._keys = dict(self._load_keys())
            except (OSError, ValueError) as e:  # KeyFileError is a ValueError
                log.error("the portal's public key cannot be loaded (%s): every command will be refused", e)
                self._keys = {}
            if not self._keys:
                log.warning("no portal public key (access.public_keys): every command will be refused")
        return self._keys

    async def admit(self, payload: bytes) -> wire.Command | Refusal:
        """The verified command, or why it is refused. Never raises for bad input."""
        from gateway.wire.commands import open_command, peek_command

        try:
            cmd = open_command(payload, self._keyring(), site=self._site, gateway=self._gateway)
        except wire.WireError as e:
            return self._refused(Refusal(e.reason, e.detail[:300], peek_command(payload)))
        claimed = {"id": cmd.id, "type": cmd.type, "by": cmd.by[:64]}
        if cmd.id in self._recent or await self._seen(cmd.id, cmd.ts):
            return self._refused(Refusal("replayed", "already carried out", claimed))
        self._remember(cmd.id, cmd.expires.timestamp())
        return cmd

    def _refused(self, r: Refusal) -> Refusal:
        self.refused[r.reason] = self.refused.get(r.reason, 0) + 1
        return r

    def _remember(self, cid: str, expires: float) -> None:
        self._recent[cid] = expires
        now = self._wall()
        while self._recent:
            oldest_id, oldest_exp = next(iter(self._recent.items()))
            if len(self._recent) <= REMEMBER_MAX and oldest_exp >= now - wire.MAX_COMMAND_LIFE_S:
                break
            del self._recent[oldest_id]

    # ------------------------------------------------------------ reporting

    def report(self, r: Refusal) -> list[Draft]:
        """The events to store for a refusal now: one for the first of a window, none for the rest."""
        now = self._mono()
        fold = self._folds.get(r.reason)
        if fold is not None and now < fold.until:
            fold.count += 1
            fold.last = r
            return []
        out = []
        if fold is not None and fold.count:  # a window that ended without being flushed
            out.append(self._draft(fold.last or r, fold.count, folded=True))
        self._folds[r.reason] = _Fold(until=now + self.fold_s)
        if r.priority >= wire.Priority.TAMPER:
            log.warning("command refused (%s): %s %s", r.reason, r.detail, r.claimed)
        else:
            log.info("command refused (%s): %s %s", r.reason, r.detail, r.claimed)
        return [*out, self._draft(r, 1, folded=False)]

    def next_flush(self) -> float | None:
        """The monotonic time at which :meth:`flush` has a folded count to report."""
        due = [f.until for f in self._folds.values() if f.count]
        return min(due) if due else None

    def flush(self) -> list[Draft]:
        """One event for each window that has ended with refusals still unreported."""
        now = self._mono()
        out: list[Draft] = []
        for reason, fold in list(self._folds.items()):
            if now >= fold.until:
                if fold.count and fold.last is not None:
                    out.append(self._draft(fold.last, fold.count, folded=True))
                del self._folds[reason]
        return out

    def _draft(self, r: Refusal, count: int, *, folded: bool) -> Draft:
        data: dict[str, Any] = {"reason": r.reason, "detail": r.detail, "count": count}
        if folded:
            data["folded"] = True
            data["window_s"] = self.fold_s
        for k, v in r.claimed.items():
            data[{"id": "command_id", "type": "command"}.get(k, k)] = v
        return Draft(
            type="command.rejected", device="gateway", place=wire.Place(site=self._site), priority=r.priority, data=data
        )
