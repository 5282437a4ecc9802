"""Optional features and the pip extras that provide their packages.

``pip install sqlproxy`` gives the proxy; a feature that needs more (the demo's SQLAlchemy
application; later a Redis cache backend, OpenTelemetry tracing) takes its packages from an
extra, ``pip install 'sqlproxy[demo]'``. Such a feature calls ``require`` on entry, before it
starts anything (servers, clusters), so that a user who installed without the extra gets one
line naming what to install instead of a traceback from deep inside the feature. The command
line prints the ``MissingExtra`` and exits with status 2.

Only the absence of one of the extra's own modules becomes that message. Anything else that goes
wrong while importing them (a module of ours with a bug, a dependency of theirs that is missing,
a broken install) propagates with its traceback.

Adding an optional feature: list its packages under a new extra in pyproject.toml's
``[project.optional-dependencies]``, describe the extra in ``EXTRAS`` (tests/test_extras.py checks
that the two agree), and call ``require`` where the feature starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

from sqlproxy.errors import MissingExtra

__all__ = ["EXTRAS", "Extra", "MissingExtra", "require"]


@dataclass(frozen=True, slots=True)
class Extra:
    """A pip extra: its name in pyproject.toml, and what it provides as (module to import,
    distribution that installs it) pairs."""

    name: str
    provides: tuple[tuple[str, str], ...]

    @property
    def install(self) -> str:
        return f"pip install 'sqlproxy[{self.name}]'"

    @property
    def packages(self) -> str:
        return _names(dist for _, dist in self.provides)


EXTRAS: dict[str, Extra] = {
    # greenlet by name: sqlalchemy imports without it, and sqlalchemy.ext.asyncio then fails
    # with its own ImportError (not a ModuleNotFoundError naming greenlet).
    "demo": Extra("demo", (("sqlalchemy", "SQLAlchemy"), ("greenlet", "greenlet"))),
    "otel": Extra("otel", (("opentelemetry.sdk.trace", "opentelemetry-sdk"),
                           ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                            "opentelemetry-exporter-otlp-proto-http"))),
    "redis": Extra("redis", (("redis.asyncio", "redis"),)),
}


def require(extra: str, feature: str) -> None:
    """Raise MissingExtra, naming ``feature`` and how to install ``extra``, unless every
    module the extra provides imports."""
    spec = EXTRAS[extra]
    missing = tuple(dist for module, dist in spec.provides if not _importable(module))
    if not missing:
        return
    verb = "is" if len(missing) == 1 else "are"
    raise MissingExtra(
        f"{feature} needs {_names(missing)}, which {verb} not installed: {spec.install}",
        extra=extra, missing=missing)


def _names(items: Iterable[str]) -> str:
    *rest, last = items
    return f"{', '.join(rest)} and {last}" if rest else last


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and _related(exc.name, module):
            return False
        raise  # something else is missing: a broken install or a bug, not the extra
    return True


def _related(name: str, module: str) -> bool:
    """Whether the missing module ``name`` is ``module`` or a package above it
    (``opentelemetry`` for ``opentelemetry.sdk``). A module missing inside an installed
    package is a broken install, which installing the extra again would not mend."""
    return name == module or module.startswith(name + ".")
