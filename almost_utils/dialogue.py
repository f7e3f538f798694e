"""The dialogue text format shared by every step.

A dialogue is a list of ``(role, text)`` turns with role ``"Human"`` or ``"Assistant"``. On the
page (demonstration files, prompts, RM inputs) turns read ``Human: ...`` / ``Assistant: ...``,
one blank line apart, and dialogues are separated by a line of five dashes::

    Human: What's the capital of Australia?

    Assistant: Canberra.

    -----

    Human: ...

A few-shot prompt is the preamble, the first N demonstration dialogues, a separator, and the
new dialogue ending in an open ``Assistant:`` turn; the model's continuation is cut at the next
separator or speaker turn (:data:`STOP_STRINGS`).
"""
from __future__ import annotations

from pathlib import Path

ROLES = ("Human", "Assistant")
SEPARATOR = "-----"
STOP_STRINGS = ["\n" + SEPARATOR, "\nHuman:", "\nAssistant:"]

Turn = tuple[str, str]


def parse_dialogues(text: str, source: str = "<text>", last_role: str = "Assistant") -> list[list[Turn]]:
    """Parse a demonstration file into dialogues; errors name the file and dialogue.

    Every dialogue must end with a ``last_role`` turn (the user agent's examples end with "Human").
    """
    blocks = [b.strip() for b in text.strip().split(f"\n{SEPARATOR}\n")]
    dialogues = []
    for i, block in enumerate(blocks):
        turns: list[Turn] = []
        for line in block.splitlines():
            role = next((r for r in ROLES if line.startswith(r + ":")), None)
            if role:
                turns.append((role, line[len(role) + 1:].strip()))
            elif turns:
                turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + line)
            elif line.strip():
                raise ValueError(f"{source}: dialogue {i + 1} has text before its first turn: {line[:60]!r}")
        turns = [(r, t.strip()) for r, t in turns]
        if not turns:
            raise ValueError(f"{source}: dialogue {i + 1} is empty")
        for j, (role, _) in enumerate(turns):
            if role != ROLES[j % 2]:
                raise ValueError(f"{source}: dialogue {i + 1}, turn {j + 1} should be {ROLES[j % 2]}, is {role}")
        if turns[-1][0] != last_role:
            article = "an" if last_role[0] in "AEIOU" else "a"
            raise ValueError(f"{source}: dialogue {i + 1} must end with {article} {last_role} turn")
        dialogues.append(turns)
    return dialogues


def load_dialogues(path: str | Path) -> list[list[Turn]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demonstration file not found: {path}")
    return parse_dialogues(path.read_text(), str(path))


def format_turns(turns: list[Turn]) -> str:
    """``Human: a\\n\\nAssistant: b`` - one dialogue on the page."""
    return "\n\n".join(f"{role}: {text}" for role, text in turns)


def few_shot_prefix(preamble: str, dialogues: list[list[Turn]], shots: int) -> str:
    """The part of a prompt every query of one configuration shares (its KV cache is reused)."""
    if shots > len(dialogues):
        raise ValueError(f"{shots} shots asked, only {len(dialogues)} demonstrations available")
    parts = [preamble.strip()] + [format_turns(d) for d in dialogues[:shots]]
    return f"\n\n{SEPARATOR}\n\n".join(parts) + f"\n\n{SEPARATOR}"


def open_turn(history: list[Turn], next_role: str = "Assistant") -> str:
    """The per-query tail of a prompt: the dialogue so far plus an open turn.

    Starts with a blank line so that it joins a :func:`few_shot_prefix` or stands alone in the
    inference format ``\\n\\nHuman: {query}\\n\\nAssistant:``.
    """
    return "\n\n" + format_turns(history) + f"\n\n{next_role}:"


def rm_text(history: list[Turn], response: str) -> str:
    """What the reward model reads: the dialogue in the policy's format ending in ``response``."""
    return open_turn(history) + " " + response.strip()
