"""`gatehouse init`: a config that loads, secrets at mode 0600, no silent overwrite, keys checked."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from common import configfile
from gateway import cli, config
from gateway.wire import passes


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def init_args(cfg: Path, *extra: str) -> list[str]:
    return [
        "init",
        "--config",
        str(cfg),
        "--site",
        "estate-a",
        "--gateway",
        "gw-1",
        "--broker",
        "10.0.0.2:8883",
        "--data-dir",
        str(cfg.parent / "data"),
        *extra,
    ]


def test_init_writes_a_valid_config_and_private_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "etc" / "gateway.yaml"
    rc, out, err = run(init_args(cfg_path), capsys)
    assert rc == 0, err
    cfg = config.load(cfg_path)
    assert (cfg.site, cfg.gateway, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username) == (
        "estate-a",
        "gw-1",
        "10.0.0.2",
        8883,
        "estate-a/gw-1",
    )
    assert cfg.local_api.enabled and (cfg.local_api.host, cfg.local_api.port) == ("127.0.0.1", 9880)
    secret = Path(cfg.mqtt.password_file or "")
    assert secret == (tmp_path / "etc" / "secrets" / "mqtt.password").resolve()
    assert mode(secret) == 0o600
    assert mode(secret.parent) == 0o700
    assert mode(cfg_path) == 0o644
    # The generated password is printed once, and is what the gateway will read.
    password = configfile.read_secret(str(secret))
    assert len(password) >= 24
    assert out.count(password) == 1
    assert password not in cfg_path.read_text()


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "gateway.yaml"
    assert run(init_args(cfg_path), capsys)[0] == 0
    before = cfg_path.read_bytes(), (tmp_path / "secrets" / "mqtt.password").read_bytes()
    rc, _, err = run(init_args(cfg_path), capsys)
    assert rc == 2
    assert err.strip() == (
        f"init: {cfg_path} and {tmp_path / 'secrets' / 'mqtt.password'} already exist; use --force to replace"
    )
    assert (cfg_path.read_bytes(), (tmp_path / "secrets" / "mqtt.password").read_bytes()) == before
    rc, _, err = run(init_args(cfg_path, "--force"), capsys)
    assert rc == 0, err
    assert (tmp_path / "secrets" / "mqtt.password").read_bytes() != before[1]
    assert mode(tmp_path / "secrets" / "mqtt.password") == 0o600


def test_init_takes_a_given_password_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-from-the-broker-admin\n"))
    cfg_path = tmp_path / "gateway.yaml"
    rc, out, err = run(init_args(cfg_path, "--mqtt-password-file", "-"), capsys)
    assert rc == 0, err
    assert (tmp_path / "secrets" / "mqtt.password").read_text() == "s3cret-from-the-broker-admin\n"
    assert "s3cret" not in out  # a password given is not echoed


def test_init_copies_the_pass_public_key_and_refuses_a_private_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = passes.generate_keypair()
    pub = tmp_path / "portal-pass.pub"
    priv = tmp_path / "portal-pass.key"
    passes.save_public_key(pub, public)
    passes.save_private_key(priv, private)
    cfg_path = tmp_path / "etc" / "gateway.yaml"
    rc, _, err = run(init_args(cfg_path, "--pass-key", str(priv)), capsys)
    assert rc == 2
    assert err.strip() == (
        f"init: --pass-key: {priv}: holds a private key; a gateway must be given only the public key"
    )
    assert not cfg_path.exists()
    rc, _, err = run(init_args(cfg_path, "--pass-key", str(pub)), capsys)
    assert rc == 0, err
    cfg = config.load(cfg_path)
    assert cfg.access.public_keys == [str((tmp_path / "etc" / "keys" / "portal-pass.pub").resolve())]
    assert passes.key_id(passes.load_public_key(cfg.access.public_keys[0])) == passes.key_id(public)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--site", "estate a"],
            "init: site name 'estate a' is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)",
        ),
        (["--broker", "10.0.0.2"], "init: --broker '10.0.0.2' is not host:port (e.g. 192.168.1.20:502)"),
        (
            ["--owner", "no-such-user-here"],
            "init: no such user 'no-such-user-here' (the install script creates 'gatehouse')",
        ),
    ],
)
def test_init_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    cfg_path = tmp_path / "gateway.yaml"
    argv = init_args(cfg_path)
    for i in range(0, len(args), 2):
        if args[i] in argv:
            argv[argv.index(args[i]) + 1] = args[i + 1]
        else:
            argv += args[i : i + 2]
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert err.strip() == message
    assert not cfg_path.exists()


def test_numeric_names_are_quoted_so_they_stay_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = tmp_path / "gateway.yaml"
    argv = init_args(cfg_path)
    argv[argv.index("--site") + 1] = "0012"
    argv[argv.index("--gateway") + 1] = "true"
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    cfg = config.load(cfg_path)
    assert (cfg.site, cfg.gateway) == ("0012", "true")
