"""AUTOMATIC1111's prompt syntax: attention weights, prompt editing and alternation.

`parse_attention` reproduces `parse_prompt_attention` and `prompt_schedules` reproduces
`get_learned_conditioning_prompt_schedules` from A1111's `modules/prompt_parser.py`. A1111 parses the
editing syntax with a lark (Earley) grammar; here a small recursive-descent parser accepts the same
language and picks the same reading where that grammar is ambiguous:

    start:       (prompt | stray "[", "]", "(", ")", ":")*     stray brackets only at the top level
    prompt:      (emphasized | scheduled | alternate | plain | whitespace)*
    emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"     kept as written
    scheduled:   "[" [prompt ":"] prompt ":" NUMBER "]"      [from:to:when], [to:when], [from::when]
    alternate:   "[" prompt ("|" [prompt])+ "]"               [a|b|c] cycles per step
    plain:       characters other than \\ [ ] ( ) : |, or a backslash and any character but a newline

A prompt outside that language (a top-level `|`, a trailing backslash) is used unchanged at every step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from latentforge.errors import ParameterError

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # the marker weight A1111 gives a BREAK segment
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by 1/1.1 (not divides by 1.1): the floats differ
MAX_NESTING = 100  # open brackets at once; A1111 has no limit, but 1.1^100 is already a weight of 13,781

# One token of attention syntax per match. The alternatives are tried in this order, as A1111's
# `re_attention`: escapes, a lone backslash (dropped), openers, an explicit weight closing a round
# bracket, closers, plain text, a stray colon.
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]
    | \\
    | [(\[]
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")

# lark's SIGNED_NUMBER, with the optional whitespace the scheduled rule allows around it.
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_PLAIN = re.compile(r"[^\\\[\]():|]+")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (text, weight) runs: `(x)` x1.1, `[x]` /1.1, `(x:w)` xw, `\\(` a literal `(`.

    Unclosed brackets still apply to the rest of the prompt; `BREAK` becomes its own ("BREAK", -1.0)
    segment; adjacent segments of equal weight are merged. Same output as A1111's parse_prompt_attention.
    """
    segments: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # indices into segments where an unclosed bracket starts
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for segment in segments[start:]:
            segment[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            segments.append([token[1:], 1.0])
        elif token in "([" and len(round_open) + len(square_open) >= MAX_NESTING:
            raise ParameterError(
                f"the prompt nests more than {MAX_NESTING} brackets; use (word:weight) for strong weights"
            )
        elif token == "(":
            round_open.append(len(segments))
        elif token == "[":
            square_open.append(len(segments))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), _parse_weight(weight, text))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    segments.append([BREAK, BREAK_WEIGHT])
                segments.append([part, 1.0])

    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)
    if not segments:
        segments = [["", 1.0]]

    for text_, weight_ in segments:
        if not math.isfinite(weight_):
            raise ParameterError(f"the weight of {text_[:40]!r} in the prompt overflows; give a finite one")
    merged: list[list] = [segments[0]]
    for segment in segments[1:]:
        if segment[1] == merged[-1][1]:
            merged[-1][0] += segment[0]
        else:
            merged.append(segment)
    return [(text_, weight_) for text_, weight_ in merged]


def _parse_weight(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ParameterError(
            f"attention weight {weight!r} in prompt {prompt!r} is not a number; write it like (word:1.2), "
            r"or escape literal brackets as \( \)"
        ) from None


# ---- prompt editing and alternation ---------------------------------------------------------------

Nodes = list  # list of str | _Scheduled | _Alternate, rendered by concatenation


@dataclass(frozen=True)
class _Scheduled:
    before: Nodes | None  # None for [to:when]
    after: Nodes
    number: str  # as written: "3" counts steps, ".5" or "3." is a fraction


@dataclass(frozen=True)
class _Alternate:
    options: list[Nodes]


class _NoMatch(Exception):
    """Internal: the text at this position is not in the grammar."""


class _ScheduleParser:
    """Recursive descent over the grammar in the module docstring; only the top level backtracks."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Nodes:
        nodes: Nodes = []
        while self.pos < len(self.text):
            char = self.peek()
            if char in "[(":
                start = self.pos
                try:
                    nodes.extend(self.bracket())
                except _NoMatch:  # no bracket construct starts here: the top level keeps it as a literal
                    self.pos = start + 1
                    nodes.append(char)
            elif char in "]):":
                self.pos += 1
                nodes.append(char)
            else:
                nodes.append(self.plain())  # raises on "|" or a bad escape: the whole prompt fails
        return nodes

    def prompt(self) -> Nodes:
        nodes: Nodes = []
        while self.peek() and self.peek() not in "]):|":
            if self.peek() in "[(":
                nodes.extend(self.bracket())
            else:
                nodes.append(self.plain())
        return nodes

    def plain(self) -> str:
        start = self.pos
        while True:
            match = _PLAIN.match(self.text, self.pos)
            if match:
                self.pos = match.end()
            elif self.peek() == "\\" and self.text[self.pos + 1 : self.pos + 2] not in ("", "\n"):
                self.pos += 2
            else:
                break
        if self.pos == start:
            raise _NoMatch
        return self.text[start : self.pos]

    def bracket(self) -> Nodes:
        opener = self.peek()
        self.pos += 1
        first = self.prompt()
        char = self.peek()
        self.pos += 1
        if opener == "(":
            if char == ")":
                return ["(", *first, ")"]
            if char == ":":
                second = self.prompt()
                if self.peek() == ")":
                    self.pos += 1
                    return ["(", *first, ":", *second, ")"]
            raise _NoMatch
        if char == "]":
            return ["[", *first, "]"]
        if char == "|":
            options = [first, self.prompt()]
            while self.peek() == "|":
                self.pos += 1
                options.append(self.prompt())
            if self.peek() == "]":
                self.pos += 1
                return [_Alternate(options)]
            raise _NoMatch
        if char == ":":
            start = self.pos
            second = self.prompt()
            if self.peek() == "]":  # [to:when]: what was read as a prompt must be the number
                when = _WHEN.fullmatch(self.text, start, self.pos)
                if when:
                    self.pos += 1
                    return [_Scheduled(None, first, when.group(1))]
            elif self.peek() == ":":  # [from:to:when]
                when = _WHEN.match(self.text, self.pos + 1)
                if when and self.text[when.end() : when.end() + 1] == "]":
                    self.pos = when.end() + 1
                    return [_Scheduled(first, second, when.group(1))]
        raise _NoMatch


def _collect_steps(nodes: Nodes, steps: int, when_of: Callable[[str], int], out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = when_of(node.number)
            if when >= 1:
                out.add(when)
            _collect_steps(node.before or [], steps, when_of, out)
            _collect_steps(node.after, steps, when_of, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _collect_steps(option, steps, when_of, out)


def _render(nodes: Nodes, step: int, when_of: Callable[[str], int]) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= when_of(node.number) else node.after
            parts.append(_render(chosen, step, when_of))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, when_of))
    return "".join(parts)


def prompt_schedules(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The prompt texts of `[from:to:when]` editing and `[a|b]` alternation as (end_step, text) pairs.

    Text i is used for steps up to and including end_step i (A1111's get_learned_conditioning_prompt_schedules
    for one prompt). `when` counts steps if written as an integer, a fraction of `steps` if it has a ".";
    with `hires_steps`, integers past `steps` and fractions past 1.0 address the hires pass.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset, total = 0, 0.0, steps
    else:
        int_offset, float_offset, total = steps, 1.0, hires_steps

    def when_of(number: str) -> int:
        value = float(number)
        if use_old_scheduling:
            value = value * total if value < 1 else value
        elif "." in number:
            value = (value - float_offset) * total
        else:
            value = value - int_offset
        return int(min(max(value, -1.0), total))  # clamped first so that "1e999" cannot overflow int()

    try:
        nodes = _ScheduleParser(prompt).parse()
    except (_NoMatch, RecursionError):
        return [(total, prompt)]
    ends = {total}
    _collect_steps(nodes, total, when_of, ends)
    return [(end, _render(nodes, end, when_of)) for end in sorted(ends)]
