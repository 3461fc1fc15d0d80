"""An independent judge of composed scenes: a small CNN trained only on real composed images (scenes.py),
sharing no weights with the shipped model, that says which thing is on the left and on the right, what
accessory is worn, how many things there are, and in which place.

    python judge.py emoji.npz judge.pt [--images 30000 --epochs 8]    # train (2-core CPU: 12 minutes)

`passes(judge, scenes, images)` scores images against the scenes they were meant to show: a wearing scene
passes when the wearer and the accessory are both right (any hat where the caption says only "a hat", any
eyewear for "glasses": `accessories_named`); a pair when both things are right (and their
order, when the caption names left and right); a count when the thing and the number are; a place when
the thing and the place are.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scenes import ACCESSORIES, KINDS, OBJECTS, PLACES, WEARERS, Composer, Emoji, Scene, accessories_named
from torch import nn

THINGS = sorted(set(WEARERS) | set(OBJECTS))
ACCS = sorted(ACCESSORIES)
PLACE_NAMES = sorted(PLACES)
IGNORE = -100  # a label the scene does not have (cross_entropy's ignore_index)
HEADS = {"left": len(THINGS), "right": len(THINGS) + 1, "accessory": len(ACCS) + 1, "count": 3,
         "place": len(PLACE_NAMES) + 1}


def labels(s: Scene) -> dict[str, int]:
    """The judge's targets for a scene (IGNORE where the scene says nothing)."""
    known = s.things[0] in THINGS
    return {"left": THINGS.index(s.things[0]) if known else IGNORE,
            "right": (THINGS.index(s.things[1]) if s.kind == "pair" else len(THINGS)) if known else IGNORE,
            "accessory": ACCS.index(s.accessory) if s.accessory else len(ACCS),
            "count": s.count - 1 if s.kind == "count" else IGNORE,
            "place": PLACE_NAMES.index(s.place) if s.place else len(PLACE_NAMES)}


class Judge(nn.Module):
    """64x64 RGB -> logits per head. Four strided conv stages keep a 4x4 map, so left and right stay apart."""

    def __init__(self, width: int = 48):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.SiLU(), nn.Conv2d(b, b, 3, 1, 1),
                       nn.BatchNorm2d(b), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * chans[-1], 384), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(384, n) for k, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 64, 64, 3] -> float [N, 3, 64, 64] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def make_set(emoji: Emoji, n: int, seed: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """`n` real scenes of every kind but "single" (all combinations: the judge is a measuring tool)."""
    c = Composer(emoji, seed, train=False)
    kinds = [k for k in KINDS if k != "single"]
    scenes = [c.scene(kinds[i % len(kinds)]) for i in range(n)]
    lab = [labels(s) for s in scenes]
    return np.stack([s.image for s in scenes]), {k: torch.tensor([x[k] for x in lab]) for k in HEADS}


def train(emoji: Emoji, images: int, epochs: int, seed: int = 0, batch: int = 128) -> Judge:
    torch.manual_seed(seed)
    x, y = make_set(emoji, images, seed)
    x = to_input(x)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            xb = x[idx] + 0.03 * torch.randn_like(x[idx])  # a little noise: generated images are not clean
            out = judge(xb)
            loss = sum(F.cross_entropy(out[k], y[k][idx], ignore_index=IGNORE) for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    outs = [judge(to_input(images[i:i + batch])) for i in range(0, len(images), batch)]
    return {k: torch.cat([o[k] for o in outs]).argmax(1).numpy() for k in HEADS}


def passes(judge: Judge, scenes: list[Scene], images: np.ndarray) -> np.ndarray:
    """Per image: does the judge find what its scene's caption names?"""
    p = predict(judge, images)
    ok = []
    for i, s in enumerate(scenes):
        t = labels(s)
        if s.kind == "pair":
            got, want = (p["left"][i], p["right"][i]), (t["left"], t["right"])
            ok.append(got == want or (not s.ordered and got == want[::-1]))
        elif s.kind == "wearing":
            ok.append(p["left"][i] == t["left"] and accessory_ok(s, p["accessory"][i]))
        elif s.kind == "count":
            ok.append(p["left"][i] == t["left"] and p["count"][i] == t["count"])
        else:
            ok.append(p["left"][i] == t["left"] and p["place"][i] == t["place"])
    return np.array(ok)


def accessory_ok(s: Scene, predicted: int) -> bool:
    """Is the judge's accessory class one the wearing scene's caption allows?"""
    return predicted < len(ACCS) and ACCS[predicted] in accessories_named(s)


def load(path: Path) -> Judge:
    judge = Judge()
    judge.load_state_dict(torch.load(path, weights_only=True))
    return judge.eval()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    emoji = Emoji(args.npz)
    judge = train(emoji, args.images, args.epochs)
    torch.save(judge.state_dict(), args.out)
    c = Composer(emoji, 99, train=False)
    for kind in ("wearing", "pair", "count", "place"):
        scenes = [c.scene(kind) for _ in range(500)]
        rate = passes(judge, scenes, np.stack([s.image for s in scenes])).mean()
        print(f"real {kind} scenes, fresh seed: {100 * rate:.1f}% pass")
