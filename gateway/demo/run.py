"""The demo's start-up and shut-down: the broker, the simulated hardware, the portal with the estate seeded, the
gateway, then the scripted life; Ctrl-C (or SIGTERM) stops everything in reverse order."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import secrets
import signal
import socket
import sys
from pathlib import Path

from gateway.demo import banner, people
from gateway.demo.estate import DOORS, ELDER, INDOOR, OWNER, SITE, estate_csv, gateway_yaml, portal_yaml
from gateway.demo.life import Duties, Life, Stubs
from gateway.demo.proc import Proc
from gateway.tooling.broker import MosquittoProcess

log = logging.getLogger("gatehouse.demo")

GUARD, ADMIN = "guard", "office"


def _secret_file(path: Path, value: str | None = None) -> str:
    if not path.exists():
        path.write_text(value or secrets.token_urlsafe(12))
    path.chmod(0o600)
    return path.read_text().strip()


def _free_port(preferred: int = 0) -> int:
    """``preferred`` when nothing listens on it, else a port the system picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


async def run_demo(ns: argparse.Namespace, data: Path) -> int:
    py = sys.executable
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    broker: MosquittoProcess | None = None
    procs: list[Proc] = []
    tasks: list[asyncio.Task[None]] = []
    browsers: list[people.Browser] = []
    life: Life | None = None

    async def start(name: str, *args: str) -> dict[str, object]:
        p = Proc(name, [py, *args], logs / f"{name}.log")
        procs.append(p)
        return await p.start()

    try:
        if ns.broker:
            h, p = ns.broker.rsplit(":", 1)
            broker_addr = (h, int(p))
        else:
            broker = MosquittoProcess(data / "broker")
            await loop.run_in_executor(None, broker.start)
            broker_addr = (broker.host, broker.port)
        print(f"启动中 starting… broker mqtt://{broker_addr[0]}:{broker_addr[1]}", flush=True)

        port = ns.port or _free_port()  # the plates print the address, so it is known before the portal starts
        grid_key = data / "grid.key"
        _secret_file(grid_key, secrets.token_urlsafe(24))
        # The district's grid platform (a stub): it takes the estate's events, accepts, dispatches and closes them by
        # itself and calls the portal back with each status.
        grid = await start(
            "grid-stub",
            "-m",
            "firmware_stubs.grid_platform",
            "--key-file",
            str(grid_key),
            "--callback",
            f"http://127.0.0.1:{port}/api/grid/callback",
            "--auto",
            "--accept-after",
            "3",
            "--dispatch-after",
            "15",
            "--close-after",
            "90",
        )
        portal_cfg = portal_yaml(data / "portal.yaml", broker_addr, port, str(grid["url"]), grid_key)
        guard_pw = _secret_file(data / "guard.password")
        admin_pw = _secret_file(data / "office.password")
        resident_pw = _secret_file(data / "resident.password", "sunny-" + secrets.token_urlsafe(9))
        elder_pw = _secret_file(data / "elder.password", "sunny-" + secrets.token_urlsafe(9))

        async def seed() -> None:
            """The staff accounts and the estate, with the portal's own commands, on the first run only."""
            marker = data / "estate.imported"
            if marker.exists() and (data / "portal" / "portal.db").exists():
                return
            portal_py = [py, "-m", "portal"]

            async def adduser(user: str, role: str, password_file: str) -> None:
                await Proc(
                    f"adduser-{user}",
                    [
                        *portal_py,
                        "adduser",
                        "--config",
                        str(portal_cfg),
                        "--user",
                        user,
                        "--role",
                        role,
                        "--password-file",
                        str(data / password_file),
                    ],
                    logs / f"adduser-{user}.log",
                ).run(ok=b"exists")

            await adduser(GUARD, "guard", "guard.password")  # this one makes the store; then two at once
            csv = data / "estate.csv"
            csv.write_text(estate_csv(), encoding="utf-8")
            await asyncio.gather(
                adduser(ADMIN, "admin", "office.password"),
                Proc(
                    "import-estate",
                    [*portal_py, "import-estate", "--config", str(portal_cfg), str(csv)],
                    logs / "import-estate.log",
                ).run(),
            )
            marker.touch()

        ctl = ("--control", "127.0.0.1:0")
        fence, board, doors, readers, indoor, _ = await asyncio.gather(
            start(
                "perimeter-stub", "-m", "firmware_stubs.perimeter_panel", "--tcp", "127.0.0.1:0", "--zones", "8", *ctl
            ),
            start(
                "io-board-stub", "-m", "firmware_stubs.modbus_device", "--model", "io-8ch", "--tcp", "127.0.0.1:0", *ctl
            ),
            start(
                "door-stub",
                "-m",
                "firmware_stubs.door_controller",
                "--tcp",
                "127.0.0.1:0",
                "--units",
                f"1-{len(DOORS)}",
                *ctl,
            ),
            start(
                "reader-stub",
                "-m",
                "firmware_stubs.qr_reader",
                "--pty",
                "--addresses",
                ",".join(str(d.reader) for d in DOORS),
                *ctl,
            ),
            start("indoor-stub", "-m", "firmware_stubs.indoor_panel", "--pty", "--account", INDOOR[1], *ctl),
            seed(),
        )
        stubs = Stubs(
            perimeter=str(fence["control"]),
            board=str(board["control"]),
            doors=str(doors["control"]),
            readers=str(readers["control"]),
            indoor=str(indoor["control"]),
        )
        gw_cfg = gateway_yaml(
            data / "gateway.yaml",
            broker_addr,
            str(fence["modbus"]),
            str(board["modbus"]),
            str(doors["modbus"]),
            str(readers["serial"]),
            str(indoor["serial"]),
            _free_port(9880),
        )

        pinfo = await start("portal", "-m", "portal", "run", "--config", str(portal_cfg))
        url = str(pinfo["url"])
        db = data / "portal" / "portal.db"
        office = people.Browser(url)
        guard = people.Browser(url)
        owner = people.Browser(url)
        elder = people.Browser(url)
        browsers += [office, guard, owner, elder]

        async def office_work() -> tuple[str, str, str, list[str]]:
            """The office registers the doors, gives the owner and the elder their phone accounts, puts the elder's
            flat under care and sets up the patrol; the addresses of the owner's and the elder's house plates (from
            their phones), of his entrance's and of the checkpoints' (the portal's plate list for a sign maker)."""
            await office.staff_sign_in(ADMIN, admin_pw)
            await people.register_doors(office)
            await people.owner_account(url, office, db, resident_pw)
            await people.owner_account(url, office, db, elder_pw, ELDER)
            await people.enrol_care(office, db)
            await people.setup_patrol(office, db)
            await owner.phone_sign_in(OWNER.phone, resident_pw)
            await elder.phone_sign_in(ELDER.phone, elder_pw)
            rows = await Proc(
                "plate-urls",
                [py, "-m", "portal", "plates", "--config", str(portal_cfg), "--site", SITE, "--urls"],
                logs / "plate-urls.log",
            ).output()
            entrance, checkpoints = people.plate_urls(rows)
            return await people.house_plate(owner), entrance, await people.house_plate(elder), checkpoints

        # The gateway needs only its config and the portal's public key (made at the portal's first start).
        _, (plate_url, entrance_url, elder_plate, checkpoints) = await asyncio.gather(
            start("gateway", "-m", "gateway.cli", "gateway", "run", "--config", str(gw_cfg)), office_work()
        )
        print(
            banner.block(
                url=url,
                guard=(GUARD, guard_pw),
                admin=(ADMIN, admin_pw),
                resident_password=resident_pw,
                plate_url=plate_url,
                entrance_url=entrance_url,
                elder_password=elder_pw,
                grid_control=str(grid["control"]),
                logs=str(logs),
                every=ns.intruder_every,
            ),
            flush=True,
        )
        print(
            json.dumps(
                {
                    "ready": True,
                    "url": url,
                    "user": GUARD,
                    "password": guard_pw,
                    "admin": {"user": ADMIN, "password": admin_pw},
                    "resident": {"phone": OWNER.phone, "password": resident_pw},
                    "elder": {"phone": ELDER.phone, "password": elder_pw, "plate_url": elder_plate},
                    "checkpoints": checkpoints,
                    "plate_url": plate_url,
                    "entrance_url": entrance_url,
                    "stub_control": stubs.perimeter,
                    "stubs": {
                        "perimeter": stubs.perimeter,
                        "board": stubs.board,
                        "doors": stubs.doors,
                        "readers": stubs.readers,
                        "indoor": stubs.indoor,
                        "grid": str(grid["control"]),
                    },
                },
                ensure_ascii=False,
            ),
            flush=True,
        )

        await guard.staff_sign_in(GUARD, guard_pw)
        await people.wait_online(guard)
        await people.arm_perimeter(guard)
        duties = Duties(guard, checkpoints, elder, elder_plate.removeprefix(elder.origin))
        life = Life(
            stubs,
            data / "portal" / "pass_signing_key.pem",
            db,
            owner,
            plate_url.removeprefix(owner.origin),
            ns.intruder_every,
            duties,
            functools.partial(people.latest_visitor_pass, py, portal_cfg, logs / "visitor-pass.log"),
        )
        tasks.append(asyncio.create_task(life.run(stop), name="demo.life"))
        watch = [asyncio.create_task(p.proc.wait()) for p in procs if p.proc]  # a child that dies ends the demo
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*watch, stopper, *tasks], timeout=ns.duration, return_when=asyncio.FIRST_COMPLETED)
        for t in [*watch, stopper]:
            t.cancel()
        died = [p.name for p in procs if p.proc and p.proc.returncode is not None]
        if died:
            print(f"demo: {', '.join(died)} exited; stopping. See {logs}", file=sys.stderr)
            return 1
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            print(f"demo: the scripted life stopped: {failed[0].exception()!r}", file=sys.stderr)
            return 1
        return 0
    except RuntimeError as e:  # people.DemoError, or a child that failed
        print(f"demo: {e}. See {logs}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        print("停止中 stopping…", flush=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in browsers:
            await b.http.close()
        if life is not None:
            await life.close()

        async def stop_one(p: Proc) -> None:
            try:
                await p.stop()
            except Exception:
                log.exception("stopping %s failed", p.name)

        services = [p for p in procs if p.name in ("gateway", "portal")]
        for p in reversed(services):  # the gateway, then the portal; then the hardware, all at once
            await stop_one(p)
        await asyncio.gather(*(stop_one(p) for p in procs if p not in services))
        if broker is not None:
            await loop.run_in_executor(None, broker.stop)
        with contextlib.suppress(Exception):
            print("已停止 stopped.", flush=True)
