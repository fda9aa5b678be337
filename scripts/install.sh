#!/usr/bin/env bash
# Install Gatehouse on Debian 12 or Raspberry Pi OS (bookworm): a virtualenv under /opt/gatehouse,
# the `gatehouse` system user (in the dialout group), the systemd units, and optionally the broker.
#
#   sudo scripts/install.sh                 # the gateway (a Raspberry Pi in the equipment room)
#   sudo scripts/install.sh --portal --broker   # the guardroom PC: portal and Mosquitto
#   scripts/install.sh --dry-run ...        # print every step, change nothing
#   scripts/install.sh --render DIR         # only write the rendered unit files into DIR
#
# Run it again to upgrade: it reinstalls the package and the units and keeps configs, data and users.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/gatehouse
CONFDIR=/etc/gatehouse
BINDIR=""
USER_NAME=gatehouse
PYTHON=python3
DRY_RUN=0
RENDER_DIR=""
ENABLE=1
ROLES=()

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF
Options:
  --gateway            install the gateway service (the default when no role is given)
  --portal             install the portal service
  --broker             install Mosquitto with the Gatehouse configuration and ACL
  --prefix DIR         where the virtualenv goes (default $PREFIX; it lands in DIR/venv)
  --confdir DIR        where the configs live (default $CONFDIR)
  --bindir DIR         the bin folder the units run from (default PREFIX/venv/bin)
  --python PY          the interpreter for the virtualenv (default $PYTHON; 3.11 or newer)
  --no-enable          install the units without enabling them
  --dry-run            print what would be done and change nothing
  --render DIR         write the rendered unit files into DIR and stop (no root needed)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --gateway) ROLES+=(gateway) ;;
        --portal) ROLES+=(portal) ;;
        --broker) ROLES+=(broker) ;;
        --prefix) PREFIX="$2"; shift ;;
        --confdir) CONFDIR="$2"; shift ;;
        --bindir) BINDIR="$2"; shift ;;
        --python) PYTHON="$2"; shift ;;
        --no-enable) ENABLE=0 ;;
        --dry-run) DRY_RUN=1 ;;
        --render) RENDER_DIR="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#ROLES[@]} -gt 0 ] || ROLES=(gateway)
BINDIR="${BINDIR:-$PREFIX/venv/bin}"

has_role() { local r; for r in "${ROLES[@]}"; do [ "$r" = "$1" ] && return 0; done; return 1; }

# Every change goes through run: printed, and done unless --dry-run.
run() {
    echo "+ $(printf '%q ' "$@")"
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

render_unit() {  # render_unit NAME DEST_DIR
    local src="$REPO/systemd/$1" dest="$2/$1"
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ render $src -> $dest (@BINDIR@=$BINDIR, @CONFDIR@=$CONFDIR)"
        return
    fi
    sed -e "s#@BINDIR@#$BINDIR#g" -e "s#@CONFDIR@#$CONFDIR#g" "$src" > "$dest.tmp"
    if grep -q '@[A-Z]*@' "$dest.tmp"; then
        echo "install.sh: $src has a placeholder this script does not know" >&2
        rm -f "$dest.tmp"
        exit 1
    fi
    chmod 0644 "$dest.tmp"
    mv "$dest.tmp" "$dest"
}

units() {
    has_role gateway && echo gatehouse-gateway.service
    has_role portal && echo gatehouse-portal.service
    return 0
}

if [ -n "$RENDER_DIR" ]; then
    mkdir -p "$RENDER_DIR"
    for u in $(units); do render_unit "$u" "$RENDER_DIR"; echo "$RENDER_DIR/$u"; done
    exit 0
fi

# ------------------------------------------------------------------ checks
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root (sudo $0 $*), or with --dry-run to see what it would do" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: this script is for Debian and Raspberry Pi OS (apt-get not found)" >&2
    exit 1
fi

# ------------------------------------------------------------------ packages
PKGS=(python3 python3-venv)
has_role broker && PKGS+=(mosquitto mosquitto-clients)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: $PYTHON is older than 3.11 (Debian 12 / Raspberry Pi OS bookworm has 3.11)" >&2
    [ "$DRY_RUN" = 1 ] || exit 1
fi

# ------------------------------------------------------------------ the service user
if ! getent passwd "$USER_NAME" >/dev/null; then
    run useradd --system --user-group --home-dir /var/lib/gatehouse --no-create-home \
        --shell /usr/sbin/nologin --comment "Gatehouse services" "$USER_NAME"
fi
if has_role gateway; then
    run usermod -aG dialout "$USER_NAME"  # serial ports (/dev/ttyUSB*, /dev/ttyAMA*) belong to dialout
fi

# ------------------------------------------------------------------ the virtualenv (every role needs the CLI)
run install -d -m 0755 "$PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || run "$PYTHON" -m venv "$PREFIX/venv"
run "$PREFIX/venv/bin/pip" install -q --upgrade pip
run "$PREFIX/venv/bin/pip" install -q --upgrade "$REPO"
run ln -sf "$BINDIR/gatehouse" /usr/local/bin/gatehouse
run install -d -m 0755 "$CONFDIR"

# ------------------------------------------------------------------ the units
UNITS=$(units)
for u in $UNITS; do render_unit "$u" /etc/systemd/system; done
if [ -n "$UNITS" ]; then
    run systemctl daemon-reload
fi
for u in $UNITS; do
    conf="$CONFDIR/gateway.yaml"
    [ "$u" = gatehouse-portal.service ] && conf="$CONFDIR/portal.yaml"
    if [ "$ENABLE" = 1 ]; then
        run systemctl enable "$u"
        if [ -f "$conf" ]; then
            run systemctl restart "$u"
        elif [ "$u" = gatehouse-gateway.service ]; then
            echo "$u: enabled; start it once $conf exists: sudo gatehouse init --config $conf --owner $USER_NAME ..."
        else
            echo "$u: enabled; start it once $conf exists (see docs/install.md)"
        fi
    fi
done

# ------------------------------------------------------------------ the broker
if has_role broker; then
    run install -d -m 0755 /etc/mosquitto/conf.d /etc/mosquitto/certs
    run install -m 0644 "$REPO/systemd/mosquitto-gatehouse.conf" /etc/mosquitto/conf.d/gatehouse.conf
    if ! grep -qs '^include_dir /etc/mosquitto/conf.d' /etc/mosquitto/mosquitto.conf; then
        echo "broker: /etc/mosquitto/mosquitto.conf does not include conf.d; add: include_dir /etc/mosquitto/conf.d" >&2
    fi
    run install -m 0644 "$REPO/systemd/gatehouse.acl" /etc/mosquitto/gatehouse.acl
    if [ ! -f /etc/mosquitto/gatehouse.passwd ]; then
        run install -m 0600 -o mosquitto -g mosquitto /dev/null /etc/mosquitto/gatehouse.passwd
    fi
    for f in gatehouse-ca.pem gatehouse-broker.pem gatehouse-broker.key; do
        if [ ! -f "/etc/mosquitto/certs/$f" ]; then
            echo "broker: /etc/mosquitto/certs/$f is missing; see docs/install.md (TLS for the broker)" >&2
        fi
    done
    echo "broker: add users with: sudo gatehouse broker add-user portal; sudo gatehouse broker add-user <site>/<gateway>"
    if [ "$ENABLE" = 1 ]; then
        run systemctl enable mosquitto
        run systemctl restart mosquitto
    fi
fi

if [ "$DRY_RUN" = 1 ]; then echo "dry run: nothing was changed"; else echo "done"; fi
