#!/usr/bin/env bash
# GCE startup script for a Spot / preemptible VM: installs and starts preemptd.
# Runs as root at every boot (metadata key `startup-script`):
#
#   gcloud compute instances create trainer-1 --provisioning-model=SPOT \
#     --instance-termination-action=STOP \
#     --disk=name=preemptd-ckpt,device-name=preemptd-ckpt,auto-delete=no \
#     --metadata-from-file=startup-script=deploy/cloud/gce-startup.sh \
#     --metadata=preemptd-source=gs://BUCKET/preemptd-0.1.0.tar.gz,preemptd-remote=gs://BUCKET/run-1
#
# What survives a preemption on GCE:
#   - a persistent disk created with auto-delete=no: survives both termination
#     actions (STOP keeps the VM; DELETE deletes the VM but not this disk, which a
#     replacement VM in the same zone attaches by name). Checkpoints go here, mounted
#     at /var/lib/preemptd.
#   - the boot persistent disk survives only with --instance-termination-action=STOP.
#   - local SSD does NOT: its data is discarded when a Spot VM is preempted.
#   - Cloud Storage (preemptd-remote, [remote] url) survives everything, across zones.
# GCE gives 30 s from the ACPI shutdown to the hard stop: TimeoutStopSec=30s,
# grace_seconds=25 (install.sh --cloud gce).
#
# Instance metadata attributes read (all optional):
#   preemptd-source  gs:// tarball of the source tree, or a git URL (default: keep /opt/preemptd-src)
#   preemptd-disk    device name of the checkpoint disk (default: preemptd-ckpt)
#   preemptd-remote  gs:// URL for the remote mirror
#   preemptd-extra   pip extras (default: gpu,remote)
set -euo pipefail

MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes
attr() { curl -fsS -H "Metadata-Flavor: Google" "$MD/$1" 2>/dev/null || echo "${2:-}"; }

SRC=/opt/preemptd-src
source_url="$(attr preemptd-source)"
disk_name="$(attr preemptd-disk preemptd-ckpt)"
remote="$(attr preemptd-remote)"
extra="$(attr preemptd-extra gpu,remote)"

if [ ! -x "$SRC/deploy/install.sh" ]; then
    [ -n "$source_url" ] || { echo "preemptd: set metadata preemptd-source" >&2; exit 1; }
    mkdir -p "$SRC"
    case "$source_url" in
        gs://*) gcloud storage cp "$source_url" /tmp/preemptd-src.tar.gz
                tar -xzf /tmp/preemptd-src.tar.gz -C "$SRC" --strip-components=1 ;;
        *) git clone --depth 1 "$source_url" "$SRC" ;;
    esac
fi

disk="/dev/disk/by-id/google-$disk_name"
[ -e "$disk" ] || disk=""   # no separate disk attached: checkpoints on the boot disk
exec "$SRC/deploy/cloud/bootstrap.sh" --cloud gce --extra "$extra" \
    ${disk:+--disk "$disk"} ${remote:+--remote "$remote"}
