"""Provisioning: ``gatehouse init`` (:mod:`.init`), ``gatehouse device add|list|show|remove``
(:mod:`.config_edit`), serial-port diagnostics (:mod:`.serial_ports`) and broker credentials
(:mod:`.broker_users`); what they share is in :mod:`.base`.

Files holding secrets get mode 0600. Errors are :class:`ProvisionError` with a message that says what is
wrong and what to do about it.
"""

from gateway.tooling.provision.base import PORTAL_USER, ProvisionError, broker_user, check_broker_user, parse_host_port
from gateway.tooling.provision.broker_users import add_broker_user, find_mosquitto_passwd
from gateway.tooling.provision.config_edit import (
    AddResult,
    BusRequest,
    ConfigDoc,
    RemoveResult,
    add_device,
    describe_devices,
    iter_profile_points,
    remove_device,
)
from gateway.tooling.provision.init import InitResult, init_gateway
from gateway.tooling.provision.serial_ports import (
    check_serial_port,
    is_url,
    permission_message,
    port_holders,
    serial_candidates,
)

__all__ = [
    "PORTAL_USER",
    "AddResult",
    "BusRequest",
    "ConfigDoc",
    "InitResult",
    "ProvisionError",
    "RemoveResult",
    "add_broker_user",
    "add_device",
    "broker_user",
    "check_broker_user",
    "check_serial_port",
    "describe_devices",
    "find_mosquitto_passwd",
    "init_gateway",
    "is_url",
    "iter_profile_points",
    "parse_host_port",
    "permission_message",
    "port_holders",
    "remove_device",
    "serial_candidates",
]
