"""Reading relaygw's log lines as an operator's tools would: text lines split into
``key=value`` pairs (values bare or double-quoted, as README's "Logs and metrics"
describes), and the check that a JSON line carries every pair of its text."""

from __future__ import annotations

import re
from typing import Any

# What a text line calls a field, where its JSON field has another name (Postfix's words).
JSON_NAME = {"id": "queue_id", "from": "sender", "to": "rcpt"}
# Text values in angle brackets are envelope addresses; the JSON field is the bare address.
BRACKETED = {"from", "to"}

_PAIR = re.compile(r'(?:^|(?<= ))([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?= |$)')
_UNESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)')
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t"}
# A text line as the text observer writes it: "<time> [<namespace>#<level>] <message>".
_TEXT_LINE = re.compile(r"^\S+ \[(?P<system>[^\]]*)\] (?P<message>.*)$")


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) > 1:
        return chr(int(code[1:], 16))
    return _SIMPLE.get(code, code)


def unquote(value: str) -> str:
    if value.startswith('"'):
        assert value.endswith('"') and len(value) >= 2, value
        return _UNESCAPE.sub(_unescape, value[1:-1])
    return value


def pairs(message: str) -> dict[str, str]:
    """Every ``key=value`` of a message, values unquoted; a key may appear once only."""
    found: dict[str, str] = {}
    for match in _PAIR.finditer(message):
        key, value = match.group(1), match.group(2)
        assert key not in found, f"{key} twice in {message!r}"
        found[key] = unquote(value)
    return found


def split_text_line(line: str) -> tuple[str, str]:
    """(``namespace#level``, message) of one text line."""
    match = _TEXT_LINE.match(line)
    assert match is not None, line
    return match.group("system"), match.group("message")


def json_value(key: str, text_value: str) -> str:
    """What the JSON field of a text pair holds, as text."""
    if key in BRACKETED:
        assert text_value.startswith("<") and text_value.endswith(">"), (key, text_value)
        return text_value[1:-1]
    return text_value


def assert_json_has_the_text_fields(record: dict[str, Any]) -> dict[str, str]:
    """Every pair of the JSON line's message is one of its fields, with the same value;
    returns the pairs."""
    found = pairs(record["message"])
    for key, value in found.items():
        name = JSON_NAME.get(key, key)
        assert name in record, f"{name} (text {key}=) missing from {record}"
        field = record[name]
        assert not isinstance(field, bool) and field is not None, (name, record)
        assert str(field) == json_value(key, value), (key, value, field, record)
    return found


PYTHON_REPRS = {"None", "True", "False"}


def python_reprs(message: str) -> list[str]:
    """The pairs of a text message whose value is a Python repr (``tls=None``)."""
    return [f"{k}={v}" for k, v in pairs(message).items() if v in PYTHON_REPRS]
