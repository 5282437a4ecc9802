"""The literal scanner: raw SQL text -> normalized text, fingerprint, literal values, hints.

This runs on every simple-protocol statement whose exact text has not been seen before, so it is
one pass of one compiled regular expression (``re.sub`` with a callback) over the lower-cased
text. The regex only stops at what has to change — literals, comments, parameters, quoted
identifiers, non-canonical whitespace, parentheses, commas, semicolons — so that ordinary words
and single spaces are copied by C code without a Python call per token.

Canonical form
--------------
- Unquoted words are lower-cased (PostgreSQL folds unquoted identifiers, and keywords are case
  insensitive); only ASCII letters are folded, as PostgreSQL does in UTF-8 databases.
  Double-quoted identifiers are copied exactly as written, quotes included.
- Comments (``--`` and nested ``/* */``) are dropped; ``sqlproxy:ignore``, ``sqlproxy:primary``
  and ``sqlproxy:replica`` inside them (any case) become ``hints``.
- Whitespace runs become one space; none after ``(`` or before ``)`` and ``,``; exactly one
  after ``,``; none at either end. A statement's trailing ``;`` is not part of it.
- Literals become placeholders: numbers (a ``-`` directly in front of a number is its sign,
  folded into it, after an operator, ``(``, ``,``, a keyword such as ``SELECT``/``WHERE``/
  ``THEN``, or at the start; after a column it is a minus), ``'...'``, ``E'...'``, ``U&'...'``,
  ``B'...'``, ``X'...'``, ``N'...'``, dollar-quoted strings, and ``TRUE``/``FALSE`` (except
  after ``IS`` / ``IS NOT``). ``NULL`` and ``DEFAULT`` stay as they are. Casts stay:
  ``'x'::text`` -> ``$1::text``. Type modifiers of well-known types stay literal
  (``varchar(20)``, ``numeric(10, 2)``), because they are part of the type, not a value.
- Placeholders are numbered from ``$1`` in order of first appearance. Parameters the client
  already wrote (``$3``) are renumbered the same way (every ``$3`` gets the same new number),
  so that ``IN ($1, $2, $3) AND b = $4`` and ``IN ($1, ..., $30) AND b = $31`` normalize alike.
- A list of constants (literals, parameters, NULL, DEFAULT, each with an optional simple cast)
  in ``IN (...)`` or ``ARRAY[...]``, of any length, and a ``VALUES`` list of two or more rows, is
  collapsed to its first element or row followed by the comment
  ``/*, ... */`` — the form PostgreSQL 18's pg_stat_statements uses, and one sqlglot can still
  parse: ``in ($1 /*, ... */)``, ``array[$1 /*, ... */]``, ``values ($1, $2) /*, ... */``.
  The hidden elements consume no placeholder numbers; their literals are still in ``values``.
  Single-row VALUES are not collapsed: a one-row INSERT is the shape the row-by-row detector
  looks for. A one-element IN list is collapsed like a longer one, because ORMs that batch
  lookups (``selectinload``) send one, three or thirty ids through the same code path.

``values`` holds each literal's raw source text in order of appearance (``'it''s'``, ``-42``,
``E'\\n'``, ``TRUE``), including those hidden in collapsed lists. ``offset`` is the largest
``OFFSET <integer literal>`` in the statement (``None`` when there is none, or when OFFSET is a
parameter), for the deep-OFFSET detector: the normalized text has only ``$n`` there.

Known approximations: comments nest to depth 3 (deeper nesting ends the statement text there, as
an unterminated comment does); dollar-quote tags are matched case-insensitively; an unterminated
string, quoted identifier or dollar quote runs to the end of the text. None of these can make
the scanner raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from hashlib import blake2b

__all__ = ["HINTS", "LIST_ELLIPSIS", "Normalized", "fingerprint_of", "normalize", "scan"]

#: The hints recognised inside comments as ``sqlproxy:<hint>``.
HINTS: frozenset[str] = frozenset({"ignore", "primary", "replica"})

#: The comment that marks the hidden part of a collapsed list.
LIST_ELLIPSIS = " /*, ... */"


@dataclass(frozen=True, slots=True)
class Normalized:
    """One statement after normalization."""

    text: str
    fingerprint: str
    values: tuple[str, ...]
    hints: frozenset[str]
    offset: int | None = None


def fingerprint_of(text: str) -> str:
    """16 hex chars identifying a normalized text, stable across processes and versions."""
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------
# The pattern. It runs over the lower-cased text, so every piece is written in lower case.
#
# Each match is (a run of "boring" text)(one token that needs handling). The boring run — words
# that start no special construct, single spaces, operator characters — is consumed by a tight
# possessive loop inside the regex engine, so the Python callback runs once per token that
# changes, not once per word. Where the run stops at a character that turns out to start
# nothing (`in (select ...)`), the OTHER alternative takes that one character and the scan goes
# on: no position is ever scanned twice.
#
# Alternatives meant to fail fast begin with a literal or a character class, which sre checks
# before entering them.

_S = r"[ \t\n\r\f\v]"  # PostgreSQL's whitespace (not Unicode's)
_NOT_AFTER_WORD = r"(?<![\w$])"
_NOT_BEFORE_WORD = r"(?![\w$])"

_BLOCK_COMMENT = r"/\*(?:[^*/]++|\*(?!/)|/(?!\*)|{})*+\*/"
_BLOCK_COMMENT = _BLOCK_COMMENT.format(_BLOCK_COMMENT.format(_BLOCK_COMMENT.format("(?!)")))
_ONE_COMMENT = rf"(?:--[^\n\r]*+|{_BLOCK_COMMENT}|/\*[\s\S]*+)"

_NUM = (
    r"(?:0x[0-9a-f_]++|0o[0-7_]++|0b[01_]++"
    r"|(?:[0-9][0-9_]*+(?:\.[0-9_]*+)?+|\.[0-9][0-9_]*+)(?:e[+-]?[0-9]++)?+)"
)
_STR = r"'[^']*+(?:''[^']*+)*+'"
_ESTR = r"e'(?:[^'\\]++|\\[\s\S]|'')*+'"
_USTR = rf"u&{_STR}(?:{_S}*+uescape{_S}*+'[^']*+')?+"
_BXNSTR = rf"[bxn]{_STR}"
_PARAM = r"\$[0-9]++"
_DOLLAR0 = r"\$\$(?:[^$]++|\$(?!\$))*+\$\$"  # $$...$$: lists allow no tags (no backreference)
_CAST = (
    rf"{_S}*+::{_S}*+[a-z_][\w$]*+(?:\.[a-z_][\w$]*+)?+"
    rf"(?:{_S}++(?:varying|precision|with(?:out)?+{_S}++time{_S}++zone))?+(?:{_S}*+\[{_S}*+\])?+"
)
_TYPMOD_ARGS = rf"\({_S}*+[0-9]++(?:{_S}*+,{_S}*+[0-9]++)?+{_S}*+\)"
_TYPMOD_TYPES = (
    r"varchar|character{S}++varying|char|character|bpchar|nchar|numeric|decimal|bit{S}++varying"
    r"|bit|varbit|timestamptz|timestamp|timetz|time|interval|float|double{S}++precision"
).replace("{S}", _S)


def _element(capture: bool) -> str:
    """One constant element of a collapsible list, with an optional simple cast.

    With ``capture``, groups are: 1 a literal, 2 a parameter, 3 a keyword constant (null and
    default stay as written; true and false are literals), 4 the cast.
    """
    g = "(" if capture else "(?:"
    return (
        rf"(?:{g}{_STR}|-?+{_NUM}|{_ESTR}|{_USTR}|{_BXNSTR}|{_DOLLAR0})|{g}{_PARAM})"
        rf"|{g}null|default|true|false){_NOT_BEFORE_WORD}){g}{_CAST})?+"
    )


_ELEM = _element(capture=True)
_ELEM_NC = _element(capture=False)
_ELEMS = rf"{_ELEM_NC}(?:{_S}*+,{_S}*+{_ELEM_NC})*+"  # one or more
_ROW = rf"\({_S}*+{_ELEM_NC}(?:{_S}*+,{_S}*+{_ELEM_NC})*+{_S}*+\)"

# Words that may start a token; any other word is boring. Written as a trie on the first
# letter so that a word costs one or two character checks, and words whose first letter starts
# nothing special skip even that.
_SPECIAL_WORD = (
    r"(?:i(?:n{S}*+\(|nterval{S}*+\()"
    r"|v(?:alues{S}*+\(|archar{S}*+\(|arbit{S}*+\()"
    r"|a(?:rray{S}*+\[)"
    r"|o(?:ffset{S}++[0-9])"
    r"|t(?:rue(?![\w$])|ime(?:stamptz|stamp|tz)?+{S}*+\()"
    r"|f(?:alse(?![\w$])|loat{S}*+\()"
    r"|c(?:har(?:acter)?+{S}*+\(|haracter{S}++varying{S}*+\()"
    r"|d(?:ecimal{S}*+\(|ouble{S}++precision{S}*+\()"
    r"|n(?:'|umeric{S}*+\(|char{S}*+\()"
    r"|b(?:'|it(?:{S}++varying)?+{S}*+\(|pchar{S}*+\()"
    r"|e'|x'|u&')"
).replace("{S}", _S)
_SPECIAL_FIRST = "iavotfcdnbexu"
_BORING = (
    rf"(?:[^\W0-9{_SPECIAL_FIRST}][\w$]*+"  # a word that starts nothing, its digits included
    rf"|[ ](?![ \t\n\r\f\v,);]|--|/\*)"  # a single space, unless canonical spacing changes it
    rf"|(?!{_SPECIAL_WORD})[{_SPECIAL_FIRST}][\w$]*+"  # a word that might, but does not
    r"|[=<>+*|&!~@#%^:\[\]?{}\\`)]"  # operator characters, `)`
    r"|\((?![ \t\n\r\f\v])|,(?=[ ][^ \t\n\r\f\v])"  # `(` and `, ` already in canonical form
    r"|-(?![-0-9.])|/(?!\*)|\.(?![0-9])"  # ... unless they may start a comment or a number
    r"|[^\x00-\x7f\w]"  # other non-ASCII characters
    r")*+"
)

_TOKEN_ALTERNATIVES = [
    # The common ones first. None of the first four can start with whitespace.
    ("NUMBER", rf"{_NOT_AFTER_WORD}-?+{_NUM}"),
    ("STRING", _STR),
    ("PARAM", rf"{_NOT_AFTER_WORD}{_PARAM}"),
    ("LPAREN", rf"\({_S}++"),
    # Of those that may start with whitespace, comments (taking the whitespace around them)
    # come first.
    ("COMMENT", rf"{_S}*+{_ONE_COMMENT}(?:{_S}*+{_ONE_COMMENT})*+{_S}*+"),
    ("RPAREN", rf"{_S}++\)"),
    ("COMMA", rf"{_S}++,{_S}*+|,(?:{_S}{{2,}}+|[\t\n\r\f\v]{_S}*+|(?!{_S}))"),
    ("SEMI", rf"{_S}*+;{_S}*+"),
    ("WS", rf"{_S}{{2,}}+|[\t\n\r\f\v]"),
    ("QIDENT", r'"[^"]*+(?:""[^"]*+)*+"'),
    ("IN_LIST", rf"{_NOT_AFTER_WORD}in{_S}*+\({_S}*+{_ELEMS}{_S}*+\)"),
    ("VALUES_LIST", rf"{_NOT_AFTER_WORD}values{_S}*+{_ROW}(?:{_S}*+,{_S}*+{_ROW})++(?!{_S}*+,)"),
    ("ARRAY_LIST", rf"{_NOT_AFTER_WORD}array{_S}*+\[{_S}*+{_ELEMS}{_S}*+\]"),
    ("BOOL", rf"(?<![\w$.])(?:true|false){_NOT_BEFORE_WORD}"),
    ("OFFSET", rf"{_NOT_AFTER_WORD}offset{_S}++[0-9]{{1,18}}+(?![\w$.])"),
    ("XSTRING", rf"{_NOT_AFTER_WORD}(?:{_ESTR}|{_USTR}|{_BXNSTR})"),
    ("TYPMOD", rf"{_NOT_AFTER_WORD}(?:{_TYPMOD_TYPES}){_S}*+{_TYPMOD_ARGS}"),
    ("DOLLAR", rf"{_NOT_AFTER_WORD}\$(?P<tag>(?:[^\W0-9]\w*+)?+)\$[\s\S]*?\$(?P=tag)\$"),
    # Unterminated: the rest of the text.
    ("UNTERMINATED_STRING", r"'[\s\S]*+"),
    ("UNTERMINATED_DOLLAR", rf"{_NOT_AFTER_WORD}\$(?:[^\W0-9]\w*+)?+\$[\s\S]*+"),
    ("UNTERMINATED_QIDENT", r'"[\s\S]*+'),
    # A character the boring run stopped at that starts nothing after all.
    ("OTHER", r"[\s\S]"),
]

_TOKEN_RE = re.compile(
    rf"(?P<BORING>{_BORING})(?:\Z|"
    + "|".join(f"(?P<{name}>{pat})" for name, pat in _TOKEN_ALTERNATIVES)
    + ")"
)
_G = _TOKEN_RE.groupindex
_END = _G["BORING"]  # no token: the end of the text
_COMMENT = _G["COMMENT"]
_SEMI = _G["SEMI"]
_RPAREN = _G["RPAREN"]
_COMMA = _G["COMMA"]
_WS = _G["WS"]
_NUMBER = _G["NUMBER"]
_STRING = _G["STRING"]
_PARAM_G = _G["PARAM"]
_LPAREN = _G["LPAREN"]
_IN_LIST = _G["IN_LIST"]
_ARRAY_LIST = _G["ARRAY_LIST"]
_VALUES_LIST = _G["VALUES_LIST"]
_OFFSET = _G["OFFSET"]
_BOOL = _G["BOOL"]
_XSTRING = _G["XSTRING"]
_TYPMOD = _G["TYPMOD"]
_DOLLAR = _G["DOLLAR"]
_QIDENT = _G["QIDENT"]
_UNTERMINATED_STRING = _G["UNTERMINATED_STRING"]
_UNTERMINATED_DOLLAR = _G["UNTERMINATED_DOLLAR"]
_UNTERMINATED_QIDENT = _G["UNTERMINATED_QIDENT"]
_OTHER = _G["OTHER"]
# Tokens that may hold parentheses that are not structure (in strings, comments, identifiers).
_PAREN_HOLDERS = frozenset(
    {
        _XSTRING,
        _DOLLAR,
        _QIDENT,
        _COMMENT,
        _IN_LIST,
        _ARRAY_LIST,
        _VALUES_LIST,
        _TYPMOD,
        _UNTERMINATED_STRING,
        _UNTERMINATED_DOLLAR,
        _UNTERMINATED_QIDENT,
    }
)

# Helpers for the rarer paths (collapsed lists, hints).
_ELEM_RE = re.compile(_ELEM)
_SEP_RE = re.compile(rf"{_S}*+(?:(,)|[)\]]){_S}*+")
_DIGITS_RE = re.compile(r"[0-9]++")
# The literals of a list's hidden part, read from the original text. IGNORECASE is markedly
# slower, so both cases are spelled out. Each element follows a `(` or a `,`; group 1 is empty
# for parameters, NULL and DEFAULT.
_HIDDEN_LITERALS_RE = re.compile(
    rf"[(,]{_S}*+(?:({_STR}"
    r"|-?+(?:0[xX][0-9a-fA-F_]++|0[oO][0-7_]++|0[bB][01_]++"
    r"|(?:[0-9][0-9_]*+(?:\.[0-9_]*+)?+|\.[0-9][0-9_]*+)(?:[eE][+-]?[0-9]++)?+)"
    r"|[eE]'(?:[^'\\]++|\\[\s\S]|'')*+'"
    rf"|[uU]&{_STR}(?:{_S}*+[uU][eE][sS][cC][aA][pP][eE]{_S}*+'[^']*+')?+"
    rf"|[bBxXnN]{_STR}"
    r"|(?:[tT][rR][uU][eE]|[fF][aA][lL][sS][eE])(?![\w$])"
    rf"|{_DOLLAR0})"
    r"|\$[0-9]++|(?:[nN][uU][lL][lL]|[dD][eE][fF][aA][uU][lL][tT])(?![\w$]))"
)
_HINT_RE = re.compile(r"sqlproxy:([a-z_]+)")

_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}
_SIGN_AFTER = frozenset("=<>+-*/%^,([|&!~@#:;")  # a '-' after these is a sign, not minus
# ... and after these keywords; after any other word (a column) it is a minus.
_SIGN_AFTER_WORDS = frozenset(
    {
        "select", "where", "and", "or", "not", "when", "then", "else", "case", "between",
        "like", "ilike", "limit", "offset", "having", "on", "distinct", "all", "any", "some",
        "by", "returning", "using", "return", "is", "in", "values", "set", "exists",
    }
)  # fmt: skip
_SPACE = frozenset(" \t\n\r\f\v")
_NO_SPACE_BEFORE = frozenset(")],;")
_TRAILER = " \t\n\r\f\v;"
_SPLIT = "\x00"  # separates statements in the substituted text; NUL cannot occur in SQL


def _word_before(low: str, end: int) -> str:
    """The word ending at index ``end`` (inclusive), or "" if that is not a word character."""
    i = end
    while i >= 0 and (low[i].isalnum() or low[i] in "_$"):
        i -= 1
    return low[i + 1 : end + 1]


def _canonical_cast(cast: str) -> str:
    """`` :: character  varying [ ]`` -> ``::character varying[]``."""
    body = " ".join(cast.split("::", 1)[1].split())
    return "::" + body.replace(" [", "[").replace("[ ]", "[]")


def _lower(sql: str) -> str:
    # str.lower() folds non-ASCII letters too and may change the length (which would break
    # the position correspondence with the original text); PostgreSQL folds ASCII only.
    return sql.lower() if sql.isascii() else sql.translate(_ASCII_LOWER)


# Per statement: normalized text (unstripped), literal values, hints, largest literal OFFSET.
_Statement = tuple[str, list[str], set[str], "int | None"]


def _scan(sql: str, split: bool) -> list[_Statement]:
    """One substitution pass over ``sql``.

    With ``split``, a top-level ``;`` ends a statement and numbering restarts; without, the
    statements stay one (their texts joined by "; ") and numbering runs on.
    """
    if _SPLIT in sql:
        sql = sql.replace(_SPLIT, " ")
    # Most statements end in ';' (psql, pgbench): trimming it here is cheaper than a token.
    sql = sql.rstrip(_TRAILER)
    low = _lower(sql)

    values: list[str] = []
    hints: set[str] = set()
    offset: int | None = None
    numbers: dict[str, str] = {}  # the client's parameters -> our placeholders
    counter = 0
    # Statements split at a `;` outside parentheses. Parentheses are mostly left to the boring
    # run, so the depth is counted only when a `;` comes: the parentheses in the raw text since
    # the statement began, less those inside strings, comments and quoted identifiers.
    segment = 0  # where the current statement began in `low`
    inner_parens = 0  # ( minus ) inside tokens since then
    done: list[tuple[list[str], set[str], int | None]] = []

    def rare(m: re.Match[str], kind: int) -> str:
        """Everything but the most common tokens (kept out of `callback` to keep it short)."""
        nonlocal offset, values, hints, counter, numbers, segment, inner_parens
        start, end = m.span(kind)
        if kind in _PAREN_HOLDERS:
            opened = low.count("(", start, end)
            closed = low.count(")", start, end)
            if opened or closed:
                inner_parens += opened - closed
        if kind == _NUMBER:  # with a '-' in front
            i = start - 1
            while i >= 0 and low[i] in _SPACE:
                i -= 1
            if (
                i >= 0
                and low[i] not in _SIGN_AFTER
                and _word_before(low, i) not in _SIGN_AFTER_WORDS
            ):
                start += 1  # a binary minus: `a -1` is `a - 1`
                counter += 1
                values.append(sql[start:end])
                return f"-${counter}"
        elif kind == _COMMENT:
            text = low[start:end]
            if "sqlproxy:" in text:
                hints.update(h for h in _HINT_RE.findall(text) if h in HINTS)
            # A comment separates tokens as a space does, except where no space belongs.
            if start == 0 or end == len(low) or low[end] in _NO_SPACE_BEFORE:
                return ""
            before = low[start - 1]
            if before == ",":  # `, /* c */ x`: the boring `,` left its space to us
                return " " if low[start] in _SPACE else ""
            if before in _SPACE or before == "(" or before == "[":
                return ""  # a token ate the space before and emitted canonical spacing
            return " "
        elif kind == _SEMI:
            if low.count("(", segment, start) - low.count(")", segment, start) > inner_parens:
                return "; "
            segment, inner_parens = end, 0
            if split:
                done.append((values, hints, offset))
                values, hints, offset = [], set(), None
                counter, numbers = 0, {}
            return _SPLIT
        elif kind in (_QIDENT, _UNTERMINATED_QIDENT):
            return sql[start:end]
        elif kind == _OTHER:
            return low[start:end]
        elif kind in (_IN_LIST, _ARRAY_LIST, _VALUES_LIST):
            # A list of constants: keep its first element (row), hide the rest.
            pos = low.index("[" if kind == _ARRAY_LIST else "(", start) + 1
            parts = []
            while True:
                while low[pos] in _SPACE:
                    pos += 1
                em = _ELEM_RE.match(low, pos)
                if em is None:  # cannot happen: the list matched the same element pattern
                    break
                lit, par, word, cast = em.group(1, 2, 3, 4)
                if lit is not None or word == "true" or word == "false":
                    counter += 1
                    values.append(sql[em.start() : em.end(1 if lit is not None else 3)])
                    out = f"${counter}"
                elif par is not None:
                    key = par[1:].lstrip("0")
                    out = numbers.get(key) or ""
                    if not out:
                        counter += 1
                        out = numbers[key] = f"${counter}"
                else:
                    out = word
                parts.append(out + _canonical_cast(cast) if cast else out)
                sep = _SEP_RE.match(low, em.end())
                if sep is None:
                    break
                pos = sep.end()
                if kind != _VALUES_LIST or sep.group(1) is None:
                    pos = sep.start()  # the hidden part starts at its `,`
                    break
            values.extend(filter(None, _HIDDEN_LITERALS_RE.findall(sql, pos, end)))
            if kind == _VALUES_LIST:
                return "values (" + ", ".join(parts) + ")" + LIST_ELLIPSIS
            if kind == _IN_LIST:
                return "in (" + parts[0] + LIST_ELLIPSIS + ")"
            return "array[" + parts[0] + LIST_ELLIPSIS + "]"
        elif kind == _BOOL:
            words = low[max(0, start - 16) : start].split()
            if words and (
                words[-1] == "is" or (words[-1] == "not" and len(words) > 1 and words[-2] == "is")
            ):
                return low[start:end]  # `IS [NOT] TRUE` is a test, not a constant
        elif kind == _OFFSET:
            start += 6
            while low[start] in _SPACE:
                start += 1
            value = int(low[start:end])
            if offset is None or value > offset:
                offset = value
            counter += 1
            values.append(low[start:end])
            return f"offset ${counter}"
        elif kind == _TYPMOD:  # varchar(20), numeric(10, 2): part of the type, not values
            paren = low.index("(", start)
            head = " ".join(low[start:paren].split())
            return head + "(" + ", ".join(_DIGITS_RE.findall(low, paren, end)) + ")"
        # Literals: signed numbers, booleans, prefixed strings, dollar quotes, and the
        # unterminated ones (the rest of the text).
        counter += 1
        values.append(sql[start:end])
        return f"${counter}"

    def callback(m: re.Match[str]) -> str:
        nonlocal counter, inner_parens
        kind = m.lastindex or 0
        if kind in (_NUMBER, _STRING):
            start, end = m.span(kind)
            if low[start] != "-":
                counter += 1
                value = sql[start:end]
                values.append(value)
                if kind == _STRING and ("(" in value or ")" in value):
                    inner_parens += value.count("(") - value.count(")")
                return f"{m.group(1)}${counter}"
        elif kind == _END:
            return m.group(1)
        elif kind == _WS:
            return m.group(1) + " "
        elif kind == _LPAREN:
            return m.group(1) + "("
        elif kind == _RPAREN:
            return m.group(1) + ")"
        elif kind == _COMMA:
            return m.group(1) + ", "
        elif kind == _PARAM_G:
            key = m.group(kind)[1:].lstrip("0")
            ph = numbers.get(key)
            if ph is None:
                counter += 1
                ph = numbers[key] = f"${counter}"
            return m.group(1) + ph
        return m.group(1) + rare(m, kind)

    text = _TOKEN_RE.sub(callback, low)
    if _SPLIT not in text:
        return [(text, values, hints, offset)]
    done.append((values, hints, offset))
    texts = text.split(_SPLIT)
    if not split:
        return [("; ".join(t for t in (t.strip(" ") for t in texts) if t), values, hints, offset)]
    return [(t, v, h, o) for t, (v, h, o) in zip(texts, done, strict=True)]


def _make(text: str, values: list[str], hints: set[str], offset: int | None) -> Normalized:
    return Normalized(
        text, fingerprint_of(text), tuple(values), frozenset(hints) if hints else _NO_HINTS, offset
    )


_NO_HINTS: frozenset[str] = frozenset()
_EMPTY = Normalized("", fingerprint_of(""), (), _NO_HINTS, None)


def scan(sql: str) -> list[Normalized]:
    """Split a simple-protocol Query string into statements and normalize each.

    Statements are split on ``;`` outside strings, quoted identifiers, comments, dollar quotes
    and parentheses. Empty statements are dropped, so an empty or blank string gives ``[]``.
    Never raises. The list may be shared by a cache: do not mutate it.
    """
    out = []
    for text, values, hints, offset in _scan(sql, True):
        text = text.strip(" ")
        if text:
            out.append(_make(text, values, hints, offset))
    return out


def normalize(sql: str) -> Normalized:
    """Normalize one statement (the text of an extended-protocol Parse). Never raises.

    Semicolons at the ends are dropped; should the text hold several statements after all,
    they stay one statement, joined by ``"; "``.
    """
    text, values, hints, offset = _scan(sql, False)[0]
    text = text.strip(" ")
    if not text:
        return _EMPTY
    return _make(text, values, hints, offset)
