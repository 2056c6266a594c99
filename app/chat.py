"""Chat messages -> one prompt, with the model's chat template (part of its config.json).

The template is a plain transcript with role prefixes:

    {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "separator": "\\n", "stop": ["\\nUser:"]}

renders [system "Be brief.", user "Hi"] as "System: Be brief.\\nUser: Hi\\nAssistant: ", and the
generation stops at the template's stop strings (the next user turn).
"""

from __future__ import annotations

from typing import Any

from app.schemas import ChatMessage
from lm.checkpoint import DEFAULT_CHAT_TEMPLATE

ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def render_chat(template: dict[str, Any] | None, messages: list[ChatMessage]) -> tuple[str, list[str]]:
    """The prompt for the next assistant turn and the template's stop strings."""
    t = {**DEFAULT_CHAT_TEMPLATE, **(template or {})}
    separator = str(t["separator"])
    turns = [f"{t[ROLE_OF[m.role]]}{m.text}{separator}" for m in messages]
    return "".join(turns) + str(t["assistant"]), [str(s) for s in t.get("stop") or []]
