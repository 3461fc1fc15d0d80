"""How every GPU bench script ends: its result rows as a markdown table, and as JSON lines under $OUT."""

import json
import os


def print_table(header, rows, cells):
    """One markdown table: `header` the column titles, `cells(row)` a row's values (None skips the row)."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        values = cells(r)
        if values is not None:
            print("| " + " | ".join(str(v) for v in values) + " |")


def save_jsonl(name, rows, mode="a"):
    """The rows to $OUT/name (appended unless mode="w"); nothing where the run has no $OUT."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


ROWS = []  # this process's result rows, in the order emitted


def emit(row):
    """Keep a result row and print it as one JSON line (the device call's log keeps it even on a timeout)."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)
