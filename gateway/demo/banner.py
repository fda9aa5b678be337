"""What the demo prints once everything is up: one block in Chinese and English with every sign-in, the house
plate's address and its QR code (drawn with text characters, to scan from the terminal with a phone)."""

from __future__ import annotations

import io

import qrcode

from gateway.demo.estate import CHECKPOINTS, ELDER, OWNER, SITE_NAME


def qr_text(url: str) -> str:
    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_L)
    qr.add_data(url)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue()


def block(
    *,
    url: str,
    guard: tuple[str, str],
    admin: tuple[str, str],
    resident_password: str,
    plate_url: str,
    entrance_url: str,
    elder_password: str,
    grid_control: str,
    logs: str,
    every: float,
) -> str:
    rule = "=" * 72
    address = f"{SITE_NAME}{OWNER.building}幢{OWNER.unit}单元{OWNER.house}室"
    elder_home = f"{ELDER.building}幢{ELDER.unit}单元{ELDER.house}室"
    qr = "".join(f"    {line}\n" for line in qr_text(plate_url).splitlines())
    return f"""
{rule}
 Gatehouse 演示 demo · {SITE_NAME} Sunny Gardens
{rule}
 值班台 Guard console     {url}
 保安 Guard               {guard[0]} / {guard[1]}
 管理员 Administrator     {admin[0]} / {admin[1]}     ({url.rstrip("/")}/admin/registry)
 住户手机 Resident phone  {OWNER.phone} / {resident_password}   ({OWNER.name}, {address}, 业主 owner)
 门牌 House plate         {plate_url}
   用手机打开并登录：通行码、访客码 / open it on a phone and sign in: own pass, visitor passes
{qr}
 单元门牌 Entrance plate  {entrance_url}
   登录后按"开门" / signed in, press Open
 独居老人 Lives alone     {ELDER.phone} / {elder_password}   ({ELDER.name}, {elder_home})
   关爱提醒时在门牌页按"我很好" / when a care alert rings, press 我很好 on her plate page ({url.rstrip("/")}/care)
 巡更 Patrol              {len(CHECKPOINTS)} 个巡更点 checkpoints, every 10 min: {url.rstrip("/")}/patrol/report
 网格平台 Grid platform   模拟 simulated; care alerts go up, status comes back ({grid_control}/state)

 硬件均为模拟 All hardware is simulated: perimeter panel, IO board beam, 3 doors with QR readers,
 an indoor panel. 住户刷码、访客、门未关、室内报警、入侵 about every {every:.0f} s.
 日志 Logs: {logs}      Ctrl-C 停止全部 stops everything
{rule}
"""
