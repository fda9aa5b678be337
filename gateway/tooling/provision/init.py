"""``gatehouse init``: a new gateway config with its secrets (MQTT password, keys), validated before it is
written."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.tooling.provision.base import (
    BROKER_CA_FILE,
    DEFAULT_DATA_DIR,
    KEYS_DIR,
    MQTT_PASSWORD_FILE,
    PASS_KEY_FILE,
    SECRETS_DIR,
    ProvisionError,
    _check_name,
    _owner,
    _scalar,
    _validated_write,
    broker_user,
    parse_host_port,
    write_file,
)

# ---------------------------------------------------------------- init


@dataclass
class InitResult:
    config: Path
    written: list[Path] = field(default_factory=list)
    generated_password: str | None = None  # shown once to the installer; None when one was given


def init_gateway(
    config_path: str | os.PathLike[str],
    *,
    site: str,
    gateway: str,
    broker: str = "127.0.0.1:1883",
    mqtt_password: str | None = None,
    pass_keys: Sequence[str] = (),
    tls_ca: str | None = None,
    data_dir: str = DEFAULT_DATA_DIR,
    owner: str | None = None,
    force: bool = False,
) -> InitResult:
    """Write a new gateway config with its secrets folder. ``mqtt_password`` None generates one."""
    from gateway.wire.passes import KeyFileError, load_public_key

    _check_name("site", site)
    _check_name("gateway", gateway)
    user = broker_user(site, gateway)
    host, port = parse_host_port(broker, "--broker")
    uid_gid = _owner(owner)
    cfg = Path(config_path)
    folder = cfg.parent if str(cfg.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    password_path = folder / MQTT_PASSWORD_FILE
    key_path = folder / PASS_KEY_FILE
    ca_path = folder / BROKER_CA_FILE
    targets = [cfg, password_path] + ([key_path] if pass_keys else []) + ([ca_path] if tls_ca else [])
    if not force:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise ProvisionError(
                f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; use --force to replace"
            )
    if len(pass_keys) > 1:
        raise ProvisionError("give one --pass-key at init; add more to access.public_keys while rotating keys")
    key_pem = None
    if pass_keys:
        try:
            load_public_key(pass_keys[0])
        except KeyFileError as e:
            raise ProvisionError(f"--pass-key: {e}") from None
        key_pem = Path(pass_keys[0]).read_bytes()
    ca_pem = None
    if tls_ca:
        try:
            ca_pem = Path(tls_ca).read_bytes()
        except OSError as e:
            raise ProvisionError(f"--tls-ca: cannot read {tls_ca}: {e.strerror or e}") from None
        if b"BEGIN CERTIFICATE" not in ca_pem:
            raise ProvisionError(f"--tls-ca: {tls_ca} is not a PEM certificate")
    password = mqtt_password
    generated = None
    if password is None:
        password = generated = secrets.token_urlsafe(24)
    password = password.strip()
    if not password or "\n" in password:
        raise ProvisionError("the MQTT password must be one non-empty line")

    text = _config_text(
        site=site,
        gateway=gateway,
        host=host,
        port=port,
        user=user,
        data_dir=data_dir,
        with_key=key_pem is not None,
        with_ca=ca_pem is not None,
    )
    result = InitResult(cfg)
    secrets_dir = folder / SECRETS_DIR
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    if uid_gid:
        os.chown(secrets_dir, *uid_gid)
    write_file(password_path, (password + "\n").encode(), 0o600, owner=uid_gid)
    result.written.append(password_path)
    if key_pem is not None or ca_pem is not None:
        (folder / KEYS_DIR).mkdir(mode=0o755, exist_ok=True)
    if key_pem is not None:
        write_file(key_path, key_pem, 0o644)
        result.written.append(key_path)
    if ca_pem is not None:
        write_file(ca_path, ca_pem, 0o644)
        result.written.append(ca_path)
    # Validate exactly what will be written, next to where it goes (relative paths resolve the same way).
    _validated_write(cfg, text, mode=0o644)
    result.written.insert(0, cfg)
    result.generated_password = generated
    return result


def _config_text(
    *, site: str, gateway: str, host: str, port: int, user: str, data_dir: str, with_key: bool, with_ca: bool
) -> str:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    tls = f"\n  tls:\n    ca_file: {BROKER_CA_FILE}   # the broker's CA certificate" if with_ca else ""
    key = (
        f"  public_keys: [{PASS_KEY_FILE}]   # the portal's signing public key (never the private one)"
        if with_key
        else "  public_keys: []   # the portal's signing public key file(s): passes, revocation lists and commands\n"
        "                    # are verified with it; until it is here, readers and commands refuse everything"
    )
    return f"""\
# Gatehouse gateway configuration, written by `gatehouse init` on {today}.
# Check it with `gatehouse config check FILE`; add devices with `gatehouse device add`.
# Relative paths are relative to this file's folder.
site: {_scalar(site)}
gateway: {_scalar(gateway)}
data_dir: {_scalar(data_dir)}   # the event log and the outbox

mqtt:
  host: {_scalar(host)}
  port: {port}
  username: {_scalar(user)}   # SITE/GATEWAY: the broker's ACL ties this user to this gateway's topics
  password_file: {MQTT_PASSWORD_FILE}   # mode 0600, the password alone{tls}

access:
{key}

local_api:   # `gatehouse status` and Prometheus `GET /metrics`; keep it on loopback
  enabled: true
  host: 127.0.0.1
  port: 9880
"""
