"""Chat messages -> one text, with the model's chat template (part of its config.json).

The template is a plain transcript with role prefixes:

    {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "separator": "\\n", "stop": ["\\nUser:"]}

renders [system "Be brief.", user "Hi"] as "System: Be brief.\\nUser: Hi\\nAssistant: ", and the
generation stops at the template's stop strings (the next user turn). Serving (app/chat.py) and training
(lm/formats.py) both render through `render_turns`, so a model is trained on exactly the text it is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm.checkpoint import DEFAULT_CHAT_TEMPLATE

ROLES = ("system", "developer", "user", "assistant")
ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # role -> prefix


def full_template(template: dict[str, Any] | None) -> dict[str, Any]:
    """The template with the default's keys filled in."""
    return {**DEFAULT_CHAT_TEMPLATE, **(template or {})}


def render_turns(
    template: dict[str, Any] | None, turns: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
) -> tuple[str, list[str]]:
    """(role, text) turns -> the prompt for the next assistant turn (without the assistant's prefix when
    not `add_generation_prompt`), and the template's stop strings."""
    t = full_template(template)
    pieces = [piece for role, text in turns for piece, _ in turn_pieces(t, role, text)]
    prefix = str(t["assistant"]) if add_generation_prompt else ""
    return "".join(pieces) + prefix, stop_strings(t)


def turn_pieces(template: dict[str, Any], role: str, text: str) -> list[tuple[str, str]]:
    """One turn as its (text, kind) pieces, kind "prefix", "text" or "separator"; they concatenate to
    the turn's rendering. `template` is a full template (`full_template`)."""
    return [(str(template[ROLE_OF[role]]), "prefix"), (text, "text"), (str(template["separator"]), "separator")]


def stop_strings(template: dict[str, Any] | None) -> list[str]:
    return [str(s) for s in full_template(template).get("stop") or []]
