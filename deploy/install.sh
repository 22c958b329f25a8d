#!/usr/bin/env bash
# Install (or --uninstall) preemptd as a systemd service. Idempotent: running it again
# upgrades the package and the unit, and never touches an existing config or checkpoint.
#
#   sudo deploy/install.sh [--extra tf|gpu|none] [--cloud gce|aws|azure] [--start]
#   sudo deploy/install.sh --uninstall        # keeps /var/lib/preemptd (checkpoints)
#
# Options:
#   --extra E        TensorFlow extra of the package: tf (CPU TensorFlow), gpu
#                    (tensorflow[and-cuda]) or none (bring your own). Default: tf.
#                    Add ,remote for object-storage mirroring, e.g. --extra gpu,remote.
#   --cloud C        gce | aws | azure: writes a drop-in with that cloud's stop window
#                    (TimeoutStopSec 30 s / 120 s / 30 s) and, for a new config, the
#                    matching [stop] grace_seconds (25 / 110 / 25).
#   --package SPEC   what pip installs (a source dir or a wheel). Default: this checkout.
#   --python PATH    interpreter for the venv. Default: python3.
#   --pip-args ARGS  extra pip arguments, e.g. "--no-index --find-links /wheels".
#   --root DIR       install into a scratch root (image building, tests); no live systemd.
#   --start          also (re)start the service now (default: enable only).
#   --uninstall      remove what install added; keep checkpoints and an edited config.
set -euo pipefail

NAME=preemptd
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="$(dirname "$HERE")"

extra=tf
cloud=""
package="$SRC"
python=python3
pip_args=""
root=""
start=0
uninstall=0

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --extra) extra="${2:?--extra needs a value}"; shift 2 ;;
        --cloud) cloud="${2:?--cloud needs a value}"; shift 2 ;;
        --package) package="${2:?--package needs a value}"; shift 2 ;;
        --python) python="${2:?--python needs a value}"; shift 2 ;;
        --pip-args) pip_args="${2?--pip-args needs a value}"; shift 2 ;;
        --root) root="${2:?--root needs a value}"; shift 2 ;;
        --start) start=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
done

case "$cloud" in
    "") stop_timeout=""; grace="" ;;
    gce|azure) stop_timeout=30; grace=25 ;;
    aws) stop_timeout=120; grace=110 ;;
    *) echo "install.sh: --cloud must be gce, aws or azure, got '$cloud'" >&2; exit 64 ;;
esac
case "$extra" in
    none) pip_spec_extra="" ;;
    *) [[ "$extra" =~ ^(tf|gpu|remote)(,(tf|gpu|remote))*$ ]] \
           || { echo "install.sh: --extra must be tf, gpu, none or a comma list of tf,gpu,remote" >&2; exit 64; }
       pip_spec_extra="[$extra]" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (it creates a system user and installs a unit)"

root="${root%/}"
PREFIX="$root/opt/$NAME"
VENV="$PREFIX/venv"
ETC="$root/etc/$NAME"
CONFIG="$ETC/config.toml"
UNIT_DIR="$root/etc/systemd/system"
UNIT="$UNIT_DIR/$NAME.service"
DROPIN="$UNIT_DIR/$NAME.service.d/10-cloud.conf"
SYSUSERS="$root/etc/sysusers.d/$NAME.conf"
RECORD="$PREFIX/.install-record"   # what this script created, for --uninstall
STATE="$root/var/lib/$NAME"

# Talk to a running systemd only when installing into the live root.
live_systemd() { [ -z "$root" ] && [ -d /run/systemd/system ]; }
systemctl_() { if [ -n "$root" ]; then systemctl --root="$root" "$@"; else systemctl "$@"; fi; }

user_exists() {
    if [ -n "$root" ]; then grep -q "^$NAME:" "$root/etc/passwd" 2>/dev/null; else getent passwd "$NAME" >/dev/null; fi
}

# ------------------------------------------------------------------ uninstall
if [ "$uninstall" -eq 1 ]; then
    if live_systemd; then
        systemctl disable --now "$NAME.service" 2>/dev/null || true
    elif [ -e "$UNIT" ]; then
        systemctl_ disable "$NAME.service" 2>/dev/null || true
    fi
    rm -f "$UNIT" "$DROPIN"
    rmdir "$UNIT_DIR/$NAME.service.d" 2>/dev/null || true
    # The config goes only if it is still byte-for-byte what we installed.
    if [ -f "$CONFIG" ] && [ -f "$PREFIX/config.installed.toml" ] \
            && cmp -s "$CONFIG" "$PREFIX/config.installed.toml"; then
        rm -f "$CONFIG"; rmdir "$ETC" 2>/dev/null || true
    elif [ -f "$CONFIG" ]; then
        say "keeping $CONFIG (edited since install)"
    fi
    if [ -f "$RECORD" ] && grep -qx "user" "$RECORD"; then
        userdel ${root:+--root "$root"} "$NAME" 2>/dev/null || true
        # userdel keeps the group unless login.defs says USERGROUPS_ENAB.
        if grep -q "^$NAME:" "$root/etc/group" 2>/dev/null; then
            groupdel ${root:+--root "$root"} "$NAME" 2>/dev/null || true
        fi
        rm -f "$SYSUSERS"
    fi
    rm -rf "$PREFIX"
    if live_systemd; then systemctl daemon-reload; fi
    say "removed; checkpoints and state kept in $STATE"
    exit 0
fi

# ------------------------------------------------------------------ install
[ -f "$HERE/systemd/$NAME.service" ] || die "$HERE/systemd/$NAME.service not found"
command -v "$python" >/dev/null || die "python interpreter '$python' not found (use --python)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is older than Python 3.10"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$python cannot create venvs (on Debian/Ubuntu: apt-get install python3-venv)"

mkdir -p "$PREFIX"
touch "$RECORD"
record() { grep -qx "$1" "$RECORD" || echo "$1" >> "$RECORD"; }

# 1. the unprivileged user (systemd-sysusers when available: declarative, idempotent)
if ! user_exists; then
    install -D -m 0644 "$HERE/sysusers.d/$NAME.conf" "$SYSUSERS"
    if command -v systemd-sysusers >/dev/null; then
        if [ -n "$root" ]; then systemd-sysusers --root="$root" "$SYSUSERS"; else systemd-sysusers "$SYSUSERS"; fi
    else
        useradd ${root:+--root "$root"} --system --user-group --home-dir /var/lib/$NAME \
            --no-create-home --shell /usr/sbin/nologin "$NAME"
    fi
    user_exists || die "could not create user $NAME"
    record user
    say "created system user $NAME"
fi

# 2. the venv and the package
if [ ! -x "$VENV/bin/python" ]; then
    "$python" -m venv "$VENV"
fi
# shellcheck disable=SC2086  # pip_args is a list of words on purpose
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $pip_args "${package}${pip_spec_extra}"
[ -x "$VENV/bin/$NAME" ] || die "package installed but $VENV/bin/$NAME is missing"
install -D -m 0644 "$SRC/docs/operations.md" "$PREFIX/share/doc/operations.md" 2>/dev/null || true

# 3. the config, only if absent (never overwrite an operator's file)
if [ ! -e "$CONFIG" ]; then
    install -d -m 0755 "$ETC"
    tmp="$(mktemp "$ETC/.config.XXXXXX")"
    if [ -n "$grace" ]; then
        sed "s/^grace_seconds = .*/grace_seconds = $grace.0/" "$HERE/config.example.toml" > "$tmp"
    else
        cat "$HERE/config.example.toml" > "$tmp"
    fi
    chmod 0640 "$tmp"
    chgrp "$(grep "^$NAME:" "$root/etc/group" | cut -d: -f3)" "$tmp"
    mv "$tmp" "$CONFIG"
    cp "$CONFIG" "$PREFIX/config.installed.toml"
    say "wrote $CONFIG"
fi
if [ -z "$root" ]; then
    "$VENV/bin/$NAME" validate "$CONFIG" || die "$CONFIG does not validate (see above)"
fi

# 4. the unit, a per-cloud drop-in, enable
install -D -m 0644 "$HERE/systemd/$NAME.service" "$UNIT"
if [ -n "$stop_timeout" ]; then
    install -d -m 0755 "$(dirname "$DROPIN")"
    printf '# Written by deploy/install.sh --cloud %s: the stop window of this cloud.\n[Service]\nTimeoutStopSec=%ss\n' \
        "$cloud" "$stop_timeout" > "$DROPIN"
fi
if live_systemd; then
    systemctl daemon-reload
    systemctl enable "$NAME.service"
    if [ "$start" -eq 1 ]; then systemctl restart "$NAME.service"; fi
else
    systemctl_ enable "$NAME.service"
fi
say "installed: $VENV, $UNIT${stop_timeout:+, $DROPIN}; checkpoints in $STATE"
