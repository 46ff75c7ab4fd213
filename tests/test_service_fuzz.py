"""Fuzz the running service from its own published OpenAPI schema (schemathesis), in bounded time.

Every generated request, valid-shaped or deliberately broken, must get a non-5xx answer in the
`{"error": {code, message}}` shape, and the server must be healthy afterwards.
"""

from __future__ import annotations

import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

import schemathesis
from schemathesis import GenerationMode
from test_service import start_server

MAX_EXAMPLES = 30  # per operation and mode; about 550 requests in all
BUDGET_S = 120.0
SKIP = {"POST /v1/shutdown"}  # would (correctly) stop the server under test


@pytest.fixture(scope="module")
def fuzz_server(tiny_models, tmp_path_factory):
    srv = start_server(tiny_models, tmp_path_factory.mktemp("fuzz") / "data")
    yield srv
    assert srv.stop() == 0, srv.output()


def test_fuzz_api_from_openapi_schema(fuzz_server):
    srv = fuzz_server
    raw = httpx.get(f"{srv.url}/v1/openapi.json", headers=srv.auth, timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/files/{name}"} <= set(labels), labels
    started = time.monotonic()
    seen: dict[int, int] = {}
    failures: list[str] = []

    for op in operations:
        if op.label in SKIP:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() - started > BUDGET_S:
                break

            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=srv.url, headers=srv.auth, timeout=30)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    failures.append(f"{op.label} [{mode.value}] -> {response.status_code}: {response.text[:300]}")
                elif response.status_code >= 400:
                    body = response.json()
                    assert set(body) == {"error"} and {"code", "message"} == set(body["error"]), body
                    assert "Traceback" not in response.text

            try:
                check()
            except Unsatisfiable:
                # no way to break a request without parameters (e.g. GET /v1/health): nothing to send
                assert mode == GenerationMode.NEGATIVE, op.label
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {sum(seen.values())} requests in {elapsed:.1f} s, statuses {dict(sorted(seen.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert sum(seen.values()) >= 100
    assert srv.healthy()
    with httpx.Client(base_url=srv.url, headers=srv.auth, timeout=30) as c:
        assert c.get("/v1/jobs").status_code == 200
