"""Training data formats: detection, line-by-line validation, and the trainable pieces."""

from __future__ import annotations

import json

import pytest

from lm.chat import render_turns
from lm.formats import FormatError, segments, validate


def jsonl(*records: object) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


GOOD = chat(("user", "Hi"), ("assistant", "Hello."))


def test_detects_the_three_formats() -> None:
    assert validate(b"To be, or not to be.\n") == "text"
    assert validate(b"[1, 2] is a list\n") == "text"
    assert validate("\ufeffplain text".encode()) == "text"
    assert validate(jsonl(GOOD, GOOD)) == "chat"
    assert validate(b"\n" + jsonl({"prompt": "2+2=", "completion": " 4"})) == "completion"


@pytest.mark.parametrize(
    ("data", "message", "line"),
    [
        (b"", "the file is empty", None),
        (b"  \n\n", "the file is empty", None),
        (b"\xff\xfe\x00binary", "the file is not UTF-8 text", None),
        (jsonl(GOOD, GOOD) + b'{"messages": [1,,]}\n', "line 3: not valid JSON (Expecting value)", 3),
        (jsonl(GOOD, {"messages": [{"content": "x"}]}), 'line 2: message 1 has no "role"', 2),
        (
            b"\n" * 4 + jsonl({"messages": [{"role": "robot", "content": "x"}]}),
            'line 5: role "robot" is not one of system, developer, user, assistant',
            5,
        ),
        (jsonl(GOOD, GOOD, GOOD, chat(("user", "Hi"))), "line 4: no assistant message: nothing to learn", 4),
        (
            jsonl(
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]}
            ),
            "line 1: no assistant message: nothing to learn",
            1,
        ),
        (jsonl(GOOD, [1, 2]), "line 2: not a JSON object", 2),
        (jsonl({"text": "x"}), 'line 1: neither "messages" (chat) nor "prompt" and "completion"', 1),
        (jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a"}), 'line 2: no "completion"', 2),
        (jsonl({"prompt": "a", "completion": 5}), 'line 1: "completion" is not a string', 1),
        (jsonl({"prompt": "a", "completion": "b\u0000"}), 'line 1: "completion" contains a NUL character', 1),
        (b'{"prompt": "a", "completion": "\\ud800"}', 'line 1: "completion" contains a lone surrogate', 1),
        (jsonl(chat(("user", "x\u0000"), ("assistant", "y"))), "line 1: message 1 contains a NUL character", 1),
        (
            jsonl(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url"}]},
                        {"role": "assistant", "content": "y"},
                    ]
                }
            ),
            'line 1: message 1: content part 1 is not a {"type": "text", "text": ...} part',
            1,
        ),
        (b"ok\nstill ok\nnot \x00 ok\n", "line 3: contains a NUL character: the file looks binary", 3),
    ],
)
def test_a_bad_file_names_its_first_bad_line(data: bytes, message: str, line: int | None) -> None:
    with pytest.raises(FormatError) as caught:
        validate(data)
    assert str(caught.value) == message
    assert caught.value.line == line


def test_chat_content_parts_names_and_weights_are_accepted() -> None:
    record = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Hi", "name": "ann"},
            {"role": "assistant", "content": "Hello.", "weight": 1},
        ]
    }
    assert validate(jsonl(record)) == "chat"


def test_plain_text_is_all_trainable() -> None:
    assert segments("To be.\n", "text", None) == [("To be.\n", True)]


def test_chat_trains_the_answers_and_the_stop_that_ends_them() -> None:
    first = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    second = {
        "messages": [
            {"role": "user", "content": "A"},
            {"role": "assistant", "content": "B", "weight": 0},
            {"role": "user", "content": "C"},
            {"role": "assistant", "content": [{"type": "text", "text": "D"}]},
        ]
    }
    text = jsonl(first, second).decode()
    pieces = segments(text, "chat", None)
    assert pieces == [
        ("System: Be brief.\nUser: Hi\nAssistant: ", False),
        ("Hello.\nUser:", True),  # the answer, and the stop string "\nUser:" the server stops at
        (" A\nAssistant: B\nUser: C\nAssistant: ", False),  # weight 0: context only
        ("D\n", True),
    ]
    # The context is exactly what the server renders as the prompt of the answer.
    prompt, stop = render_turns(None, [("system", "Be brief."), ("user", "Hi")])
    assert pieces[0][0] == prompt and stop == ["\nUser:"]


def test_chat_uses_the_models_template() -> None:
    template = {"user": "Q: ", "assistant": "A: ", "separator": "\n\n", "stop": ["\n\nQ:"]}
    text = jsonl(GOOD, GOOD).decode()
    assert segments(text, "chat", template) == [
        ("Q: Hi\n\nA: ", False),
        ("Hello.\n\nQ:", True),
        (" Hi\n\nA: ", False),
        ("Hello.\n\n", True),
    ]


def test_completion_trains_the_completion_and_its_newline() -> None:
    text = jsonl({"prompt": "2+2=", "completion": " 4"}, {"prompt": "1+1=", "completion": " 2"}).decode()
    assert segments(text, "completion", None) == [("2+2=", False), (" 4\n", True), ("1+1=", False), (" 2\n", True)]


def test_segments_refuses_an_invalid_text() -> None:
    with pytest.raises(FormatError, match="line 1"):
        segments('{"messages": 1}\n', "chat", None)
