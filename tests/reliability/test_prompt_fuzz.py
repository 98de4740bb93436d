"""Seeded fuzz of the prompt parser (Hypothesis is not installed): random strings over the syntax's own
alphabet must parse or raise `ParameterError`, never anything else, within a fixed time budget."""

from __future__ import annotations

import random
import time

from latentforge.errors import ParameterError
from latentforge.prompts.parser import parse_attention, prompt_schedules

# The characters that carry meaning in A1111's syntax, numbers and their spellings, and a few that do not.
PIECES = [
    "(", ")", "[", "]", ":", "|", "\\", "BREAK", " ", "\n", "a", "cat", "0", "1", ".", "-", "+", "e",
    "1e400", "nan", "inf", "0.5", "-1", "9" * 40, "\x00", "\udcff", "é", "::", "((", "]]", "[a:b:0.5]",
    "[a|b]", "(a:1.2)", "(a:1.2.3)", "AND", ",",
]  # fmt: skip
BUDGET_SECONDS = 3.0


def _random_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 60)))


def test_parser_raises_only_parameter_errors():
    rng = random.Random(19)  # issue 19; fixed so a failure reproduces
    start, runs, rejected = time.monotonic(), 0, 0
    while time.monotonic() - start < BUDGET_SECONDS:
        prompt = _random_prompt(rng)
        steps = rng.choice([1, 2, 20, 1000])
        try:
            weights = parse_attention(prompt)
            hires = rng.choice([None, steps + 10])
            schedules = prompt_schedules(prompt, steps, hires_steps=hires)
        except ParameterError:
            rejected += 1
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"{type(error).__name__} for prompt {prompt!r} at {steps} steps") from error
        else:
            assert all(isinstance(t, str) and isinstance(w, float) for t, w in weights)
            assert schedules and schedules[-1][0] == (hires or steps)  # the last entry covers the final step
        runs += 1
    assert runs > 500, runs  # the budget bought a real search, not a handful of cases
    assert 0 < rejected < runs  # both outcomes were reached: the alphabet exercises the error paths
