"""Training data formats: plain text, OpenAI chat JSONL and prompt/completion JSONL.

`validate(data)` reads a file's bytes, detects its format and checks every line, raising `FormatError`
with the first bad line; `segments(text, fmt, template)` turns a valid text into the training text as
(piece, trainable) pieces, so the loss can count the trainable tokens only (lm/data.py `encode_segments`).

Detection: the first non-empty line decides. If it starts with "{", the file is JSONL, and every
non-empty line must then be a JSON object of the same kind: `{"messages": [...]}` (chat) or
`{"prompt": ..., "completion": ...}`. Anything else that is UTF-8 text is plain text (a plain text whose
first line starts with "{" has to start with another line). Empty lines in JSONL are skipped.

What the model learns (the trainable pieces):
- plain text: everything;
- chat: each line is rendered with the chat template exactly as serving renders a conversation
  (lm/chat.py), and the loss counts each assistant message's text and the separator after it, and, where
  the text that follows continues a stop string of the template (the next "\\nUser:", also across
  conversations), the rest of that stop string too, so the model learns to end its turn where the server
  stops it. Prefixes, system and user turns are context only. An assistant message with `"weight": 0`
  (OpenAI's per-message weight) is context only too;
- prompt/completion: a line renders as prompt + completion + "\\n", and the completion and that newline
  are trainable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

from lm.chat import ROLES, full_template, stop_strings, turn_pieces
from lm.errors import CorpusError

DataFormat = Literal["text", "chat", "completion"]
DATA_FORMATS: tuple[DataFormat, ...] = ("text", "chat", "completion")
# A text file with more than this share of control characters is treated as binary (lm/data.py's rule).
_MAX_CONTROL_SHARE = 0.01
_ALLOWED_CONTROLS = {"\n", "\r", "\t", "\f", "\v"}


class FormatError(CorpusError):
    """A training file that is not valid in its format; the message names the first bad line (`line`,
    1-based, None when the fault is the whole file's)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


def decode(data: bytes) -> str:
    """A file's bytes -> its text (a UTF-8 byte order mark dropped), or FormatError."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise FormatError("the file is not UTF-8 text") from None


def validate(data: bytes) -> DataFormat:
    """Detect the format of a training file's bytes and check every line; FormatError names the first bad one."""
    return validate_text(decode(data))


def validate_text(text: str) -> DataFormat:
    """`validate` for a text already decoded."""
    fmt = detect(text)
    if fmt == "text":
        _check_plain(text)
    else:
        for _ in _records(text, fmt):
            pass
    return fmt


def detect(text: str) -> DataFormat:
    """The format by the first non-empty line (module docstring); FormatError for an empty text or a JSONL
    whose first object is of neither kind."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            return "text"
        record = _parse_line(line, number)
        if "messages" in record:
            return "chat"
        if "prompt" in record or "completion" in record:
            return "completion"
        raise FormatError('neither "messages" (chat) nor "prompt" and "completion"', number)
    raise FormatError("the file is empty")


def segments(text: str, fmt: DataFormat, chat_template: dict[str, Any] | None) -> list[tuple[str, bool]]:
    """The training text as (piece, trainable) pieces that concatenate to it (module docstring). The text
    must be valid in `fmt` (FormatError otherwise); `chat_template` is the model's (None: the default)."""
    if fmt == "text":
        return [(text, True)]
    if fmt == "completion":
        out: list[tuple[str, bool]] = []
        for _, record in _records(text, fmt):
            out += [(record["prompt"], False), (record["completion"] + "\n", True)]
        return _merge(out)
    return _chat_segments(text, full_template(chat_template))


def _chat_segments(text: str, template: dict[str, Any]) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = []
    answer_ends: list[int] = []  # offsets just past each trainable answer (its separator included)
    offset = 0
    for _, record in _records(text, "chat"):
        for message in record["messages"]:
            role, weight = message["role"], message.get("weight", 1)
            for piece, kind in turn_pieces(template, role, _content_text(message.get("content"))):
                trainable = role == "assistant" and weight == 1 and kind != "prefix"
                pieces.append((piece, trainable))
                offset += len(piece)
                if trainable and kind == "separator":
                    answer_ends.append(offset)
    full = "".join(piece for piece, _ in pieces)
    mask = bytearray(len(full))
    start = 0
    for piece, trainable in pieces:
        if trainable:
            mask[start : start + len(piece)] = b"\x01" * len(piece)
        start += len(piece)
    separator = str(template["separator"])
    for end in answer_ends:  # the rest of a stop string that the separator begins
        for stop in stop_strings(template):
            if stop.startswith(separator) and full.startswith(stop, end - len(separator)):
                stop_end = end - len(separator) + len(stop)
                mask[end:stop_end] = b"\x01" * (stop_end - end)
    return _from_mask(full, mask)


def _from_mask(text: str, mask: bytearray) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or mask[i] != mask[start]:
            out.append((text[start:i], bool(mask[start])))
            start = i
    return out


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbours of the same kind and drop empty pieces."""
    out: list[tuple[str, bool]] = []
    for piece, trainable in pieces:
        if not piece:
            continue
        if out and out[-1][1] == trainable:
            out[-1] = (out[-1][0] + piece, trainable)
        else:
            out.append((piece, trainable))
    return out


def _check_plain(text: str) -> None:
    if not text.strip():
        raise FormatError("the file is empty")
    if "\x00" in text:
        raise FormatError("contains a NUL character: the file looks binary", _line_of(text, text.index("\x00")))
    sample = text[:100_000]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in _ALLOWED_CONTROLS)
    if controls > _MAX_CONTROL_SHARE * len(sample):
        raise FormatError(f"the file looks binary ({controls} control characters in the first {len(sample)})")
    _check_string(text, None, "the text")


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _records(text: str, fmt: DataFormat) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line of a JSONL text, each checked against `fmt`."""
    seen = False
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        record = _parse_line(line, number)
        if fmt == "chat":
            _check_chat(record, number)
        else:
            _check_completion(record, number)
        seen = True
        yield number, record
    if not seen:
        raise FormatError("the file is empty")


def _parse_line(line: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise FormatError(f"not valid JSON ({e.msg})", number) from None
    except RecursionError:
        raise FormatError("not valid JSON (nested too deeply)", number) from None
    if not isinstance(record, dict):
        raise FormatError("not a JSON object", number)
    return record


def _check_chat(record: dict[str, Any], line: int) -> None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FormatError('"messages" is not a non-empty list', line)
    learns = False
    for i, message in enumerate(messages, 1):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise FormatError(f"{where} is not a JSON object", line)
        if "role" not in message:
            raise FormatError(f'{where} has no "role"', line)
        role = message["role"]
        if role not in ROLES:
            shown = json.dumps(role, ensure_ascii=False)[:40]
            raise FormatError(f"role {shown} is not one of {', '.join(ROLES)}", line)
        _check_content(message, where, line)
        if "name" in message and not isinstance(message["name"], str):
            raise FormatError(f'{where}: "name" is not a string', line)
        weight = message.get("weight", 1)
        if "weight" in message and (isinstance(weight, bool) or weight not in (0, 1)):
            raise FormatError(f'{where}: "weight" is not 0 or 1', line)
        if "weight" in message and role != "assistant":
            raise FormatError(f'{where}: "weight" is only for assistant messages', line)
        learns = learns or (role == "assistant" and weight == 1)
    if not learns:
        raise FormatError("no assistant message: nothing to learn", line)


def _check_content(message: dict[str, Any], where: str, line: int) -> None:
    if "content" not in message:
        raise FormatError(f'{where} has no "content"', line)
    content = message["content"]
    if isinstance(content, str):
        _check_string(content, line, where)
        return
    if not isinstance(content, list):
        raise FormatError(f"{where}: content is not a string or a list of text parts", line)
    for j, part in enumerate(content, 1):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise FormatError(f'{where}: content part {j} is not a {{"type": "text", "text": ...}} part', line)
        _check_string(part["text"], line, where)


def _check_completion(record: dict[str, Any], line: int) -> None:
    for key in ("prompt", "completion"):
        if key not in record:
            raise FormatError(f'no "{key}"', line)
        if not isinstance(record[key], str):
            raise FormatError(f'"{key}" is not a string', line)
        _check_string(record[key], line, f'"{key}"')
    if not record["completion"]:
        raise FormatError("the completion is empty: nothing to learn", line)


def _check_string(text: str, line: int | None, where: str) -> None:
    """NUL and lone surrogates are refused everywhere (as the service refuses them in requests)."""
    if "\x00" in text:
        raise FormatError(f"{where} contains a NUL character", line)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{where} contains a lone surrogate", line) from None


def _content_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)
