"""A1111's extra-network tags in prompts: `<lora:NAME:WEIGHT>` applies the LoRA file NAME (found in
`--lora-dir`) at WEIGHT (default 1). The tags are taken out of the text before it is encoded, as A1111
does; with `--prompt-syntax plain` the prompt is sent as is, tags included."""

import re

from ldm_cli.errors import LdmError, check

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra_networks pattern: <kind:arg[:arg...]>
LORA_KINDS = ("lora", "lyco")  # lyco: the LyCORIS extension's name for the same tag


def split_networks(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its tags, [(LoRA name, weight)] in order of appearance)."""
    found = []
    for m in TAG.finditer(prompt):
        kind, args = m.group(1), m.group(2).split(":")
        check(kind in LORA_KINDS, f"prompt tag {m.group(0)!r}: ldm applies <lora:NAME:WEIGHT> tags only")
        check(1 <= len(args) <= 2 and args[0].strip(), f"prompt tag {m.group(0)!r}: expected <lora:NAME> or "
              "<lora:NAME:WEIGHT> (separate text-encoder and U-Net weights are not supported)")
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise LdmError(f"prompt tag {m.group(0)!r}: the weight {args[1]!r} is not a number") from None
        check(weight == weight and -10 <= weight <= 10, f"prompt tag {m.group(0)!r}: the weight must be in [-10, 10]")
        found.append((args[0].strip(), weight))
    return TAG.sub("", prompt), found


def strip_networks(prompt: str) -> str:
    return TAG.sub("", prompt)
