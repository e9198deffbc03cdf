"""The gateway's HTTP API against real gateway processes on loopback (DESIGN.md: HTTP API, Events,
Tokens, Trust model). Real runners on a simulated pool; nothing of ours is mocked.

Most tests share the session gateway of conftest.py (pool H100:2, A100-80GB:4 on one node) and
leave its GPUs free when they end. Extra gateways are started only for what needs them: a tokens
file with several users, and a restart on the same state directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import gpu_magic
from gpu_magic._client import GatewayClient
from gpu_magic._errors import GatewayError
from gpu_magic._payload import PIECE, digest, loads, pack_inputs
from gpu_magic._version import WIRE_FORMAT, __version__
from gpu_magic.server.auth import TokensFileError, load_tokens_file

from .conftest import Gateway, start_gateway, wait_for

pytestmark = pytest.mark.slow

FINAL_STATES = {"succeeded", "failed", "cancelled", "timed_out", "lost", "expired"}
DEADLINE_S = 60.0  # a no-hang deadline, never a claim about speed

# Every route of DESIGN.md's table, as the app names its path parameters.
PUBLIC_ROUTES = {("GET", "/v1/health")}
PRIVATE_ROUTES = [
    ("GET", "/v1/pool"),
    ("POST", "/v1/blobs/missing"),
    ("PUT", "/v1/blobs/{digest}"),
    ("GET", "/v1/blobs/{digest}"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("DELETE", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/interrupt"),
    ("GET", "/v1/limits"),
    ("PUT", "/v1/limits/{name}"),
    ("GET", "/v1/local"),
    ("POST", "/v1/blobs/adopt"),
]


# --- helpers ---


def opts(text: str) -> list[dict[str, Any]]:
    """``"H100:2, A100-80GB"`` as the JSON spec of a submission."""
    out = []
    for part in text.split(","):
        name, _, count = part.strip().partition(":")
        out.append({"type": name, "count": int(count or 1)})
    return out


def submit(client: GatewayClient, source: str, spec: str = "H100", *,
           values: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Upload a job's inputs and submit it, as the client side does; the job record."""
    values = values or {}
    packed = pack_inputs(values, None, None)
    for d, blob in packed.blobs().items():
        client.upload(d, blob)
    body = {
        "source": source, "spec": opts(spec), "inputs": packed.manifest,
        "input_names": list(values), "outputs": [], "deleted": [], "has_value": False,
        "timeout": 60, **fields,
    }
    return client.submit(body)


def follow(client: GatewayClient, job_id: str, *, after: int = 0,
           until: Callable[[dict[str, Any]], bool] | None = None,
           timeout: float = DEADLINE_S) -> list[dict[str, Any]]:
    """The job's events (after ``after``) up to done, or up to the first one ``until`` accepts.

    The stream is read in a daemon thread so that a gateway which never ends it fails the test
    after ``timeout`` instead of hanging the run.
    """
    box: dict[str, Any] = {"events": []}

    def read() -> None:
        try:
            for ev in client.events(job_id, after=after):
                box["events"].append(ev)
                if until is not None and until(ev):
                    break
        except BaseException as exc:  # handed to the test's thread below
            box["error"] = exc

    t = threading.Thread(target=read, daemon=True, name=f"follow-{job_id}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"the event stream of job {job_id} did not get there within {timeout} s; "
                             f"so far: {box['events']}")
    if "error" in box:
        raise box["error"]
    return box["events"]


def finish(client: GatewayClient, job_id: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
    """Wait until the job is in a final state; its record."""
    return wait_for(lambda: (r := client.job(job_id))["state"] in FINAL_STATES and r, timeout)


def free_of(client: GatewayClient, gpu_type: str) -> int:
    return next(t["free"] for t in client.pool()["types"] if t["type"] == gpu_type)


def all_free(client: GatewayClient) -> bool:
    return all(t["free"] == t["total"] for t in client.pool()["types"])


def raw_sse(url: str, token: str, job_id: str, headers: dict[str, str] | None = None,
            params: dict[str, Any] | None = None) -> tuple[httpx.Response, list[tuple[int, dict[str, Any]]]]:
    """A finished job's stream read with plain httpx: the response and its (id, data) pairs."""
    pairs: list[tuple[int, dict[str, Any]]] = []
    with httpx.Client(timeout=DEADLINE_S) as http:
        resp = http.get(f"{url}/v1/jobs/{job_id}/events", params=params,
                        headers={"Authorization": f"Bearer {token}", **(headers or {})})
    for block in resp.text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue  # heartbeat comment
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "data" in fields:
            pairs.append((int(fields["id"]), json.loads(fields["data"])))
    return resp, pairs


def call(url: str, token: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One plain HTTP request: status codes and error bodies are checked on the wire, not through
    the client's mapping of them to exceptions."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as http:
        return http.request(method, path, headers=headers, **kwargs)


def refused(resp: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    """Assert an error answer; its JSON body."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    if error is not None:
        assert body["error"] == error, body
    return body


def post_job(gateway: Gateway, client: GatewayClient, spec: str) -> httpx.Response:
    """Submit a trivial job with the given spec over plain HTTP (its inputs uploaded first)."""
    packed = pack_inputs({}, None, None)
    client.upload(packed.pickle_digest, memoryview(packed.pickle))
    return call(gateway.url, gateway.token, "POST", "/v1/jobs",
                json={"source": "pass", "spec": opts(spec), "inputs": packed.manifest})


def write_tokens(path: Path, entries: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f)


SLEEPER = "print('sleeping', flush=True)\nimport time\ntime.sleep(30)\n"


@pytest.fixture
def blocker(client: GatewayClient) -> Iterator[dict[str, Any]]:
    """A running job that holds both H100s; cancelled, and its GPUs free again, afterwards."""
    wait_for(lambda: free_of(client, "H100") == 2, DEADLINE_S)
    job = submit(client, SLEEPER, "H100:2")
    wait_for(lambda: client.job(job["id"])["state"] == "running", DEADLINE_S)
    assert free_of(client, "H100") == 0
    yield job
    client.cancel(job["id"])
    finish(client, job["id"])
    wait_for(lambda: free_of(client, "H100") == 2, DEADLINE_S)


@pytest.fixture(scope="module")
def known(gateway: Gateway) -> Iterator[dict[str, Any]]:
    """Things of the owner on the shared gateway, so that a refusal can only be about the token:
    a finished job, a stored blob and a valid submission body."""
    c = gateway.client()
    data = b"known blob " + secrets.token_bytes(16)
    c.upload(digest(data), memoryview(data))
    job = submit(c, "y = 40 + 2\n", "A100-80GB", outputs=["y"])
    packed = pack_inputs({}, None, None)
    body = {"source": "pass\n", "spec": opts("A100-80GB"), "inputs": packed.manifest, "timeout": 60}
    yield {"job": finish(c, job["id"]), "digest": digest(data), "data": data, "body": body}
    c.close()


@dataclass
class Users:
    """A gateway with a tokens file: alice and bob, and carol, an admin."""

    gw: Gateway
    tokens: dict[str, str]
    tokens_file: Path

    def client(self, name: str) -> GatewayClient:
        return GatewayClient(self.gw.url, self.tokens[name])


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    tmp = tmp_path_factory.mktemp("users")
    tokens = {name: secrets.token_urlsafe(24) for name in ("alice", "bob", "carol")}
    path = tmp / "tokens.json"
    write_tokens(path, {"alice": tokens["alice"], "bob": tokens["bob"],
                        "carol": {"token": tokens["carol"], "admin": True}})
    gw = start_gateway(tmp, "--tokens-file", str(path))
    yield Users(gw, tokens, path)
    gw.stop()


# --- auth: every route once denied and once allowed ---


def request_for(method: str, path: str, known: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A well-formed request for one route, on things that exist, so only the token decides."""
    url = path.format(digest=known["digest"], job_id=known["job"]["id"],
                      name=known["job"]["user"])  # a user of this gateway
    kwargs: dict[str, Any] = {}
    if (method, path) == ("POST", "/v1/blobs/missing"):
        kwargs["json"] = {"digests": [known["digest"]]}
    elif (method, path) == ("PUT", "/v1/blobs/{digest}"):
        kwargs["content"] = known["data"]
    elif (method, path) == ("POST", "/v1/jobs"):
        kwargs["json"] = known["body"]
    elif (method, path) == ("PUT", "/v1/limits/{name}"):
        kwargs["json"] = {"max_jobs": 100}
    elif (method, path) == ("POST", "/v1/blobs/adopt"):
        kwargs["json"] = {"digest": known["digest"], "name": "0" * 32}
    return url, kwargs


# "{token}" is replaced by the gateway's real token: close misses must fail too.
BAD_AUTH = [
    pytest.param(None, id="no-header"),
    pytest.param("Bearer " + "w" * 43, id="wrong-token"),
    pytest.param("Token {token}", id="scheme-Token"),
    pytest.param("Bearer", id="bare-Bearer"),
    pytest.param("Basic dXNlcjpwYXNz", id="basic"),
    pytest.param("Bearer {token}x", id="token-plus-one"),
    pytest.param("Bearer {token_short}", id="token-minus-one"),
    pytest.param("{token}", id="token-without-scheme"),
]


def auth_headers(template: str | None, token: str) -> dict[str, str]:
    if template is None:
        return {}
    return {"Authorization": template.format(token=token, token_short=token[:-1])}


def test_route_table_matches_the_app(gateway: Gateway) -> None:
    """PRIVATE_ROUTES is every route the app has but health: a new route joins the auth table."""
    resp = httpx.get(f"{gateway.url}/openapi.json", headers={"Authorization": f"Bearer {gateway.token}"})
    assert resp.status_code == 200
    served = {(method.upper(), path) for path, item in resp.json()["paths"].items() for method in item}
    assert served == PUBLIC_ROUTES | set(PRIVATE_ROUTES)
    # what a client generated from it sends: the token everywhere but health, a blob's bytes
    # (an API trial: neither was described)
    spec = resp.json()
    assert spec["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/health"]["get"]["security"] == []
    put = spec["paths"]["/v1/blobs/{digest}"]["put"]["requestBody"]
    assert put["required"] and "application/octet-stream" in put["content"]


@pytest.mark.parametrize("header", BAD_AUTH)
@pytest.mark.parametrize(("method", "path"), PRIVATE_ROUTES)
def test_private_route_refused_without_a_valid_token(
    gateway: Gateway, client: GatewayClient, known: dict[str, Any], method: str, path: str,
    header: str | None,
) -> None:
    url, kwargs = request_for(method, path, known)
    fresh = b"never stored " + secrets.token_bytes(16)
    if (method, path) == ("PUT", "/v1/blobs/{digest}"):  # a refused upload must store nothing
        url, kwargs = f"/v1/blobs/{digest(fresh)}", {"content": fresh}
    jobs_before = {j["id"] for j in client.jobs()}
    resp = httpx.request(method, gateway.url + url, headers=auth_headers(header, gateway.token),
                         timeout=DEADLINE_S, **kwargs)
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"].startswith("application/json")  # not a started stream
    assert resp.json()["error"] == "unauthorized"
    assert "Bearer" in resp.json()["message"]
    assert {j["id"] for j in client.jobs()} == jobs_before
    assert client.missing([digest(fresh)]) == [digest(fresh)]


@pytest.mark.parametrize("header", BAD_AUTH)
def test_submit_and_follow_without_a_valid_token_runs_nothing(
        gateway: Gateway, client: GatewayClient, header: str | None) -> None:
    # the one request every cell makes is answered outside the framework: the same refusal
    body = inline_body({"t": secrets.token_hex(8)}, "r = t", outputs=["r"])
    (d, _), = body["blobs"].items()
    jobs_before = {j["id"] for j in client.jobs()}
    resp = httpx.post(f"{gateway.url}/v1/jobs?follow=true", json=body, timeout=DEADLINE_S,
                      headers=auth_headers(header, gateway.token))
    refused(resp, 401, "unauthorized")
    assert {j["id"] for j in client.jobs()} == jobs_before
    assert client.missing([d]) == [d]  # its inline blob was not stored either


def test_cancel_without_a_valid_token_leaves_the_job_running(
    gateway: Gateway, client: GatewayClient
) -> None:
    job = submit(client, SLEEPER, "A100-80GB")
    try:
        wait_for(lambda: client.job(job["id"])["state"] == "running", DEADLINE_S)
        for param in BAD_AUTH:
            header = param.values[0]
            resp = httpx.delete(f"{gateway.url}/v1/jobs/{job['id']}",
                                headers=auth_headers(header, gateway.token), timeout=DEADLINE_S)
            assert resp.status_code == 401, (param.id, resp.text)
        assert client.job(job["id"])["state"] == "running"
    finally:
        client.cancel(job["id"])
        finish(client, job["id"])


@pytest.mark.parametrize(("method", "path"), PRIVATE_ROUTES)
def test_private_route_allowed_with_the_token(
    gateway: Gateway, client: GatewayClient, known: dict[str, Any], method: str, path: str
) -> None:
    url, kwargs = request_for(method, path, known)
    if (method, path) == ("POST", "/v1/blobs/adopt"):  # a file waiting in the inbox to adopt
        with gateway.client() as c:
            inbox = Path(c.local_path()["inbox"])  # type: ignore[index]
        (inbox / kwargs["json"]["name"]).write_bytes(known["data"])
    resp = httpx.request(method, gateway.url + url, timeout=DEADLINE_S,
                         headers={"Authorization": f"Bearer {gateway.token}"}, **kwargs)
    if path.endswith("/interrupt"):  # let in, and told the job has no cell running any more
        refused(resp, 409, "job_ended")
        return
    assert resp.status_code in (200, 201), resp.text
    if method == "DELETE":  # cancelling a finished job changes nothing
        assert resp.json()["state"] == known["job"]["state"] == "succeeded"
    if (method, path) == ("POST", "/v1/jobs"):
        assert finish(client, resp.json()["id"])["state"] == "succeeded"


@pytest.mark.parametrize("content", [b"{not json", b"{}", b"[]"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/blobs/missing"])
def test_bad_body_without_token_is_refused_as_unauthorized(gateway: Gateway, path: str,
                                                           content: bytes) -> None:
    """An anonymous caller learns nothing, not even how the body should look."""
    resp = httpx.post(gateway.url + path, content=content,
                      headers={"Content-Type": "application/json"}, timeout=DEADLINE_S)
    assert resp.status_code == 401, resp.text


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
def test_api_description_needs_a_token(gateway: Gateway, path: str) -> None:
    """DESIGN.md: every route but health needs a token (the description pages included)."""
    resp = httpx.get(gateway.url + path, timeout=DEADLINE_S)
    assert resp.status_code == 401, f"{path} answered {resp.status_code} without a token"


@pytest.mark.parametrize("header", BAD_AUTH)
def test_health_needs_no_token(gateway: Gateway, header: str | None) -> None:
    resp = httpx.get(f"{gateway.url}/v1/health", headers=auth_headers(header, gateway.token),
                     timeout=DEADLINE_S)
    assert resp.status_code == 200
    health = resp.json()
    assert health["status"] == "ok"
    assert health["version"] == __version__
    # which packages run the cells is for users only (an anonymous caller could look up their
    # known vulnerabilities); whether tokens are shared stays, for a refused client's advice,
    # and that this caller's token was not taken (a client then says so, not "Python ''")
    assert set(health) == {"status", "version", "client_python", "wire_format", "digests",
                           "shared", "withdraws", "authorized"}, health
    assert health["authorized"] is False


@pytest.mark.parametrize("count", ["2", True, 2.0])
def test_a_gpu_count_that_is_not_a_whole_number_is_refused(gateway: Gateway, count: Any) -> None:
    # "2" and true were taken as 2 GPUs and 1: a client's bug must not become a grant
    body = {"source": "1", "spec": [{"type": "H100", "count": count}],
            "inputs": pack_inputs({}, None, None).manifest}
    err = refused(call(gateway.url, gateway.token, "POST", "/v1/jobs", json=body), 422)
    assert "count" in err["message"], err


@pytest.mark.parametrize(("body", "content_type", "says"), [
    (b'{"source": "1",', "application/json",
     "the body is not valid JSON (Expecting property name enclosed in double quotes at "
     "character 15)"),
    (b'{"source": "1"}', "text/plain", "the body must be a JSON object, sent with "
     "'Content-Type: application/json' (it came as 'text/plain')"),
    (b"", None, "the body must be a JSON object, sent with 'Content-Type: application/json' "
     "(it came without one)"),
])
def test_a_body_that_is_not_json_is_told_what_to_send(
        gateway: Gateway, body: bytes, content_type: str | None, says: str) -> None:
    # (it was told "body.1: JSON decode error", or "Input should be a valid dictionary")
    headers = {"Content-Type": content_type} if content_type else {}
    err = refused(call(gateway.url, gateway.token, "POST", "/v1/jobs", content=body,
                       headers=headers), 422, "invalid_request")
    assert err["message"] == f"invalid request: {says}", err


def test_a_refusal_does_not_echo_the_request_back(gateway: Gateway) -> None:
    # a missing field quoted the whole request, blobs and all, in its detail
    blob = "A" * 100_000
    resp = call(gateway.url, gateway.token, "POST", "/v1/jobs",
                json={"source": "1", "blobs": {"xxh3-128:" + "0" * 32: blob}})
    err = refused(resp, 422, "invalid_request")
    assert "body.spec: Field required" in err["message"]
    assert blob not in resp.text and len(resp.text) < 2000, len(resp.text)


def test_health_answers_head_and_says_which_methods_it_takes(gateway: Gateway) -> None:
    # (HEAD was 405, and a POST was told to send a token, for a route that needs none)
    assert call(gateway.url, None, "HEAD", "/v1/health").status_code == 200
    body = refused(call(gateway.url, None, "POST", "/v1/health"), 405, "method_not_allowed")
    assert body["message"] == "POST is not allowed here; use GET"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer  "])
def test_the_token_s_scheme_is_read_as_http_says(gateway: Gateway, scheme: str) -> None:
    # RFC 7235: the scheme's name is case-insensitive ("bearer TOKEN" was refused)
    resp = call(gateway.url, None, "GET", "/v1/pool",
                headers={"Authorization": f"{scheme} {gateway.token}"})
    assert resp.status_code == 200, resp.text
    assert call(gateway.url, None, "GET", "/v1/pool", headers={
        "Authorization": f"Basic {gateway.token}"}).status_code == 401


def test_health_tells_a_user_what_runs_the_cells(client: GatewayClient) -> None:
    health = client.health(refresh=True)
    assert health["status"] == "ok" and health["version"] == __version__
    assert health["python"] == platform.python_version()  # the gateway runs this interpreter
    assert {"cloudpickle", "numpy", "gpu-magic"} <= set(health["packages"])
    assert health["backend"] == "local"
    assert health["simulated"] is True
    assert health["authorized"] is True


# --- pool ---


def test_pool_shows_types_nodes_and_queue(client: GatewayClient) -> None:
    wait_for(lambda: all_free(client), DEADLINE_S)
    pool = client.pool()
    assert pool["simulated"] is True
    types = {t["type"]: t for t in pool["types"]}
    assert {n: (t["free"], t["total"]) for n, t in types.items()} == {"H100": (2, 2), "A100-80GB": (4, 4)}
    assert all(t["simulated"] is True and t["memory_gb"] for t in types.values())
    assert len(pool["nodes"]) == 1
    gpus = pool["nodes"][0]["gpus"]
    assert sorted(g["type"] for g in gpus) == ["A100-80GB"] * 4 + ["H100"] * 2
    assert all(g["simulated"] is True and g["busy"] is False for g in gpus)
    assert len({(g["node"], g["index"]) for g in gpus}) == 6
    assert pool["queue_length"] == 0


def test_pool_marks_granted_gpus_busy(client: GatewayClient, blocker: dict[str, Any]) -> None:
    pool = client.pool()
    types = {t["type"]: t for t in pool["types"]}
    assert (types["H100"]["free"], types["A100-80GB"]["free"]) == (0, 4)
    busy = [g for g in pool["nodes"][0]["gpus"] if g["busy"]]
    grant = client.job(blocker["id"])["grant"]
    assert sorted(g["index"] for g in busy) == sorted(grant["indices"])
    assert {g["type"] for g in busy} == {"H100"}


# --- blobs ---


def test_blob_upload_then_download_exact_bytes(gateway: Gateway, client: GatewayClient) -> None:
    data = secrets.token_bytes(3 << 20) + b"\0tail"  # more than one upload chunk
    d = digest(data)
    assert client.missing([d]) == [d]
    client.upload(d, memoryview(data))
    assert client.missing([d]) == []
    assert bytes(client.download(d)) == data
    resp = httpx.get(f"{gateway.url}/v1/blobs/{d}", headers={"Authorization": f"Bearer {gateway.token}"})
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["content-length"] == str(len(data))


def test_a_blob_named_by_its_pieces_is_checked_by_them(gateway: Gateway,
                                                      client: GatewayClient) -> None:
    assert client.health()["digests"] == ["xxh3-128", "xxh3-128-16m"]
    data = secrets.token_bytes(2 * PIECE) + b"tail"
    d = digest(data, pieces=True)
    assert d.startswith("xxh3-128-16m:")
    client.upload(d, memoryview(data))
    assert bytes(client.download(d)) == data
    # the same bytes under their plain name too (an older client's), each checked by its own
    plain = digest(data)
    client.upload(plain, memoryview(data))
    assert client.missing([d, plain]) == []
    other = secrets.token_bytes(2 * PIECE) + b"tail"
    claimed = digest(other, pieces=True)
    body = refused(call(gateway.url, gateway.token, "PUT", f"/v1/blobs/{claimed}", content=data),
                   400)
    assert claimed in body["message"] and d in body["message"]
    assert client.missing([claimed]) == [claimed]


@pytest.mark.parametrize("knows", [True, False], ids=["client-knows-pieces", "older-client"])
def test_large_results_are_named_by_pieces_only_for_a_client_that_knows_them(
        gateway: Gateway, client: GatewayClient, knows: bool) -> None:
    values = {"n": PIECE // 8 + 1000}
    packed = pack_inputs(values, None, None)
    for d, blob in packed.blobs().items():
        client.upload(d, blob)
    meta = {"wire": str(WIRE_FORMAT), **({"digests": "xxh3-128,xxh3-128-16m"} if knows else {})}
    body = {"source": "import numpy as np\nbig = np.zeros(n)", "spec": opts("H100"), "inputs": packed.manifest,
            "input_names": list(values), "outputs": ["big"], "deleted": [], "has_value": False,
            "timeout": 60, "meta": meta}
    resp = call(gateway.url, gateway.token, "POST", "/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    (result,) = [e for e in follow(client, resp.json()["id"]) if e["type"] == "result"]
    (name,) = result["buffers"]
    assert name.startswith("xxh3-128-16m:" if knows else "xxh3-128:"), name
    assert name == digest(bytes(values["n"] * 8), pieces=knows)


def test_blob_whose_content_does_not_match_is_refused_and_not_kept(
    gateway: Gateway, client: GatewayClient
) -> None:
    data = secrets.token_bytes(100_000)
    claimed = digest(b"something else " + data)
    body = refused(call(gateway.url, gateway.token, "PUT", f"/v1/blobs/{claimed}", content=data), 400)
    assert claimed in body["message"] and digest(data) in body["message"]
    assert client.missing([claimed, digest(data)]) == [claimed, digest(data)]
    refused(call(gateway.url, gateway.token, "GET", f"/v1/blobs/{claimed}"), 404, "no_such_blob")
    # nothing half-written is left in the store either
    stored = [p.name for p in (gateway.state_dir / "blobs").rglob("*")]
    assert not [n for n in stored if claimed.partition(":")[2] in n or digest(data).partition(":")[2] in n]


BAD_DIGESTS = [
    "abc",
    "xxh3-128:" + "0" * 31,
    "xxh3-128:" + "0" * 33,
    "xxh3-128:" + "g" * 32,
    "xxh3-128:" + "A" * 32,
    "sha256:" + "0" * 64,
    "xxh3-64:" + "0" * 16,
    "xxh3-128-" + "0" * 32,
    "xxh3-128-16m:" + "0" * 31,
    "xxh3-128-8m:" + "0" * 32,
]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_malformed_digest_is_refused(gateway: Gateway, bad: str) -> None:
    for method, path, kwargs in [("PUT", f"/v1/blobs/{bad}", {"content": b"x"}),
                                 ("GET", f"/v1/blobs/{bad}", {}),
                                 ("POST", "/v1/blobs/missing", {"json": {"digests": [bad]}})]:
        # refused by the API's own description: the digest pattern is in /openapi.json
        body = refused(call(gateway.url, gateway.token, method, path, **kwargs), 422,
                       "invalid_request")
        assert bad in body["message"] and "xxh3-128" in body["message"], (method, path, body)


def test_unknown_blob_is_404(gateway: Gateway) -> None:
    d = digest(secrets.token_bytes(32))
    refused(call(gateway.url, gateway.token, "GET", f"/v1/blobs/{d}"), 404, "no_such_blob")


def test_blobs_are_per_user(users: Users) -> None:
    alice, bob = users.client("alice"), users.client("bob")
    data = secrets.token_bytes(1000)
    d = digest(data)
    alice.upload(d, memoryview(data))
    assert alice.missing([d]) == []
    assert bob.missing([d]) == [d]
    refused(call(users.gw.url, users.tokens["bob"], "GET", f"/v1/blobs/{d}"), 404, "no_such_blob")
    # a job of bob's cannot name alice's blob either
    packed = pack_inputs({"v": secrets.token_bytes(16)}, None, None)
    alice.upload(packed.pickle_digest, memoryview(packed.pickle))
    resp = call(users.gw.url, users.tokens["bob"], "POST", "/v1/jobs",
                json={"source": "pass", "spec": opts("H100"), "inputs": packed.manifest,
                      "meta": {"wire": str(WIRE_FORMAT)}})
    assert refused(resp, 409, "missing_blobs")["missing"] == [packed.pickle_digest]
    assert bytes(alice.download(d)) == data
    alice.close()
    bob.close()


# --- jobs: events, listing, replay, resume ---


@pytest.fixture(scope="module")
def hello(gateway: Gateway) -> Iterator[dict[str, Any]]:
    """A job with an input, output and a value, followed live from submit to done."""
    c = gateway.client()
    job = submit(c, "x = a + 1\nprint('hi')\nx", "H100", values={"a": 1},
                 outputs=["x"], has_value=True)
    events = follow(c, job["id"])
    yield {"job": job, "events": events}
    c.close()


def test_submit_answers_the_job_record(hello: dict[str, Any]) -> None:
    job = hello["job"]
    assert job["id"] and job["user"]
    assert job["state"] in ("queued", "running")
    assert job["spec"].upper().replace(" ", "") in ("H100", "H100:1")


def test_events_come_in_order_with_sequence_numbers(hello: dict[str, Any]) -> None:
    events = hello["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types[-2:] == ["result", "done"]
    assert types.count("granted") == types.count("started") == 1
    assert types.index("granted") < types.index("started") < types.index("stdout") < types.index("result")
    if "queued" in types:
        assert types.index("queued") < types.index("granted")
    assert set(types) <= {"queued", "granted", "started", "stdout", "result", "done"}
    assert "".join(e["text"] for e in events if e["type"] == "stdout") == "hi\n"


def test_granted_event_describes_the_grant(hello: dict[str, Any]) -> None:
    granted = next(e for e in hello["events"] if e["type"] == "granted")
    assert granted["gpu_type"] == "H100"
    assert granted["count"] == 1
    assert granted["node"]
    assert granted["option_index"] == 0
    assert granted["simulated"] is True
    assert granted["passed_over"] == []
    assert granted["memory_gb"]
    assert granted["attempt"] == 1


def test_result_and_done(client: GatewayClient, hello: dict[str, Any]) -> None:
    result, done = hello["events"][-2:]
    assert done["state"] == "succeeded"
    assert set(done["timings"]) >= {"queued_s", "ran_s", "total_s"}
    assert result["names"] == ["x"]
    assert result["value"] == "2"
    # the result blob is the owner's to download, and it holds what the cell made
    data = client.download(result["blob"])
    assert digest(data) == result["blob"]
    buffers = [client.download(d) for d in result.get("buffers", [])]
    payload = loads(bytes(data), buffers, namespace={})
    assert payload["names"] == {"x": 2}
    assert payload["value"] == 2


def test_job_is_listed_and_readable(client: GatewayClient, hello: dict[str, Any]) -> None:
    job_id = hello["job"]["id"]
    assert job_id in [j["id"] for j in client.jobs()]
    record = client.job(job_id)
    assert record["id"] == job_id
    assert record["state"] == "succeeded"
    assert record["grant"]["gpu_type"] == "H100"
    assert record["grant"]["option_index"] == 0
    assert record["finished"] >= record["started"] >= record["created"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/jobs/{}"), ("DELETE", "/v1/jobs/{}"),
                                            ("GET", "/v1/jobs/{}/events"),
                                            ("POST", "/v1/jobs/{}/interrupt")])
def test_unknown_job_is_404(gateway: Gateway, method: str, path: str) -> None:
    resp = call(gateway.url, gateway.token, method, path.format("0123456789ab"))
    refused(resp, 404, "no_such_job")


def test_finished_job_replays_in_full(client: GatewayClient, hello: dict[str, Any]) -> None:
    assert follow(client, hello["job"]["id"]) == hello["events"]
    assert follow(client, hello["job"]["id"]) == hello["events"]


def test_resume_after_each_event(client: GatewayClient, hello: dict[str, Any]) -> None:
    events = hello["events"]
    for k in range(len(events)):
        assert follow(client, hello["job"]["id"], after=k) == events[k:], f"after={k}"


def test_resume_with_last_event_id_header(gateway: Gateway, hello: dict[str, Any]) -> None:
    events = hello["events"]
    n = len(events)
    for k in range(n + 1):
        resp, pairs = raw_sse(gateway.url, gateway.token, hello["job"]["id"],
                              headers={"Last-Event-ID": str(k)} if k else None)
        assert resp.status_code == 200
        assert [i for i, _ in pairs] == list(range(k + 1, n + 1)), f"Last-Event-ID: {k}"
        assert [d for _, d in pairs] == events[k:]
        _, by_query = raw_sse(gateway.url, gateway.token, hello["job"]["id"], params={"after": k})
        assert by_query == pairs
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["cache-control"] == "no-cache"


# --- scheduling ---


def test_fallback_to_a_later_option(client: GatewayClient, blocker: dict[str, Any]) -> None:
    job = submit(client, "z = 1\n", "H100, A100-80GB")
    events = follow(client, job["id"])
    granted = next(e for e in events if e["type"] == "granted")
    assert granted["gpu_type"] == "A100-80GB"
    assert granted["option_index"] == 1
    assert "H100" in granted["passed_over"][0]["option"]
    assert granted["passed_over"][0]["reason"]
    assert events[-1]["state"] == "succeeded"
    assert client.job(blocker["id"])["state"] == "running"


INFEASIBLE = [
    pytest.param("T4", ["T4", "H100", "A100-80GB"], id="type-not-in-pool"),
    pytest.param("H100:4", ["H100:4", "no node has 4"], id="count-larger-than-any-node"),
    pytest.param("T4, H100:4", ["T4", "no node has 4", "H100", "A100-80GB"], id="all-options"),
]


@pytest.mark.parametrize(("spec", "mentions"), INFEASIBLE)
def test_infeasible_spec_is_refused_at_once(gateway: Gateway, client: GatewayClient, spec: str,
                                            mentions: list[str]) -> None:
    before = {j["id"] for j in client.jobs()}
    body = refused(post_job(gateway, client, spec), 422, "no_feasible_option")
    for word in mentions:
        assert word in body["message"], (word, body["message"])
    assert {j["id"] for j in client.jobs()} == before
    assert client.pool()["queue_length"] == 0


def test_infeasible_option_is_dropped_and_the_rest_kept(client: GatewayClient) -> None:
    job = submit(client, "pass", "H100:4, A100-80GB")
    assert [d["option"] for d in job["dropped"]] == ["H100:4"]
    assert "no node has 4" in job["dropped"][0]["reason"]
    granted = next(e for e in follow(client, job["id"]) if e["type"] == "granted")
    assert (granted["gpu_type"], granted["option_index"]) == ("A100-80GB", 1)


def test_unknown_gpu_type_is_a_bad_spec(gateway: Gateway, client: GatewayClient) -> None:
    body = refused(post_job(gateway, client, "H1000"), 422, "bad_spec")
    assert "H1000" in body["message"]


def big_array() -> Any:
    import numpy as np

    return np.frombuffer(secrets.token_bytes(1 << 18), dtype=np.uint8)  # out of band: a buffer blob


@pytest.mark.parametrize("which", ["pickle", "buffer"])
def test_missing_input_blob_is_409(gateway: Gateway, client: GatewayClient, which: str) -> None:
    packed = pack_inputs({"v": big_array()}, None, None)
    assert len(packed.buffer_digests) == 1
    uploaded = packed.buffer_digests[0] if which == "pickle" else packed.pickle_digest
    client.upload(uploaded, packed.blobs()[uploaded])
    absent = packed.pickle_digest if which == "pickle" else packed.buffer_digests[0]
    resp = call(gateway.url, gateway.token, "POST", "/v1/jobs", json={
        "source": "v", "spec": opts("H100"), "inputs": packed.manifest, "input_names": ["v"]})
    body = refused(resp, 409, "missing_blobs")
    assert body["missing"] == [absent]
    assert client.pool()["queue_length"] == 0


# --- submit and follow in one exchange, small blobs inline ---


def sse(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data:")]


def inline_body(values: dict[str, Any], source: str, **fields: Any) -> dict[str, Any]:
    packed = pack_inputs(values, None, None)
    return {"source": source, "spec": opts("H100"), "inputs": packed.manifest,
            "input_names": list(values), "timeout": 60,
            "blobs": {d: base64.b64encode(bytes(b)).decode() for d, b in packed.blobs().items()},
            "meta": {"wire": str(WIRE_FORMAT)}, **fields}  # (as this client writes them)


def test_submit_and_follow_is_one_exchange_with_inputs_and_results_inside(
        gateway: Gateway) -> None:
    token = secrets.token_hex(8)  # a value the gateway has never seen: it must come inline
    body = inline_body({"t": token}, "r = t * 2\nprint('ok')", outputs=["r"])
    resp = call(gateway.url, gateway.token, "POST", "/v1/jobs?follow=true", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    first, *events = sse(resp)
    assert first["type"] == "job" and first["job"]["state"] in ("queued", "running")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1] == {**events[-1], "type": "done", "state": "succeeded"}
    result = next(e for e in events if e["type"] == "result")
    # the result blob comes inside the event, and it is exactly the stored blob
    data = base64.b64decode(result["inline"][result["blob"]])
    assert digest(data) == result["blob"]
    assert loads(data, [], namespace={})["names"] == {"r": token * 2}
    # the same events, replayed by the plain stream
    again = call(gateway.url, gateway.token, "GET", f"/v1/jobs/{first['job']['id']}/events")
    assert [e["type"] for e in sse(again)] == [e["type"] for e in events]


@pytest.mark.parametrize("spoil, status, error", [
    ("digest", 400, "blob"),  # content that is not what its digest says
    ("base64", 400, "bad_blob"),
])
def test_bad_inline_blob_is_refused_and_not_kept(gateway: Gateway, client: GatewayClient,
                                                 spoil: str, status: int, error: str) -> None:
    body = inline_body({"t": secrets.token_hex(8)}, "t")
    (d, text), = body["blobs"].items()
    if spoil == "digest":
        body["blobs"][d] = base64.b64encode(b"something else").decode()
    else:
        body["blobs"][d] = text[:-2] + "!!"
    refused(call(gateway.url, gateway.token, "POST", "/v1/jobs?follow=true", json=body),
            status, error)
    assert client.missing([d]) == [d]
    assert client.pool()["queue_length"] == 0


def test_inline_blobs_and_results_stay_with_their_user(users: Users) -> None:
    body = inline_body({"t": secrets.token_hex(8)}, "r = t", outputs=["r"])
    (d, _), = body["blobs"].items()
    resp = call(users.gw.url, users.tokens["alice"], "POST", "/v1/jobs?follow=true", json=body)
    assert resp.status_code == 201, resp.text
    result = next(e for e in sse(resp) if e["type"] == "result")
    assert result["blob"] in result["inline"]
    bob = users.client("bob")
    assert bob.missing([d, result["blob"]]) == [d, result["blob"]]
    refused(call(users.gw.url, users.tokens["bob"], "GET", f"/v1/blobs/{result['blob']}"), 404,
            "no_such_blob")
    bob.close()


@pytest.mark.parametrize("spoil, status, error", [
    ("field", 422, "invalid_request"),  # refused by the model: the route answers it
    ("json", 422, "invalid_request"),
    ("type", 422, "invalid_request"),  # a valid body, but not sent as JSON
    ("types", 422, "invalid_request"),  # two types: the first one counts, as for the route
    ("nan", 422, "invalid_request"),  # a refusal that quotes a NaN must not fail itself
    ("missing", 409, "missing_blobs"),  # refused by the gateway: the fast path answers it
    ("spec", 422, "bad_spec"),
    ("source", 413, "too_large"),
])
def test_submit_and_follow_refuses_exactly_as_a_plain_submit(
        gateway: Gateway, client: GatewayClient, spoil: str, status: int, error: str) -> None:
    body = inline_body({}, "pass")
    if spoil == "field":
        body["retries"] = -1
    elif spoil == "missing":
        body["blobs"] = {}
        body["inputs"] = dict(body["inputs"], pickle="xxh3-128:" + secrets.token_hex(16))
    elif spoil == "spec":
        body["spec"] = [{"type": "NOT-A-GPU", "count": 1}]
    elif spoil == "source":
        cap = call(gateway.url, gateway.token, "GET", "/v1/limits").json()["limits"]
        body["source"] = "x" * (cap["max_source_chars"] + 1)
    elif spoil == "nan":
        body["timeout"] = float("nan")  # json.dumps writes it as NaN; a client may send it
    content = b'{"source": ' if spoil == "json" else json.dumps(body).encode()
    types = {"type": ["text/plain"], "types": ["text/plain", "application/json"],
             "json": []}.get(spoil, ["application/json"])
    headers = [("authorization", f"Bearer {gateway.token}"),
               *(("content-type", t) for t in types)]
    answers = []
    for path in ("/v1/jobs", "/v1/jobs?follow=true"):
        with httpx.Client(base_url=gateway.url, timeout=DEADLINE_S) as http:
            resp = http.request("POST", path, content=content, headers=headers)
        answers.append((resp.status_code, resp.headers["content-type"], refused(resp, status, error)))
    assert answers[0] == answers[1]
    if spoil == "missing":
        assert answers[1][2]["missing"] == [body["inputs"]["pickle"]]
    assert client.pool()["queue_length"] == 0


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs?follow=true"])
def test_a_misspelled_field_is_refused_and_named(gateway: Gateway, client: GatewayClient,
                                                path: str) -> None:
    # {"wiat": 5} was taken without a word, and the job waited without limit
    body = dict(inline_body({}, "pass"), wiat=5)
    answer = refused(call(gateway.url, gateway.token, "POST", path, json=body), 422,
                     "invalid_request")
    assert "body.wiat: unknown field 'wiat'; did you mean 'wait'?" in answer["message"], answer
    # inside the spec's options too, with that model's own fields
    body = dict(inline_body({}, "pass"), spec=[{"type": "H100", "cuont": 2}])
    answer = refused(call(gateway.url, gateway.token, "POST", path, json=body), 422,
                     "invalid_request")
    assert "unknown field 'cuont'; did you mean 'count'? (known fields: type, count)" \
        in answer["message"], answer
    assert client.pool()["queue_length"] == 0 and all(
        j["state"] != "queued" for j in client.jobs())


def test_a_misspelled_limit_is_refused_and_named(users: Users) -> None:
    answer = refused(call(users.gw.url, users.tokens["carol"], "PUT", "/v1/limits/bob",
                          json={"max_jbos": 1}), 422, "invalid_request")
    assert "unknown field 'max_jbos'; did you mean 'max_jobs'?" in answer["message"], answer


def test_inline_blobs_over_the_limit_are_413(gateway: Gateway, client: GatewayClient) -> None:
    blob = secrets.token_bytes((1 << 20) + 1)
    d = digest(blob)
    body = inline_body({}, "pass")
    body["blobs"] = {d: base64.b64encode(blob).decode()}
    body = refused(call(gateway.url, gateway.token, "POST", "/v1/jobs", json=body), 413,
                   "too_large")
    assert "PUT /v1/blobs/" in body["message"]
    assert client.missing([d]) == [d]


# --- cancel, errors, timeouts ---


def test_cancel_a_running_job(gateway: Gateway, client: GatewayClient) -> None:
    wait_for(lambda: free_of(client, "H100") == 2, DEADLINE_S)
    job = submit(client, SLEEPER, "H100:2")
    follow(client, job["id"], until=lambda e: e["type"] == "stdout")  # the cell is running
    resp = httpx.delete(f"{gateway.url}/v1/jobs/{job['id']}",
                        headers={"Authorization": f"Bearer {gateway.token}"}, timeout=DEADLINE_S)
    assert resp.status_code == 200
    assert resp.json()["id"] == job["id"]
    assert finish(client, job["id"], timeout=30)["state"] == "cancelled"
    events = follow(client, job["id"])
    assert events[-1]["type"] == "done"
    assert events[-1]["state"] == "cancelled"
    assert "sleeping" in "".join(e.get("text", "") for e in events if e["type"] == "stdout")
    wait_for(lambda: free_of(client, "H100") == 2, DEADLINE_S)
    assert client.cancel(job["id"])["state"] == "cancelled"  # a second cancel changes nothing


def test_cancel_a_queued_job(client: GatewayClient, blocker: dict[str, Any]) -> None:
    job = submit(client, "print('never ran')", "H100")
    assert job["state"] == "queued"
    assert job["queue_position"] == 1
    queued = follow(client, job["id"], until=lambda e: e["type"] == "queued")
    assert queued[-1]["position"] == 1
    assert client.pool()["queue_length"] == 1
    assert client.cancel(job["id"], via="sidebar")["state"] == "cancelled"
    events = follow(client, job["id"])
    assert [e["type"] for e in events] == ["queued", "done"]
    assert events[-1]["state"] == "cancelled"
    # said where, as its cell says it (a trial: the sidebar showed "cancelled" bare)
    assert events[-1]["message"] == "cancelled by the sidebar while queued; nothing ran"
    assert "seq" not in client.job(job["id"])  # (its gaps would count others' jobs)
    assert client.pool()["queue_length"] == 0
    assert client.job(blocker["id"])["state"] == "running"


def test_remote_error_becomes_an_error_event(client: GatewayClient) -> None:
    source = "def f():\n    raise ValueError('boom')\n\nf()\n"
    job = submit(client, source, "A100-80GB")
    events = follow(client, job["id"])
    assert "result" not in [e["type"] for e in events]
    error, done = events[-2:]
    assert error["type"] == "error"
    assert (error["ename"], error["evalue"]) == ("ValueError", "boom")
    frames = [f for f in error["traceback"] if f["cell"] is True]
    assert [(f["lineno"], f["name"]) for f in frames] == [(4, "<module>"), (2, "f")]
    assert frames[-1]["line"] == "raise ValueError('boom')"
    assert error["traceback"][-1]["cell"] is True  # no runner frames below the cell's own
    assert done["state"] == "failed"
    assert client.job(job["id"])["state"] == "failed"


def test_timeout_stops_the_cell(client: GatewayClient) -> None:
    job = submit(client, SLEEPER, "A100-80GB", timeout=1)
    assert finish(client, job["id"], timeout=DEADLINE_S)["state"] == "timed_out"
    done = follow(client, job["id"])[-1]
    assert done["type"] == "done"
    assert done["state"] == "timed_out"
    # the fix, for the magic and for Python alike (a run() caller has no %%gpu line)
    assert "%%gpu A100-80GB --timeout 2 (timeout=2 in Python)" in done["message"], done["message"]
    # a cell that named no GPU: its line names none either ("%%gpu any" it never wrote)
    job = submit(client, SLEEPER, "any", timeout=1)
    done = follow(client, job["id"])[-1]
    assert "Raise the limit: %%gpu --timeout 2 (timeout=2 in Python)" in done["message"], \
        done["message"]
    wait_for(lambda: all_free(client), DEADLINE_S)


# --- interrupts ---

INTERRUPTED_CELL = ("acc = [1]\nprint('sleeping', flush=True)\nimport time\ntry:\n"
                    "    time.sleep(30)\nfinally:\n    print('finally ran', flush=True)\n"
                    "after = 1\n")


def _interrupted_events(events: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result and the error of a cell its interrupt ended, checked for what every such
    end has: the cell took the interrupt, ran its finally block, and the job is cancelled."""
    kinds = [e["type"] for e in events]
    assert kinds[-3:] == ["result", "error", "done"], kinds
    assert events[-1]["state"] == "cancelled"
    assert kinds.index("interrupted") < kinds.index("result")
    result, error = events[-3], events[-2]
    assert result["interrupted"] is True and error["interrupted"] is True
    assert error["ename"] == "KeyboardInterrupt"
    return result, error


def test_interrupt_raises_keyboard_interrupt_in_the_running_cell(client: GatewayClient) -> None:
    job = submit(client, INTERRUPTED_CELL, "A100-80GB", outputs=["acc", "after"])
    follow(client, job["id"], until=lambda e: "sleeping" in str(e.get("text")))
    record = client.interrupt(job["id"])
    assert record["state"] == "running"  # it goes on until the cell has ended
    events = follow(client, job["id"])
    result, error = _interrupted_events(events)
    assert "finally ran" in "".join(e.get("text", "") for e in events if e["type"] == "stdout")
    # what the cell had bound came back; what it never reached did not
    payload = loads(bytes(client.download(result["blob"])), [], namespace={})
    assert payload["names"]["acc"] == [1] and "after" not in payload["names"]
    # the traceback ends at the cell's line that was running, not in the runner
    assert error["traceback"][-1]["cell"] and error["traceback"][-1]["lineno"] == 5
    assert [e["attempt"] for e in events if e["type"] == "interrupted"] == [1]
    wait_for(lambda: all_free(client), DEADLINE_S)



def test_an_interrupt_while_a_cell_prints_repeats_no_line(client: GatewayClient) -> None:
    # the interrupt once landed between a line sent and its noting as sent: the line came twice,
    # and the traceback showed the runner's own frames under the print
    cell = ("import sys\ni = 0\nwhile True:\n    print('line', i)\n"
            "    print('err', i, file=sys.stderr)\n    i += 1\n")
    for _ in range(2):
        job = submit(client, cell, "A100-80GB")
        follow(client, job["id"], until=lambda e: "line 200" in str(e.get("text")))
        client.interrupt(job["id"])
        events = follow(client, job["id"])
        for stream, word in (("stdout", "line"), ("stderr", "err")):
            text = "".join(e["text"] for e in events if e["type"] == stream)
            # (print writes its parts one by one: the interrupt may cut the last line short,
            # as in a local cell)
            lines = [x for x in text.splitlines() if not x.startswith("[gpu_magic]")]
            if lines and len(lines[-1].split()) < 2:
                lines.pop()
            numbers = [int(x.split()[1]) for x in lines]
            assert all(x.split()[0] == word for x in lines), lines[-5:]
            assert numbers == list(range(len(numbers))), numbers[-5:]  # none twice, none lost
        error = [e for e in events if e["type"] == "error"][-1]
        assert error["ename"] == "KeyboardInterrupt"
        assert all(f["cell"] or "gpu_magic" not in f["filename"] for f in error["traceback"])
    wait_for(lambda: all_free(client), DEADLINE_S)

def test_an_interrupt_the_cell_handles_lets_it_succeed(client: GatewayClient) -> None:
    cell = ("import time\nprint('sleeping', flush=True)\ntry:\n    time.sleep(30)\n"
            "except KeyboardInterrupt:\n    y = 'saved'\n")
    job = submit(client, cell, "A100-80GB", outputs=["y"])
    follow(client, job["id"], until=lambda e: "sleeping" in str(e.get("text")))
    client.interrupt(job["id"])
    events = follow(client, job["id"])
    assert [e["type"] for e in events][-2:] == ["result", "done"]
    assert events[-1]["state"] == "succeeded" and "interrupted" not in events[-2]
    payload = loads(bytes(client.download(events[-2]["blob"])), [], namespace={})
    assert payload["names"]["y"] == "saved"


def test_interrupt_of_a_queued_or_ended_job_is_refused(
        client: GatewayClient, blocker: dict[str, Any], hello: dict[str, Any]) -> None:
    queued = submit(client, "x = 1\n", "H100:2")
    try:
        with pytest.raises(GatewayError) as info:
            client.interrupt(queued["id"])
        assert info.value.status == 409 and info.value.detail["error"] == "job_queued"
        assert "Cancel it instead" in str(info.value)
        assert client.job(queued["id"])["state"] == "queued"  # left as it was
    finally:
        client.cancel(queued["id"])
    with pytest.raises(GatewayError) as info:
        client.interrupt(hello["job"]["id"])
    assert info.value.status == 409 and info.value.detail["error"] == "job_ended"


# --- users ---


def test_other_users_job_is_invisible_and_untouchable(users: Users) -> None:
    alice, bob, carol = users.client("alice"), users.client("bob"), users.client("carol")
    job = submit(alice, SLEEPER, "A100-80GB")
    follow(alice, job["id"], until=lambda e: e["type"] == "started")
    for method, path in [("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/events"),
                         ("DELETE", "/v1/jobs/{}"), ("POST", "/v1/jobs/{}/interrupt")]:
        resp = call(users.gw.url, users.tokens["bob"], method, path.format(job["id"]))
        refused(resp, 404, "no_such_job")
    assert job["id"] not in [j["id"] for j in bob.jobs()]
    assert job["id"] not in [j["id"] for j in bob.jobs(everyone=True)]  # not an admin
    # and the answer says whose jobs it lists (the sidebar's list is labelled by it)
    everyone = {"params": {"all": "true"}}
    assert call(users.gw.url, users.tokens["bob"], "GET", "/v1/jobs", **everyone).json()["all"] is False
    assert call(users.gw.url, users.tokens["carol"], "GET", "/v1/jobs", **everyone).json()["all"] is True
    assert alice.job(job["id"])["state"] == "running"  # bob's cancel and interrupt did nothing
    assert job["id"] in [j["id"] for j in alice.jobs()]
    # the admin sees every job, and cancels it
    assert job["id"] in [j["id"] for j in carol.jobs(everyone=True)]
    assert carol.job(job["id"])["user"] == "alice"
    carol.cancel(job["id"])
    done = finish(alice, job["id"], timeout=30)
    assert done["state"] == "cancelled"
    # alice is told who stopped her job: she did not ask for it
    assert done["message"] == "cancelled by carol (admin) while running; the output so far is kept"
    for c in (alice, bob, carol):
        c.close()


def test_a_cancel_that_finds_no_job_withdraws_its_id_for_its_own_user_only(users: Users) -> None:
    # a client interrupted while submitting cancels by the id it chose; a submit still on
    # its way must not run after that cancel, and nobody else's cancel may stop one
    alice, bob = users.client("alice"), users.client("bob")
    late, others = secrets.token_hex(8), secrets.token_hex(8)
    for who, job_id in (("alice", late), ("bob", others)):
        resp = call(users.gw.url, users.tokens[who], "DELETE", f"/v1/jobs/{job_id}")
        refused(resp, 404, "no_such_job")
    with pytest.raises(GatewayError) as got:
        submit(alice, "made = 1", id=late)
    assert got.value.status == 409 and got.value.detail["error"] == "job_cancelled"
    assert str(got.value).startswith(f"job {late} was cancelled before the gateway took it")
    assert late not in [j["id"] for j in alice.jobs()]
    assert finish(alice, submit(alice, "made = 1", id=others)["id"])["state"] == "succeeded"
    assert alice.health()["withdraws"] is True
    for c in (alice, bob):
        c.close()


def test_an_admin_interrupts_a_sandboxed_cell_as_soon_as_it_runs(users: Users) -> None:
    # a shared gateway's runner is in a sandbox (its own pid numbers); asked at once, the
    # interrupt waits for the runner to start, then for its cell to run
    alice, carol = users.client("alice"), users.client("carol")
    job = submit(alice, INTERRUPTED_CELL, "A100-80GB", outputs=["acc", "after"])
    follow(alice, job["id"], until=lambda e: e["type"] == "granted")
    carol.interrupt(job["id"])
    events = follow(alice, job["id"])
    kinds = [e["type"] for e in events]
    # she did not ask her cell to stop: nothing of it is bound (no result), as after an
    # admin's cancel, and the error still shows where it stopped
    assert kinds[-2:] == ["error", "done"] and "result" not in kinds, kinds
    assert kinds.index("interrupted") < kinds.index("error")
    error = events[-2]
    assert error["ename"] == "KeyboardInterrupt" and error["by"] == "carol (admin)"
    assert error["traceback"] and error["traceback"][-1]["cell"]
    assert alice.job(job["id"])["state"] == "cancelled"
    # alice is told who interrupted her cell, as for a cancel: she did not ask for it
    assert events[-1]["message"] == ("interrupted by carol (admin) while running: the cell "
                                     "stopped on KeyboardInterrupt; nothing was bound, the "
                                     "output so far is kept")
    wait_for(lambda: all_free(alice), DEADLINE_S)
    for c in (alice, carol):
        c.close()


def test_a_student_s_cell_says_which_admin_interrupted_it(users: Users) -> None:
    # her cell said "cancelled by an interrupt ... bound acc (what the cell had assigned)", as
    # if she had pressed stop; only the job's record named the admin
    import gpu_magic
    from gpu_magic._view import render_text

    namespace: dict[str, Any] = {"__name__": "__main__"}
    job, stopped = _stopped_by_carol(users, INTERRUPTED_CELL, namespace, "interrupt")
    assert isinstance(stopped, gpu_magic.JobCancelled), repr(stopped)
    assert str(stopped) == (f"GPU job {job.id} was interrupted by carol (admin): the cell "
                            "stopped on KeyboardInterrupt there; nothing was bound")
    assert "acc" not in namespace and "after" not in namespace
    text = render_text(job._job.state, 0.0)
    assert "interrupted by carol (admin): KeyboardInterrupt · nothing was bound" in text, text
    assert "cancelled by an interrupt" not in text


def test_a_student_s_cell_says_which_admin_cancelled_it(users: Users) -> None:
    # her status said "cancelled: nothing was bound", as if she had cancelled it herself; only
    # the exception named the admin, and a saved notebook keeps the status
    import gpu_magic
    from gpu_magic._view import render_text

    job, stopped = _stopped_by_carol(
        users, "import time\nprint('sleeping', flush=True)\ntime.sleep(60)",
        {"__name__": "__main__"}, "cancel")
    assert isinstance(stopped, gpu_magic.JobCancelled), repr(stopped)
    assert str(stopped).count("carol (admin)") == 1, stopped  # (said twice once)
    text = render_text(job._job.state, 0.0)
    assert "cancelled by carol (admin): nothing was bound" in text, text


def _stopped_by_carol(users: Users, source: str, namespace: dict[str, Any],
                      how: str) -> tuple[Any, BaseException]:
    """alice's background job, interrupted or cancelled by carol (an admin) once it printed
    "sleeping": the job, and what its wait() raised."""
    import gpu_magic

    with users.client("alice") as alice, users.client("carol") as carol:
        job = gpu_magic.run(source, "A100-80GB", namespace, client=alice, quiet=True,
                            background=True)
        follow(alice, job.id, until=lambda e: "sleeping" in str(e.get("text")))
        getattr(carol, how)(job.id)
        # (a KeyboardInterrupt from wait() would read as her own, and stop the test run)
        with pytest.raises(BaseException) as info:
            job.wait(timeout=DEADLINE_S)
    return job, info.value


def test_tokens_file_is_read_again_on_sighup(users: Users) -> None:
    import signal

    dave = secrets.token_urlsafe(24)
    entries = json.loads(users.tokens_file.read_text())
    write_tokens(users.tokens_file, {**entries, "dave": dave})
    refused(call(users.gw.url, dave, "GET", "/v1/pool"), 401, "unauthorized")
    users.gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: call(users.gw.url, dave, "GET", "/v1/pool").status_code == 200, DEADLINE_S)
    for name in users.tokens:  # the others keep their tokens
        assert call(users.gw.url, users.tokens[name], "GET", "/v1/pool").status_code == 200


def test_a_token_refused_then_added_works_from_the_same_client(users: Users) -> None:
    # a review: the refusal was kept with the client's health, and the student's next cells
    # were refused here, without asking, after the admin had added their token
    import signal

    dave = secrets.token_urlsafe(24)
    with GatewayClient(users.gw.url, dave) as client:
        with pytest.raises(gpu_magic.AuthError):
            gpu_magic.run("x = 1", "H100", {"__name__": "__main__"}, client=client, quiet=True)
        entries = json.loads(users.tokens_file.read_text())
        write_tokens(users.tokens_file, {**entries, "dave": dave})
        users.gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: call(users.gw.url, dave, "GET", "/v1/pool").status_code == 200,
                 DEADLINE_S)
        ns: dict[str, Any] = {"__name__": "__main__"}
        gpu_magic.run("x = 1", "H100", ns, client=client, quiet=True)
        assert ns["x"] == 1


def test_results_a_revoked_token_cannot_fetch_are_said_to_be_kept(users: Users) -> None:
    # a department's trial: the advice was "%gpu attach ID fetches them", which the same
    # refusal stopped until the admin gave the token back
    import signal

    erin = secrets.token_urlsafe(24)
    entries = json.loads(users.tokens_file.read_text())

    def tokens(**more: str) -> None:
        write_tokens(users.tokens_file, {**entries, **more})
        users.gw.proc.send_signal(signal.SIGHUP)
        wanted = 200 if more else 401
        wait_for(lambda: call(users.gw.url, erin, "GET", "/v1/pool").status_code == wanted,
                 DEADLINE_S)

    tokens(erin=erin)
    try:
        with GatewayClient(users.gw.url, erin) as client:
            job = gpu_magic.run("import time\ntime.sleep(3)\nbig = bytes(3_000_000)", "H100",
                                {"__name__": "__main__"}, client=client, quiet=True,
                                background=True)
            wait_for(lambda: job.state == "running", DEADLINE_S)
            tokens()  # revoked while it runs: it goes on to its end
            with pytest.raises(gpu_magic.GatewayError) as info:
                job.wait(timeout=DEADLINE_S)
        said = str(info.value)
        assert f"GPU job {job.id} succeeded, but its results could not be fetched" in said
        assert (f"the gateway keeps them, and %gpu attach {job.id} fetches them "
                f"(gpu_magic.attach('{job.id}') in Python) once your token is valid "
                "again") in said, said
        tokens(erin=erin)
        with GatewayClient(users.gw.url, erin) as client:
            assert client.job(job.id)["state"] == "succeeded"
            result = next(e for e in client.events(job.id) if e["type"] == "result")
            assert len(client.download(result["blob"])) > 3_000_000  # (kept: `big` in it)
    finally:
        tokens()


def test_a_refused_token_is_logged_once_a_minute_per_address_and_token(tmp_path: Path) -> None:
    # a department's trial: a student's refused token left no trace for the admin to find
    gw = start_gateway(tmp_path)
    try:
        for _ in range(3):
            refused(call(gw.url, "x" * 30, "GET", "/v1/jobs"), 401, "unauthorized")
        refused(call(gw.url, "y" * 30, "GET", "/v1/jobs"), 401, "unauthorized")
        refused(call(gw.url, None, "GET", "/v1/pool"), 401, "unauthorized")
        assert call(gw.url, gw.token, "GET", "/v1/pool").status_code == 200
        log = (tmp_path / "gateway.log").read_text()
        lines = [ln for ln in log.splitlines() if "refused a request" in ln]
        # one per token and address: a second student behind the same address is seen too
        assert len(lines) == 3, lines
        x = hashlib.sha256(b"x" * 30).hexdigest()[:8]
        assert ("refused a request from 127.0.0.1 (GET /v1/jobs): a token it does not know "
                f"(wrong, or revoked; its SHA-256 begins {x})") in lines[0]
        assert lines[2].endswith("(GET /v1/pool): no token; the same again from there is not "
                                 "logged for a minute"), lines[2]
        assert "x" * 30 not in log and "y" * 30 not in log
        # someone guessing tries a new token each time: a few lines, then one that says so
        for i in range(40):
            refused(call(gw.url, f"guess-{i:02d}" + "z" * 30, "GET", "/v1/jobs"), 401,
                    "unauthorized")
        log = (tmp_path / "gateway.log").read_text()
        guesses = [ln for ln in log.splitlines() if "refused a request" in ln][3:]
        assert len(guesses) == 2, guesses  # (5 a minute: 3 were logged above)
        assert log.count("refused requests from 127.0.0.1 with 6 or more tokens it does not "
                         "know in a minute; more from there are not logged for a minute") == 1
    finally:
        gw.stop()


def test_a_job_cannot_set_what_its_grant_sets(client: GatewayClient) -> None:
    # the HTTP API checks it too: not every client is ours
    with pytest.raises(GatewayError) as info:
        submit(client, "1", "H100", env={"CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "3"})
    assert info.value.status == 422
    assert "env CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES: the grant sets these" in str(info.value)


@pytest.mark.parametrize("env", [{"A=B": "x"}, {"": "x"}, {"A\0": "x"}, {"OK": "a\0b"}])
def test_an_environment_no_process_can_have_is_refused_before_a_gpu_is_granted(
        client: GatewayClient, env: dict[str, str]) -> None:
    # it reached a runner, which failed on a granted GPU ("illegal environment variable name")
    with pytest.raises(GatewayError) as info:
        submit(client, "1", "H100", env=env)
    assert info.value.status == 422 and "bad_env" in str(info.value.detail), info.value
    assert "NUL" in str(info.value)
    assert not [j for j in client.jobs() if j.get("env") == env]
    with pytest.raises(ValueError, match="not a name an environment variable can have|without "
                       "a NUL"):  # and the Python API, before anything is sent
        gpu_magic.run("1", "H100", {}, client=client, env=env, quiet=True)


def test_a_reload_cannot_make_a_one_user_gateway_shared(tmp_path: Path) -> None:
    # its runners run without isolation and see the state directory: a second user added
    # by SIGHUP could have read every token (found by a security review)
    import signal

    path = tmp_path / "tokens.json"
    alice, bob = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    write_tokens(path, {"alice": alice})
    gw = start_gateway(tmp_path, "--tokens-file", str(path))
    try:
        write_tokens(path, {"alice": alice, "bob": bob})
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "kept the old tokens" in (tmp_path / "gateway.log").read_text(),
                 DEADLINE_S)
        log = (tmp_path / "gateway.log").read_text()
        assert "started for one user" in log and "Restart it with the new file" in log
        refused(call(gw.url, bob, "GET", "/v1/pool"), 401, "unauthorized")
        assert call(gw.url, alice, "GET", "/v1/pool").status_code == 200
    finally:
        gw.stop()


def test_a_reload_of_a_bad_tokens_file_keeps_the_old_tokens_and_says_why(tmp_path: Path) -> None:
    import signal

    path = tmp_path / "tokens.json"
    alice = secrets.token_urlsafe(24)
    write_tokens(path, {"alice": alice})
    gw = start_gateway(tmp_path, "--tokens-file", str(path))
    try:
        write_tokens(path, {"alice": {"token": alice, "admn": True}})
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "kept the old tokens" in (tmp_path / "gateway.log").read_text(),
                 DEADLINE_S)
        log = (tmp_path / "gateway.log").read_text()
        assert "user 'alice' in " in log and "unknown key 'admn'; did you mean 'admin'?" in log
        me = call(gw.url, alice, "GET", "/v1/limits")
        assert me.status_code == 200 and me.json()["admin"] is False
    finally:
        gw.stop()


def test_a_reload_that_removes_a_user_cancels_their_queued_jobs_not_their_running_one(
        tmp_path: Path) -> None:
    # an instructor's trial: a revoked student's queued cells went on to start, one by one
    import signal

    path = tmp_path / "tokens.json"
    dora, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    write_tokens(path, {"dora": dora, "teacher": {"token": admin, "admin": True}})
    gw = start_gateway(tmp_path, "--tokens-file", str(path), simulate="H100:3")
    sleeper = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)"
    try:
        with GatewayClient(gw.url, admin) as t, GatewayClient(gw.url, dora) as c:
            other = gpu_magic.run(sleeper, "H100", {"__name__": "__main__"}, client=t,
                                  quiet=True, background=True)
            running = gpu_magic.run(sleeper, "H100", {"__name__": "__main__"}, client=c,
                                    quiet=True, background=True)
            for who, job in ((t, other), (c, running)):
                follow(who, job.id, until=lambda e: "sleeping" in str(e.get("text")))
            # the first waits for 2 of the 3 H100s and holds the free one, the second waits
            # behind it: cancelling the first must not start the second (a review)
            queued = [gpu_magic.run("x = 1", spec, {"__name__": "__main__"}, client=c,
                                    quiet=True, background=True) for spec in ("H100:2", "H100")]
            write_tokens(path, {"teacher": {"token": admin, "admin": True}})
            gw.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reloaded" in (tmp_path / "gateway.log").read_text(), DEADLINE_S)
        log = (tmp_path / "gateway.log").read_text()
        assert "(removed dora); 2 queued jobs of theirs cancelled; 1 running job of theirs " \
               "goes on to the end" in log, log
        with GatewayClient(gw.url, admin) as teacher:
            states = {j["id"]: j for j in teacher.jobs(everyone=True)}
            for job in queued:
                assert states[job.id]["state"] == "cancelled", states[job.id]
                assert "dora's token was removed from the gateway's tokens file; nothing ran" in \
                    states[job.id]["message"]
                # and its cell, if one follows it, says by what
                done = follow(teacher, job.id)[-1]
                assert done["cancelled_by"] == \
                    "the removal of your token from the gateway's tokens file", done
            assert states[running.id]["state"] == "running"
            for job in (running, other):
                teacher.cancel(job.id)
                wait_for(lambda job=job: teacher.job(job.id)["state"] == "cancelled",
                         DEADLINE_S)
    finally:
        gw.stop()


def test_a_reload_that_raises_a_limit_starts_a_job_it_held(tmp_path: Path) -> None:
    # a review: a queued job kept the GPU limit it was submitted under, so a limit raised in
    # the tokens file left it waiting beside free GPUs
    import signal

    path = tmp_path / "tokens.json"
    eve = secrets.token_urlsafe(24)
    write_tokens(path, {"eve": {"token": eve, "max_gpus": 1}, "root": secrets.token_urlsafe(24)})
    gw = start_gateway(tmp_path, "--tokens-file", str(path), simulate="H100:2")
    try:
        with GatewayClient(gw.url, eve) as c:
            first = gpu_magic.run("import time\nprint('sleeping', flush=True)\ntime.sleep(60)",
                                  "H100", {"__name__": "__main__"}, client=c, quiet=True,
                                  background=True)
            follow(c, first.id, until=lambda e: "sleeping" in str(e.get("text")))
            second = gpu_magic.run("x = 1", "H100", {"__name__": "__main__"}, client=c,
                                   quiet=True, background=True)
            assert "your limit" in wait_for(lambda: c.job(second.id).get("waiting_why"),
                                            DEADLINE_S)
            write_tokens(path, {**json.loads(path.read_text()),
                                "eve": {"token": eve, "max_gpus": 2}})
            gw.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: c.job(second.id)["state"] == "succeeded", DEADLINE_S)
            c.cancel(first.id)
    finally:
        gw.stop()


BAD_TOKENS_FILES = [
    pytest.param({"alice": "short"}, 0o600, "has 5 characters, fewer than 22", id="short-token"),
    pytest.param({"alice": secrets.token_urlsafe(24)}, 0o644, "chmod 600", id="readable-by-others"),
    pytest.param({"alice": "s" * 30, "bob": "s" * 30}, 0o600,
                 "share a token: give each their own", id="shared-token"),
    pytest.param({}, 0o600, "JSON object", id="empty"),
    # bool("false") is True: a quoted false once made alice an admin
    pytest.param({"alice": {"token": "a" * 30, "admin": "false"}}, 0o600,
                 "admin of user 'alice' .* is \"false\"; write true or false", id="admin-string"),
    # a misspelled key was ignored: bob was no admin and had no limit, and nobody was told
    pytest.param({"bob": {"token": "b" * 30, "admn": True}}, 0o600,
                 "unknown key 'admn'; did you mean 'admin'\\?", id="misspelled-admin"),
    pytest.param({"bob": {"token": "b" * 30, "max_jbos": 1}}, 0o600,
                 "unknown key 'max_jbos'; did you mean 'max_jobs'\\?", id="misspelled-limit"),
    pytest.param({"bob": {"token": "b" * 30, "max_jobs": True}}, 0o600,
                 "max_jobs of user 'bob' .* is true; it must be a whole number", id="limit-true"),
]


# what JSON or a roster script lets through in silence (a department's trial)
BAD_TOKENS_TEXTS = [
    pytest.param(f'{{"bob": "{"b" * 30}", "bob": "{"c" * 30}"}}',
                 "'bob' appears twice in one object of the tokens file .*JSON keeps only the "
                 "last", id="same-user-twice"),
    pytest.param(f'{{"bob": {{"token": "{"b" * 30}", "admin": true, "admin": false}}}}',
                 "'admin' appears twice in one object", id="same-key-twice"),
    pytest.param(f'{{"": "{"a" * 30}"}}', "has an empty name", id="empty-name"),
    # "Bob " for bob renamed a user (their queued jobs cancelled); a line break in a name
    # split the gateway's log line in two (a department's trial)
    pytest.param(f'{{"Bob ": "{"a" * 30}"}}', "user 'Bob ' in the tokens file .* has white "
                 "space at an end of the name, .*; write it as 'Bob'", id="name-space-around"),
    pytest.param(f'{{"bob\\n": "{"a" * 30}"}}', "user 'bob\\\\n' .* a line break or control "
                 "character in it; write it as 'bob'", id="name-line-break"),
    # (its kind, never its value: the message goes to the gateway's log)
    pytest.param('{"alice": 12345678901234567890123}',
                 "token of user 'alice' .* is a JSON number, not a string", id="number-token"),
    pytest.param('{"alice": {"admin": true}}', "token of user 'alice' .* is missing",
                 id="no-token"),
    pytest.param(f'{{"alice": "{"a" * 15}\\n{"b" * 15}"}}',
                 "holds a line break, a control character or a non-ASCII one",
                 id="line-break-inside"),
    pytest.param(f'{{"alice": "{"a" * 30} "}}', "starts or ends with white space",
                 id="space-around"),
]


def test_a_passphrase_token_with_spaces_inside_works(tmp_path: Path) -> None:
    # (a review: refusing them broke tokens files that worked; a header carries spaces)
    phrase = "correct horse battery staple " + secrets.token_hex(8)
    path = tmp_path / "tokens.json"
    write_tokens(path, {"alice": phrase, "bob": secrets.token_hex(16)})
    gw = start_gateway(tmp_path, "--tokens-file", str(path), "--isolation", "none", "--force")
    try:
        with GatewayClient(gw.url, f" {phrase}\n") as alice:
            assert alice.whoami()["user"] == "alice"
    finally:
        gw.stop()


@pytest.mark.parametrize(("text", "says"), BAD_TOKENS_TEXTS)
def test_tokens_file_mistakes_json_would_let_through_are_refused(tmp_path: Path, text: str,
                                                                 says: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(TokensFileError, match=says) as info:
        load_tokens_file(path)
    assert "12345678901234567890123" not in str(info.value)


@pytest.mark.parametrize(("entries", "mode", "says"), BAD_TOKENS_FILES)
def test_gateway_refuses_a_bad_tokens_file(tmp_path: Path, entries: dict[str, Any], mode: int,
                                           says: str) -> None:
    path = tmp_path / "tokens.json"
    write_tokens(path, entries)
    os.chmod(path, mode)
    with pytest.raises(RuntimeError, match=says):
        gw = start_gateway(tmp_path, "--tokens-file", str(path))
        gw.stop()
    # and it made nothing on the way (a red team found the state directory made)
    assert not (tmp_path / "state").exists()


# --- restart ---


def test_restart_keeps_finished_jobs_and_marks_interrupted_ones_lost(tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(tmp_path, state_dir=state)
    try:
        c = gw.client()
        done_job = submit(c, "print('before the restart')\n", "H100")
        done_events = follow(c, done_job["id"])
        assert done_events[-1]["state"] == "succeeded"
        running = submit(c, SLEEPER, "H100")
        before = follow(c, running["id"], until=lambda e: e["type"] == "stdout")
        c.close()
    finally:
        gw.stop()
    assert gw.proc.returncode is not None

    gw2 = start_gateway(tmp_path, state_dir=state)
    try:
        c = gw2.client()
        assert c.job(done_job["id"])["state"] == "succeeded"
        assert follow(c, done_job["id"]) == done_events
        record = c.job(running["id"])
        assert record["state"] == "lost"
        events = follow(c, running["id"])
        assert events[: len(before)] == before  # its output so far is kept
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "done"
        assert events[-1]["state"] == "lost"
        # (stopped, it ended the job itself and said why; a killed one's successor says
        # "restarted": test_reliability)
        assert events[-1]["message"].startswith("the gateway was stopped (SIGTERM) while this "
                                                "job was running")
        assert {done_job["id"], running["id"]} <= {j["id"] for j in c.jobs()}
        assert all_free(c)  # the lost job holds no GPU
        c.close()
    finally:
        gw2.stop()


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_event_stream_parser_takes_any_chunking_and_line_ending(newline: str, step: int) -> None:
    from gpu_magic._client import _parse_sse

    events = [{"type": "stdout", "text": "a\nb", "seq": 1}, {"type": "done", "seq": 2}]
    text = ": heartbeat\n\n" + "".join(f"id: {e['seq']}\ndata: {json.dumps(e)}\n\n" for e in events)
    raw = text.replace("\n", newline).encode()
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)]
    assert list(_parse_sse(iter(chunks))) == events


def test_a_timeout_cap_applies_to_every_job_and_is_said_to_each_user(tmp_path: Path) -> None:
    # the cap once cut the default (3600 s) in silence, and the timeout's advice was a
    # --timeout the cap would cut again
    gw = start_gateway(tmp_path, "--max-timeout", "2")
    capped = ("the cell ran longer than 2 s, the most this gateway allows (its --max-timeout"
              "{}), and was stopped; its output so far is kept. A larger --timeout cannot help "
              "here: split the work into shorter cells, ask whoever runs the gateway to raise "
              "--max-timeout, or run it on a gateway whose cap is higher.")
    cases = [
        (None, "instead of the default of 3600 s",
         capped.format("; the cell gave no --timeout, whose default is 3600 s")),
        (3600, "instead of its --timeout of 3600 s",
         capped.format("; the cell asked for 3600 s")),
        (2, None, capped.format("")),
        # twice its 1.5 s is over the cap: the advice is the cap itself
        (1.5, None, "the cell ran longer than its --timeout of 1.5 s and was stopped; its "
                    "output so far is kept. Raise the limit: %%gpu H100 --timeout 2 (timeout=2 in "
                    "Python) (this gateway allows up to 2 s)."),
        # the default's cap is said to a user once (two trials: on every cell it read as a
        # warning about each), and still in the message of a cell it stopped
        (None, None, capped.format("; the cell gave no --timeout, whose default is 3600 s")),
    ]
    try:
        with gw.client() as c:
            for asked, notice, message in cases:
                job = submit(c, "import time\ntime.sleep(30)\n", timeout=asked)
                events = follow(c, job["id"])
                notices = [n for e in events if e["type"] == "queued"
                           for n in e.get("notices") or []]
                if notice is None:
                    assert not notices, asked
                else:
                    assert notices == [f"this gateway caps --timeout at 2 s; the job runs with "
                                       f"that {notice}"], asked
                assert events[-1]["state"] == "timed_out", asked  # capped, said or not
                assert events[-1]["message"] == message, asked
    finally:
        gw.stop()


def test_a_kernel_writing_other_pickles_is_refused_where_runners_are_the_gateway_s(
        tmp_path: Path) -> None:
    # a version-skew trial: an older kernel's cells ran on a newer gateway's runners and their
    # results could not be read back (lost after the cell ran). Where runners use the
    # gateway's own Python, a kernel that does not write this wire format is refused first.
    gw = start_gateway(tmp_path, "--gateway-python")
    try:
        with gw.client() as c:
            assert c.health()["wire_format"] == WIRE_FORMAT and not c.health()["client_python"]
            body = {"source": "x = 1", "spec": opts("H100"), "inputs": pack_inputs({}, None,
                                                                                  None).manifest}
            for meta, said in (({}, "0.1.0 or older, from before wire formats"),
                               ({"wire": "0", "gpu_magic": "0.1.9"}, "0.1.9, wire format 0")):
                with pytest.raises(GatewayError) as info:
                    c._request("POST", "/v1/jobs", json={**body, "meta": meta})
                assert info.value.status == 409, info.value
                assert (f"this kernel's gpu_magic ({said}) and the one this gateway runs cells "
                        f"with (gpu_magic {__version__}, wire format {WIRE_FORMAT}) cannot read "
                        "each other's inputs and results: nothing was sent to a GPU. Install "
                        f"gpu-magic=={__version__} where the kernel runs" in str(info.value)), \
                    info.value
            assert c.jobs() == []
            # this client's own submit says its format, and runs
            job = submit(c, "x = 1")
            assert finish(c, job["id"])["state"] == "succeeded"
            assert c.job(job["id"])["meta"] == {}  # (what the client said of itself: checked)
    finally:
        gw.stop()
