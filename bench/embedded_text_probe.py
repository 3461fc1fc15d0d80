"""Does the embedded model's text encoder still say which accessory a new combination names? A probe.

    python bench/embedded_text_probe.py .data/emoji.npz [--model FOLDER]

The U-Net draws the accessory of a (wearer, accessory) it was trained on and mostly not of a new one
(bench/embedded_judge.py --trained). Either the text encoder's states of a new combination no longer carry
the accessory (its 3 layers mix the words of a caption), or they do and the U-Net answers from memory. The
probe reads the states as a cross-attention does: 4 learned queries attend over the token states (keys a
learned projection, padding masked), a linear layer names the accessory (or the wearer). Trained on the
states of 6,000 captions of trained combinations, scored on fresh captions of trained combinations and on
the held-out ones (captions naming the accessory itself, not only "a hat"). Per layer: 0 is the token
and position embeddings (no mixing yet), the last is what the U-Net reads. CPU: about a minute.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent / "recipes" / "tiny-emoji"))

from common import Report, add_out_option, out_folder  # noqa: E402
from scenes import ACCESSORIES, Composer, Emoji, accessories_named, held_out_prompts  # noqa: E402

from ldm_cli.models.defaults import EMBEDDED_MODEL  # noqa: E402


def specific(scenes) -> list:
    """Wearing scenes whose caption names the accessory itself."""
    return [s for s in scenes if s.kind == "wearing" and accessories_named(s) == {s.accessory}]


def wearing(emoji: Emoji, n: int, seed: int) -> list:
    c, out = Composer(emoji, seed=seed), []
    while len(out) < n:
        out += specific([c.wearing()])
    return out


class Probe(torch.nn.Module):
    """A cross-attention's read of token states: learned queries, projected keys, the values themselves."""

    def __init__(self, dim: int, classes: int, queries: int = 4):
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.k = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(queries * dim, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = torch.einsum("qd,btd->bqt", self.q, self.k(x)) / x.shape[-1] ** 0.5
        a = a.masked_fill(mask[:, None, :] == 0, float("-inf")).softmax(-1)
        return self.head(torch.einsum("bqt,btd->bqd", a, x).flatten(1))


def fit_and_score(train, tests, classes: int, steps: int = 400, seed: int = 0) -> list[float]:
    """train, tests: (states, mask, labels); the probe's accuracy on each test set."""
    torch.manual_seed(seed)
    x, m, y = train
    probe = Probe(x.shape[-1], classes)
    opt = torch.optim.Adam(probe.parameters(), 3e-3)
    for _ in range(steps):
        i = torch.randint(0, len(x), (256,))
        loss = F.cross_entropy(probe(x[i], m[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [round((probe(tx, tm).argmax(1) == ty).float().mean().item(), 3) for tx, tm, ty in tests]


def main():
    from transformers import AutoTokenizer, CLIPTextModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path, help="the emoji dataset (recipes/tiny-emoji/make_dataset.py makes it)")
    ap.add_argument("--model", default=str(EMBEDDED_MODEL), help="model folder (default: the embedded model)")
    add_out_option(ap)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(Path(args.model) / "tokenizer")
    enc = CLIPTextModel.from_pretrained(Path(args.model) / "text_encoder").float().eval()
    emoji = Emoji(args.npz)
    sets = {"train": wearing(emoji, 6000, 11), "trained combinations": wearing(emoji, 600, 12),
            "held-out combinations": specific(held_out_prompts(emoji, 3000))}
    wearers = sorted({s.things[0] for v in sets.values() for s in v})
    accs = sorted(ACCESSORIES)
    with torch.no_grad():
        encoded = {}
        for name, scenes in sets.items():
            ids = tok([s.caption for s in scenes], padding="max_length", max_length=enc.config.max_position_embeddings,
                      truncation=True, return_tensors="pt")
            out = enc(input_ids=ids.input_ids, output_hidden_states=True)
            encoded[name] = ([*out.hidden_states[:-1], out.last_hidden_state], ids.attention_mask)
    report = Report(out_folder(args.out), "embedded_text_probe")
    report.emit({"model": args.model, "captions": {k: len(v) for k, v in sets.items()}})
    for layer in range(len(encoded["train"][0])):
        for target, labels in (("accessory", lambda s: accs.index(s.accessory)),
                               ("wearer", lambda s: wearers.index(s.things[0]))):
            data = {k: (encoded[k][0][layer], encoded[k][1], torch.tensor([labels(s) for s in v]))
                    for k, v in sets.items()}
            scores = fit_and_score(data["train"], [data["trained combinations"], data["held-out combinations"]],
                                   len(accs) if target == "accessory" else len(wearers))
            report.emit({"layer": "last (the U-Net's)" if layer == len(encoded["train"][0]) - 1 else layer,
                         "names": target, "trained combinations": scores[0], "held-out combinations": scores[1]})
    report.table(("layer", "names", "trained combinations", "held-out combinations"),
                 lambda r: [r["layer"], r["names"], r["trained combinations"], r["held-out combinations"]]
                 if "layer" in r else None)
    report.save()


if __name__ == "__main__":
    main()
