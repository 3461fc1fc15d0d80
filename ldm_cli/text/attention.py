"""AUTOMATIC1111's prompt syntax: emphasis weights and BREAK, parsed into (text, weight) runs.

    a (red:1.3) cat, ((big)) [blurry] \\(literal\\)  BREAK  on a table

  (text)     weight x 1.1 (nested: x 1.21, ...)      [text]    weight / 1.1
  (text:w)   weight x w                              \\( \\) \\[ \\] \\\\   the literal characters
  BREAK      ends the current 75-token chunk         unmatched ( or [ applies to the rest of the prompt,
                                                     unmatched ) or ] is literal text (as A1111 parses it)

Runs of equal weight are merged; the result is never empty ("" with weight 1). This follows the
grammar as AUTOMATIC1111 documents it (wiki "Features: Attention/emphasis", "BREAK"); tokenizing and
weighting the runs is text/encode.py's.
"""

import re

from ldm_cli.errors import check

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)  # the marker run
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    runs: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # positions in runs where an open bracket starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _TOKEN.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):  # an escaped character; a lone backslash is dropped
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            value = _weight(weight)
            scale(open_round.pop(), value)
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:  # plain text (and unmatched closers, a lone ':' or '\'), split at BREAK
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in open_round:  # unclosed brackets reach to the end
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1] and run[1] != BREAK[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    check(value == value and 0 <= value <= 100, f"prompt weight :{text} is not a number in [0, 100] "
          "(negative weights are not supported; write the concept in the negative prompt)")
    return value
