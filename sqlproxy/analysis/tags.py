"""Request attribution: the tags frameworks put in SQL comments, read safely.

Frameworks already say where a statement comes from, in a comment at the start or the end of
its text:

- sqlcommenter (Django, SQLAlchemy/OpenTelemetry, Spring, Knex, Rails with
  ``query_log_tags_format = :sqlcommenter``): ``/*key='value',key2='value2'*/``, keys and values
  URL-encoded, a quote inside a value escaped as ``\\'``. Drivers that format parameters with
  ``%`` double every ``%`` (``%%2F``); both forms are read.
- Rails' default query log tags: ``/*application:Shop,controller:orders,action:show*/``.

The standard keys are ``route``, ``controller``, ``action``, ``framework`` (also
``db_framework``), ``db_driver``, ``application`` (also ``app_name``), ``traceparent`` and
``tracestate``; a W3C ``baggage`` value may carry ``http.route``, ``route``, ``controller`` and
``action`` (OpenTelemetry's SQLAlchemy commenter puts its propagator's baggage there). Other
keys are kept only when configured (``analysis.tag_keys``).

Everything here treats the comment as hostile: an unterminated, nested or oversized comment, a
malformed pair, a value that does not decode as UTF-8 or holds control characters, a malformed
``traceparent`` — each is ignored (the pair, or the whole comment), never an error; the
statement is profiled as usual. Values are bounded in length and number.

Cost: the profiler asks only for texts that have edge comments (it learns that while looking
the statement up, see ``Profiler._find``); untagged statements never come here. Parsed tags are
cached per distinct comment text with the per-request values (``traceparent``, ``tracestate``)
cut out, so a framework's tags cost one dict lookup per statement after the first, plus a
check of the trace id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

__all__ = ["MAX_COMMENT", "TagReader", "Tags", "edge_comments", "parse_comment"]

MAX_COMMENT: Final = 4096  # characters of edge comments read per statement; longer: ignored
MAX_VALUE: Final = 512  # characters of one decoded value; longer: that pair is ignored
MAX_PAIRS: Final = 32  # pairs read per comment
MAX_CACHED: Final = 4096  # distinct comment texts remembered

# One sqlcommenter pair: a URL-encoded key, '=', a quoted value (\' escapes a quote). Keys are
# strict ASCII; anything else makes the pair (not the rest of the comment) unreadable.
_PAIR_RE = re.compile(r"\s*([A-Za-z0-9_.%\-]{1,128})\s*=\s*'((?:[^'\\]|\\.){0,4096}?)'\s*(?:,|$)")
# Rails' legacy format: key:value pairs separated by commas, no quotes.
_LEGACY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}:[^,:'\"\\]{0,512}(?:,[A-Za-z_][A-Za-z0-9_.]"
                        r"{0,63}:[^,:'\"\\]{0,512})*")
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Control characters (log and terminal injection), and U+FFFD: the wire layer's stand-in for
# bytes that were not UTF-8.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f\ufffd]")
_BLANK: Final = " \t\n\r\f\v;"

_ALIASES: Final = {
    "route": "route",
    "http.route": "route",
    "controller": "controller",
    "action": "action",
    "framework": "framework",
    "db_framework": "framework",
    "db_driver": "db_driver",
    "application": "application",
    "app_name": "application",
    "traceparent": "traceparent",
    "tracestate": "tracestate",
}
_BAGGAGE_KEYS: Final = {"http.route": "route", "route": "route", "controller": "controller",
                        "action": "action"}


@dataclass(frozen=True, slots=True)
class Tags:
    """What one statement's comments say about where it comes from.

    ``trace_id`` and ``span_id`` come from a valid ``traceparent`` (lower-case hex; "" when
    absent or malformed); ``sampled`` is its sampled flag.
    """

    route: str = ""
    controller: str = ""
    action: str = ""
    framework: str = ""
    db_driver: str = ""
    application: str = ""
    trace_id: str = ""
    span_id: str = ""
    sampled: bool = False
    tracestate: str = ""
    extra: tuple[tuple[str, str], ...] = ()
    endpoint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # The name statistics and findings are grouped by: the route, else controller#action.
        if self.route:
            name = self.route
        elif self.controller and self.action:
            name = f"{self.controller}#{self.action}"
        else:
            name = self.controller or self.action
        object.__setattr__(self, "endpoint", name)

    @property
    def empty(self) -> bool:
        return not (self.endpoint or self.trace_id or self.framework or self.db_driver
                    or self.application or self.extra)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for key in ("route", "controller", "action", "framework", "db_driver", "application",
                    "trace_id"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.extra:
            out["extra"] = dict(self.extra)
        return out


_NO_TAGS: Final = Tags()


def edge_comments(sql: str) -> str | None:
    """The bodies of the block comments before and after the statement, joined by a comma;
    None when there is none, or when they cannot be read safely (unterminated, nested, too
    long, or a ``*/`` that might belong to a string)."""
    text = sql.strip(_BLANK)
    bodies: list[str] = []
    total = 0
    while text.startswith("/*"):
        end = text.find("*/", 2)
        if end < 0:
            return None  # unterminated: the rest of the text is a comment to PostgreSQL
        body = text[2:end]
        if "/*" in body:
            return None  # nested: PostgreSQL would end it elsewhere
        total += len(body)
        if total > MAX_COMMENT:
            return None
        bodies.append(body)
        text = text[end + 2 :].lstrip(_BLANK)
    while text.endswith("*/"):
        start = text.rfind("/*", 0, len(text) - 2)
        if start < 0 or text.count("'", 0, start) % 2:
            return None  # no opening, or it lies inside a string
        body = text[start + 2 : -2]
        if "*/" in body:
            return None
        total += len(body)
        if total > MAX_COMMENT:
            return None
        bodies.append(body)
        text = text[:start].rstrip(_BLANK)
    if not bodies:
        return None
    return ",".join(bodies)


def _decode(raw: str) -> str | None:
    """A sqlcommenter value or key: unescape quotes, then URL-decode (``%%`` as ``%`` first,
    for drivers that double it). None when it is not UTF-8 or holds control characters."""
    if "\\" in raw:
        raw = re.sub(r"\\(.)", r"\1", raw)
    if "%" in raw:
        if "%%" in raw:
            raw = raw.replace("%%", "%")
        try:
            raw = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
    if len(raw) > MAX_VALUE or _CONTROL_RE.search(raw) is not None:
        return None
    try:
        raw.encode("utf-8")  # lone surrogates (from a client's bad bytes) are no text to show
    except UnicodeEncodeError:
        return None
    return raw


def _pairs(body: str) -> list[tuple[str, str]]:
    """The readable key/value pairs of one comment text (several comments: joined by ',')."""
    out: list[tuple[str, str]] = []
    body = body.strip()
    if "=" in body:
        pos = 0
        n = len(body)
        while pos < n and len(out) < MAX_PAIRS:
            m = _PAIR_RE.match(body, pos)
            if m is None:
                # Skip to the next comma outside a quoted value and go on.
                nxt = _skip_pair(body, pos)
                if nxt <= pos:
                    break
                pos = nxt
                continue
            key = _decode(m.group(1))
            value = _decode(m.group(2))
            if key is not None and value is not None:
                out.append((key.lower(), value))
            pos = m.end()
        return out
    for part in body.split(",")[:MAX_PAIRS] if _LEGACY_RE.fullmatch(body) else ():
        key, _, value = part.partition(":")
        value = value.strip()
        if len(value) <= MAX_VALUE and _CONTROL_RE.search(value) is None:
            out.append((key.strip().lower(), value))
    return out


def _skip_pair(body: str, pos: int) -> int:
    """The position after the next comma that is outside quotes, or len(body)."""
    quoted = False
    i = pos
    n = len(body)
    while i < n:
        c = body[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == "'":
            quoted = not quoted
        elif c == "," and not quoted:
            return i + 1
        i += 1
    return n


def _baggage(value: str, found: dict[str, str]) -> None:
    """Route, controller and action from a W3C baggage value (``k=v;props,k2=v2``)."""
    for member in value.split(",")[:MAX_PAIRS]:
        key, _, rest = member.partition("=")
        name = _BAGGAGE_KEYS.get(key.strip().lower())
        if name is None or name in found:
            continue
        decoded = _decode(rest.split(";", 1)[0].strip())
        if decoded:
            found[name] = decoded


def _trace(traceparent: str) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of a W3C traceparent; ("", "", False) if invalid."""
    m = _TRACEPARENT_RE.fullmatch(traceparent) if len(traceparent) == 55 else None
    if m is None:
        return "", "", False
    version, tid, sid, flags = m.groups()
    if version == "ff" or tid == "0" * 32 or sid == "0" * 16:
        return "", "", False
    return tid, sid, bool(int(flags, 16) & 1)


def parse_comment(body: str, extra_keys: frozenset[str] = frozenset()) -> Tags:
    """The tags in the text of edge comments (see ``edge_comments``). Never raises."""
    found: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    baggage = ""
    for key, value in _pairs(body):
        name = _ALIASES.get(key)
        if name is not None:
            found.setdefault(name, value)
        elif key == "baggage":
            baggage = baggage or value
        elif key in extra_keys and len(extra) < MAX_PAIRS:
            extra.append((key, value))
    if baggage:
        _baggage(baggage, found)
    trace_id, span_id, sampled = _trace(found.get("traceparent", ""))
    return Tags(
        route=found.get("route", ""), controller=found.get("controller", ""),
        action=found.get("action", ""), framework=found.get("framework", ""),
        db_driver=found.get("db_driver", ""), application=found.get("application", ""),
        trace_id=trace_id, span_id=span_id, sampled=sampled,
        tracestate=found.get("tracestate", "") if trace_id else "", extra=tuple(extra),
    )


_TP_KEY: Final = "traceparent='"
_TS_KEY: Final = "tracestate='"


def _cut(body: str, key: str) -> tuple[str, str]:
    """``body`` without the quoted value of ``key`` (``key='...'``), and that value."""
    i = body.find(key)
    if i < 0:
        return body, ""
    start = i + len(key)
    end = body.find("'", start)
    if end < 0:
        return body, ""
    return body[:start] + body[end:], body[start:end]


class TagReader:
    """Tags of statement texts, cached per comment text (bounded).

    The per-request values — ``traceparent`` and ``tracestate`` — are cut out of the comment
    before the lookup, so one framework's tags for one endpoint are parsed once; the trace
    values are checked and added per statement.
    """

    __slots__ = ("_cache", "_last", "_last_tags", "extra_keys", "hits", "misses")

    def __init__(self, extra_keys: frozenset[str] = frozenset()) -> None:
        self.extra_keys = extra_keys
        self._cache: dict[str, Tags | None] = {}
        # The last comment text read and its tags: a request's statements repeat it (same
        # endpoint, same traceparent), so the trace values need not be checked again.
        self._last = ""
        self._last_tags: Tags | None = None
        self.hits = 0
        self.misses = 0

    def configure(self, extra_keys: frozenset[str]) -> None:
        if extra_keys != self.extra_keys:
            self.extra_keys = extra_keys
            self._cache.clear()
            self._last = ""

    def read(self, sql: str) -> Tags | None:
        """The tags of ``sql``'s edge comments, or None when they say nothing."""
        body = edge_comments(sql)
        if body is None:
            return None
        if body == self._last:
            self.hits += 1
            return self._last_tags
        tags = self._read(body)
        self._last = body
        self._last_tags = tags
        return tags

    def _read(self, body: str) -> Tags | None:
        key, tp = _cut(body, _TP_KEY)
        ts = ""
        if tp:
            key, ts = _cut(key, _TS_KEY)
        cache = self._cache
        tags = cache.get(key, _NO_TAGS)
        if tags is _NO_TAGS:
            self.misses += 1
            tags = parse_comment(key, self.extra_keys)
            if tags.empty:
                tags = None
            if len(cache) >= MAX_CACHED:
                cache.clear()
            cache[key] = tags
        else:
            self.hits += 1
        if not tp:
            return tags
        trace_id, span_id, sampled = _trace(tp)
        if not trace_id:
            return tags
        state = _decode(ts) or "" if ts else ""
        if tags is None:
            return Tags(trace_id=trace_id, span_id=span_id, sampled=sampled, tracestate=state)
        return Tags(tags.route, tags.controller, tags.action, tags.framework, tags.db_driver,
                    tags.application, trace_id, span_id, sampled, state, tags.extra)
