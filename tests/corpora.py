"""Tiny public-domain texts the suite trains and tokenizes, written once for every part of it."""

from __future__ import annotations

import json

# Shakespeare, Sonnet 18 (public domain).
SONNET_18 = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""

# Shakespeare, Sonnet 116 (public domain).
SONNET_116 = """\
Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove.
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wand'ring bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come;
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me prov'd,
I never writ, nor no man ever lov'd.
"""

# Shakespeare, Hamlet III.1 (public domain).
HAMLET = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause.
"""

# Sonnets 18 and 116 and Hamlet III.1: about 2 KB.
TINY_CORPUS = "\n".join([SONNET_18, SONNET_116, HAMLET])

# Laozi, Dao De Jing chapters 1 and 8 (public domain).
CHINESE_CORPUS = """\
道可道，非常道。名可名，非常名。
无名天地之始；有名万物之母。
故常无欲，以观其妙；常有欲，以观其徼。
此两者，同出而异名，同谓之玄。
玄之又玄，众妙之门。
上善若水。水善利万物而不争，处众人之所恶，故几于道。
居善地，心善渊，与善仁，言善信，正善治，事善能，动善时。
夫唯不争，故无尤。
"""


def first_lines(text: str, n: int) -> str:
    return "".join(text.splitlines(keepends=True)[:n])


def chat_jsonl(text: str) -> str:
    """OpenAI chat JSONL from a text: each line as the user's turn, the next line as the assistant's answer."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}) + "\n"
        for a, b in zip(lines, lines[1:], strict=False)
    )


CHAT_JSONL = chat_jsonl(TINY_CORPUS)  # about 40 conversations
