"""Prompt files: one prompt per line, or JSON lines.

Text format:
    # comments and blank lines are skipped
    a red apple
    a cat face | seed=7 cfg=4 negative=blurry, low quality
After the last '|' come `key=value` overrides (keys: config.OVERRIDE_TYPES); a value runs to the next
` key=` or the end of the line. A prompt that itself needs '|' goes in a .jsonl file:
    {"prompt": "a | b", "seed": 7}
Errors name the file and line.
"""

import json
import re
from pathlib import Path

from ldm_cli.errors import LdmError, check
from ldm_cli.jobs import OVERRIDE_TYPES

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINE_CHARS = 100_000
PAIR = re.compile(r"\s*([A-Za-z_]\w*)=(.*?)(?=\s+[A-Za-z_]\w*=|\s*$)", re.S)

PromptLine = tuple[str, dict, str]  # (prompt, overrides, "file:line: ")


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    path = Path(path)
    try:
        with open(path, "rb") as f:  # read with a bound, not by stat: /dev/zero and pipes have no size
            data = f.read(MAX_FILE_BYTES + 1)
        check(len(data) <= MAX_FILE_BYTES, f"{path}: prompt file is larger than {MAX_FILE_BYTES} bytes")
    except OSError as e:
        raise LdmError(f"{path}: cannot read prompt file ({e.strerror or type(e).__name__})") from e
    lines = parse_prompts(decode_utf8(data, path), str(path), jsonl=path.suffix.lower() == ".jsonl")
    check(lines != [], f"{path}: no prompts in the file (only blank lines or comments)")
    return lines


def decode_utf8(data: bytes, where) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LdmError(f"{where}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def parse_prompts(text: str, name: str = "<prompts>", jsonl: bool = False) -> list[PromptLine]:
    out = []
    # lines end at \n only (str.splitlines also splits at U+2028, NEL, form feed...: wrong line numbers,
    # and a prompt cut in two)
    for number, raw in enumerate(text.split("\n"), start=1):
        where = f"{name}:{number}: "
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        check(len(line) <= MAX_LINE_CHARS, f"{where}line is {len(line)} characters, more than {MAX_LINE_CHARS}")
        check("\x00" not in line, f"{where}line contains a NUL byte")
        prompt, overrides = parse_json_line(line, where) if jsonl else parse_text_line(line, where)
        check(prompt.strip() != "", f"{where}empty prompt")
        out.append((prompt.strip(), overrides, where))
    return out


def parse_text_line(line: str, where: str) -> tuple[str, dict]:
    if "|" not in line:
        return line, {}
    prompt, _, tail = line.rpartition("|")
    pairs, pos = {}, 0
    for m in PAIR.finditer(tail):
        check(tail[pos:m.start()].strip() == "", f"{where}cannot read overrides {tail.strip()!r}: "
              "expected key=value pairs after '|' (use a .jsonl file for prompts containing '|')")
        check(m.group(1) not in pairs, f"{where}{m.group(1)} is given twice; give each key once")
        pairs[m.group(1)] = m.group(2).strip()
        pos = m.end()
    check(tail[pos:].strip() == "" and (pairs or not tail.strip()),
          f"{where}cannot read overrides {tail.strip()!r}: expected key=value pairs after '|'")
    return prompt, {k: convert(k, v, where) for k, v in pairs.items()}


def parse_json_line(line: str, where: str) -> tuple[str, dict]:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        check(dup is None, f"{where}{dup} is given twice; give each key once")
        return dict(pairs)

    try:
        obj = json.loads(line, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise LdmError(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # "[[[[..." thousands deep: Python's parser gives up before the line ends
        raise LdmError(f"{where}JSON nested too deeply") from None
    check(isinstance(obj, dict) and isinstance(obj.get("prompt"), str),
          f"{where}expected a JSON object with a \"prompt\" string")
    return obj.pop("prompt"), {k: convert(k, v, where) for k, v in obj.items()}


def convert(key: str, value, where: str):
    check(key in OVERRIDE_TYPES, f"{where}unknown key {key!r} (known: {', '.join(OVERRIDE_TYPES)})")
    kind = OVERRIDE_TYPES[key]
    if kind is str:
        check(isinstance(value, str), f"{where}{key} must be text")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise LdmError(f"{where}{key} must be a number, got {value!r}")
    try:
        number = kind(value) if not (kind is int and isinstance(value, float)) else None
    except (ValueError, OverflowError):
        number = None
    check(number is not None, f"{where}{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return number
