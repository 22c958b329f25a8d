"""Faithful local fakes of cloud metadata servers (real HTTP on 127.0.0.1), reusable by any test.

    from tests.fakes import FakeGce, FakeAws, FakeAzure, Fault
"""

from tests.fakes.aws import FakeAws
from tests.fakes.azure import FakeAzure
from tests.fakes.base import FakeMetadataServer, Fault, Reply, Request, unused_port
from tests.fakes.gce import FakeGce

__all__ = [
    "FakeAws", "FakeAzure", "FakeGce", "FakeMetadataServer", "Fault", "Reply", "Request", "unused_port",
]
