"""An asyncio budget over an amount (bytes, pixels): what keeps the server's memory inside its limit.

A request reserves what it will hold before it holds it and waits, first come first served, until
that fits; one reservation larger than the whole budget runs alone rather than never. Waiting
longer than the timeout is a 503 with Retry-After, so a client can come back instead of hanging.
Event-loop only: reserve and release are called from coroutines on the server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from deploy.errors import ServeError


class Budget:
    def __init__(self, name: str, capacity: int, unit: str, setting: str):
        self.name, self.capacity, self.unit, self.setting = name, capacity, unit, setting
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.capacity

    def _take(self, n: int):
        self.used += n
        self.peak = max(self.peak, self.used)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, n: int, timeout: float) -> None:
        if n <= 0:
            return
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we gave up: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()  # a big waiter leaving may let smaller ones behind it in
            if isinstance(e, TimeoutError):
                raise ServeError(503, f"server busy: {n} {self.unit} of {self.name} did not fit the "
                                      f"{self.capacity} allowed at once ({self.setting}) within {timeout:g} s; "
                                      "retry later", retry_after=1) from None
            raise

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        self._wake()

    def _wake(self):
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                break
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, n: int, timeout: float):
        await self.acquire(n, timeout)
        try:
            yield
        finally:
            self.release(n)
