"""Run one fake metadata server by hand, for drills (see docs/drills.md).

    python -m tests.fakes gce   --port 8181
    python -m tests.fakes aws   --port 8182
    python -m tests.fakes azure --port 8183 --vm-name "$(hostname)"

Then type commands (one per line) on its standard input:

    preempt            the provider's preemption (GCE preempted=TRUE, AWS instance-action,
                       Azure Preempt event for this VM)
    rebalance          AWS only: a rebalance recommendation
    maintenance VALUE  GCE only: set instance/maintenance-event (e.g. TERMINATE_ON_HOST_MAINTENANCE)
    event TYPE [SECS]  Azure only: add an event (Reboot, Redeploy, Freeze, Terminate...)
    clear              withdraw everything (a false alarm)
    fault KIND [SECS]  misbehave: 500, garbage, huge, huge_declared, slow, trickle, close, reset
    fault none         behave again
    status             what the fake holds and how many requests it saw
    quit
"""

from __future__ import annotations

import argparse
import sys

from tests.fakes.aws import FakeAws
from tests.fakes.azure import FakeAzure
from tests.fakes.base import FakeMetadataServer, Fault
from tests.fakes.gce import FakeGce


def _clear(fake: FakeMetadataServer) -> None:
    if isinstance(fake, FakeGce):
        fake.set_value("instance/preempted", "FALSE")
        fake.set_value("instance/maintenance-event", "NONE")
    elif isinstance(fake, FakeAws):
        fake.withdraw()
        with fake.lock:
            fake.rebalance = None
    elif isinstance(fake, FakeAzure):
        for e in list(fake.events):
            fake.remove(e["EventId"])


def _status(fake: FakeMetadataServer) -> str:
    if isinstance(fake, FakeGce):
        held: object = {k: fake.values[k] for k in ("instance/preempted", "instance/maintenance-event")}
    elif isinstance(fake, FakeAws):
        held = {"instance-action": fake.instance_action, "rebalance": fake.rebalance}
    elif isinstance(fake, FakeAzure):
        held = {"events": fake.events, "acknowledged": fake.acknowledged}
    else:
        held = {}
    return f"{held} requests={fake.count()}"


def command(fake: FakeMetadataServer, line: str) -> str:
    """Apply one drill command; returns what to print."""
    words = line.split()
    if not words:
        return ""
    verb, args = words[0], words[1:]
    if verb == "preempt":
        if isinstance(fake, FakeGce):
            fake.preempt()
        elif isinstance(fake, FakeAws):
            fake.interrupt("terminate", in_seconds=float(args[0]) if args else 120.0)
        elif isinstance(fake, FakeAzure):
            fake.preempt(in_seconds=float(args[0]) if args else 30.0)
    elif verb == "rebalance" and isinstance(fake, FakeAws):
        fake.recommend_rebalance()
    elif verb == "maintenance" and isinstance(fake, FakeGce) and args:
        fake.set_value("instance/maintenance-event", args[0])
    elif verb == "event" and isinstance(fake, FakeAzure) and args:
        fake.add_event(args[0], in_seconds=float(args[1]) if len(args) > 1 else 30.0)
    elif verb == "clear":
        _clear(fake)
    elif verb == "fault" and args:
        try:
            fake.set_fault(Fault(args[0]), seconds=float(args[1]) if len(args) > 1 else 1.0)
        except ValueError:
            return f"unknown fault {args[0]!r}; known: {', '.join(f.value for f in Fault)}"
    elif verb == "status":
        return _status(fake)
    else:
        return f"unknown or inapplicable command {line.strip()!r} (see --help)"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("provider", choices=("gce", "aws", "azure"))
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--vm-name", default="trainer-spot-1", help="Azure: this VM's name")
    args = parser.parse_args(argv)
    fake: FakeMetadataServer
    if args.provider == "gce":
        fake = FakeGce(args.port)
    elif args.provider == "aws":
        fake = FakeAws(args.port)
    else:
        fake = FakeAzure(args.vm_name, args.port)
    with fake:
        print(f"{args.provider} fake metadata server on {fake.url}  (preemption.{args.provider}_url)",
              flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            out = command(fake, line)
            if out:
                print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
