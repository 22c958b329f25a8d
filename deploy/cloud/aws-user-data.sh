#!/bin/bash
# AWS EC2 user-data for a Spot instance: installs and starts preemptd at first boot
# (cloud-init runs user-data once; the unit is enabled, so later boots start it).
# Edit the variables below, then launch with --user-data file://deploy/cloud/aws-user-data.sh.
#
# What survives a Spot interruption on AWS:
#   - instance store (NVMe "ephemeral") volumes: never; lost on stop, hibernate and
#     terminate.
#   - the root EBS volume: survives only with interruption behaviour stop/hibernate;
#     with the default (terminate) it is deleted (DeleteOnTermination=true).
#   - an extra EBS volume with DeleteOnTermination=false: survives termination, but
#     lives in one Availability Zone and must be attached to the replacement instance.
#     Set CKPT_DEVICE to put checkpoints on such a volume.
#   - S3 (REMOTE_URL, [remote] url): survives everything, any AZ. Recommended with the
#     default terminate behaviour.
# AWS warns 2 minutes ahead (instance-action in IMDS): TimeoutStopSec=120s,
# grace_seconds=110 (install.sh --cloud aws).
set -euo pipefail

SOURCE_URL=""            # s3://BUCKET/preemptd-0.1.0.tar.gz or a git URL
REMOTE_URL=""            # e.g. s3://BUCKET/run-1
CKPT_DEVICE=""           # e.g. /dev/nvme1n1 for a retained EBS volume; "" = root volume
EXTRA="gpu,remote"

SRC=/opt/preemptd-src
if [ ! -x "$SRC/deploy/install.sh" ]; then
    [ -n "$SOURCE_URL" ] || { echo "preemptd: set SOURCE_URL in the user-data" >&2; exit 1; }
    mkdir -p "$SRC"
    case "$SOURCE_URL" in
        s3://*) aws s3 cp "$SOURCE_URL" /tmp/preemptd-src.tar.gz
                tar -xzf /tmp/preemptd-src.tar.gz -C "$SRC" --strip-components=1 ;;
        *) git clone --depth 1 "$SOURCE_URL" "$SRC" ;;
    esac
fi
exec "$SRC/deploy/cloud/bootstrap.sh" --cloud aws --extra "$EXTRA" \
    ${CKPT_DEVICE:+--disk "$CKPT_DEVICE"} ${REMOTE_URL:+--remote "$REMOTE_URL"}
