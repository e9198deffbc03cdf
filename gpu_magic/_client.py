"""The HTTP client of a gateway: one keep-alive httpx.Client per gateway, and for each cell's
one request (submit and follow) a kept-alive socket of our own (:class:`_rawget.Exchange`).

Uploads stream memoryview slices (httpx with one large ``content=`` bytes object is quadratic),
downloads land in a preallocated buffer, and a job's event stream resumes after a dropped
connection from the last event seen (``Last-Event-ID``), so no event is lost or repeated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from . import _rawget, _reserve
from ._errors import AuthError, GatewayError, NoFeasibleOption, SpecError
from ._payload import SCHEMES, byte_view
from ._version import WIRE_FORMAT, __version__

CHUNK = 1 << 20
# Blobs at least this big go through files on the same host (below it one HTTP body is cheaper).
SAME_HOST_MIN = 1 << 20
# from this size an upload goes to the gateway's bulk port, where it offers one: its two extra
# round trips (the listener's proof, then 100 Continue) cost less than uvicorn's slower reading
BULK_MIN = 1 << 20
RESUME_ATTEMPTS = 20
# An event stream that brings nothing, not even the gateway's heartbeat (every 5 s), for this
# long is taken as lost and resumed: a gateway stopped (SIGSTOP, a frozen host) keeps its
# connections open, and the cell went on saying "running" for the whole 60 s read timeout.
STREAM_SILENCE_S = 20.0
# Input blobs up to this much in all travel inside the submit itself (base64 in its JSON).
INLINE_MAX = 256 << 10


# what job ids look like: the gateway makes 16 hex digits, a client may choose 12 to 32
_JOB_ID = re.compile(r"[0-9a-f]{12,32}")


def checked_job_id(job_id: str) -> str:
    """``job_id``, if it has the form of one; else a ValueError that says so. It goes into
    a URL path, where ``../../etc`` would name another route (answered "Not Found")."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"{job_id!r} is not a job id: job ids are 12 to 32 lowercase hex "
                         "digits (0-9, a-f), such as 3f9a1c2b7d4e5f60; `%gpu jobs` (or "
                         "`gpu-magic jobs`) lists yours")
    return job_id


# Our own requests say nothing in the notebook's logs: a `logging.basicConfig(level=INFO)`
# showed httpx's "HTTP Request: GET http://127.0.0.1:…/v1/health" for each (and, at DEBUG,
# httpcore's connection lines), the gateway's address included. The user's own httpx
# requests log as ever.
_OUR_URLS: set[str] = set()
_QUIET = threading.local()


class _QuietTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _QUIET.on = True
        try:
            response = self._inner.handle_request(request)
        finally:
            _QUIET.on = False
        response.stream = _QuietStream(response.stream)  # (its body is read after this)
        return response

    def close(self) -> None:
        self._inner.close()


class _QuietStream(httpx.SyncByteStream):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            _QUIET.on = True
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                _QUIET.on = False
            yield chunk

    def close(self) -> None:
        _QUIET.on = True
        try:
            self._inner.close()
        finally:
            _QUIET.on = False


class _OwnRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_QUIET, "on", False):
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.name == "httpx" and len(args) > 1
                    and str(args[1]).startswith(tuple(_OUR_URLS)))


for _name in ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
              "httpcore.proxy", "httpcore.socks"):
    logging.getLogger(_name).addFilter(_OwnRequests())


def usable_token(token: str | None, token_from: str | None = None,
                 whose: str | None = None) -> str | None:
    """``token`` without the white space a paste or a file leaves around it. One with a
    character a header cannot carry inside (a line break) is refused without being shown:
    httpx's own error printed the whole token into the notebook, which gets saved and shared.
    ``whose``: how the error names the token (default: "the token from ``token_from``")."""
    if token is None:
        return None
    token = token.strip()
    bad = next((i for i, c in enumerate(token) if not " " <= c <= "~"), None)
    if bad is not None:
        what = {"\n": "a line break", "\r": "a line break", "\t": "a tab"}.get(
            token[bad], f"the character U+{ord(token[bad]):04X}")
        whose = whose or f"the token from {token_from or 'the caller'}"
        raise AuthError(f"{whose} has {what} inside it (character {bad + 1} of {len(token)}), "
                        "which a request cannot carry: copy the token again, without it")
    return token or None


def _with_wire(body: dict[str, Any]) -> dict[str, Any]:
    """The job's body saying which pickles this client writes, its version for a refusal to
    name, and the blob digests it knows, for its results' names (in ``meta``, which a gateway
    from before takes as it is)."""
    return {**body, "meta": {**(body.get("meta") or {}), "wire": str(WIRE_FORMAT),
                             "gpu_magic": __version__, "digests": ",".join(SCHEMES)}}


class GatewayClient:
    """Talks to one gateway with one token."""

    def __init__(self, url: str, token: str | None, *, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, same_host: bool = True,
                 url_from: str | None = None, token_from: str | None = None) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):  # the API's prefix, copied with the address: ours to add
            self.url = self.url[: -len("/v1")]
        self.token = usable_token(token, token_from)
        # where the URL and the token came from ("GPU_MAGIC_URL", "--token", LOCAL, ...), for
        # advice that names what to fix; None: given in code
        self.url_from, self.token_from = url_from, token_from
        # called when the gateway cannot be reached (the local one forgets itself)
        self.on_unreachable: Callable[[], None] | None = None
        # where this gateway is now if it was started again elsewhere (the local one, at a new
        # port with a new token, over the same jobs); None: it cannot move
        self.relocate: Callable[[], tuple[str, str | None] | None] | None = None
        # why the event stream being resumed cannot be reached now (None while it flows): a
        # background job's wait() says the gateway is away, not that the job still runs
        self.trouble: BaseException | None = None
        self._timeout = httpx.Timeout(connect_timeout, read=read_timeout)
        self._http = self._new_http()
        self._health: dict[str, Any] | None = None
        # False: always HTTP bodies, even when the gateway offers files on this host
        self._local: dict[str, Any] | bool | None = None if same_host else False
        # digests the gateway held for us when last asked (it may drop them later: a submit
        # that names a dropped one is refused with 409 and sent again with it)
        self.known: set[str] = set()
        # clients for event streams, one per job being followed, kept for the next job
        self._spares: list[GatewayClient] = []
        self._spares_lock = threading.Lock()
        # a client dropped without close() still closes its connections (and its spares'):
        # their sockets would otherwise be collected open
        self._open: dict[str, Any] = {"http": self._http}
        weakref.finalize(self, _close_all, self._open, self._spares)
        # a ready URL: httpx parses and merges a relative one on every request
        self._follow_url = httpx.URL(self.url + "/v1/jobs?follow=true")
        # the submit-and-follow exchange on a plain kept-alive socket (None: not made yet)
        self._exchange: _rawget.Exchange | None = None
        self._plain: bool | None = None  # whether nothing (a proxy) stands in its way
        self._bulk: bool | None = None  # False: its bulk port proved unusable from here
        _CLIENTS.add(self)

    def _new_http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        _OUR_URLS.add(self.url.rstrip("/") + "/")
        client = httpx.Client(base_url=self.url, headers=headers, timeout=self._timeout,
                              verify=_ssl_context())
        # quiet whichever transport httpx chose (a proxy's, from the environment, included)
        with contextlib.suppress(AttributeError):
            client._transport = _QuietTransport(client._transport)
            client._mounts = {k: v if v is None else _QuietTransport(v)
                              for k, v in client._mounts.items()}
        return client

    def _stream_gone(self, job_id: str, exc: BaseException) -> GatewayError:
        return _local_gone(self, job_id, exc) or GatewayError(
            f"lost the event stream of job {job_id} from {self.url} and could not resume it: "
            f"{_clause(exc)}. The job may still be running: %gpu attach {job_id}")

    def _moved(self) -> bool:
        """Whether the gateway was started again elsewhere: then this client talks to it."""
        where = self.relocate() if self.relocate is not None else None
        if where is None or (where[0].rstrip("/"), where[1]) == (self.url, self.token):
            return False
        self.url, self.token = where[0].rstrip("/"), where[1]
        self._follow_url = httpx.URL(self.url + "/v1/jobs?follow=true")
        self._health = None
        self._local = None if self._local is not False else False
        self._bulk = None
        self.let_go()
        return True

    def let_go(self) -> None:
        """Close every connection of this client and its spares, staying usable (its gateway
        went away: a soak trial's kernel kept two or three sockets of each gateway stopped
        since, for good)."""
        self.reset()
        if self._exchange is not None:
            self._exchange.close()
            self._exchange = None
            self._open.pop("exchange", None)
        with self._spares_lock:
            spares, self._spares = self._spares, []
        for c in spares:
            c.close()

    def reset(self) -> None:
        """Drop pooled connections (after an interrupt may have left one half-used)."""
        try:
            self._http.close()
        except Exception:
            pass
        self._http = self._open["http"] = self._new_http()
        if self._exchange is not None:
            self._exchange.drop()

    def close(self) -> None:
        self._http.close()
        if self._exchange is not None:
            self._exchange.close()
        with self._spares_lock:
            spares, self._spares = self._spares, []
        for c in spares:
            c.close()

    def borrow(self) -> GatewayClient:
        """A client of this gateway for another thread (httpx clients are not shared between
        threads here); ``give_back`` keeps it and its open connection for the next one."""
        with self._spares_lock:
            while self._spares:
                spare = self._spares.pop()
                if not spare._http.is_closed:
                    return spare
        other = GatewayClient(self.url, self.token, url_from=self.url_from,
                              token_from=self.token_from)
        other.on_unreachable, other.relocate = self.on_unreachable, self.relocate
        other._health, other._local = self._health, self._local  # same_host=False included
        return other

    def give_back(self, other: GatewayClient) -> None:
        with self._spares_lock:
            # (not one of a gateway this client has left since: its socket would stay open)
            if len(self._spares) < 4 and (other.url, other.token) == (self.url, self.token):
                self._spares.append(other)
                return
        other.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        factory = kw.pop("content_factory", None)
        for attempt in (1, 2):
            if factory is not None:
                kw["content"] = factory()  # a fresh body for each try
            try:
                resp = self._http.request(method, path, **kw)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A pooled keep-alive connection the server had just closed: send once more on
                # a fresh one. Every request here may be repeated safely (a job's id is chosen
                # by the client, so a repeated submit is refused as a duplicate, not run twice;
                # a streamed body comes from a factory, so it is made anew).
                if attempt == 2:
                    # a gateway with TLS hangs up so on plain http (and so does one dying)
                    tls = (f". It speaks https (--certfile): use https{self.url[4:]}"
                           if self.url.startswith("http:") and _speaks_tls(self.url) else "")
                    raise GatewayError(f"the gpu_magic gateway at {self.url} dropped the "
                                       f"connection: {_clause(exc)}{tls}") from None
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
        _check(resp, self.url, self)
        return resp

    def _unreachable(self, exc: BaseException) -> GatewayError:
        if self.on_unreachable is not None:
            self.on_unreachable()
        error = unreachable(self.url, exc, self.url_from)
        error.transport = exc
        return error

    def health(self, refresh: bool = False) -> dict[str, Any]:
        if self._health is None or refresh:
            answer = self._request("GET", "/v1/health").json()
            if isinstance(answer, dict) and answer.get("authorized") is False:
                # not kept: once the admin adds or restores the token, the next cell must
                # ask again, not repeat the refusal from here
                return answer
            self._health = answer
        return self._health

    def whoami(self) -> dict[str, Any]:
        """Whom the gateway takes our token for: ``{"user": ..., "admin": ...}`` (one
        authenticated request; AuthError if the token is refused)."""
        try:
            return self._request("GET", "/v1/limits").json()  # (it names the caller)
        except GatewayError as exc:
            if exc.status != 404:
                raise
        self.pool()  # a gateway without /v1/limits: the token is good, the name unknown
        return {}

    def pool(self) -> dict[str, Any]:
        return self._request("GET", "/v1/pool").json()

    def jobs(self, everyone: bool = False) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/jobs", params={"all": everyone}).json()["jobs"]

    def recent_jobs(self, limit: int, everyone: bool = False,
                    ) -> tuple[list[dict[str, Any]], int]:
        """The jobs not ended and the ``limit`` that ended last, and how many there are in
        all (a gateway too old to say: all of them, counted here)."""
        body = self._request("GET", "/v1/jobs", params={"all": everyone, "limit": limit}).json()
        return body["jobs"], int(body.get("total", len(body["jobs"])))

    def all_jobs(self, asked_by: str, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Every user's jobs, for an admin token. Any other token gets a GatewayError (403):
        the gateway itself answers it with the caller's own jobs, which would read as if
        nobody else had any. ``asked_by`` names what the user typed, for the message."""
        me = self.whoami()
        if me and not me.get("admin"):
            whose = f"the token from {self.token_from}" if self.token_from else "this token"
            raise GatewayError(
                f"{asked_by} lists every user's jobs and needs an admin token; the gateway at "
                f"{self.url} takes {whose} for user {me.get('user')!r}, who is not an admin. "
                "Leave out --all to list your own jobs.", status=403)
        return self.recent_jobs(limit, everyone=True)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{checked_job_id(job_id)}").json()

    def cancel(self, job_id: str, via: str | None = None) -> dict[str, Any]:
        """``via``: ``magic`` for %gpu cancel (the cell then says where it was cancelled)."""
        return self._request("DELETE", f"/v1/jobs/{checked_job_id(job_id)}",
                             params={"via": via} if via else None).json()

    def interrupt(self, job_id: str) -> dict[str, Any]:
        """A KeyboardInterrupt in the job's running cell (409: queued, ended, or a backend
        that cannot; the answer's ``error`` says which)."""
        return self._request("POST", f"/v1/jobs/{checked_job_id(job_id)}/interrupt").json()

    def missing(self, digests: list[str]) -> list[str]:
        if not digests:
            return []
        return self._request("POST", "/v1/blobs/missing", json={"digests": digests}).json()["missing"]

    def local_path(self) -> dict[str, Any] | None:
        """The same-host path of this gateway (inbox and store folders), if it offers one and
        we are on its host; checked once per client."""
        if self._local is None:
            info: dict[str, Any] | bool = False
            try:
                resp = self._http.get("/v1/local")
                if resp.status_code == 200:
                    got = resp.json()
                    if got.get("host") == socket.gethostname() and os.access(got["inbox"], os.W_OK):
                        info = got
            except (httpx.HTTPError, ValueError, KeyError):
                info = False
            self._local = info
        return self._local or None

    def upload(self, digest: str, data: memoryview) -> None:
        view = byte_view(data)
        local = self.local_path() if view.nbytes >= SAME_HOST_MIN else None
        if local is not None:
            # same host: one write into the gateway's inbox instead of an HTTP body
            name = os.urandom(16).hex()
            path = os.path.join(local["inbox"], name)
            try:
                _reserve.write_file(path, view, local.get("reserve"))
                self._request("POST", "/v1/blobs/adopt", json={"digest": digest, "name": name})
            except OSError as exc:
                raise GatewayError(f"cannot hand blob {digest} to the gateway through "
                                   f"{local['inbox']}: {exc}") from None
            finally:
                if os.path.exists(path):
                    os.unlink(path)
            return

        if view.nbytes >= BULK_MIN and self._bulk_upload(digest, view):
            return

        def slices() -> Iterator[memoryview]:
            for i in range(0, view.nbytes, CHUNK):
                yield view[i : i + CHUNK]

        self._request("PUT", f"/v1/blobs/{digest}", content_factory=slices,
                      headers={"Content-Length": str(view.nbytes),
                               "Content-Type": "application/octet-stream"})

    def _bulk_upload(self, digest: str, view: memoryview) -> bool:
        """Upload through the gateway's bulk port when it offers one: False if that port cannot
        take it, and the upload is to go through the main one."""
        def put(url: httpx.URL, offer: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
            return _rawget.put_bulk(
                url, offer["port"], offer["id"], offer["key"], f"/v1/blobs/{digest}", view,
                timeout=self._timeout.read or 60.0,
                connect_timeout=self._timeout.connect or 10.0, context=_ssl_context())
        return self._via_bulk("PUT", digest, put) is not None

    def _via_bulk(self, method: str, digest: str,
                  call: Callable[[httpx.URL, dict[str, Any]], tuple[int, dict[str, str], Any]],
                  ) -> Any:
        """``call`` the gateway's bulk port for ``method`` on blob ``digest`` when its health
        (to a caller with a token) offers one: the 200 answer's body, or None if that port
        cannot take it and the main one is to be used. An error answer is raised as the main
        port's would be. A port found unusable (not reached: a firewall; not the gateway's)
        is not tried again by this client, once a fresh health answer has named the same
        port."""
        url = httpx.URL(f"{self.url}/v1/blobs/{digest}")
        if self._bulk is False or not self.token or not _rawget.usable(url):
            return None
        tried = None
        for fresh in (False, True):
            try:
                offer = self.health(refresh=fresh).get("bulk")
            except GatewayError:
                return None  # (the main route says what is wrong)
            if not _bulk_offer(offer):
                return None
            if method not in offer.get("serves", ["PUT"]):
                return None  # (a gateway from before this method came to the bulk port)
            if offer == tried:
                break
            tried = offer
            try:
                status, fields, body = call(url, offer)
            except _rawget.Unusable as exc:
                if not exc.lasting:
                    return None
                continue  # (a gateway started again listens elsewhere: its health says where)
            if status == 200:
                return body
            known = status >= 400 and status not in (404, 405)
            if known or (status == 404 and method == "GET" and b"no_such_blob" in body):
                _check(httpx.Response(status, headers=fields, content=body), self.url, self)
            break  # (an answer this client does not know from a bulk port)
        self._bulk = False
        return None

    def download(self, digest: str, size: int | None = None) -> bytearray:
        """Blob ``digest`` in writable memory; ``size``, where known (the result event says),
        lets one of 1 MiB or more come through the bulk port."""
        local = self.local_path()
        if local is not None:
            path = os.path.join(local["store"], digest.replace(":", "-"))
            try:
                stored = os.path.getsize(path)
            except OSError:
                stored = -1
            if stored >= SAME_HOST_MIN:
                # same host: map the stored file, private and copy-on-write (writable arrays,
                # nothing copied until written; a fresh buffer costs a page fault per page)
                try:
                    with open(path, "rb", buffering=0) as f:
                        return mmap.mmap(f.fileno(), stored, flags=mmap.MAP_PRIVATE,  # type: ignore[return-value]
                                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError):
                    pass  # gone meanwhile: over HTTP below
        def get(url: httpx.URL, offer: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
            return _rawget.get_bulk(
                url, offer["port"], offer["id"], offer["key"], f"/v1/blobs/{digest}",
                timeout=self._timeout.read or 60.0,
                connect_timeout=self._timeout.connect or 10.0, context=_ssl_context())
        url = httpx.URL(f"{self.url}/v1/blobs/{digest}")
        got_raw = None
        try:
            # the bulk port (the kernel sends the file), else a plain GET read in place
            big = size is not None and size >= BULK_MIN
            body = self._via_bulk("GET", digest, get) if big else None
            if body is not None:
                return body  # type: ignore[no-any-return]
            if _rawget.usable(url):
                got_raw = _rawget.get_into(
                    url, {"Authorization": f"Bearer {self.token}"} if self.token else {},
                    timeout=self._timeout.read or 60.0, context=_ssl_context(),
                    connect_timeout=self._timeout.connect)
        except _rawget.Short as exc:
            raise GatewayError(f"result {digest} arrived short ({exc.got} of {exc.size} "
                               "bytes)") from None
        except OSError as exc:  # ssl.SSLError and timeouts are OSErrors too
            raise GatewayError(f"the download of result {digest} from {self.url} broke: "
                               f"{exc}") from None
        if got_raw is not None:
            status, fields, body = got_raw
            if status >= 400:
                _check(httpx.Response(status, headers=fields, content=body), self.url, self)
            if status == 200:
                return body  # type: ignore[no-any-return]
        try:
            with self._http.stream("GET", f"/v1/blobs/{digest}") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _check(resp, self.url, self)
                size = int(resp.headers.get("Content-Length", "-1"))
                if size < 0:  # no length given: grow as it comes
                    buf = bytearray()
                    for chunk in resp.iter_raw(CHUNK):
                        buf += chunk
                    return buf
                # into one preallocated buffer: fresh buffers per chunk cost page faults
                buf = _rawget.new_buffer(size)
                got = 0
                with _rawget.prefaulted(buf), memoryview(buf) as view:
                    for chunk in resp.iter_raw(CHUNK):
                        n = len(chunk)
                        if got + n > size:
                            raise GatewayError(f"result {digest} is longer than announced")
                        view[got : got + n] = chunk
                        got += n
        except httpx.TransportError as exc:
            raise GatewayError(f"the download of result {digest} from {self.url} broke: {exc}") from None
        if got != size:
            raise GatewayError(f"result {digest} arrived short ({got} of {size} bytes)")
        return buf

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        body = _with_wire(body)
        try:
            return self._request("POST", "/v1/jobs", json=body).json()
        except GatewayError as exc:
            # our first try reached the gateway after all: the job exists, follow it
            detail = exc.detail if isinstance(exc.detail, dict) else {}
            if exc.status == 409 and detail.get("error") == "job_exists" and body.get("id"):
                return self.job(body["id"])
            raise

    def submit_follow(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Submit and follow in one exchange: first ``{"type": "job", "job": record}``, then the
        job's events as ``events`` gives them (a dropped stream resumes the same way)."""
        body = _with_wire(body)
        job_id = body["id"]
        last, submitted = 0, False
        for attempt in (1, 2):
            try:
                with self._post_follow(body) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        _check(resp, self.url, self)
                    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                        # a gateway from before submit-and-follow: its answer is the record
                        resp.read()
                        submitted = True
                        yield {"type": "job", "job": resp.json()}
                        break
                    chunks = resp.iter_bytes()
                    for ev in _parse_sse(chunks):
                        if ev.get("type") == "job":
                            submitted = True
                            if self._plain and self._exchange is not None:
                                # taken: from here on heartbeats come (the submit itself may
                                # take the gateway long, checking large inputs)
                                self._exchange.listen(STREAM_SILENCE_S)
                        else:
                            last = int(ev.get("seq", 0)) or last
                        yield ev
                        if ev.get("type") == "done":
                            _finish_reading(chunks)
                            return
                break  # ended early: resume below
            except GatewayError as exc:
                detail = exc.detail if isinstance(exc.detail, dict) else {}
                if attempt == 2 and exc.status == 409 and detail.get("error") == "job_exists":
                    # our first try reached the gateway before its connection dropped
                    yield {"type": "job", "job": self.job(job_id)}
                    break
                raise
            except httpx.TransportError as exc:
                if submitted:
                    break
                if attempt == 2 or not isinstance(
                        exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
                    raise self._unreachable(exc) from None
                # a pooled connection the server had just closed: once more (the job id is
                # ours, so a repeat that reached it twice is refused as a duplicate)
        yield from self.events(job_id, after=last)

    @contextlib.contextmanager
    def _post_follow(self, body: dict[str, Any]) -> Iterator[Any]:
        """The submit-and-follow request: on our own kept-alive socket where nothing stands
        between us and the gateway, else through httpx (a proxy)."""
        if self._plain is None:  # (reads the proxy settings: once per client)
            self._plain = _rawget.usable(self._follow_url)
        if not self._plain:
            with self._http.stream("POST", self._follow_url, json=body) as resp:
                yield resp
            return
        if self._exchange is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._exchange = self._open["exchange"] = _rawget.Exchange(
                self._follow_url, headers, timeout=self._timeout.read or 60.0,
                connect_timeout=self._timeout.connect or 10.0, context=_ssl_context())
        status, fields, pieces = self._exchange.post(
            self._follow_url.raw_path.decode("ascii"), json.dumps(body).encode())
        try:
            yield _Answer(status, fields, pieces)
        finally:
            pieces.close()  # (read to its end: the connection is kept; else closed)

    def events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events in order, each exactly once, resuming after dropped connections."""
        path = f"/v1/jobs/{checked_job_id(job_id)}/events"
        last = after
        failures = 0  # attempts in a row that brought nothing, not even a heartbeat
        while True:
            heard = [False]
            try:
                headers = {"Last-Event-ID": str(last)} if last else {}
                silence = httpx.Timeout(self._timeout.connect, read=STREAM_SILENCE_S)
                with self._http.stream("GET", path, headers=headers, params={"after": last},
                                       timeout=silence) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        _check(resp, self.url, self)
                    self.trouble = None
                    chunks = _heard(resp.iter_bytes(), heard)
                    for ev in _parse_sse(chunks):
                        seq = int(ev.get("seq", 0))
                        if seq and seq <= last:
                            continue
                        last = seq or last
                        yield ev
                        if ev.get("type") == "done":
                            _finish_reading(chunks)
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                self.trouble = exc
                # a stream cut after it brought something (a proxy or a network that drops
                # long connections under a long silent cell) is no failure of the gateway's
                failures = 0 if heard[0] else failures + 1
                if failures >= 3 and self._moved():
                    failures = 0  # the same jobs, at the gateway's new address
                    continue
                # no local gateway for some seconds (another kernel may start one, found as
                # moved above): none will answer, no use trying for the full 30 s
                if failures >= 6 and (gone := _local_gone(self, job_id, exc)) is not None:
                    raise gone from None
                if failures > RESUME_ATTEMPTS:
                    raise self._stream_gone(job_id, exc) from None
                time.sleep(min(2.0, 0.05 * 2**failures))
                continue
            # the server closed the stream without a done event: resume from where we are
            failures = 0 if heard[0] else failures + 1
            if failures > RESUME_ATTEMPTS:
                raise GatewayError(f"the event stream of job {job_id} keeps ending early")
            time.sleep(min(2.0, 0.05 * 2**failures))


def _speaks_tls(url: str) -> bool:
    """Whether a TLS handshake succeeds where ``url`` points (checked nothing more: only
    whether to suggest https after a hang-up)."""
    import ssl

    u = httpx.URL(url)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((u.host, u.port or 80), timeout=3.0) as raw, \
                ctx.wrap_socket(raw, server_hostname=u.host or None):
            return True
    except (OSError, ValueError):  # (ssl.SSLError is an OSError)
        return False


def _clause(exc: BaseException) -> str:
    """An exception's text to go inside a sentence of ours: without its own full stop, and
    as a person says it ("Connection refused", not "[Errno 111] Connection refused")."""
    text = str(exc).rstrip(" .") or type(exc).__name__
    return text.split("] ", 1)[1] if text.startswith("[Errno ") and "] " in text else text


def silence_clause(exc: BaseException) -> str:
    """Why an event stream is being resumed, in words: a read timeout is the gateway's
    silence (its heartbeats stopped), not "timed out"."""
    if isinstance(exc, httpx.ReadTimeout):
        return f"it has sent nothing, not even its heartbeat, for {STREAM_SILENCE_S:g} s"
    return _clause(exc)


def unreached_clause(exc: GatewayError, waited: float) -> str:
    """Why a request did not reach the gateway, short ("no answer within 5 s", "Connection
    refused"), for a sentence that names the gateway itself; ``waited``: its read timeout."""
    why = exc.transport
    if isinstance(why, httpx.ReadTimeout):
        return f"no answer within {waited:g} s"
    if isinstance(why, httpx.ConnectTimeout):
        return "no connection could be made in time"
    if why is not None:
        return _clause(why)
    return str(exc).rstrip(" .")


LOCAL = "the local gateway"  # url_from of this user's embedded local gateway


def _local_gone(client: GatewayClient, job_id: str, exc: BaseException) -> GatewayError | None:
    """Following a job of the local gateway that is no longer running: it ended with it."""
    if client.url_from != LOCAL:
        return None
    from ._embedded import local_gateway_gone

    if not local_gateway_gone(client.url):
        return None
    # (its runners end with it, even after a kill -9: nothing of the job runs on)
    return GatewayError(
        f"the local gpu_magic gateway at {client.url} is no longer running ({_clause(exc)}: "
        f"stopped, or it exited), and GPU job {job_id} ended with it, as lost; what it printed "
        f"is kept. Run the cell again (a fresh gateway starts), or `%gpu attach {job_id}` "
        "after a %%gpu cell has started one, to see how it ended")


def unreachable(url: str, exc: BaseException, url_from: str | None = None) -> GatewayError:
    """The error for a gateway that could not be reached, with what to check."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return GatewayError(
            f"the gateway URL {url!r} does not say how to reach it ({_clause(exc)}): write it "
            "as http://HOST:PORT or https://HOST:PORT")
    text = _clause(exc)
    source = f" (from {url_from})" if url_from and url_from != LOCAL else ""
    if "CERTIFICATE_VERIFY_FAILED" in text:
        # (ssl's own names: our plain-socket paths keep only the text of ssl's errors)
        if "mismatch" in text:
            return GatewayError(
                f"the TLS certificate of the gpu_magic gateway at {url}{source} is not made out "
                f"to {httpx.URL(url).host} ({text}): use the host name the certificate names")
        return GatewayError(
            f"the gpu_magic gateway at {url}{source} shows a TLS certificate this machine does "
            f"not trust ({text}). If it is self-signed or signed by a CA of your own, get that "
            "CA's certificate from whoever runs the gateway and set "
            "SSL_CERT_FILE=/path/to/ca.pem in this program's environment (for a notebook: "
            "where Jupyter starts, then restart the kernel)")
    if "WRONG_VERSION_NUMBER" in text and url.startswith("https:"):
        return GatewayError(
            f"the gpu_magic gateway at {url}{source} speaks plain http, not https ({text}): use "
            f"http{url[len('https'):]}")
    if url_from == LOCAL:
        return GatewayError(
            f"the local gpu_magic gateway at {url} stopped answering ({text}); it is "
            "forgotten: run the cell again and a fresh one starts")
    check = {"--url": "check --url", "%gpu connect": "check the URL given to %gpu connect, or "
             "go back with %gpu connect local", "%config GPUMagic.url": "check %config "
             "GPUMagic.url", "GPU_MAGIC_URL": "check GPU_MAGIC_URL"}.get(url_from or "",
                                                                         "check the URL")
    return GatewayError(f"cannot reach the gpu_magic gateway at {url}{source}: {text}. Is it "
                        "running (`gpu-magic serve` where it runs; a class's or a lab's: ask "
                        f"whoever runs it)? Or {check}")


_SSL: Any = None


class _Answer:
    """An answer of the plain exchange, as much of an ``httpx.Response`` as is read here."""

    def __init__(self, status: int, headers: dict[str, str], pieces: Iterator[bytes]) -> None:
        self.status_code, self.headers, self._pieces = status, headers, pieces
        self.content = b""

    def read(self) -> bytes:
        self.content = b"".join(self._pieces)
        return self.content

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def iter_bytes(self) -> Iterator[bytes]:
        return self._pieces


def _bulk_offer(offer: Any) -> bool:
    """Whether a health answer's ``bulk`` names a port, an id and a key a client can use."""
    if not isinstance(offer, dict) or not isinstance(offer.get("port"), int):
        return False
    key, kid = offer.get("key"), offer.get("id")
    return (isinstance(key, str) and isinstance(kid, str) and kid.isascii() and kid.isalnum()
            and bool(re.fullmatch(r"(?:[0-9a-f]{2}){16,64}", key)))


def _ssl_context() -> Any:
    """One SSL context for every client: building one reads the CA bundle (~50 ms here), and a
    fresh client per request (a cancel, a sidebar poll) would pay that each time."""
    global _SSL
    if _SSL is None:
        import ssl

        _SSL = ssl.create_default_context()
        bundle = os.environ.get("SSL_CERT_FILE")
        if bundle:
            _SSL.load_verify_locations(bundle)
    return _SSL


# A forked child (multiprocessing) must not reuse its parent's kept connections: their sockets
# are shared with the parent, and two processes reading one stream would each lose half of it.
_CLIENTS: weakref.WeakSet[GatewayClient] = weakref.WeakSet()


def _forget_spares_after_fork() -> None:
    for c in list(_CLIENTS):
        c._spares_lock = threading.Lock()
        c._spares.clear()  # dropped, not closed: closing would not touch the parent's anyway


os.register_at_fork(after_in_child=_forget_spares_after_fork)


def _close_all(open_: dict[str, Any], spares: list[GatewayClient]) -> None:
    for c in list(spares):
        c.close()
    spares.clear()
    for conn in open_.values():
        conn.close()


def _finish_reading(chunks: Iterator[bytes]) -> None:
    """Read a stream to its end (the gateway ends it right after ``done``): a response left
    half-read closes its connection, and the next job would pay for a new one."""
    try:
        for _ in chunks:
            pass
    except httpx.HTTPError:
        pass  # the connection is dropped instead; nothing of the job is lost


def _heard(chunks: Iterator[bytes], heard: list[bool]) -> Iterator[bytes]:
    """``chunks``, noting in ``heard[0]`` that one came."""
    for chunk in chunks:
        heard[0] = True
        yield chunk


def _parse_sse(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON ``data`` of each server-sent event in raw chunks (cheaper than httpx's text
    lines, which cost more than the rest of a trivial cell's client side)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        if b"\r" in buf and not buf.endswith(b"\r"):
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *messages, buf = buf.split(b"\n\n")
        for message in messages:
            data = [line[5:].removeprefix(b" ") for line in message.split(b"\n")
                    if line.startswith(b"data:")]
            if data:
                yield json.loads(b"\n".join(data))


# where a token came from -> how to put another one there
_SET_TOKEN = {
    "GPU_MAGIC_TOKEN": "set GPU_MAGIC_TOKEN to it",
    "%config GPUMagic.token": "set it with %config GPUMagic.token = 'TOKEN'",
    "%gpu connect --token": "give it with %gpu connect URL --token TOKEN",
    "%gpu connect's prompt": "type it at %gpu connect URL's prompt",
    "--token": "pass it with --token TOKEN",
}


def refused(url: str, client: GatewayClient | None, detail: Any = None) -> AuthError:
    """The error for a token the gateway refused: whose token it was and where to get the
    right one (an owner's own file, or whoever runs a shared gateway)."""
    token_from = client.token_from if client is not None else None
    if client is not None and not client.token:
        return AuthError(f"the gateway at {url} needs a token and none was given: set "
                         "GPU_MAGIC_TOKEN, or use %gpu connect URL --token TOKEN",
                         status=401, detail=detail)
    if token_from == LOCAL:
        return AuthError(
            f"the local gpu_magic gateway at {url} refused the token of its own runtime file "
            "(was it started again with another state directory?): run `gpu-magic stop` (or "
            "%gpu stop) and the next cell starts a fresh one", status=401, detail=detail)
    health: Any = client._health if client is not None else None
    if client is not None and health is None:
        try:  # (not through _check: a proxy that refused this too must not loop here)
            answer = client._http.get("/v1/health", timeout=3.0)
            health = answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            pass
    health = health if isinstance(health, dict) else {}
    users = health.get("users")
    if (isinstance(users, int) and users > 1) or health.get("shared"):
        where = "ask whoever runs the gateway for your token"
    elif health.get("client_python") or users == 1:
        # only a gateway of one user runs cells with its client's Python: most likely yours
        where = ("the token of a gateway you started is in its <state-dir>/token (or your "
                 "entry of its --tokens-file); of one somebody else runs, ask them for yours")
    else:
        where = ("ask whoever runs the gateway for your token (one you started yourself keeps "
                 "it in its <state-dir>/token)")
    # (the 401's own message is for HTTP callers: which header to send)
    whose = f"the token from {token_from}" if token_from else "our token"
    fix = _SET_TOKEN.get(token_from or "", "set GPU_MAGIC_TOKEN to it")
    return AuthError(f"the gateway at {url} refused {whose} (wrong, or no longer valid): "
                     f"{where}, and {fix}", status=401, detail=detail)


def _check(resp: httpx.Response, url: str, client: GatewayClient | None = None) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except ValueError:
        body = {"message": resp.text[:500]}
    message = body.get("message") if isinstance(body, dict) else None
    if message is None and isinstance(body, dict) and "detail" in body:
        message = json.dumps(body["detail"])[:1000]
    if resp.status_code == 401:
        raise refused(url, client, body)
    code = body.get("error") if isinstance(body, dict) else None
    if code == "no_feasible_option":
        raise NoFeasibleOption(message)
    if code == "bad_spec":
        raise SpecError(message or "bad GPU spec")
    raise GatewayError(message or f"the gateway answered {resp.status_code}",
                       status=resp.status_code, detail=body)
