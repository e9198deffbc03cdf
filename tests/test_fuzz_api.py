"""Fuzzing the HTTP API from its own OpenAPI description (schemathesis), with a valid token:
no request may cause a server error or an answer that contradicts the description."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from gpu_magic.server.api import create_app
from gpu_magic.server.auth import Authenticator

from .conftest import Gateway, start_gateway

# The description the gateway serves at /openapi.json, built from the same app object. Its
# bearer-token requirement is left out here: every call below carries a valid token, so a
# "request without the token" the fuzzer makes up would be sent with one, and taken
# (test_gateway_http refuses every route without a token, or with a wrong one).
_described = create_app(None, Authenticator({})).fastapi.openapi()  # type: ignore[arg-type,attr-defined]
schema = schemathesis.openapi.from_dict({k: v for k, v in _described.items() if k != "security"})


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # its own gateway: the fuzzer may set limits and cancel things
    gw = start_gateway(tmp_path_factory.mktemp("fuzz"))
    yield gw
    gw.stop()


def test_served_description_is_the_one_fuzzed(fuzzed: Gateway) -> None:
    import httpx

    served = httpx.get(fuzzed.url + "/openapi.json",
                       headers={"Authorization": f"Bearer {fuzzed.token}"}).json()
    assert served["paths"].keys() == schema.raw_schema["paths"].keys()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_within_its_description(case: Any, fuzzed: Gateway) -> None:
    # Every check but "a schema-valid request is accepted": a well-formed request may still be
    # refused for what it means (a blob whose bytes do not match its digest, a job naming blobs
    # the gateway lacks, a GPU type the pool does not have), with a documented 4xx.
    case.call_and_validate(base_url=fuzzed.url,
                           headers={"Authorization": f"Bearer {fuzzed.token}"},
                           excluded_checks=[positive_data_acceptance])
