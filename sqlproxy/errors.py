"""The error hierarchy. Every error a client sees is an ErrorResponse with a real SQLSTATE."""

from __future__ import annotations


class ProxyError(Exception):
    """Root of every error sqlproxy raises on purpose."""

    sqlstate: str = "XX000"

    def __init__(self, message: str, *, sqlstate: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.detail = detail


class ProtocolViolation(ProxyError):
    """The peer sent bytes that are not valid protocol v3 (SQLSTATE 08P01)."""

    sqlstate = "08P01"


class ConnectionFailure(ProxyError):
    """A backend could not be reached or went away (SQLSTATE 08006)."""

    sqlstate = "08006"


class TooManyConnections(ProxyError):
    """A configured connection limit was reached (SQLSTATE 53300)."""

    sqlstate = "53300"


class ConfigError(ProxyError):
    """The configuration is invalid; the message names the key."""

    sqlstate = "F0000"


class MissingExtra(ProxyError):
    """An optional feature's packages are not installed; the message names the pip extra that
    provides them (see sqlproxy.extras). The command line prints it as one line, status 2."""

    def __init__(self, message: str, *, extra: str, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.extra = extra
        self.missing = missing
