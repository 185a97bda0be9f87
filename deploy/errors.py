"""The one error type the server turns into an HTTP answer: a status and a message that names the problem."""

from __future__ import annotations


class ServeError(Exception):
    """A client-visible error. `retry_after` (seconds) becomes a Retry-After header (503/429 while busy)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"retry-after": str(self.retry_after)}


def bad(message: str) -> ServeError:
    return ServeError(400, message)
