"""An estate's bridge link as two centre instances on one PostgreSQL show it (in-process, a real Mosquitto): the
link went down (the bridge's retained ``0``) while one instance ran; an instance started ten minutes later, hearing the
retained state only then, shows the same "down since" as the first, the moment the first instance heard it go. A
change heard by both at once (their clocks ten minutes apart) shows one time on both: the first to store it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gateway.tooling.broker import MosquittoProcess
from portal.app import Options
from portal.store import Postgres
from tests.centre_support import in_process_config
from tests.portal_support import Device, add_user, devices, mqtt, running_portal, wait_for

GATEWAYS = [("s1", "gw1"), ("s2", "gw2")]
PW = "guard1-password-long"
TOPIC = "gatehouse/bridge/s2/state"


async def link_of(guard: Device) -> tuple[str, str | None]:
    r = await guard.get("/api/centre")
    assert r.status == 200, r.status
    [s2] = [e for e in (await r.json())["estates"] if e["site"] == "s2"]
    return str(s2["link"]), s2["link_since"]


async def test_link_down_since_is_when_it_went_down_on_every_instance(
    tmp_path: Path, broker: MosquittoProcess, pg_target: Postgres
) -> None:
    def config(name: str, first: Any = None) -> Path:
        return in_process_config(
            tmp_path / name, pg_target, first, broker=broker, gateways=GATEWAYS, client_id=f"centre-{name}"
        )

    # B starts ten minutes later (its clock says so; under the sessions' idle time, or it would end A's)
    later = Options(clock=lambda: time.time() + 600)
    async with running_portal(config("a"), last=False) as pa, mqtt(broker) as bridge, devices(pa) as at_a:
        await wait_for(lambda: pa.services.ingest.connected, what="A connected")
        await add_user(pa, "guard1", "guard", PW)
        await add_user(pa, "guard2", "guard", PW)  # one guard, one session: a console of its own at each instance
        guard_a = at_a()
        assert (await guard_a.sign_in("guard1", PW)).status == 303

        await bridge.publish(TOPIC, b"0", qos=1, retain=True)  # the bridge's last will on the centre's broker

        async def down_at(guard: Device) -> str | None:
            state, since = await link_of(guard)
            return since if state == "down" else None

        down_since = await wait_for(lambda: down_at(guard_a), what="A shows the link down")
        async with running_portal(config("b", pa), later) as pb, devices(pb) as at_b:
            guard_b = at_b()
            assert (await guard_b.sign_in("guard2", PW)).status == 303
            assert await wait_for(lambda: down_at(guard_b), what="B shows the link down") == down_since
            assert await link_of(guard_a) == ("down", down_since)

            # the bridge comes back and goes again, heard by both at once: one time on both, the first stored
            for payload, state in ((b"1", "up"), (b"0", "down")):
                await bridge.publish(TOPIC, payload, qos=1, retain=True)

                async def both(state: str = state) -> tuple[str, str | None] | None:
                    a, b = await link_of(guard_a), await link_of(guard_b)
                    return a if a == b and a[0] == state else None

                _, since = await wait_for(both, what=f"A and B show the link {state} since one time")
                assert since is not None and since > down_since
