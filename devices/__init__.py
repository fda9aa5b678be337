"""Protocol drivers: Modbus polling, serial framing, Contact ID, QR reader lines.

Drivers emit the typed device events of :mod:`devices.events` and accept its commands. They know
nothing of alarms, people, databases or MQTT. Only this package imports pymodbus or pyserial.
"""
