"""Chat messages -> one prompt, with the model's chat template (part of its config.json).

The template is a plain transcript with role prefixes:

    {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "separator": "\\n", "stop": ["\\nUser:"]}

renders [system "Be brief.", user "Hi"] as "System: Be brief.\\nUser: Hi\\nAssistant: ", and the
generation stops at the template's stop strings (the next user turn).
"""

from __future__ import annotations

from typing import Any

from app.schemas import ChatMessage
from lm.chat import full_template, render_turns


def render_chat(
    template: dict[str, Any] | None, messages: list[ChatMessage], *, add_generation_prompt: bool = True
) -> tuple[str, list[str]]:
    """The prompt for the next assistant turn (without the assistant's prefix when not
    `add_generation_prompt`) and the template's stop strings: lm/chat.py's rendering, which training uses too."""
    return render_turns(template, [(m.role, m.text) for m in messages], add_generation_prompt=add_generation_prompt)


def jinja_chat_template(template: dict[str, Any] | None) -> str:
    """The same rendering as `render_chat`, as a Jinja template over Hugging Face's variables (`messages`,
    `add_generation_prompt`), for clients that render chats themselves (GET /tokenizer_info).

    It has no text outside its tags, so the Jinja environment's whitespace options (Hugging Face's
    trim_blocks and lstrip_blocks, keep_trailing_newline) cannot change its output; every literal is
    an escaped ASCII string, so no newline normalization applies either. It reads only defined
    variables (it works under StrictUndefined): a message's content may be a string, a list of text
    parts, null or absent."""
    t = full_template(template)
    prefix = {role: _jinja_string(str(t[role])) for role in ("system", "user", "assistant")}
    return "".join(
        [
            "{%- for message in messages -%}",
            "{%- if message['role'] in ['system', 'developer'] -%}{{- " + prefix["system"] + " -}}",
            "{%- elif message['role'] == 'user' -%}{{- " + prefix["user"] + " -}}",
            "{%- elif message['role'] == 'assistant' -%}{{- " + prefix["assistant"] + " -}}",
            "{%- endif -%}",
            "{%- set content = message['content'] if message['content'] is defined else none -%}",
            "{%- if content is string -%}{{- content -}}",
            "{%- elif content is not none -%}{%- for part in content -%}{{- part['text'] -}}{%- endfor -%}",
            "{%- endif -%}",
            "{{- " + _jinja_string(str(t["separator"])) + " -}}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt is defined and add_generation_prompt -%}",
            "{{- " + prefix["assistant"] + " -}}",
            "{%- endif -%}",
        ]
    )


def _jinja_string(text: str) -> str:
    """A Jinja string literal of `text`, in printable ASCII: Jinja reads its escapes as Python's
    unicode-escape does (\\n, \\", \\\\, \\uXXXX, \\UXXXXXXXX)."""
    out = []
    for char in text:
        code = ord(char)
        if char in '\\"':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
