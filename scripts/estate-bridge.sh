#!/usr/bin/env bash
# Render the bridge from an estate's Mosquitto to the monitoring centre's (systemd/mosquitto-estate-bridge.conf).
#
#   sudo scripts/estate-bridge.sh --site sunny-gardens --centre centre.example.cn:8883 \
#        --user bridge-sunny-gardens --password-file /etc/gatehouse/secrets/bridge.password \
#        --cafile /etc/mosquitto/certs/centre-ca.pem [--conf-dir /etc/mosquitto/conf.d | --out FILE]
#
# The output holds the bridge's password: it is written with mode 0600 (owned by mosquitto when that user exists).
# Its queue limits are global, and Mosquitto takes the last it reads (conf.d in alphabetical order): the file is named
# to be read after gatehouse.conf (whose 10000 would otherwise cap the WAN backlog), and the script refuses to write
# it where another file read after it would set them again.
# TLS is required; --plain leaves it out, for a centre reached over a VPN or in the tests, and says so in the file.
# On the centre's broker, add the user (mosquitto_passwd) and its ACL lines (systemd/gatehouse.acl, "bridges").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATE="$REPO/systemd/mosquitto-estate-bridge.conf"
SITE="" CENTRE="" USER_NAME="" PASSWORD_FILE="" CAFILE="" CERTFILE="" KEYFILE="" PLAIN=0
OUT=/etc/mosquitto/conf.d/zz-centre-bridge.conf
KEEPALIVE=30 MAX_QUEUED=1000000

die() { echo "estate-bridge: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --site) SITE="$2"; shift 2 ;;
        --centre) CENTRE="$2"; shift 2 ;;
        --user) USER_NAME="$2"; shift 2 ;;
        --password-file) PASSWORD_FILE="$2"; shift 2 ;;
        --cafile) CAFILE="$2"; shift 2 ;;
        --certfile) CERTFILE="$2"; shift 2 ;;
        --keyfile) KEYFILE="$2"; shift 2 ;;
        --plain) PLAIN=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --conf-dir) OUT="$2/zz-centre-bridge.conf"; shift 2 ;;
        --keepalive) KEEPALIVE="$2"; shift 2 ;;
        --max-queued) MAX_QUEUED="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ "$SITE" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "--site: an estate's code (letters, digits, _ . -)"
[[ "$CENTRE" =~ ^[A-Za-z0-9.:-]+:[0-9]+$ ]] || die "--centre: HOST:PORT of the centre's broker"
[[ "$USER_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "--user: the bridge's user on the centre's broker"
[ -r "$PASSWORD_FILE" ] || die "--password-file: a readable file holding the password alone"
[[ "$KEEPALIVE" =~ ^[0-9]+$ ]] && [ "$KEEPALIVE" -ge 5 ] || die "--keepalive: seconds, at least 5"
[[ "$MAX_QUEUED" =~ ^[0-9]+$ ]] || die "--max-queued: a number of messages"
if [ "$(stat -c %a "$PASSWORD_FILE")" != 600 ] && [ "$(stat -c %a "$PASSWORD_FILE")" != 400 ]; then
    die "--password-file $PASSWORD_FILE is readable by others: chmod 600 it"
fi
PASSWORD="$(head -n1 "$PASSWORD_FILE")"
[ -n "$PASSWORD" ] && [[ "$PASSWORD" != *[[:space:]]* ]] || die "the password is empty or holds blanks"

if [ "$PLAIN" = 1 ]; then
    TLS="# No TLS (--plain): the centre is reached over a VPN or a private line."
else
    [ -r "$CAFILE" ] || die "--cafile: the CA that signed the centre broker's certificate (or --plain)"
    TLS="bridge_cafile $CAFILE"$'\n'"bridge_insecure false"
    if [ -n "$CERTFILE" ]; then TLS+=$'\n'"bridge_certfile $CERTFILE"$'\n'"bridge_keyfile $KEYFILE"; fi
fi

# The queue limits must be the last ones Mosquitto reads: no file of the same folder read after this one may set them.
out_dir="$(dirname "$OUT")" out_name="$(basename "$OUT")"
for f in "$out_dir"/*.conf; do
    [ -f "$f" ] && [ "$(basename "$f")" != "$out_name" ] || continue
    if [[ "$(basename "$f")" > "$out_name" ]] \
        && grep -Eq '^[[:space:]]*(max_queued_messages|max_queued_bytes|queue_qos0_messages)[[:space:]]' "$f"; then
        die "$f is read after $OUT and sets the queue limits again (Mosquitto keeps the last): remove them there, or --out a name that sorts after it"
    fi
done

umask 077
tmp="$(mktemp "${OUT}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
    line="${line//@SITE@/$SITE}"
    line="${line//@CENTRE_HOST@/${CENTRE%:*}}"
    line="${line//@CENTRE_PORT@/${CENTRE##*:}}"
    line="${line//@USER@/$USER_NAME}"
    line="${line//@PASSWORD@/$PASSWORD}"
    line="${line//@KEEPALIVE@/$KEEPALIVE}"
    line="${line//@MAX_QUEUED@/$MAX_QUEUED}"
    line="${line//@TLS@/$TLS}"
    printf '%s\n' "$line"
done < "$TEMPLATE" > "$tmp"
chmod 600 "$tmp"
if id mosquitto >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then chown mosquitto: "$tmp"; fi
mv "$tmp" "$OUT"
trap - EXIT
echo "estate-bridge: wrote $OUT (mode 0600); restart mosquitto to start the bridge"
cat <<ACL
On the centre's broker: mosquitto_passwd /etc/mosquitto/gatehouse.passwd $USER_NAME, and in gatehouse.acl:
user $USER_NAME
topic write gatehouse/v1/$SITE/+/events
topic write gatehouse/v1/$SITE/+/status
topic read gatehouse/v1/$SITE/+/ack
topic read gatehouse/v1/$SITE/+/cmd
topic readwrite gatehouse/bridge/$SITE/state
ACL
