"""The fake metadata servers speak their provider's protocol (headers, tokens, 404s, long polls).

These pin the fakes down, so the source tests that use them test against the
documented behaviour and not against whatever the fake happens to do.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from tests.fakes import FakeAws, FakeAzure, FakeGce, Fault


def call(url: str, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


G = {"Metadata-Flavor": "Google"}


def test_gce_requires_the_flavor_header_and_answers_with_it() -> None:
    with FakeGce() as gce:
        status, _, body = call(gce.url, "GET", "/computeMetadata/v1/instance/preempted")
        assert status == 403 and b"Metadata-Flavor" in body
        status, _, _ = call(gce.url, "GET", "/computeMetadata/v1/instance/preempted",
                            {**G, "X-Forwarded-For": "10.0.0.1"})
        assert status == 403
        status, headers, body = call(gce.url, "GET", "/computeMetadata/v1/instance/preempted", G)
        assert (status, body) == (200, b"FALSE")
        assert headers["metadata-flavor"] == "Google" and headers["etag"]
        assert call(gce.url, "GET", "/computeMetadata/v1/instance/nope", G)[0] == 404


def test_gce_long_poll_times_out_unchanged_and_returns_on_change() -> None:
    with FakeGce() as gce:
        _, headers, _ = call(gce.url, "GET", "/computeMetadata/v1/instance/preempted", G)
        etag = headers["etag"]
        path = f"/computeMetadata/v1/instance/preempted?wait_for_change=true&last_etag={etag}&timeout_sec=1"
        began = time.monotonic()
        status, headers2, body = call(gce.url, "GET", path, G)
        assert 0.8 < time.monotonic() - began < 5 and body == b"FALSE" and headers2["etag"] == etag
        # A stale last_etag returns at once.
        began = time.monotonic()
        call(gce.url, "GET", path.replace(etag, "0000"), G)
        assert time.monotonic() - began < 0.5
        # A change wakes a waiting long poll.
        threading.Timer(0.3, gce.preempt).start()
        began = time.monotonic()
        _, headers3, body = call(gce.url, "GET", path.replace("timeout_sec=1", "timeout_sec=30"), G)
        assert body == b"TRUE" and headers3["etag"] != etag and time.monotonic() - began < 3


def test_aws_imdsv2_token_flow() -> None:
    with FakeAws() as aws:
        action = "/latest/meta-data/spot/instance-action"
        assert call(aws.url, "GET", action)[0] == 401
        assert call(aws.url, "PUT", "/latest/api/token")[0] == 400
        ttl0 = {"X-aws-ec2-metadata-token-ttl-seconds": "0"}
        assert call(aws.url, "PUT", "/latest/api/token", ttl0)[0] == 400
        assert call(aws.url, "GET", "/latest/api/token")[0] == 405
        status, headers, token = call(aws.url, "PUT", "/latest/api/token",
                                      {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        assert status == 200 and token and headers["x-aws-ec2-metadata-token-ttl-seconds"] == "60"
        auth = {"X-aws-ec2-metadata-token": token.decode()}
        assert call(aws.url, "GET", action, auth)[0] == 404
        assert call(aws.url, "GET", action, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
        aws.interrupt("stop", in_seconds=120)
        status, _, body = call(aws.url, "GET", action, auth)
        assert status == 200 and json.loads(body)["action"] == "stop"
        aws.expire_tokens()
        assert call(aws.url, "GET", action, auth)[0] == 401


def test_azure_requires_header_and_version_and_post_starts_events() -> None:
    with FakeAzure(vm_name="vm7") as az:
        path = "/metadata/scheduledevents?api-version=2020-07-01"
        status, _, body = call(az.url, "GET", path)
        assert status == 400 and b"metadata header" in body
        assert call(az.url, "GET", "/metadata/scheduledevents", {"Metadata": "true"})[0] == 400
        status, _, body = call(az.url, "GET", path, {"Metadata": "true"})
        doc = json.loads(body)
        assert status == 200 and doc["Events"] == [] and isinstance(doc["DocumentIncarnation"], int)
        eid = az.preempt(in_seconds=30)
        doc2 = json.loads(call(az.url, "GET", path, {"Metadata": "true"})[2])
        assert doc2["DocumentIncarnation"] > doc["DocumentIncarnation"]
        ev = doc2["Events"][0]
        assert (ev["EventId"], ev["EventType"], ev["Resources"], ev["EventStatus"]) == (
            eid, "Preempt", ["vm7"], "Scheduled") and ev["NotBefore"].endswith("GMT")
        assert call(az.url, "POST", path, {"Metadata": "true"}, b"nonsense")[0] == 400
        ack = json.dumps({"StartRequests": [{"EventId": eid}]}).encode()
        json_headers = {"Metadata": "true", "Content-Type": "application/json"}
        assert call(az.url, "POST", path, json_headers, ack)[0] == 200
        ev = json.loads(call(az.url, "GET", path, {"Metadata": "true"})[2])["Events"][0]
        assert (ev["EventStatus"], ev["NotBefore"]) == ("Started", "") and az.acknowledged == [eid]
        name = call(az.url, "GET", "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
                    {"Metadata": "true"})
        assert name[:1] == (200,) and name[2] == b"vm7"


@pytest.mark.parametrize("fault", [Fault.ERROR_500, Fault.GARBAGE, Fault.HUGE_DECLARED])
def test_faults_apply_to_matching_paths_only(fault: Fault) -> None:
    with FakeGce() as gce:
        gce.set_fault(fault, only="preempted", size=1 << 20)
        status, headers, body = call(gce.url, "GET", "/computeMetadata/v1/instance/preempted", G)
        assert (status, body) != (200, b"FALSE")
        assert call(gce.url, "GET", "/computeMetadata/v1/instance/maintenance-event", G)[2] == b"NONE"
        gce.clear_fault()
        assert call(gce.url, "GET", "/computeMetadata/v1/instance/preempted", G)[2] == b"FALSE"


def test_close_fault_drops_the_connection() -> None:
    with FakeAws() as aws:
        aws.set_fault(Fault.CLOSE)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            call(aws.url, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
