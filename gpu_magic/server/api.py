"""The gateway's HTTP API (v1): a thin FastAPI shell around :class:`Gateway`.

Every route but ``GET /v1/health`` needs ``Authorization: Bearer TOKEN``; a user sees, streams,
downloads, interrupts and cancels only their own jobs and blobs (someone else's answer 404, as if
absent).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import hashlib
import ipaddress
import json
import logging
import math
import platform
import socket
import time
import typing
from collections.abc import Sequence
from importlib import metadata
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._payload import SCHEMES
from .._version import WIRE_FORMAT, __version__
from .auth import Authenticator, User, bearer
from .gateway import ApiError, Gateway
from .limits import human
from .store import BlobError

log = logging.getLogger("gpu_magic.gateway")
REFUSAL_LOG_S = 60.0  # one log line a minute per address and token for refused tokens
REFUSAL_TOKENS_LOGGED = 5  # and at most this many a minute per address

HEARTBEAT_S = 5.0
# Small blobs travel inside the submit request and inside the result event: one exchange
# instead of a missing-check, uploads and downloads of their own.
INLINE_IN_MAX = 1 << 20
INLINE_OUT_MAX = 1 << 20
DIGEST_PATTERN = "^(?:" + "|".join(SCHEMES) + "):[0-9a-f]{32}$"  # (their names need no escape)
_DIGEST = Annotated[str, Field(pattern=DIGEST_PATTERN)]
_PACKAGES = ("cloudpickle", "ipython", "numpy", "torch")


class _Strict(BaseModel):
    """A request body that refuses fields it does not know: a misspelled one (``wiat``)
    would otherwise be dropped in silence, and the job run without the limit it asked for."""

    model_config = ConfigDict(extra="forbid")


class InputsModel(_Strict):
    pickle: _DIGEST
    buffers: list[_DIGEST] = Field(default_factory=list, max_length=100_000)


class OptionModel(_Strict):
    type: str | None = None
    count: StrictInt = 1  # ("2" and true were taken as 2 and 1 GPUs)


class JobSubmit(_Strict):
    """A job: the cell's source, its GPU spec and the digests of its input blobs."""

    # The client may choose the id, so that it can cancel a job whose submit it was
    # interrupted in the middle of (before it ever saw the answer).
    id: str | None = Field(default=None, pattern=r"^[0-9a-f]{12,32}$")
    source: str  # its size limit is the gateway's, answered with 413
    spec: list[OptionModel] = Field(min_length=1, max_length=64)
    inputs: InputsModel
    # small input blobs sent along, base64 by digest (larger ones: PUT /v1/blobs/{digest})
    blobs: dict[_DIGEST, str] = Field(default_factory=dict, max_length=10_000)
    input_names: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    has_value: bool = False
    return_names: list[str] | None = None
    no_return: bool = False
    timeout: float | None = Field(default=None, gt=0, le=30 * 24 * 3600)
    wait: float | None = Field(default=None, ge=0, le=30 * 24 * 3600)
    retries: StrictInt = Field(default=0, ge=0, le=10)
    oom_fallback: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    python: str | None = None
    python_version: str | None = None
    cwd: str | None = None
    sys_path: list[str] | None = Field(default=None, max_length=1000)
    background: bool = False
    # where the cell came from (its notebook, its cell's id): kept with the job for the
    # retention period, so bounded
    meta: dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=4096)]] = \
        Field(default_factory=dict, max_length=16)
    # how the notebook names the cell's lines: `Cell In[5]`, the %%gpu line being line 1
    cell_label: str = Field(default="Cell", max_length=200)
    line_offset: int = Field(default=0, ge=0, le=100)


class LimitsModel(_Strict):
    max_jobs: StrictInt | None = Field(default=None, ge=0, le=1_000_000)
    max_gpus: StrictInt | None = Field(default=None, ge=0, le=1_000_000)


class ErrorModel(BaseModel):
    """Every error answer: a code to branch on and a message that says what to do."""

    error: str
    message: str


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_WHY = {
    400: "malformed value (a digest that is not one, content that does not match its digest)",
    401: "missing or wrong token",
    403: "not allowed (foreign Host or Origin, or an admin-only route)",
    404: "no such job or blob of yours",
    409: "the job names input blobs the gateway does not hold (listed in 'missing'), or comes "
         "from a kernel whose gpu_magic writes another wire format (wire_format); or, to an "
         "interrupt, the job is queued (job_queued), has ended (job_ended), or the backend "
         "cannot interrupt (cannot_interrupt)",
    413: "larger than this gateway's limit",
    422: "invalid request, a bad GPU spec, or no option this pool could ever grant",
    429: "over your limit of jobs or GPUs",
    507: "the gateway cannot store it (disk full or not writable)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorModel, "description": _WHY[c]} for c in (401, 403, *codes)}


Digest = Annotated[str, Field(pattern=DIGEST_PATTERN)]


class AdoptRequest(_Strict):
    digest: Digest
    name: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class MissingRequest(_Strict):
    digests: list[Digest] = Field(max_length=100_000)


# each route's body, for naming the fields it knows when a request sends one it does not
_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/v1/jobs"): JobSubmit,
    ("PUT", "/v1/limits/{name}"): LimitsModel,
    ("POST", "/v1/blobs/missing"): MissingRequest,
    ("POST", "/v1/blobs/adopt"): AdoptRequest,
}


def _fields_at(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str] | None:
    """The field names of the model found at ``path`` (field names and list indices) inside
    ``model``, or None where the path leads to no model."""
    for step in path:
        if model is None:
            return None
        if isinstance(step, int):
            continue  # an item of a list field: the list's model was found at its name
        field = model.model_fields.get(str(step))
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The request model inside an annotation such as ``list[OptionModel] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _versions() -> dict[str, str]:
    out = {"gpu-magic": __version__}  # (the code running: an editable install's metadata lags)
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def create_app(gateway: Gateway, auth: Authenticator, *, loopback_only: bool = True) -> FastAPI:
    # FastAPI's own /openapi.json, /docs and /redoc would answer without a token: ours is below
    app = FastAPI(title="gpu_magic gateway", version=__version__,
                  description="Runs notebook cells on a pool of GPUs. See DESIGN.md.",
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.state.auth = auth
    versions = _versions()

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (an unparsable body, ...) in our one error shape
        return JSONResponse({"error": "bad_request" if exc.status_code == 400 else "http_error",
                             "message": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        route = request.scope.get("route")
        body_model = _BODIES.get((request.method, getattr(route, "path", "")))

        def problem(e: dict[str, Any]) -> str:
            loc = e.get("loc", ())
            where = ".".join(str(p) for p in loc)
            if e.get("type") == "extra_forbidden" and loc:
                known = _fields_at(body_model, loc[1:-1]) if loc[0] == "body" else None
                close = difflib.get_close_matches(str(loc[-1]), known or (), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                fields = f" (known fields: {', '.join(known)})" if known else ""
                return f"{where}: unknown field {str(loc[-1])!r}{hint}{fields}"
            if e.get("type") == "json_invalid":
                why = (e.get("ctx") or {}).get("error", "")
                at = f" at character {loc[-1]}" if len(loc) > 1 else ""
                return f"the body is not valid JSON ({why}{at})"
            sent_as = request.headers.get("content-type")
            if loc == ("body",) and not _is_json(sent_as or ""):
                came = f"it came as {sent_as!r}" if sent_as else "it came without one"
                return ("the body must be a JSON object, sent with 'Content-Type: "
                        f"application/json' ({came})")
            return (f"{where}: {e.get('msg')}"
                    + (f" (got {str(e['input'])[:100]!r})"
                       if isinstance(e.get("input"), (str, int, float)) else ""))

        errors = exc.errors()
        problems = "; ".join(problem(e) for e in errors)
        # (the input of each problem as sent, but for a whole object or list: a missing
        # field echoed the whole request back, blobs and all)
        detail = [{k: v for k, v in e.items() if k != "input" or isinstance(v, (str, int, float))
                   and len(str(v)) <= 200} for e in errors]
        return JSONResponse({"error": "invalid_request", "message": f"invalid request: {problems}",
                             "detail": _json_safe(jsonable_encoder(detail))},
                            status_code=422)

    @app.exception_handler(BlobError)
    async def _blob_error(_request: Request, exc: BlobError) -> JSONResponse:
        return JSONResponse({"error": "blob", "message": exc.message}, status_code=exc.status)

    async def user(request: Request) -> User:  # async: a plain def would take a thread hop
        # set by _AuthMiddleware, which has already refused requests without a valid token
        return request.state.user

    described = app.openapi

    def with_token() -> dict[str, Any]:
        # the token the middleware asks for, said where generated clients look for it (they
        # sent none: the routes declare no security of their own)
        spec = described()
        if "security" not in spec:
            spec.setdefault("components", {})["securitySchemes"] = {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "the gateway's token: <state-dir>/token, or the tokens file's"}}
            spec["security"] = [{"bearer": []}]
            spec["paths"]["/v1/health"]["get"]["security"] = []  # (the public route)
        return spec

    app.openapi = with_token  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(u: User = Depends(user)) -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/health")
    async def health(request: Request) -> dict[str, Any]:
        public = {
            "status": "ok",
            "version": __version__,
            # (for a refused client's advice: ask whoever runs it, or read your own token file)
            "client_python": bool(getattr(gateway.backend, "client_python", False)),
            "wire_format": WIRE_FORMAT,
            "digests": list(SCHEMES),  # the blob digests it verifies (a client picks one)
            "shared": len(auth.users()) > 1,
            # a cancel that finds no job refuses a submit of its id that comes after it
            "withdraws": True,
        }
        # The rest tells which packages and versions run the cells (what an attacker looks
        # up vulnerabilities for): only for a caller with a token, like every other route.
        if auth.user_for(request.headers.get("authorization")) is None:
            # (said, so that a client can tell a refused token from a gateway of another kind)
            return {**public, "authorized": False}
        answer = {
            **public,
            "authorized": True,
            "python": platform.python_version(),
            "packages": versions,
            "backend": gateway.backend.name,
            "simulated": bool(getattr(gateway.backend, "simulated", False)),
        }
        if gateway.bulk is not None:
            answer["bulk"] = gateway.bulk.offer(bearer(request.headers.get("authorization")) or "")
        if gateway.store.error is not None:  # (its disk is full: it takes no new job)
            answer["store_error"] = f"cannot write its state directory: {gateway.store.error}"
        return answer

    # (HEAD, which uptime monitors send, was 405; one description of the route is enough)
    app.add_api_route("/v1/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/pool", responses=_errors())
    async def pool(u: User = Depends(user)) -> dict[str, Any]:
        return gateway.pool()

    @app.post("/v1/blobs/missing", responses=_errors(400, 413, 422))
    async def blobs_missing(body: MissingRequest, u: User = Depends(user)) -> dict[str, Any]:
        return {"missing": gateway.blobs.missing(u.name, body.digests)}

    @app.put("/v1/blobs/{digest}", responses=_errors(400, 413, 507), openapi_extra={
        # (read as a stream, so FastAPI cannot see it: a generated client sent no body)
        "requestBody": {"required": True, "description": "the blob's bytes, as they are",
                        "content": {"application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}}})
    async def put_blob(request: Request, digest: str = Path(pattern=DIGEST_PATTERN),
                       u: User = Depends(user)) -> dict[str, Any]:
        gateway.blobs.path(u.name, digest)  # validates the digest before reading the body
        length = request.headers.get("content-length", "")
        size = await gateway.blobs.put_stream(u.name, digest, request.stream(),
                                              max_bytes=gateway.limits_for(u).max_blob_bytes,
                                              size_hint=int(length) if length.isdigit() else 0)
        return {"digest": digest, "size": size}

    @app.get("/v1/local", responses=_errors(404))
    async def local(u: User = Depends(user)) -> dict[str, Any]:
        """For a client on this host of a single-user gateway: where to hand blobs over as files
        instead of HTTP bodies (the same-host path)."""
        if not same_host_ok():
            raise ApiError(404, "no_local_path", "this gateway offers no same-host path")
        inbox = gateway.blobs.inbox(u.name)
        reserve = gateway.blobs.reserve
        return {"host": socket.gethostname(), "inbox": str(inbox),
                "store": str(gateway.blobs.user_dir(u.name)),
                "reserve": str(reserve.folder) if reserve.cap > 0 else None}

    @app.post("/v1/blobs/adopt", responses=_errors(400, 404, 422, 507))
    async def adopt(body: AdoptRequest, u: User = Depends(user)) -> dict[str, Any]:
        """Take a blob the client wrote into its inbox: stored at once, its digest verified
        beside the job that uses it (see server/checks.py)."""
        if not same_host_ok():
            raise ApiError(404, "no_local_path", "this gateway offers no same-host path")
        size = await asyncio.to_thread(gateway.blobs.adopt_inbox, u.name, body.name, body.digest,
                                       gateway.limits_for(u).max_blob_bytes)
        return {"digest": body.digest, "size": size}

    def same_host_ok() -> bool:
        # only where every caller is the gateway's own user: the files are theirs anyway
        return gateway.backend.name == "local" and len(auth.users()) == 1

    @app.get("/v1/blobs/{digest}", responses=_errors(400, 404))
    async def get_blob(digest: str = Path(pattern=DIGEST_PATTERN),
                       u: User = Depends(user)) -> StreamingResponse:
        path = gateway.blobs.path(u.name, digest)
        if not path.exists():
            raise ApiError(404, "no_such_blob", f"this gateway holds no blob {digest} of yours")
        return StreamingResponse(gateway.blobs.iter_file(u.name, digest),
                                 media_type="application/octet-stream",
                                 headers={"Content-Length": str(path.stat().st_size)})

    @app.get("/v1/limits", responses=_errors())
    async def get_limits(u: User = Depends(user)) -> dict[str, Any]:
        """The caller's own limits; an admin also sees the per-user overrides, and every
        user's limits in force (the tokens file's, the gateway's defaults, the overrides)."""
        mine = gateway.limits_for(u)
        out: dict[str, Any] = {"user": u.name, "admin": u.admin, "limits": vars(mine)}
        if u.admin:
            out["overrides"] = gateway.user_limits
            out["users"] = {name: vars(gateway.limits_for(who)) for name in sorted(auth.users())
                            if (who := auth.user(name)) is not None}
        return out

    @app.put("/v1/limits/{name}", responses=_errors(400, 404, 413, 422, 507))
    async def set_limits(name: str, body: LimitsModel, u: User = Depends(user)) -> dict[str, Any]:
        """An admin (instructor) sets one user's limits on jobs and GPUs at once."""
        if not u.admin:
            raise ApiError(403, "forbidden", "only an admin token may set limits")
        known = sorted(auth.users())
        target = auth.user(name)
        if target is None:  # a typo would otherwise be taken, and limit nobody
            raise ApiError(404, "no_such_user", f"there is no user {name!r} in the tokens file; "
                           f"its users are: {', '.join(known)}")
        gateway.set_user_limits(target, {k: v for k, v in body.model_dump().items()
                                       if v is not None})
        return {"user": name, "overrides": gateway.user_limits[name]}

    @app.post("/v1/jobs", status_code=201, responses=_errors(400, 409, 413, 422, 429, 507))
    async def submit(body: JobSubmit, follow: bool = Query(default=False),
                     u: User = Depends(user)) -> Any:
        """Submit a job. With ``follow=true`` the answer is the job's event stream, opened by
        one ``job`` event holding the record: submit and follow in one exchange."""
        job, record = accept(u, body)
        if not follow:
            return record
        return StreamingResponse(followed(job, record, u), status_code=201,
                                 media_type="text/event-stream", headers=_SSE_HEADERS)

    def accept(u: User, body: JobSubmit) -> tuple[Any, dict[str, Any]]:
        data = body.model_dump()
        gateway.check_wire(data)  # (before its blobs are kept: nothing of a refused job stays)
        _store_inline(u, data.pop("blobs"))
        job = gateway.submit(u, data)
        return job, gateway.view(job, u)

    async def followed(job: Any, record: dict[str, Any], u: User) -> Any:
        yield f"data: {json.dumps({'type': 'job', 'job': record})}\n\n".encode()
        async for chunk in _sse(job, 0, u):
            yield chunk

    async def submit_follow(scope: dict[str, Any], receive: Any, send: Any, u: User) -> Any:
        """``POST /v1/jobs?follow=true`` without the framework, the one request of every cell:
        the route's checks and answer in less of the gateway's time. An invalid request is
        left to the route, so that its refusal is the route's own: the answer is then a
        ``receive`` that gives the body again (None: answered here)."""
        body = await _read_body(receive)
        if body is None:
            return None  # the client went away while sending
        try:
            model = JobSubmit.model_validate_json(body)
        except ValidationError:
            return _replay(body, receive)
        try:
            job, record = accept(u, model)
        except (ApiError, BlobError) as exc:  # answered as the route's handlers answer them
            handler = _api_error if isinstance(exc, ApiError) else _blob_error
            await (await handler(None, exc))(scope, receive, send)  # type: ignore[arg-type]
            return None
        await _stream(send, receive, followed(job, record, u), 201, [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            *((k.lower().encode(), v.encode()) for k, v in _SSE_HEADERS.items())])
        return None

    app.state.submit_follow = submit_follow

    def _store_inline(u: User, blobs: dict[str, str]) -> None:
        decoded: dict[str, bytes] = {}
        for digest, text in blobs.items():
            try:
                decoded[digest] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_blob", f"inline blob {digest} is not valid base64") from None
        total = sum(len(b) for b in decoded.values())
        if total > INLINE_IN_MAX:
            raise ApiError(413, "too_large",
                           f"the inline blobs are {human(total)}; at most {human(INLINE_IN_MAX)} "
                           "travel inside a submit. Upload larger ones first with "
                           "PUT /v1/blobs/{digest}.")
        cap = gateway.limits_for(u).max_blob_bytes
        for digest, data in decoded.items():
            if len(data) > cap:
                raise ApiError(413, "too_large", f"blob {digest} is {human(len(data))}; this "
                                                 f"gateway takes at most {human(cap)} per blob")
            gateway.blobs.put_bytes(u.name, digest, data)

    async def _sse(job: Any, start: int, u: User) -> Any:
        gateway.follow(job, +1)
        try:
            async for batch in gateway.stream(job, start, HEARTBEAT_S):
                if batch is None:
                    yield b": heartbeat\n\n"
                else:
                    yield "".join(f"id: {ev['seq']}\ndata: "
                                  f"{json.dumps(_inline(gateway.event_for(ev, job, u), u))}\n\n"
                                  for ev in batch).encode()
        finally:
            gateway.follow(job, -1)

    def _inline(ev: dict[str, Any], u: User) -> dict[str, Any]:
        """A result or error event with its small blobs inside: no download round trip."""
        kind = ev.get("type")
        if kind == "result":
            digests = [ev["blob"], *ev.get("buffers", [])]
        elif kind == "error" and ev.get("exception"):
            digests = [ev["exception"]]
        else:
            return ev
        got = gateway.blobs.read_small(u.name, digests, INLINE_OUT_MAX)
        if got is None:
            return ev
        return dict(ev, inline={d: base64.b64encode(b).decode() for d, b in got.items()})

    @app.get("/v1/jobs", responses=_errors(422))
    async def list_jobs(all: bool = Query(default=False),
                        limit: int | None = Query(default=None, ge=0, le=1_000_000),
                        u: User = Depends(user)) -> dict[str, Any]:
        """``limit``: the jobs not ended and that many of those that ended last; ``total``
        counts them all."""
        # "all": whether these are every user's jobs; asked by a user who is not an admin,
        # they are the caller's own (its answer must not read as "nobody else has any")
        jobs, total = gateway.jobs_of(u, everyone=all, limit=limit)
        return {"jobs": jobs, "total": total, "all": all and u.admin}

    @app.get("/v1/jobs/{job_id}", responses=_errors(404))
    async def get_job(job_id: str, u: User = Depends(user)) -> dict[str, Any]:
        return gateway.view(gateway.job_for(u, job_id), u)

    @app.delete("/v1/jobs/{job_id}", responses=_errors(404))
    async def cancel_job(job_id: str, u: User = Depends(user),
                         via: str | None = Query(default=None, max_length=16)) -> dict[str, Any]:
        """Cancel; ``via`` (``sidebar``, ``magic``): where its user did, for the cell to say."""
        return gateway.view(gateway.cancel(u, job_id, via), u)

    @app.post("/v1/jobs/{job_id}/interrupt", responses=_errors(404, 409))
    async def interrupt_job(job_id: str, u: User = Depends(user)) -> dict[str, Any]:
        """Interrupt the job's running cell: a KeyboardInterrupt in it, as a local kernel's
        interrupt (the job goes on until the cell ends; cancel it to stop it at once)."""
        return gateway.view(gateway.interrupt(u, job_id), u)

    @app.get("/v1/jobs/{job_id}/events", responses=_errors(404, 422),
             response_class=StreamingResponse)
    async def job_events(
        job_id: str,
        after: int = Query(default=0, ge=0),
        last_event_id: str | None = Header(default=None),
        u: User = Depends(user),
    ) -> StreamingResponse:
        job = gateway.job_for(u, job_id)
        start = after
        if last_event_id and last_event_id.isdigit():
            start = max(start, int(last_event_id))

        return StreamingResponse(_sse(job, start, u), media_type="text/event-stream",
                                 headers=_SSE_HEADERS)

    return _AuthMiddleware(app, auth, gateway, loopback_only)  # type: ignore[return-value]


class _AuthMiddleware:
    """Refuses every request but ``GET /v1/health`` without a valid token, before anything of
    the request is read (so a malformed body cannot tell an anonymous caller anything)."""

    def __init__(self, app: FastAPI, auth: Authenticator, gateway: Gateway,
                 loopback_only: bool) -> None:
        self.app, self.auth, self.gateway = app, auth, gateway
        self.loopback_only = loopback_only
        # (address, token) -> when its refusal was logged
        self._refusals: dict[tuple[str, str], float] = {}
        self._refusal_bursts: dict[str, tuple[float, int]] = {}  # address: (since, lines)
        self.fastapi = app  # the wrapped app, for tests that enumerate its routes
        self.state = app.state
        self.routes = app.routes

    def note_refusal(self, scope: dict[str, Any], header: str | None) -> None:
        """A line in the log for a refused caller (whose student cannot connect is the
        admin's first question), at most one a minute per address and token: a client that
        retries, or someone guessing, does not fill the log, and one student's stale sidebar
        behind a shared JupyterHub address does not hide another's refusal. The token is
        named by the start of its SHA-256, never itself."""
        client = scope.get("client") or ("?", 0)
        offered = (header or "").removeprefix("Bearer ").strip()
        which = (f"a token it does not know (wrong, or revoked; its SHA-256 begins "
                 f"{hashlib.sha256(offered.encode()).hexdigest()[:8]})" if offered
                 else "no token")
        now, key = time.monotonic(), (client[0], which)
        if now - self._refusals.get(key, -REFUSAL_LOG_S) < REFUSAL_LOG_S:
            return
        if len(self._refusals) > 1000:
            self._refusals.clear()
        self._refusals[key] = now
        # and a few tokens a minute per address: each guess is a new token (a trial's 40
        # guesses made 40 lines)
        since, count = self._refusal_bursts.get(client[0], (now, 0))
        if now - since >= REFUSAL_LOG_S:
            since, count = now, 0
        if len(self._refusal_bursts) > 1000:
            self._refusal_bursts.clear()
        self._refusal_bursts[client[0]] = (since, count + 1)
        if count == REFUSAL_TOKENS_LOGGED:
            log.warning("refused requests from %s with %d or more tokens it does not know in "
                        "a minute; more from there are not logged for a minute", client[0],
                        count + 1)
        if count >= REFUSAL_TOKENS_LOGGED:
            return
        log.warning("refused a request from %s (%s %s): %s; the same again from there is not "
                    "logged for a minute", client[0], scope.get("method"), scope.get("path"),
                    which)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, str] = {}
        for key, value in scope.get("headers", []):
            headers[key] = value.decode("latin-1")
        if self.loopback_only and (refusal := foreign_page(headers)) is not None:
            await _refuse(send, 403, *refusal)
            return
        if scope["path"] == "/v1/health":  # public: another method is told so, not "token"
            if scope["method"] in ("GET", "HEAD"):
                await self.app(scope, receive, send)
            else:
                await _refuse(send, 405, "method_not_allowed",
                              f"{scope['method']} is not allowed here; use GET",
                              [(b"allow", b"GET, HEAD")])
            return
        found = self.auth.user_for(headers.get(b"authorization"))
        if found is None:
            self.note_refusal(scope, headers.get(b"authorization"))
            await _refuse(send, 401, "unauthorized",
                          "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                          "(GPU_MAGIC_TOKEN on the client side)")
            return
        limits = self.gateway.limits_for(found)
        length = headers.get(b"content-length", "")
        size = int(length) if length.isdigit() else 0
        is_blob = scope["method"] == "PUT" and scope["path"].startswith("/v1/blobs/")
        # JSON may write a character of the source as \uXXXX, two of them for one outside
        # the BMP (12 bytes): a legal cell of 900,000 'é' was refused as too large
        cap = limits.max_blob_bytes if is_blob else 12 * limits.max_source_chars + (1 << 20)
        if size > cap:
            # refused from the header alone: nothing of the body is read
            what = "blob" if is_blob else "request"
            per = " per blob (--max-blob-bytes)" if is_blob else ""
            await _refuse(send, 413, "too_large",
                          f"the {what} is {human(size)}; this gateway takes at most "
                          f"{human(cap)}{per}")
            return
        if not is_blob and not length and b"transfer-encoding" in headers:
            # a body without a length (chunked): read it here, up to the cap, so an endless
            # one is refused like a long one instead of being gathered in memory
            chunks: list[bytes] = []
            got = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                got += len(chunk)
                if got > cap:
                    await _refuse(send, 413, "too_large",
                                  f"the request is over {human(cap)}; this gateway takes at "
                                  f"most {human(cap)}")
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            receive = _replay(b"".join(chunks), receive)
        allowed = self._methods_for(scope["path"])
        if allowed and scope["method"] not in allowed:
            # Starlette would list only the methods of the first route matching the path
            await _refuse(send, 405, "method_not_allowed",
                          f"{scope['method']} is not allowed here; use {', '.join(allowed)}",
                          [(b"allow", ", ".join(allowed).encode())])
            return
        self.gateway.touch()
        scope.setdefault("state", {})["user"] = found
        if (scope["path"] == "/v1/jobs" and scope["method"] == "POST"
                and scope.get("query_string") == b"follow=true"
                and _is_json(next((v.decode("latin-1") for k, v in scope["headers"]
                                   if k == b"content-type"), "application/json"))):
            receive = await self.state.submit_follow(scope, receive, send, found)
            if receive is None:
                return
        await self.app(scope, receive, send)

    def _methods_for(self, path: str) -> list[str]:
        methods: set[str] = set()
        # a fixed path (/v1/blobs/missing) wins over a template that also matches it
        exact = [r for r in self.routes if getattr(r, "path", None) == path]
        for route in exact or self.routes:
            regex = getattr(route, "path_regex", None)
            if regex is not None and regex.match(path) and getattr(route, "methods", None):
                methods |= set(route.methods)
        return sorted(methods)


def foreign_page(headers: dict[bytes, str]) -> tuple[str, str] | None:
    """For a gateway on loopback: (code, message) refusing a request whose Host or Origin is
    not a loopback name. A page on another site (or a DNS name rebound to 127.0.0.1) must not
    reach us."""
    host = _hostname(headers.get(b"host", ""))
    origin = headers.get(b"origin")
    if not _loopback_name(host):
        return "forbidden_host", f"this gateway listens on loopback only; Host {host!r} is refused"
    if origin is not None and not _loopback_name(_hostname(origin.split("://", 1)[-1])):
        return "forbidden_origin", f"requests from the web page at {origin!r} are refused"
    return None


def _loopback_name(host: str) -> bool:
    if host in ("localhost", "[::1]"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(hostport: str) -> str:
    hostport = hostport.strip().split("/", 1)[0]
    if hostport.startswith("["):
        return hostport.split("]", 1)[0] + "]"
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that gives ``body`` once, then what the connection says next."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # type: ignore[no-any-return]

    return replay


async def _refuse(send: Any, status: int, code: str, message: str,
                  extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json_safe(value: Any) -> Any:
    """``value`` with the floats JSON has no word for (NaN, infinities, as a client may send
    them) written as text: a refusal that quotes them must not fail itself."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this type (the first Content-Type sent) as JSON."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                          and kind.endswith("+json"))


async def _read_body(receive: Any) -> bytes | None:
    """A request's whole body (its size was checked from its header), None on a disconnect."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _stream(send: Any, receive: Any, chunks: Any, status: int,
                  headers: list[tuple[bytes, bytes]]) -> None:
    """Send ``chunks`` as a streamed answer, stopping at once if the client goes away (as
    Starlette's StreamingResponse, with two plain tasks instead of a task group)."""
    async def pump() -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(gone())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await chunks.aclose()
    for t in done:
        t.result()  # the pump's failure, if it failed
