"""``python -m portal run --config FILE``, ``adduser ...``, ``check``, ``purge [--dry-run]``, and the registry commands
``import-estate``, ``export-estate``, ``plates``, ``visitor-pass``, ``audit-verify`` and ``audit-anchor``
(:mod:`portal.estate.registry_cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from portal.config import ConfigError, PortalConfig, load
from portal.estate import registry_cli
from portal.web import redact


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(redact.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # no plate codes
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("portal.mqtt").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _run(cfg: PortalConfig) -> int:
    from portal.app import serve
    from portal.store import StoreError
    from portal.store.storekey import StoreKeyError

    try:
        asyncio.run(serve(cfg, sys.stdout))
    except (OSError, StoreError, StoreKeyError, ConfigError) as e:  # a port in use, a too new store, no key, ...
        logging.getLogger("portal").error("cannot run: %s", e)
        print(f"portal: cannot run: {e}", file=sys.stderr)
        return 1
    return 0


def _adduser(
    cfg: PortalConfig, name: str, role: str, password_file: str, must_change: bool, sites_arg: str | None = None
) -> int:
    from argon2 import PasswordHasher

    from portal.store import (
        ROLES,
        SitesError,
        StoreConflict,
        StoreError,
        insert_user,
        open_db,
        parse_sites,
        registry_site_codes,
    )
    from portal.store.storekey import StoreKeyError
    from portal.web.auth import USER_NAME_RE, AuthError, check_new_password

    if not USER_NAME_RE.match(name):
        print(f"adduser: bad user name {name!r}: letters, digits and . _ - only, at most 32", file=sys.stderr)
        return 2
    if role not in ROLES:
        print(f"adduser: role must be one of {', '.join(ROLES)}", file=sys.stderr)
        return 2
    try:
        password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        print(f"adduser: cannot read {password_file}: {e}", file=sys.stderr)
        return 2
    try:
        check_new_password(password)
    except AuthError:
        print("adduser: the password must have 12 to 1024 characters", file=sys.stderr)
        return 2
    if sites_arg is not None and role == "admin":
        print("adduser: administrators see every site; --sites is for guards and installers", file=sys.stderr)
        return 2
    try:
        conn = open_db(cfg.store_target, cfg.store_key())
    except (StoreError, StoreKeyError) as e:
        print(f"adduser: {e}", file=sys.stderr)
        return 1
    try:
        sites = None
        if sites_arg is not None:
            known = registry_site_codes(conn)
            try:
                sites = parse_sites(sites_arg, known)
            except SitesError as e:
                why = (
                    "not a site id"
                    if e.key == "users.bad_sites"
                    else f"unknown site (the registry has: {', '.join(known)})"
                )
                print(f"adduser: --sites: {why}: {', '.join(e.sites)}", file=sys.stderr)
                return 2
            if sites is None:
                print("adduser: --sites needs at least one site id (leave it out for every site)", file=sys.stderr)
                return 2
        insert_user(conn, name, role, PasswordHasher().hash(password), must_change, sites)
    except StoreConflict:
        print(f"adduser: user {name!r} exists", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(
        json.dumps(
            {
                "user": name,
                "role": role,
                "must_change": must_change,
                "sites": list(sites) if sites is not None else None,
            },
            ensure_ascii=False,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m portal", description="Gatehouse estate portal")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="serve the portal until SIGTERM/SIGINT")
    r.add_argument("--config", required=True, help="the portal's YAML config")
    a = sub.add_parser("adduser", help="create a user (for set-up scripts, the demo and tests)")
    a.add_argument("--config", required=True)
    a.add_argument("--user", required=True)
    a.add_argument("--role", required=True, choices=["admin", "guard", "installer"])
    a.add_argument("--password-file", required=True, help="a file holding the password (trailing newline ignored)")
    a.add_argument("--must-change", action="store_true", help="force a password change at first sign-in")
    a.add_argument("--sites", help="comma-separated site ids the account sees and acts on (default: every site)")
    c = sub.add_parser("check", help="validate the config and exit")
    c.add_argument("--config", required=True)
    pg = sub.add_parser("purge", help="apply the retention policy now (the portal also does it daily)")
    pg.add_argument("--config", required=True)
    pg.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    registry_cli.add_parsers(sub)
    args = p.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    if args.command in registry_cli.COMMANDS:
        _setup_logging("WARNING")
        return registry_cli.run(args, cfg)
    _setup_logging(cfg.log_level)
    if args.command == "run":
        return _run(cfg)
    if args.command == "purge":
        from portal.estate import retention

        return retention.cli(cfg, dry_run=args.dry_run)
    if args.command == "adduser":
        return _adduser(cfg, args.user, args.role, args.password_file, args.must_change, args.sites)
    if cfg.grid.enabled:  # the grid link's key and certificates: readable, 0600, certificates that load
        from portal.grid.link import load_secrets

        try:
            load_secrets(cfg.grid)
        except ConfigError as e:
            print("config error:\n" + "\n".join(e.problems), file=sys.stderr)
            return 2
    warnings = cfg.warnings()  # check: valid, but say what will surprise people
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps({"ok": True, "config": cfg.source, "warnings": warnings}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
