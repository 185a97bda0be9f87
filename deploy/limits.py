"""How the server holds its limits against slow, many, large or broken clients.

- `connection_protocol`: uvicorn's h11 protocol plus a deadline on each request head (READ_TIMEOUT_S: a
  half-sent request line or header block gets a 408 and is closed) and a cap on open connections
  (MAX_CONNECTIONS, kept below the open-file limit): at the cap the oldest connection with no request in
  progress (idle keep-alive, or a head still arriving) is closed to make room; with none, the newcomer gets 503.
- `LimitsAndMetrics`, the outermost ASGI layer: counts and times every request; a body over MAX_BODY_BYTES
  is a 413; a body is admitted only when it fits the bytes all bodies may hold at once (MAX_BUFFERED_BYTES,
  else it waits up to QUEUE_TIMEOUT_S, then 503 + Retry-After) and must arrive whole within READ_TIMEOUT_S
  (else 408: also what a request shorter than its Content-Length gets).
- `FloodFilter`: a log line that repeats (EMFILE on accept, invalid requests...) is written once per interval
  with a count of those held back, so a flood of events is not a flood of log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from deploy.errors import ServeError
from deploy.metrics import Metrics, endpoint_label

log = logging.getLogger("tlcv.serve")

FD_RESERVE = 32  # open files kept for everything that is not a client connection (model, logs, spooled uploads)


# ----------------------------------------------------------------------------------------------- logging

class FloodFilter(logging.Filter):
    """Passes the first WARNING+ record of each kind, then at most one per `interval` seconds, noting how many
    like it were held back. INFO and below always pass."""

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval = interval
        self.seen: dict[tuple, list] = {}  # kind -> [last passed at, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = str(record.msg) if record.args else record.getMessage()
        key = (record.name, record.levelno, text.split("\n", 1)[0][:60])
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.getMessage()}\n[{entry[1]} more like this in the last {now - entry[0]:.0f} s, not logged]"
            record.args = None
        self.seen[key] = [now, 0]
        return True


def install_flood_filter(interval: float = 10.0) -> FloodFilter:
    f = FloodFilter(interval)
    for name in ("asyncio", "uvicorn.error", "tlcv.serve"):
        logging.getLogger(name).addFilter(f)
    return f


def connection_limits(wanted: int) -> tuple[int, int]:
    """(MAX_CONNECTIONS as the open-file limit allows it, listen backlog). The soft limit is raised to the hard
    one first; FD_RESERVE files stay for the rest of the process; the listen backlog (how many connections one
    accept round takes in before the cap sees them) and the cap share the remainder, so accept() does not meet
    EMFILE because of clients however many connect at once (and if it still does, FloodFilter keeps the log short)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = max(64, soft - FD_RESERVE)
    backlog = min(2048, max(8, room // 8))
    # asyncio accepts a backlog's worth per loop turn and the protocol sees them two turns later: keep 3 rounds free
    cap = min(wanted, max(16, room - 3 * backlog))
    if cap < wanted:
        log.warning("MAX_CONNECTIONS %d lowered to %d (listen backlog %d): the open-file limit is %d (ulimit -n)",
                    wanted, cap, backlog, soft)
    return cap, backlog


# ----------------------------------------------------------------------------------------------- connections

def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode("latin-1") + body


def connection_protocol(read_timeout_s: float, max_connections: int, metrics: Metrics | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (see the module docstring)."""

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._idle_since: float | None = time.monotonic()  # no request in progress since then
            self._receiving_since: float | None = None  # a request's body is still arriving since then
            if len(self.connections) > max_connections and not self._make_room():
                self._close_with(_raw_response(503, "Service Unavailable", f"server busy: {max_connections} connections "
                                               "all have requests in progress (MAX_CONNECTIONS); retry later",
                                               "retry-after: 1\r\n"), "connection_limit")
                return
            self._arm_head_timer()
            if metrics:
                metrics.connections.set(len(self.connections))

        def connection_lost(self, exc):
            self._cancel_head_timer()
            self._idle_since = self._receiving_since = None
            super().connection_lost(exc)
            if metrics:
                metrics.connections.set(len(self.connections))

        def data_received(self, data: bytes):
            super().data_received(data)
            self._follow_state()

        def on_response_complete(self):
            super().on_response_complete()  # arms uvicorn's keep-alive timer (KEEP_ALIVE_S) and runs a pipelined request
            self._follow_state()
            if self.conn.their_state is h11.IDLE and self._head_timer is None:
                self._idle_since = time.monotonic()  # idle keep-alive: evictable; its own timer closes it

        # -- the request-head deadline
        def _follow_state(self):
            if self.transport.is_closing():
                self._cancel_head_timer()
            elif self.conn.their_state is h11.IDLE:
                if self._head_timer is None and self.conn.trailing_data[0]:  # part of a head has arrived
                    self._idle_since = self._idle_since or time.monotonic()
                    self._arm_head_timer()
            else:  # a whole head arrived: the body deadline is LimitsAndMetrics'
                self._cancel_head_timer()
                self._idle_since = None
                if self.conn.their_state is h11.SEND_BODY:
                    self._receiving_since = self._receiving_since or time.monotonic()
                else:
                    self._receiving_since = None

        def _arm_head_timer(self):
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(read_timeout_s, self._head_timeout)

        def _cancel_head_timer(self):
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self):
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # a half-sent head: say why before closing
                got = len(self.conn.trailing_data[0])
                self._close_with(_raw_response(408, "Request Timeout", f"request head not complete within {read_timeout_s:g} s "
                                               f"(READ_TIMEOUT_S; {got} bytes received)"), "read_timeout")
            else:  # connected and said nothing
                self._close_with(b"", "read_timeout")

        # -- the connection cap
        def _make_room(self) -> bool:
            """Close the connection idle the longest (no request, or a head still arriving); else the one whose
            body has been arriving the longest (503, it may retry). False if every one has a whole request."""
            live = [c for c in self.connections if c is not self and not c.transport.is_closing()]
            if len(live) < max_connections:
                return True
            idle = [c for c in live if getattr(c, "_idle_since", None) is not None]
            if idle:
                min(idle, key=lambda c: c._idle_since)._close_with(b"", "make_room")
                return True
            receiving = [c for c in live if getattr(c, "_receiving_since", None) is not None
                         and c.cycle is not None and not c.cycle.response_started]
            if receiving:
                victim = min(receiving, key=lambda c: c._receiving_since)
                victim.cycle.disconnected = True  # the app's answer, if any, is dropped: this one is the answer
                victim.cycle.message_event.set()
                victim._close_with(_raw_response(503, "Service Unavailable", "connection closed to make room for others "
                                                 "(MAX_CONNECTIONS) while its body was still arriving; retry later",
                                                 "retry-after: 1\r\n"), "make_room")
                return True
            return False

        def _close_with(self, data: bytes, reason: str):
            self._cancel_head_timer()
            self._idle_since = self._receiving_since = None
            self._unset_keepalive_if_required()
            if data:
                self.transport.write(data)
            self.transport.close()
            if metrics:
                metrics.connections_closed.labels(reason).inc()
            log.warning("closed a connection from %s: %s", "%s:%s" % self.client if self.client else "?", reason)

    return BoundedH11Protocol


# ----------------------------------------------------------------------------------------------- requests

class LimitsAndMetrics:
    """Outermost ASGI layer: counts, times and labels every request; admits and reads its body within the limits.

    The body is read here (it is needed whole anyway) and replayed to the app. Over MAX_BODY_BYTES the rest
    of it is drained (up to a cap, within the read deadline) before the 413 goes out, so the client reads the
    answer instead of a reset connection.
    """

    DRAIN_CAP = 256 * 1024 * 1024

    def __init__(self, app, service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, m = self.service.settings, self.service.metrics
        label = endpoint_label(scope["path"])
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            limit = s.max_body_bytes
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            declared = headers.get("content-length")
            declared_n = int(declared) if declared is not None and declared.isdigit() else None
            chunked = "transfer-encoding" in headers
            if declared_n is not None and declared_n > limit:
                await self._drain(receive, s.read_timeout_s)
                return await send_json(send_wrapped, 413, f"request body of {declared} bytes is over the limit of "
                                                          f"{limit} bytes (MAX_BODY_BYTES)", close=True)
            # what this request may hold: what it declares, or the most a chunked body may be
            reserve = declared_n if declared_n is not None else (limit if chunked else 0)
            budget = self.service.body_budget
            try:
                await budget.acquire(reserve, s.queue_timeout_s)
            except ServeError as e:  # 503 + Retry-After: too many bodies in memory already
                return await send_json(send_wrapped, e.status, e.message, close=True,
                                       extra=[(k.encode(), v.encode()) for k, v in e.headers().items()])
            try:
                body = await self._read(receive, limit, s.read_timeout_s)
                if isinstance(body, tuple):  # (status, message): refused while reading
                    return await send_json(send_wrapped, body[0], body[1], close=True)
                if body is None:  # the client went away
                    return
                replayed = False

                async def receive_replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, receive_replay, send_wrapped)
            finally:
                budget.release(reserve)
        finally:
            m.requests.labels(label).inc()
            m.latency.labels(label).observe(time.perf_counter() - t0)
            if status["code"] >= 400:
                m.errors.labels(label, str(status["code"])).inc()

    async def _read(self, receive, limit: int, timeout: float) -> bytes | tuple[int, str] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        chunks, total, more = [], 0, True
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                return 408, (f"request body not received in full within {timeout:g} s (READ_TIMEOUT_S): "
                             f"{total} bytes arrived (is the body shorter than its Content-Length?)")
            if msg["type"] == "http.disconnect":
                return None
            part = msg.get("body", b"")
            total += len(part)
            more = msg.get("more_body", False)
            if total > limit:  # a chunked body over the limit
                if more:
                    await self._drain(receive, max(0.0, deadline - loop.time()), total)
                return 413, f"request body of over {limit} bytes is over the limit of {limit} bytes (MAX_BODY_BYTES)"
            chunks.append(part)
        return b"".join(chunks)

    async def _drain(self, receive, timeout: float, total: int = 0):
        try:
            async with asyncio.timeout(timeout):
                while total <= self.DRAIN_CAP:
                    msg = await receive()
                    total += len(msg.get("body", b""))
                    if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                        return
        except TimeoutError:
            pass


async def send_json(send, status: int, message: str, close: bool = False, extra: list | None = None):
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    if close:  # the body was not read: this connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
