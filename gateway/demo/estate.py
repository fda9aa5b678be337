"""The demo's estate, 阳光花园: who lives where, which doors and zones there are, and the two config files
that describe it to the gateway and the portal. Data only; the hardware's specifics stay in the device
profiles the gateway config names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SITE, GATEWAY = "demo", "gw1"
SITE_NAME = "阳光花园"

#: perimeter-panel zones: (zone name, label)
ZONES = [
    ("north-fence", "北围墙"),
    ("east-fence", "东围墙"),
    ("south-gate", "南门"),
    ("west-fence", "西围墙"),
    ("car-park", "停车场"),
    ("garden", "中心花园"),
    ("b3-roof", "3幢屋顶"),
    ("river-side", "河边步道"),
]
#: the infrared beam on input 1 of the Waveshare IO board
BEAM = ("north-beam", "北区红外对射")


@dataclass(frozen=True)
class Door:
    name: str
    label: str
    unit_id: int  # the controller's Modbus unit id on the door bus (one controller per door)
    reader: int  # the QR reader's address on the shared RS-485 reader line
    building: str | None = None
    unit: str | None = None

    @property
    def gate(self) -> bool:
        return self.building is None


DOORS = [
    Door("main-gate", "南大门", 1, 1),
    Door("b1u1", "1幢1单元门", 2, 2, "1", "1"),
    Door("b2u1", "2幢1单元门", 3, 3, "2", "1"),
]


@dataclass(frozen=True)
class Person:
    building: str
    unit: str
    house: str
    name: str
    phone: str
    role: str  # owner, family, tenant
    move_in: str
    lease_end: str = ""


#: 张伟 owns 1幢1单元101 and lives there with his household; he is the demo's phone sign-in.
PEOPLE = [
    Person("1", "1", "101", "张伟", "13800000001", "owner", "2019-05-01"),
    Person("1", "1", "101", "李娜", "13800000002", "family", "2019-05-01"),
    Person("1", "1", "101", "张小雨", "13800000003", "family", "2019-05-01"),
    Person("1", "1", "102", "王芳", "13800000004", "tenant", "2025-03-01", "2027-02-28"),
    Person("1", "1", "201", "赵磊", "13800000005", "owner", "2020-09-15"),
    Person("2", "1", "101", "刘强", "13800000006", "owner", "2018-01-10"),
    Person("2", "1", "101", "陈静", "13800000007", "family", "2018-01-10"),
    Person("2", "1", "302", "孙悦", "13800000008", "tenant", "2026-01-01", "2027-12-31"),
    Person("3", "1", "501", "周敏", "13800000009", "owner", "2021-06-01"),
    Person("3", "1", "502", "吴秀英", "13800000010", "owner", "2008-04-01"),
]
OWNER = PEOPLE[0]
#: 吴秀英, 82, lives alone in 3幢1单元502: under care (consent recorded by the office, her son the contact), with an
#: indoor panel whose senior-watch timer (Contact ID 641) the scripted life runs out now and then.
ELDER = PEOPLE[-1]
CARE_CONTACT = ("吴建国", "儿子", "13900000010")
CARE_HOURS = 1  # the shortest no-activity window the portal takes
VACANT = [("1", "1", "202"), ("2", "1", "102"), ("2", "1", "301"), ("3", "2", "101")]
INDOOR = ("flat-1-1-101", "1234", ("1", "1", "101"))  # name, Contact ID account, house
#: the elder's panel: on the same Contact ID line as INDOOR (the stub sends with this account)
ELDER_PANEL = ("flat-3-1-502", "5678", (ELDER.building, ELDER.unit, ELDER.house))

#: patrol checkpoints (name, x, y on the site map), walked in this order by the route PATROL_ROUTE; a round every 10
#: minutes all day, each point due within 8 minutes of the round's start (then 2 late), else missed.
CHECKPOINTS = [("南门岗亭", 540, 670), ("停车场", 800, 590), ("3幢后门", 780, 250), ("河边步道", 230, 670)]
PATROL_ROUTE = {
    "name": "全天巡逻",
    "starts": "00:00",
    "ends": "00:00",
    "every_min": "10",
    "window_min": "8",
    "late_min": "2",
}
GRID = {"grid_code": "330802001001", "address": "浙江省衢州市柯城区荷花街道阳光花园"}

CSV_HEADER = "site,site_name,building,unit,house,name,phone,role,move_in,move_out,lease_end\n"


def estate_csv() -> str:
    """The estate as the office's spreadsheet (the web import's and ``portal import-estate``'s columns)."""
    rows = [CSV_HEADER]
    rows += [
        f"{SITE},{SITE_NAME},{p.building},{p.unit},{p.house},{p.name},{p.phone},{p.role},{p.move_in},,{p.lease_end}\n"
        for p in PEOPLE
    ]
    rows += [f"{SITE},{SITE_NAME},{b},{u},{h},,,,,,\n" for b, u, h in VACANT]
    return "".join(rows)


def gateway_yaml(
    path: Path,
    broker: tuple[str, int],
    fence: str,
    board: str,
    doors: str,
    readers: str,
    indoor: str,
    local_api_port: int,
) -> Path:
    """The gateway's config: the perimeter panel and the IO board's beam, three doors on one controller bus, their
    readers on one RS-485 line, an indoor panel on a Contact ID line; passes checked with the portal's key."""
    fh, fp = fence.removeprefix("tcp://").rsplit(":", 1)
    bh, bp = board.removeprefix("tcp://").rsplit(":", 1)
    dh, dp = doors.removeprefix("tcp://").rsplit(":", 1)
    zones = "\n".join(
        f"  - {{name: {name}, device: panel-1, point: zone{i}_alarm, type: perimeter, group: perimeter, "
        f"label: {label}, aux: {{tamper: zone{i}_tamper, fault: zone{i}_fault, cut: zone{i}_cut}}}}"
        for i, (name, label) in enumerate(ZONES, start=1)
    )
    door_devices = "\n".join(
        f"  - {{name: ctl-{d.name}, profile: door-controller, bus: doors, unit: {d.unit_id}, poll_ms: 200}}"
        for d in DOORS
    )
    door_rows = "\n".join(
        f"  - {{name: {d.name}, device: ctl-{d.name}, relay: lock_relay, contact: door_open, exit_button: exit_button,"
        f" lock_feedback: lock_released, tamper: tamper, label: {d.label}, "
        + ("gate: true" if d.gate else f'place: {{building: "{d.building}", unit: "{d.unit}"}}')
        + ", unlock_ms: 3000, held_open_s: 8}"
        for d in DOORS
    )
    reader_rows = "\n".join(
        f"  - {{name: qr-{d.name}, serial: {readers}, address: {d.reader}, door: {d.name}, "
        f"heartbeat_s: 2, repeat_ignore_ms: 0}}"
        for d in DOORS
    )
    panels = "\n".join(
        f'  - {{name: {name}, account: "{account}", place: {{building: "{b}", unit: "{u}", '
        f'house: "{h}"}}, test_interval_s: null}}'
        for name, account, (b, u, h) in (INDOOR, ELDER_PANEL)
    )
    path.write_text(
        f"""# written by `gatehouse demo`
site: {SITE}
gateway: {GATEWAY}
data_dir: gateway
mqtt: {{host: {broker[0]}, port: {broker[1]}}}
local_api: {{port: {local_api_port}}}   # `gatehouse status --config` reads it
buses:
  - {{name: fence, kind: modbus-tcp, host: {fh}, port: {fp}, timeout_ms: 500}}
  - {{name: io, kind: modbus-tcp, host: {bh}, port: {bp}, timeout_ms: 500}}
  - {{name: doors, kind: modbus-tcp, host: {dh}, port: {dp}, timeout_ms: 500}}
devices:
  - {{name: panel-1, profile: perimeter-panel-8, bus: fence, unit: 1, poll_ms: 100}}
  - {{name: io-1, profile: waveshare-modbus-rtu-io-8ch, bus: io, unit: 1, poll_ms: 100}}
{door_devices}
zone_groups:
  - {{name: perimeter, label: 周界}}
zones:
{zones}
  - {{name: {BEAM[0]}, device: io-1, point: input1, type: perimeter, group: perimeter, label: {BEAM[1]}}}
doors:
{door_rows}
readers:
{reader_rows}
contact_id_lines:
  - {{name: cid-1, serial: {indoor}, mode: panel}}
indoor_panels:
{panels}
access:
  public_keys: [portal/pass_signing_key.pub.pem]   # the portal's public key: passes and the guard's commands
""",
        encoding="utf-8",
    )
    return path


def portal_yaml(path: Path, broker: tuple[str, int], port: int, grid_url: str, grid_key: Path) -> Path:
    """The portal's config: the estate's gateway, the address plates print (this machine), the office's and the
    guardroom's phones on every plate, the site map with the zones, the beam and the doors placed on it, and the
    grid platform (the stub) it reports up to."""

    def box(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    zone_pts = [
        [[80, 40], [920, 40]],
        [[940, 60], [940, 640]],
        [[420, 690], [580, 690]],
        [[60, 60], [60, 640]],
        box(700, 500, 900, 620),
        box(380, 300, 620, 440),
        box(700, 100, 860, 220),
        [[80, 690], [380, 690]],
    ]
    zones = "\n".join(
        f"      - {{zone: {name}, label: {label}, points: {pts}}}"
        for (name, label), pts in zip(ZONES, zone_pts, strict=True)
    )
    buildings = "\n".join(
        f'      - {{code: "{c}", name: {c}幢, x: {x}, y: 100, w: 160, h: 120}}'
        for c, x in (("1", 120), ("2", 420), ("3", 700))
    )
    doors = "\n".join(
        f"      - {{door: {d.name}, label: {d.label}, x: {x}, y: {y}}}"
        for d, (x, y) in zip(DOORS, ((500, 650), (200, 230), (500, 230)), strict=True)
    )
    path.write_text(
        f"""# written by `gatehouse demo`
listen: {{host: 127.0.0.1, port: {port}}}
data_dir: portal
site_name: {SITE_NAME} Sunny Gardens (demo)
public_url: http://127.0.0.1:{port}   # what plates print; a real estate sets its own address
mqtt: {{host: {broker[0]}, port: {broker[1]}}}
gateways:
  - {{site: {SITE}, gateway: {GATEWAY}}}
sites:
  - {{site: {SITE}, office_phone: "0571-8888 6666", office_hours: "8:00-20:00", guardroom_phone: "0571-8888 6110"}}
site_maps:
  - site: {SITE}
    width: 1000
    height: 720
    buildings:
{buildings}
    zones:
{zones}
      - {{zone: {BEAM[0]}, label: {BEAM[1]}, points: [[100, 75], [900, 75]]}}
    doors:
{doors}
grid:
  url: {grid_url}
  key_file: {grid_key}
  key_id: gatehouse
  tick_s: 0.5
  timeout_s: 5
  retry_first_s: 5
  retry_max_s: 60
  sites: [{{site: {SITE}, grid_code: "{GRID["grid_code"]}", address: {GRID["address"]}}}]
""",
        encoding="utf-8",
    )
    return path
