"""Turn the shipped Shakespeare corpus into OpenAI chat JSONL for fine-tuning examples.

    python scripts/shakespeare_chat.py [--corpus data/shakespeare/shakespeare.txt] [--out DIR]
                                       [--held-out 0.05] [--max-chars 400]

In the plays a speech is a block of lines after its speaker's name ("VALERIA."). Each pair of
neighbouring speeches by two speakers becomes one conversation: the first speech is the user's turn,
the reply the assistant's:

    {"messages": [{"role": "user", "content": "How do you both? ..."},
                  {"role": "assistant", "content": "I thank your ladyship; well, good madam."}]}

A speech's lines are joined with spaces. A stage direction or a scene heading between two speeches
breaks the pair, and pairs with a speech longer than --max-chars are left out. The conversations of the
corpus's last --held-out share (its last plays, which shakespeare-char held out for its own validation)
go to held-out.jsonl, the others to train.jsonl: fine-tune on one, validate on the other
(docs/TRAINING.md, "Chat data").
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEAKER = re.compile(r"[A-Z][A-Z' .-]*[A-Z]\.")  # "VALERIA.", "FIRST LORD.", "LADY MACBETH."


def speeches(text: str) -> Iterator[tuple[str, str] | None]:
    """(speaker, speech) per speech, in order; None for any other block (a stage direction, a heading)."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) >= 2 and SPEAKER.fullmatch(lines[0]):
            yield lines[0][:-1], " ".join(line for line in lines[1:] if line)
        else:
            yield None


def conversations(text: str, max_chars: int) -> list[dict[str, list[dict[str, str]]]]:
    """One conversation per pair of neighbouring speeches by two speakers (module docstring)."""
    out = []
    previous: tuple[str, str] | None = None
    for speech in speeches(text):
        if previous is not None and speech is not None and replies(previous, speech, max_chars):
            turns = [{"role": "user", "content": previous[1]}, {"role": "assistant", "content": speech[1]}]
            out.append({"messages": turns})
        previous = speech
    return out


def replies(first: tuple[str, str], reply: tuple[str, str], max_chars: int) -> bool:
    """Another speaker answers, and neither speech is longer than `max_chars`."""
    return first[0] != reply[0] and len(first[1]) <= max_chars and len(reply[1]) <= max_chars


def write_jsonl(path: Path, records: list[dict[str, list[dict[str, str]]]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "data" / "shakespeare" / "shakespeare.txt")
    parser.add_argument("--out", type=Path, default=Path("shakespeare-chat"), help="folder for the two files")
    parser.add_argument("--held-out", type=float, default=0.05, help="share of conversations held out (the last)")
    parser.add_argument("--max-chars", type=int, default=400, help="leave out pairs with a longer speech")
    args = parser.parse_args(argv)

    chats = conversations(args.corpus.read_text(encoding="utf-8"), args.max_chars)
    n_held_out = max(1, round(len(chats) * args.held_out))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", chats[:-n_held_out])
    write_jsonl(args.out / "held-out.jsonl", chats[-n_held_out:])
    print(f"{len(chats) - n_held_out} conversations in {args.out / 'train.jsonl'}")
    print(f"{n_held_out} conversations in {args.out / 'held-out.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
