"""What a routed session built on one backend, replayed on another (sans-IO).

A client thinks it has one server session. A routed session has several backend connections,
so what the client set up on one must exist wherever its next unit runs:

* session settings (SET / RESET / DISCARD ALL), applied in order. They are noted when their
  statement completes and kept once the transaction they ran in ends well (a ROLLBACK or an
  error throws them away, as the server does);
* the client's named prepared statements: a unit that binds or describes one on a backend that
  lacks it (or holds another statement under that name) first gets the client's own Parse
  there; one the client closed or deallocated is closed on the others before their next unit.

``Replay`` holds the session's side and builds the *preamble* for a backend: extra units sent
before the client's, whose answers the session swallows. Each backend's side is a
``BackendReplay``. Pooled server connections need the same bookkeeping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlproxy.analysis.classify import Shape, StatementKind
from sqlproxy.analysis.normalize import Normalized
from sqlproxy.routing.units import Unit
from sqlproxy.wire.messages import SYNC, build, cstr

__all__ = ["SESSION_TAGS", "BackendReplay", "Replay", "literal_text"]

_DEALLOCATE_RE = re.compile(r"deallocate\s+(?:prepare\s+)?(.+)$")
# A DEALLOCATE of one named statement anywhere in a (not normalized) text.
_DEALLOCATE_NAME_RE = re.compile(r"(?i)\bdeallocate\s+(?:prepare\s+)?(?!all\b)(\"[^\"]+\"|\w+)")
_PARAM_RE = re.compile(r"\$([0-9]+)")
#: Command tags of the only statements that change what another backend must replay.
SESSION_TAGS = (b"SET", b"RESET", b"DISCARD", b"DEALLOCATE")


def literal_text(n: Normalized) -> str:
    """A statement's text with its literals back in place (for replaying SET elsewhere)."""
    values = n.values
    if not values:
        return n.text

    def put(m: re.Match[str]) -> str:
        i = int(m.group(1)) - 1
        return values[i] if 0 <= i < len(values) else m.group(0)

    return _PARAM_RE.sub(put, n.text)


def _close_statement(name: bytes) -> bytes:
    return build(b"C", b"S" + name + b"\x00")


class BackendReplay:
    """What one backend connection holds of the session's replayed state."""

    __slots__ = ("prepared", "settings_applied", "settings_gen", "to_close")

    def __init__(self, fresh: bool = False) -> None:
        self.prepared: dict[bytes, bytes] = {}  # statement name -> the Parse message sent
        self.to_close: set[bytes] = set()  # closed by the client elsewhere: close here too
        # A fresh connection (-1) replays every setting, without a RESET ALL first.
        self.settings_gen = -1 if fresh else 0
        self.settings_applied = 0

    def bound(self, used: Iterable[bytes], limit: int) -> None:
        """Keep at most ``limit`` named statements here (a pooled server connection serves
        many clients): ``used`` were just used (most recent last, in ``prepared``'s order);
        the least recently used beyond the limit are closed before the next unit."""
        prepared = self.prepared
        for name in used:
            msg = prepared.pop(name, None)
            if msg is not None:
                prepared[name] = msg
        excess = len(prepared) - len(self.to_close) - limit
        if excess > 0:
            for name in prepared:
                if excess <= 0:
                    break
                if name and name not in self.to_close:
                    self.to_close.add(name)
                    excess -= 1


class Replay:
    """The session's settings and named statements, and the preambles that replay them."""

    __slots__ = ("pending_settings", "settings", "settings_gen", "statements")

    def __init__(self) -> None:
        self.statements: dict[bytes, tuple[str, bytes]] = {}  # name -> (sql, Parse message)
        self.settings: list[str] = []  # SET statements in force, in order
        self.settings_gen = 0  # bumped by RESET ALL / DISCARD ALL
        self.pending_settings: list[str] = []  # of the transaction in progress

    # ------------------------------------------------------------------ preambles
    def preamble(self, backend: BackendReplay, unit: Unit,
                 dry_run: bool = False) -> tuple[bytes, int, dict[bytes, str]]:
        """The injected units that make ``backend`` ready for ``unit``: their bytes, how
        many ReadyForQuery answers to swallow, and the statements (name -> sql) they prepare
        there. ``dry_run``: only say whether one is needed, change nothing."""
        out = bytearray()
        units = 0
        if backend.settings_gen != self.settings_gen \
                or backend.settings_applied < len(self.settings):
            if backend.settings_gen != self.settings_gen:
                todo = (["RESET ALL"] if backend.settings_gen >= 0 else []) + self.settings
            else:
                todo = self.settings[backend.settings_applied :]
            if todo:
                out += build(b"Q", cstr("; ".join(todo)))
                units += 1
            if not dry_run:
                backend.settings_gen = self.settings_gen
                backend.settings_applied = len(self.settings)
        ext = bytearray()
        prepared: dict[bytes, str] = {}
        for name in list(backend.to_close):
            ext += _close_statement(name)
            if not dry_run:
                backend.prepared.pop(name, None)
                backend.to_close.discard(name)
        parsed_here = unit.parsed_names
        for name in (*unit.binds, *unit.describes):
            if name in parsed_here:
                continue
            known = self.statements.get(name)
            if known is None or backend.prepared.get(name) == known[1]:
                continue
            if name in backend.prepared and name != b"":
                ext += _close_statement(name)
            ext += known[1]
            prepared[name] = known[0]
            if not dry_run:
                backend.prepared[name] = known[1]
        for name in parsed_here:
            # The client parses a name it never closed here but did elsewhere: make room.
            if name and name in backend.prepared and name not in self.statements:
                ext += _close_statement(name)
                if not dry_run:
                    backend.prepared.pop(name, None)
        if ext:
            out += ext + SYNC
            units += 1
        return bytes(out), units, prepared

    def sent(self, backend: BackendReplay, unit: Unit, others: Iterable[BackendReplay]) -> None:
        """Bookkeeping once ``unit`` went to ``backend``: its Parses now exist there (and are
        the client's statements), its Closes are to be repeated on ``others``."""
        for name, sql, msg in unit.parses:
            self.statements[name] = (sql, msg)
            backend.prepared[name] = msg
        for name in unit.closes:
            self.statements.pop(name, None)
            backend.prepared.pop(name, None)
            for other in others:
                if other is not backend and name in other.prepared:
                    other.to_close.add(name)
        if unit.has_query:  # a simple Query drops the unnamed statement
            self.statements.pop(b"", None)
            backend.prepared.pop(b"", None)

    # ------------------------------------------------------------------ settings
    def statement_completed(self, n: Normalized, shape: Shape, current: BackendReplay,
                            backends: Iterable[BackendReplay]) -> None:
        """A statement (tagged one of ``SESSION_TAGS``) completed on ``current``."""
        if shape.kind is StatementKind.SET:
            if not n.text.startswith(("set local ", "set transaction ")):
                self.note_setting(literal_text(n))
        elif shape.kind is StatementKind.UTILITY and shape.command in ("deallocate", "discard"):
            self.forget_statements(n.text, current, backends)

    def note_setting(self, text: str) -> None:
        """A SET/RESET completed (in the transaction in progress)."""
        self.pending_settings.append(text)

    def transaction_ended(self, backend: BackendReplay, committed: bool) -> None:
        """The backend is idle again: keep (or, after an error, drop) the settings its
        transaction made; the backend itself already has them."""
        if committed and self.pending_settings:
            for text in self.pending_settings:
                if text.lower().startswith(("reset all", "discard all")):
                    self.settings.clear()
                    self.settings_gen += 1
                else:
                    self.settings.append(text)
            backend.settings_gen = self.settings_gen
            backend.settings_applied = len(self.settings)
        self.pending_settings.clear()

    def rolled_back(self) -> None:
        self.pending_settings.clear()

    def describe_deallocated(self, unit: Unit) -> None:
        """A SQL DEALLOCATE in ``unit`` of a statement the client prepared by protocol,
        maybe on another server connection: the unit describes it first, so that the server
        it runs on is given the statement (``preamble``) and the DEALLOCATE finds it."""
        for text in unit.queries:
            for m in _DEALLOCATE_NAME_RE.finditer(text):
                name = m.group(1).strip('"').encode()
                if name in self.statements and name not in unit.describes:
                    unit.describes.append(name)

    def forget_statements(self, text: str, current: BackendReplay,
                          backends: Iterable[BackendReplay]) -> None:
        """DEALLOCATE [ALL] / DISCARD ALL (normalized ``text``) ran on ``current``: gone there,
        to be closed on the other backends before their next unit."""
        names: set[bytes] | None
        if text.startswith("discard"):
            if text != "discard all":
                return
            self.pending_settings.append("discard all")
            names = None
        else:
            m = _DEALLOCATE_RE.match(text)
            if m is None:
                return
            arg = m.group(1).strip()
            names = None if arg == "all" else {arg.strip('"').encode()}
        for b in backends:
            if b is not current:
                b.to_close.update(b.prepared if names is None else
                                  (x for x in names if x in b.prepared))
            else:
                for x in (list(b.prepared) if names is None else names):
                    b.prepared.pop(x, None)
        if names is None:
            self.statements.clear()
        else:
            for x in names:
                self.statements.pop(x, None)
