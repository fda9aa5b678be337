"""Ademco Contact ID event codes (SIA DC-05 appendix): what each means to the alarm engine, and its
name in English and Chinese for the console.

``family`` tells the engine what to do with a report:

* ``alarm``, ``tamper``, ``trouble`` — a condition with an incident: "new" opens it (or counts a
  repeat), "restore" closes it, "status" (still present) opens it if it is not open.
* ``openclose`` — 4xx opening (new, 撤防) and closing (restore, 布防): the house's arm state.
* ``test`` — a periodic test report: resets the panel's supervision timer.
* ``event`` — anything else worth a line in the log (bypasses, manual tests, access, programming).

Codes not in the table fall back to their range (1xx alarm, 2xx/3xx trouble, the rest events), so a
vendor's private code is still shown, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.wire import Priority

Family = Literal["alarm", "tamper", "trouble", "openclose", "test", "event"]

#: Codes that reset a panel's periodic test supervision.
PERIODIC_TESTS = frozenset({602, 603, 608})


@dataclass(frozen=True, slots=True)
class CidCode:
    code: int
    family: Family
    kind: str  # a short key for filters and icons: "fire", "burglary", "ac_loss", "opening"...
    priority: int
    en: str
    zh: str
    user: bool = False  # the report's zone_or_user field is a user number, not a zone
    known: bool = True  # False for a range fallback


_P = Priority
_ROWS: tuple[tuple[int, Family, str, int, str, str], ...] = (
    # 10x medical, 11x fire, 12x panic
    (100, "alarm", "medical", _P.PANIC, "Medical", "医疗求助"),
    (101, "alarm", "medical", _P.PANIC, "Personal emergency", "个人紧急求助"),
    (102, "alarm", "medical", _P.PANIC, "Fail to report in", "未按时报平安"),
    (110, "alarm", "fire", _P.FIRE, "Fire", "火警"),
    (111, "alarm", "fire", _P.FIRE, "Smoke", "烟雾火警"),
    (112, "alarm", "fire", _P.FIRE, "Combustion", "燃烧报警"),
    (113, "alarm", "fire", _P.FIRE, "Water flow", "喷淋水流报警"),
    (114, "alarm", "fire", _P.FIRE, "Heat", "感温火警"),
    (115, "alarm", "fire", _P.FIRE, "Pull station", "手动火警按钮"),
    (116, "alarm", "fire", _P.FIRE, "Duct", "风管火警"),
    (117, "alarm", "fire", _P.FIRE, "Flame", "火焰报警"),
    (118, "alarm", "fire", _P.FIRE, "Near alarm (fire)", "火警预警"),
    (120, "alarm", "panic", _P.PANIC, "Panic", "紧急求助"),
    (121, "alarm", "duress", _P.PANIC, "Duress", "胁迫报警"),
    (122, "alarm", "panic", _P.PANIC, "Silent panic", "无声求助"),
    (123, "alarm", "panic", _P.PANIC, "Audible panic", "有声求助"),
    (124, "alarm", "duress", _P.PANIC, "Duress - access granted", "胁迫报警（已准入）"),
    (125, "alarm", "duress", _P.PANIC, "Duress - egress granted", "胁迫报警（已准出）"),
    # 13x burglary, 14x general
    (130, "alarm", "burglary", _P.INTRUSION, "Burglary", "入侵报警"),
    (131, "alarm", "burglary", _P.INTRUSION, "Perimeter", "周界入侵"),
    (132, "alarm", "burglary", _P.INTRUSION, "Interior", "室内入侵"),
    (133, "alarm", "burglary", _P.INTRUSION, "24-hour (safe)", "24小时防区报警"),
    (134, "alarm", "burglary", _P.INTRUSION, "Entry/exit", "出入口入侵"),
    (135, "alarm", "burglary", _P.INTRUSION, "Day/night", "日夜防区报警"),
    (136, "alarm", "burglary", _P.INTRUSION, "Outdoor", "户外入侵"),
    (137, "tamper", "tamper", _P.TAMPER, "Tamper", "防拆报警"),
    (138, "alarm", "burglary", _P.INTRUSION, "Near alarm (burglary)", "入侵预警"),
    (139, "alarm", "burglary", _P.INTRUSION, "Intrusion verifier", "入侵确认"),
    (140, "alarm", "general", _P.INTRUSION, "General alarm", "通用报警"),
    (141, "trouble", "loop_open", _P.FAULT, "Polling loop open", "总线开路"),
    (142, "trouble", "loop_short", _P.FAULT, "Polling loop short", "总线短路"),
    (143, "trouble", "module_failure", _P.FAULT, "Expansion module failure", "扩展模块故障"),
    (144, "tamper", "tamper", _P.TAMPER, "Sensor tamper", "探测器防拆"),
    (145, "tamper", "tamper", _P.TAMPER, "Expansion module tamper", "扩展模块防拆"),
    (146, "alarm", "burglary", _P.INTRUSION, "Silent burglary", "无声入侵报警"),
    (147, "trouble", "supervision", _P.FAULT, "Sensor supervision failure", "探测器监控失效"),
    # 15x-16x 24-hour non-burglary
    (150, "alarm", "non_burglary", _P.INTRUSION, "24-hour non-burglary", "24小时非入侵报警"),
    (151, "alarm", "gas", _P.FIRE, "Gas detected", "燃气泄漏"),
    (152, "alarm", "refrigeration", _P.FAULT, "Refrigeration", "冷藏报警"),
    (153, "alarm", "loss_of_heat", _P.FAULT, "Loss of heat", "供暖中断"),
    (154, "alarm", "water", _P.FAULT, "Water leakage", "漏水报警"),
    (155, "alarm", "burglary", _P.INTRUSION, "Foil break", "玻璃贴箔破裂"),
    (156, "trouble", "day_trouble", _P.FAULT, "Day trouble", "日间故障"),
    (157, "alarm", "low_gas_level", _P.FAULT, "Low bottled gas level", "瓶装燃气不足"),
    (158, "alarm", "high_temp", _P.FAULT, "High temperature", "高温报警"),
    (159, "alarm", "low_temp", _P.FAULT, "Low temperature", "低温报警"),
    (161, "alarm", "air_flow", _P.FAULT, "Loss of air flow", "气流丢失"),
    (162, "alarm", "co", _P.FIRE, "Carbon monoxide detected", "一氧化碳报警"),
    (163, "alarm", "tank_level", _P.FAULT, "Tank level", "液位报警"),
    # 2xx fire supervisory
    (200, "trouble", "fire_supervisory", _P.FAULT, "Fire supervisory", "消防监视"),
    (201, "trouble", "fire_supervisory", _P.FAULT, "Low water pressure", "水压低"),
    (202, "trouble", "fire_supervisory", _P.FAULT, "Low CO2", "二氧化碳压力低"),
    (203, "trouble", "fire_supervisory", _P.FAULT, "Gate valve sensor", "阀门传感器"),
    (204, "trouble", "fire_supervisory", _P.FAULT, "Low water level", "水位低"),
    (205, "trouble", "fire_supervisory", _P.FAULT, "Pump activated", "水泵启动"),
    (206, "trouble", "fire_supervisory", _P.FAULT, "Pump failure", "水泵故障"),
    # 30x-31x system troubles
    (300, "trouble", "system", _P.FAULT, "System trouble", "系统故障"),
    (301, "trouble", "ac_loss", _P.FAULT, "AC loss", "交流电断电"),
    (302, "trouble", "low_battery", _P.FAULT, "Low system battery", "系统电池欠压"),
    (303, "trouble", "system", _P.FAULT, "RAM checksum bad", "内存校验错误"),
    (304, "trouble", "system", _P.FAULT, "ROM checksum bad", "程序校验错误"),
    (305, "event", "system_reset", _P.ROUTINE, "System reset", "系统复位"),
    (306, "event", "programming", _P.ROUTINE, "Panel programming changed", "主机编程已更改"),
    (307, "trouble", "system", _P.FAULT, "Self-test failure", "自检失败"),
    (308, "trouble", "system", _P.FAULT, "System shutdown", "系统关闭"),
    (309, "trouble", "low_battery", _P.FAULT, "Battery test failure", "电池测试失败"),
    (310, "trouble", "ground_fault", _P.FAULT, "Ground fault", "接地故障"),
    (311, "trouble", "low_battery", _P.FAULT, "Battery missing/dead", "电池缺失或失效"),
    (312, "trouble", "power", _P.FAULT, "Power supply overcurrent", "电源过流"),
    (313, "event", "system_reset", _P.ROUTINE, "Engineer reset", "工程师复位"),
    # 32x sounders and relays
    (320, "trouble", "bell", _P.FAULT, "Sounder/relay", "警号/继电器故障"),
    (321, "trouble", "bell", _P.FAULT, "Bell 1", "警号1故障"),
    (322, "trouble", "bell", _P.FAULT, "Bell 2", "警号2故障"),
    (323, "trouble", "bell", _P.FAULT, "Alarm relay", "报警继电器故障"),
    (324, "trouble", "bell", _P.FAULT, "Trouble relay", "故障继电器故障"),
    (325, "trouble", "bell", _P.FAULT, "Reversing relay", "反向继电器故障"),
    (326, "trouble", "bell", _P.FAULT, "Notification appliance 3", "通知设备3故障"),
    (327, "trouble", "bell", _P.FAULT, "Notification appliance 4", "通知设备4故障"),
    # 33x-34x peripherals
    (330, "trouble", "peripheral", _P.FAULT, "System peripheral trouble", "系统外设故障"),
    (331, "trouble", "loop_open", _P.FAULT, "Polling loop open", "总线开路"),
    (332, "trouble", "loop_short", _P.FAULT, "Polling loop short", "总线短路"),
    (333, "trouble", "module_failure", _P.FAULT, "Expansion module failure", "扩展模块故障"),
    (334, "trouble", "peripheral", _P.FAULT, "Repeater failure", "中继器故障"),
    (335, "trouble", "peripheral", _P.FAULT, "Local printer out of paper", "打印机缺纸"),
    (336, "trouble", "peripheral", _P.FAULT, "Local printer failure", "打印机故障"),
    (337, "trouble", "power", _P.FAULT, "Expansion module DC loss", "扩展模块直流断电"),
    (338, "trouble", "low_battery", _P.FAULT, "Expansion module low battery", "扩展模块电池欠压"),
    (339, "trouble", "peripheral", _P.FAULT, "Expansion module reset", "扩展模块复位"),
    (341, "tamper", "tamper", _P.TAMPER, "Expansion module tamper", "扩展模块防拆"),
    (342, "trouble", "ac_loss", _P.FAULT, "Expansion module AC loss", "扩展模块交流断电"),
    (343, "trouble", "peripheral", _P.FAULT, "Expansion module self-test failure", "扩展模块自检失败"),
    (344, "trouble", "rf_jam", _P.FAULT, "RF receiver jam", "无线接收机受干扰"),
    # 35x communication
    (350, "trouble", "communication", _P.FAULT, "Communication trouble", "通讯故障"),
    (351, "trouble", "communication", _P.FAULT, "Telco 1 fault", "电话线1故障"),
    (352, "trouble", "communication", _P.FAULT, "Telco 2 fault", "电话线2故障"),
    (353, "trouble", "communication", _P.FAULT, "Long-range radio fault", "远程无线发射机故障"),
    (354, "trouble", "communication", _P.FAULT, "Failure to communicate", "通讯失败"),
    (355, "trouble", "communication", _P.FAULT, "Loss of radio supervision", "无线监控丢失"),
    (356, "trouble", "communication", _P.FAULT, "Loss of central polling", "中心轮询丢失"),
    (357, "trouble", "communication", _P.FAULT, "Long-range radio VSWR problem", "远程无线驻波比异常"),
    # 37x protection loops
    (370, "trouble", "loop", _P.FAULT, "Protection loop", "防区回路故障"),
    (371, "trouble", "loop_open", _P.FAULT, "Protection loop open", "防区回路开路"),
    (372, "trouble", "loop_short", _P.FAULT, "Protection loop short", "防区回路短路"),
    (373, "trouble", "fire_trouble", _P.FAULT, "Fire trouble", "火警回路故障"),
    (374, "alarm", "exit_error", _P.INTRUSION, "Exit error alarm", "退出错误报警"),
    (375, "trouble", "loop", _P.FAULT, "Panic zone trouble", "紧急求助防区故障"),
    (376, "trouble", "loop", _P.FAULT, "Hold-up zone trouble", "挟持防区故障"),
    (377, "trouble", "loop", _P.FAULT, "Swinger trouble", "防区反复触发故障"),
    (378, "trouble", "loop", _P.FAULT, "Cross-zone trouble", "交叉防区故障"),
    # 38x-39x sensors
    (380, "trouble", "sensor", _P.FAULT, "Sensor trouble", "探测器故障"),
    (381, "trouble", "supervision", _P.FAULT, "Loss of supervision - RF", "无线探测器失联"),
    (382, "trouble", "supervision", _P.FAULT, "Loss of supervision - RPM", "总线探测器失联"),
    (383, "tamper", "tamper", _P.TAMPER, "Sensor tamper", "探测器防拆"),
    (384, "trouble", "low_battery", _P.FAULT, "RF low battery", "无线探测器电池欠压"),
    (385, "trouble", "sensor", _P.FAULT, "Smoke detector high sensitivity", "烟感灵敏度偏高"),
    (386, "trouble", "sensor", _P.FAULT, "Smoke detector low sensitivity", "烟感灵敏度偏低"),
    (387, "trouble", "sensor", _P.FAULT, "Intrusion detector high sensitivity", "入侵探测器灵敏度偏高"),
    (388, "trouble", "sensor", _P.FAULT, "Intrusion detector low sensitivity", "入侵探测器灵敏度偏低"),
    (389, "trouble", "sensor", _P.FAULT, "Sensor self-test failure", "探测器自检失败"),
    (391, "trouble", "sensor", _P.FAULT, "Sensor watch trouble", "探测器监视故障"),
    (392, "trouble", "sensor", _P.FAULT, "Drift compensation error", "漂移补偿错误"),
    (393, "trouble", "sensor", _P.FAULT, "Maintenance alert", "维护提醒"),
    # 4xx open/close (new = opening/disarm, restore = closing/arm) and access
    (400, "openclose", "away", _P.ROUTINE, "Open/close", "撤防/布防"),
    (401, "openclose", "away", _P.ROUTINE, "Open/close by user", "用户撤防/布防"),
    (402, "openclose", "away", _P.ROUTINE, "Group open/close", "分组撤防/布防"),
    (403, "openclose", "away", _P.ROUTINE, "Automatic open/close", "自动撤防/布防"),
    (404, "openclose", "away", _P.ROUTINE, "Late to open/close", "延迟撤防/布防"),
    (405, "openclose", "away", _P.ROUTINE, "Deferred open/close", "推迟撤防/布防"),
    (406, "event", "cancel", _P.ROUTINE, "Cancel", "用户取消报警"),
    (407, "openclose", "away", _P.ROUTINE, "Remote arm/disarm", "远程撤防/布防"),
    (408, "openclose", "away", _P.ROUTINE, "Quick arm", "快速布防"),
    (409, "openclose", "away", _P.ROUTINE, "Keyswitch open/close", "钥匙开关撤防/布防"),
    (411, "event", "remote", _P.ROUTINE, "Callback request made", "回拨请求"),
    (412, "event", "remote", _P.ROUTINE, "Successful download/access", "远程下载/访问成功"),
    (413, "event", "remote", _P.ROUTINE, "Unsuccessful access", "远程访问失败"),
    (414, "event", "remote", _P.ROUTINE, "System shutdown command received", "收到系统关闭命令"),
    (415, "event", "remote", _P.ROUTINE, "Dialer shutdown command received", "收到拨号器关闭命令"),
    (416, "event", "remote", _P.ROUTINE, "Successful upload", "上传成功"),
    (421, "event", "access", _P.ROUTINE, "Access denied", "拒绝进入"),
    (422, "event", "access", _P.ROUTINE, "Access report by user", "用户进入记录"),
    (423, "event", "forced_access", _P.INTRUSION, "Forced access", "强行进入"),
    (424, "event", "access", _P.ROUTINE, "Egress denied", "拒绝外出"),
    (425, "event", "access", _P.ROUTINE, "Egress granted", "准许外出"),
    (426, "event", "door_propped", _P.FAULT, "Access door propped open", "门被撑开"),
    (427, "event", "access", _P.FAULT, "Door status monitor trouble", "门磁故障"),
    (428, "event", "access", _P.FAULT, "Request-to-exit trouble", "出门按钮故障"),
    (429, "event", "access", _P.ROUTINE, "Access program mode entry", "进入门禁编程"),
    (430, "event", "access", _P.ROUTINE, "Access program mode exit", "退出门禁编程"),
    (431, "event", "access", _P.ROUTINE, "Access threat level change", "门禁威胁等级变更"),
    (432, "event", "access", _P.FAULT, "Access relay/trigger fail", "门禁继电器故障"),
    (433, "event", "access", _P.ROUTINE, "Access RTE shunt", "出门按钮旁路"),
    (434, "event", "access", _P.ROUTINE, "Access DSM shunt", "门磁旁路"),
    (441, "openclose", "stay", _P.ROUTINE, "Armed stay", "留守布防"),
    (442, "openclose", "stay", _P.ROUTINE, "Keyswitch armed stay", "钥匙开关留守布防"),
    (450, "openclose", "away", _P.ROUTINE, "Exception open/close", "异常撤防/布防"),
    (451, "openclose", "away", _P.ROUTINE, "Early open/close", "提前撤防/布防"),
    (452, "openclose", "away", _P.ROUTINE, "Late open/close", "延后撤防/布防"),
    (453, "event", "schedule", _P.ROUTINE, "Failed to open", "未按时撤防"),
    (454, "event", "schedule", _P.ROUTINE, "Failed to close", "未按时布防"),
    (455, "event", "auto_arm_failed", _P.FAULT, "Auto-arm failed", "自动布防失败"),
    (456, "openclose", "stay", _P.ROUTINE, "Partial arm", "部分布防"),
    (457, "event", "exit_error", _P.ROUTINE, "Exit error (user)", "退出错误（用户）"),
    (458, "event", "user", _P.ROUTINE, "User on premises", "用户在场"),
    (459, "event", "user", _P.ROUTINE, "Recent close", "最近布防"),
    (461, "event", "wrong_code", _P.ROUTINE, "Wrong code entry", "密码错误"),
    (462, "event", "user", _P.ROUTINE, "Legal code entry", "密码正确"),
    (463, "event", "user", _P.ROUTINE, "Re-arm after alarm", "报警后重新布防"),
    (464, "event", "user", _P.ROUTINE, "Auto-arm time extended", "自动布防延时"),
    (465, "event", "user", _P.ROUTINE, "Panic alarm reset", "紧急报警复位"),
    (466, "event", "user", _P.ROUTINE, "Service on/off premises", "维修人员进出"),
    # 5xx disables and bypasses
    (501, "event", "disable", _P.ROUTINE, "Access reader disable", "读卡器禁用"),
    (520, "event", "disable", _P.ROUTINE, "Sounder/relay disable", "警号/继电器禁用"),
    (521, "event", "disable", _P.ROUTINE, "Bell 1 disable", "警号1禁用"),
    (522, "event", "disable", _P.ROUTINE, "Bell 2 disable", "警号2禁用"),
    (523, "event", "disable", _P.ROUTINE, "Alarm relay disable", "报警继电器禁用"),
    (524, "event", "disable", _P.ROUTINE, "Trouble relay disable", "故障继电器禁用"),
    (525, "event", "disable", _P.ROUTINE, "Reversing relay disable", "反向继电器禁用"),
    (531, "event", "module", _P.ROUTINE, "Module added", "模块已添加"),
    (532, "event", "module", _P.ROUTINE, "Module removed", "模块已移除"),
    (551, "event", "disable", _P.ROUTINE, "Dialer disabled", "拨号器禁用"),
    (552, "event", "disable", _P.ROUTINE, "Radio transmitter disabled", "无线发射机禁用"),
    (553, "event", "disable", _P.ROUTINE, "Remote upload/download disabled", "远程上传/下载禁用"),
    (570, "event", "bypass", _P.ROUTINE, "Zone/sensor bypass", "防区旁路"),
    (571, "event", "bypass", _P.ROUTINE, "Fire bypass", "火警防区旁路"),
    (572, "event", "bypass", _P.ROUTINE, "24-hour zone bypass", "24小时防区旁路"),
    (573, "event", "bypass", _P.ROUTINE, "Burglary bypass", "入侵防区旁路"),
    (574, "event", "bypass", _P.ROUTINE, "Group bypass", "分组旁路"),
    (575, "event", "bypass", _P.ROUTINE, "Swinger bypass", "反复触发自动旁路"),
    (576, "event", "bypass", _P.ROUTINE, "Access zone shunt", "门禁防区旁路"),
    (577, "event", "bypass", _P.ROUTINE, "Access point bypass", "门禁点旁路"),
    # 6xx tests and miscellany
    (601, "event", "manual_test", _P.ROUTINE, "Manual trigger test", "手动测试"),
    (602, "test", "periodic_test", _P.ROUTINE, "Periodic test report", "定时测试报告"),
    (603, "test", "periodic_test", _P.ROUTINE, "Periodic RF transmission", "无线定时检测"),
    (604, "event", "fire_test", _P.ROUTINE, "Fire test", "火警测试"),
    (605, "event", "status", _P.ROUTINE, "Status report to follow", "状态报告待续"),
    (606, "event", "listen_in", _P.ROUTINE, "Listen-in to follow", "监听待续"),
    (607, "event", "walk_test", _P.ROUTINE, "Walk test mode", "步测模式"),
    (608, "test", "periodic_test", _P.ROUTINE, "Periodic test - system trouble present", "定时测试（存在系统故障）"),
    (609, "event", "video", _P.ROUTINE, "Video transmitter active", "视频发射机启动"),
    (611, "event", "walk_test", _P.ROUTINE, "Point tested OK", "测试点正常"),
    (612, "event", "walk_test", _P.ROUTINE, "Point not tested", "测试点未测试"),
    (613, "event", "walk_test", _P.ROUTINE, "Intrusion zone walk tested", "入侵防区步测"),
    (614, "event", "walk_test", _P.ROUTINE, "Fire zone walk tested", "火警防区步测"),
    (615, "event", "walk_test", _P.ROUTINE, "Panic zone walk tested", "紧急防区步测"),
    (616, "event", "service", _P.ROUTINE, "Service request", "维修请求"),
    (621, "event", "log", _P.ROUTINE, "Event log reset", "事件记录已清除"),
    (622, "event", "log", _P.ROUTINE, "Event log 50% full", "事件记录已满50%"),
    (623, "event", "log", _P.ROUTINE, "Event log 90% full", "事件记录已满90%"),
    (624, "event", "log", _P.FAULT, "Event log overflow", "事件记录溢出"),
    (625, "event", "clock", _P.ROUTINE, "Time/date reset", "时间/日期已重设"),
    (626, "event", "clock", _P.FAULT, "Time/date inaccurate", "时间/日期不准确"),
    (627, "event", "programming", _P.ROUTINE, "Program mode entry", "进入编程模式"),
    (628, "event", "programming", _P.ROUTINE, "Program mode exit", "退出编程模式"),
    (629, "event", "log", _P.ROUTINE, "32-hour event log marker", "32小时事件记录标记"),
    (630, "event", "schedule", _P.ROUTINE, "Schedule change", "时间表更改"),
    (631, "event", "schedule", _P.ROUTINE, "Exception schedule change", "例外时间表更改"),
    (632, "event", "schedule", _P.ROUTINE, "Access schedule change", "门禁时间表更改"),
    # 64x supervision of people: an in-flat inactivity timer ("senior watch") and a child not home in time; the
    # portal's care watch (portal/care) raises a care alert for a household it watches
    (641, "event", "senior_watch", _P.ROUTINE, "Senior watch trouble", "长时间无活动（老人看护）"),
    (642, "event", "latch_key", _P.ROUTINE, "Latch-key supervision", "儿童未按时到家"),
)

#: Codes whose zone_or_user field is a user number.
_USER_CODES = frozenset(
    {121, 574, 607, 625, 627, 628} | {c for c, *_ in _ROWS if 400 <= c <= 466 and not 421 <= c <= 434}
)

CODES: dict[int, CidCode] = {
    code: CidCode(code, family, kind, int(prio), en, zh, user=code in _USER_CODES)
    for code, family, kind, prio, en, zh in _ROWS
}

# Ranges for codes the table does not name: (first, last, family, kind, priority, en, zh).
_RANGES: tuple[tuple[int, int, Family, str, int, str, str], ...] = (
    (100, 109, "alarm", "medical", _P.PANIC, "Medical alarm", "医疗报警"),
    (110, 119, "alarm", "fire", _P.FIRE, "Fire alarm", "火警"),
    (120, 129, "alarm", "panic", _P.PANIC, "Panic alarm", "紧急求助"),
    (130, 139, "alarm", "burglary", _P.INTRUSION, "Burglary", "入侵报警"),
    (140, 149, "alarm", "general", _P.INTRUSION, "General alarm", "通用报警"),
    (150, 169, "alarm", "non_burglary", _P.INTRUSION, "24-hour non-burglary", "24小时非入侵报警"),
    (170, 199, "alarm", "general", _P.INTRUSION, "Alarm", "报警"),
    (200, 299, "trouble", "fire_supervisory", _P.FAULT, "Supervisory", "监视故障"),
    (300, 399, "trouble", "system", _P.FAULT, "Trouble", "故障"),
    (400, 499, "event", "user", _P.ROUTINE, "Open/close or access", "布撤防或门禁事件"),
    (500, 599, "event", "disable", _P.ROUTINE, "Disable or bypass", "禁用或旁路"),
    (600, 699, "event", "test", _P.ROUTINE, "Test or miscellaneous", "测试或其他"),
    (700, 999, "event", "other", _P.ROUTINE, "Event", "事件"),
)


def describe(code: int) -> CidCode:
    """The table's entry for ``code``, or its range's (``known=False``). ``code`` must be 0-999."""
    hit = CODES.get(code)
    if hit is not None:
        return hit
    for first, last, family, kind, prio, en, zh in _RANGES:
        if first <= code <= last:
            return CidCode(code, family, kind, int(prio), f"{en} ({code:03d})", f"{zh}（{code:03d}）", known=False)
    return CidCode(code, "event", "other", int(_P.ROUTINE), f"Event {code:03d}", f"事件 {code:03d}", known=False)
