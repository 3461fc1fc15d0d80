"""Prompt-file parsing: examples and a property test."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_cli.errors import LdmError
from ldm_cli.io.prompts import parse_prompts, read_prompt_file


def test_examples():
    text = "# c\n\n  a cat  \na red apple | seed=7 cfg=4 negative=blurry, low quality\nx | steps=3\n"
    assert parse_prompts(text, "f") == [
        ("a cat", {}, "f:3: "),
        ("a red apple", {"seed": 7, "cfg": 4.0, "negative": "blurry, low quality"}, "f:4: "),
        ("x", {"steps": 3}, "f:5: ")]


@pytest.mark.parametrize("line,message", [
    ("a | sed=7", "f:1: unknown key 'sed'"),
    ("a | seed=x", "f:1: seed must be an integer"),
    ("a | seed=7 junk", "f:1: seed must be an integer"),
    ("a | just words", "f:1: cannot read overrides"),
    (" | seed=1", "f:1: empty prompt"),
])
def test_errors_name_file_and_line(line, message):
    with pytest.raises(LdmError, match=message.replace("(", r"\(")):
        parse_prompts(line, "f")


def test_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a | b", "seed": 3, "negative": "x"}\n\n{"prompt": "c"}\n')
    assert read_prompt_file(f) == [("a | b", {"seed": 3, "negative": "x"}, f"{f}:1: "), ("c", {}, f"{f}:3: ")]
    f.write_text('{"prompt": "a", "seed": "7x"}\n')
    with pytest.raises(LdmError, match=":1: seed must be an integer"):
        read_prompt_file(f)


prompt_text = st.text(st.characters(blacklist_characters="|\r\n\x00\x1c\x1d\x1e\x85\u2028\u2029\x0b\x0c",
                                    blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda s: s.strip() and not s.strip().startswith("#"))
negative_text = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" ,.-"),
                        max_size=20).map(str.strip).filter(lambda s: "=" not in s)
overrides = st.fixed_dictionaries({}, optional={
    "seed": st.integers(0, 2**40), "steps": st.integers(1, 1000), "cfg": st.floats(0, 30, allow_nan=False),
    "eta": st.floats(0, 1), "width": st.sampled_from([64, 512, 768]), "negative": negative_text})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(prompt_text, overrides), min_size=1, max_size=5), st.booleans())
def test_round_trip(entries, comments):
    lines = []
    for prompt, over in entries:
        if comments:
            lines += ["# a comment", ""]
        tail = " ".join(f"{k}={v}" for k, v in over.items())
        lines.append(f"{prompt} | {tail}" if over else prompt)
    parsed = parse_prompts("\n".join(lines), "f")
    assert [(p, o) for p, o, _ in parsed] == [(p.strip(), o) for p, o in entries]
