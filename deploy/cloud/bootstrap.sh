#!/usr/bin/env bash
# Shared VM start-up step of the per-cloud files (gce-startup.sh, aws-user-data.sh,
# azure-cloud-init.yaml): put the checkpoint disk at /var/lib/preemptd, install and
# start preemptd. Idempotent: safe on every boot (a stopped-then-restarted spot VM runs
# its start-up script again).
#
#   deploy/cloud/bootstrap.sh --cloud gce|aws|azure [--disk DEVICE] [--remote URL]
#                             [--extra gpu,remote] [--package SPEC]
#
#   --disk    block device that survives preemption (a persistent disk / EBS / managed
#             data disk). Formatted ext4 only when it holds no filesystem yet, then
#             mounted at /var/lib/preemptd by UUID (fstab, nofail). Without it the
#             checkpoints stay on the boot disk.
#   --remote  object-storage URL for [remote] url (only set in a freshly written config).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE=/var/lib/preemptd
CONFIG=/etc/preemptd/config.toml
cloud="" disk="" remote="" extra="gpu,remote" package=""

while [ $# -gt 0 ]; do
    case "$1" in
        --cloud) cloud="${2:?}"; shift 2 ;;
        --disk) disk="${2?}"; shift 2 ;;
        --remote) remote="${2?}"; shift 2 ;;
        --extra) extra="${2:?}"; shift 2 ;;
        --package) package="${2?}"; shift 2 ;;
        *) echo "bootstrap.sh: unknown option $1" >&2; exit 64 ;;
    esac
done
case "$cloud" in gce|aws|azure) ;; *) echo "bootstrap.sh: --cloud must be gce, aws or azure" >&2; exit 64 ;; esac
log() { echo "preemptd-bootstrap: $*"; }

# The unit may not load kernel modules (ProtectKernelModules=yes), and CUDA loads
# nvidia-uvm on first use through a setuid helper that NoNewPrivileges= blocks: load
# it here, as root, before the service starts.
# modules-load.d makes later boots load it before the (enabled) unit starts.
if command -v nvidia-smi >/dev/null || command -v nvidia-modprobe >/dev/null; then
    echo nvidia-uvm > /etc/modules-load.d/preemptd-nvidia.conf
    if command -v nvidia-modprobe >/dev/null; then
        nvidia-modprobe -u -c=0 || log "nvidia-modprobe failed (no GPU driver?)"
    else
        modprobe nvidia-uvm || log "modprobe nvidia-uvm failed"
    fi
fi

# install.sh needs venv support; Debian/Ubuntu images often lack python3-venv.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

if [ -n "$disk" ]; then
    for _ in $(seq 60); do [ -b "$disk" ] && break; sleep 1; done
    [ -b "$disk" ] || { log "disk $disk did not appear"; exit 1; }
    if ! blkid "$disk" >/dev/null 2>&1; then
        log "formatting empty disk $disk"
        mkfs.ext4 -q -L preemptd "$disk"
    fi
    uuid="$(blkid -s UUID -o value "$disk")"
    mkdir -p "$STATE"
    if ! grep -q "UUID=$uuid" /etc/fstab; then
        echo "UUID=$uuid $STATE ext4 defaults,nofail,x-systemd.device-timeout=60s 0 2" >> /etc/fstab
        systemctl daemon-reload 2>/dev/null || true
    fi
    mountpoint -q "$STATE" || mount "$STATE"
    log "checkpoint disk $disk mounted at $STATE"
fi

fresh=0
[ -e "$CONFIG" ] || fresh=1
"$HERE/../install.sh" --cloud "$cloud" --extra "$extra" ${package:+--package "$package"}
if [ "$fresh" -eq 1 ] && [ -n "$remote" ]; then
    sed -i "s|^url = \"\"|url = \"$remote\"|" "$CONFIG"
    log "remote mirror: $remote"
fi
# start, not restart: on a later boot the enabled unit already runs a training job.
systemctl start preemptd.service
log "preemptd started ($(systemctl show -p StatusText --value preemptd.service))"
