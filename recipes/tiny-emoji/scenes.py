"""Composed scenes for the embedded model: emoji wearing things, side by side, counted, in simple places,
each with a caption that says what is there, in many phrasings.

    python scenes.py emoji.npz OUT_DIR [--per-kind 20000]       # PNGs + .txt captions for `ldm train`
    python scenes.py emoji.npz --preview grid.png                # a 8x8 grid of random scenes

Kinds of scene (every one also varies position, size and mirroring, so that a caption has many right
pictures and the model must read its noise):
  single   one emoji on a plain colour, the first edition's captions ("cat face, 3d style, on a blue background");
           every kind on a plain colour names it in a third of its captions ("..., on a blue background")
  wearing  a wearer (animal or face) with an accessory where it belongs: hats on top of the alpha mask's box,
           glasses across the eyes, a scarf under the chin, a bow at the top corner ("a cat wearing a top hat")
  pair     two things side by side ("a cat next to an apple", "an apple on the left and a banana on the right")
  count    one to three of a thing in a row ("three apples")
  place    a thing in a drawn place: night sky, grass, sea, snow, desert, a wooden table ("a rocket in the night sky")
A share of (wearer, accessory) and (thing, thing) combinations never appears in training, chosen by a hash
of the pair, so that held-out prompts measure composition rather than memory (`held_out_prompts`).
The labels of each scene (things, accessory, count, place) train the independent judge (judge.py).
"""

import argparse
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from captions import (  # noqa: F401
    ACCESSORIES,
    GENERIC,
    MORE_WEARERS,
    OBJECTS,
    STYLES,
    WEARERS,
    accessories_named,
    article,
    count_caption,
    pair_caption,
    plural,
    style_suffix,
    wearing_caption,
    words,
)
from emoji_data import BACKGROUNDS as COLOURS  # the first edition's ten plain colours
from PIL import Image, ImageDraw

SIZE = 64
# where the eyes are, for wearers that are not a round face: (height as a share of the drawn box from its top,
# glasses width as a share of its width); others (0.42, 0.8). Read off a grid of every wearer in every style.
EYES = {"rabbit face": (0.6, 0.8), "mouse face": (0.5, 0.8), "frog face": (0.33, 0.8), "koala": (0.45, 0.8),
        "penguin": (0.2, 0.55), "owl": (0.3, 0.75), "chicken": (0.27, 0.5)}
# places: (sky colour top, sky colour bottom, ground colour or None, ground line y, words, things that belong)
PLACES = {
    "night sky": ((8, 12, 40), (30, 40, 90), None, 0, ["in the night sky", "at night", "under the stars"],
                  ["rocket", "airplane", "balloon", "white medium star", "owl"]),
    "grass": ((120, 180, 240), (180, 215, 245), (70, 160, 60), 42, ["on grass", "in a field", "on a meadow"],
             ["deciduous tree", "house building", "sunflower", "tulip", "mushroom", "snail", "butterfly",
              "rabbit face", "cow face", "dog face", "cat face", "soccer ball", "bicycle", "automobile"]),
    "sea": ((120, 180, 240), (170, 210, 245), (30, 90, 180), 36, ["on the sea", "at sea", "in the ocean"],
           ["sailboat", "fish", "whale", "duck", "turtle"]),
    "snow": ((170, 190, 210), (210, 220, 230), (240, 244, 250), 42, ["in the snow", "on snow", "in winter"],
            ["snowman without snow", "evergreen tree", "penguin", "house building", "polar bear", "rabbit face"]),
    "desert": ((250, 200, 120), (250, 225, 170), (225, 185, 110), 44, ["in the desert", "on sand"],
               ["cactus", "snail", "turtle", "automobile"]),
    "wooden table": ((235, 225, 210), (225, 215, 200), (150, 95, 50), 40, ["on a wooden table", "on a table"],
                     ["red apple", "banana", "pear", "strawberry", "lemon", "tangerine", "watermelon", "slice of pizza",
                      "doughnut", "birthday cake", "carrot"]),
}
HELD_OUT_PERCENT = 20


def held_out(*names: str) -> bool:
    """A combination left out of training (the same answer for (a, b) and (b, a))."""
    key = "+".join(sorted(names))
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


@dataclass
class Scene:
    """What a composed image shows: its caption and the judge's labels."""
    kind: str
    caption: str
    things: list[str]                     # emoji names, left to right (one for single/wearing/place)
    accessory: str | None = None
    count: int = 1
    place: str | None = None
    style: str = "flat"
    ordered: bool = False                 # a pair whose caption says which is on the left
    image: np.ndarray = field(default=None, repr=False)


class Emoji:
    """The emoji table of emoji.npz: RGBA pixels by (name, style), held-out names excluded."""

    def __init__(self, npz: Path):
        d = np.load(npz)
        self.rgba = {}
        for px, name, style, held in zip(d["rgba"], d["name"], d["style"], d["held_out"]):
            if not held:
                self.rgba[str(name), str(style)] = px
        self.names = sorted({n for n, _ in self.rgba})

    def styles_of(self, *names: str) -> list[str]:
        return [s for s in STYLES if all((n, s) in self.rgba for n in names)]

    def image(self, name: str, style: str, size: int, mirror: bool = False) -> Image.Image:
        im = Image.fromarray(self.rgba[name, style], "RGBA")
        bbox = im.getbbox() or (0, 0, im.width, im.height)
        im = im.crop(bbox)  # the drawn part: sizes below are of what is visible
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        return im.transpose(Image.FLIP_LEFT_RIGHT) if mirror else im


# ---- drawing ---------------------------------------------------------------------------------------------

def background(rng: random.Random, place: str | None, colour: str | None) -> Image.Image:
    if place is None:
        return Image.new("RGBA", (SIZE, SIZE), COLOURS[colour] + (255,))
    top, bottom, ground, line, _, _ = PLACES[place]
    y = np.linspace(0, 1, SIZE)[:, None, None]
    sky = (np.array(top) * (1 - y) + np.array(bottom) * y) * np.ones((1, SIZE, 1))
    if ground is not None:
        line += rng.randint(-3, 3)
        rows = np.arange(SIZE - line)[:, None, None]
        grain = 1 + 0.08 * np.sin(rows * rng.uniform(0.8, 1.6)) if place == "wooden table" else 1.0
        sky[line:] = np.array(ground) * grain
    im = Image.fromarray(sky.clip(0, 255).astype(np.uint8), "RGB").convert("RGBA")
    if place == "night sky":
        d = ImageDraw.Draw(im)
        for _ in range(rng.randint(8, 16)):
            x, yy = rng.randrange(SIZE), rng.randrange(SIZE)
            d.point((x, yy), fill=(255, 255, 230, 255))
    return im


def paste(canvas: Image.Image, im: Image.Image, cx: float, cy: float) -> None:
    """`im` centred at (cx, cy); what falls off the canvas is cut (older Pillows refuse negative offsets)."""
    x, y = round(cx - im.width / 2), round(cy - im.height / 2)
    if x < 0 or y < 0:
        im = im.crop((max(0, -x), max(0, -y), im.width, im.height))
    canvas.alpha_composite(im, (max(0, x), max(0, y)))


def wear(emoji: Emoji, wearer: str, accessory: str, style: str, size: int, mirror: bool) -> Image.Image:
    """The wearer with the accessory put where it belongs, relative to the wearer's drawn box."""
    base = emoji.image(wearer, style, size, mirror)
    w, h = base.size
    where = ACCESSORIES[accessory][0]
    eye_y, eye_w = EYES.get(wearer, (0.42, 0.8))
    acc_size = {"hat": 0.72 * w, "eyes": eye_w * w, "neck": 0.7 * w, "bow": 0.42 * w}[where]
    acc = emoji.image(accessory, style, round(acc_size), mirror)
    top_room = round(acc.height * 0.75) if where == "hat" else 0
    canvas = Image.new("RGBA", (max(w, acc.width) + 8, h + top_room + acc.height // 2 + 4), (0, 0, 0, 0))
    ox = (canvas.width - w) // 2
    canvas.alpha_composite(base, (ox, top_room))
    cx = ox + w / 2
    if where == "hat":  # sits on the head: its lower quarter overlaps the top of the box
        paste(canvas, acc, cx, top_room - acc.height / 2 + acc.height * 0.3)
    elif where == "eyes":  # across the eyes
        paste(canvas, acc, cx, top_room + eye_y * h)
    elif where == "neck":  # under the chin
        paste(canvas, acc, cx, top_room + h)
    else:  # a bow at the top corner
        paste(canvas, acc, ox + (0.2 if mirror else 0.8) * w, top_room + 0.12 * h)
    return canvas.crop(canvas.getbbox())


def fit(im: Image.Image, size: int) -> Image.Image:
    scale = size / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)


# ---- scenes ----------------------------------------------------------------------------------------------

class Composer:
    """Random scenes of each kind; `train=True` leaves out the held-out combinations. more_wearers: wearing
    scenes also of the MORE_WEARERS smileys (a data lever against memorising each (wearer, accessory) pair:
    every accessory seen on twice the wearers)."""

    def __init__(self, emoji: Emoji, seed: int = 0, train: bool = True, more_wearers: bool = False):
        self.e, self.rng, self.train = emoji, random.Random(seed), train
        present = set(emoji.names)
        self.wearers = [n for n in WEARERS if n in present]
        self.objects = [n for n in OBJECTS if n in present]
        self.accessories = [n for n in ACCESSORIES if n in present]
        self.things = self.wearers + self.objects
        self.wearers += [n for n in MORE_WEARERS if more_wearers and n in present]

    def allowed(self, *names: str) -> bool:
        return not (self.train and held_out(*names))

    def scene(self, kind: str) -> Scene:
        return getattr(self, kind)()

    def again(self, s: Scene) -> Scene:
        """Another real picture of what a wearing or pair scene shows (style, place, size, background vary)."""
        return self.wearing(s.things[0], s.accessory) if s.kind == "wearing" else self.pair(*s.things)

    def colour_suffix(self, colour: str, kind: str) -> str:
        """The plain background named in a third of training captions: a colour no caption names is one the model
        may draw for any prompt, and a prompt that names one (the first edition's form) must be drawn on it. The
        held-out prompts (train=False) are drawn as they always were (a quarter of wearing captions, no pair), so
        that the judge's 200 prompts, and its scores, stay the same."""
        if not self.train and kind != "wearing":
            return ""
        return f", on a {colour} background" if self.rng.random() < (0.35 if self.train else 0.25) else ""

    def _finish(self, s: Scene, canvas: Image.Image) -> Scene:
        s.image = np.asarray(canvas.convert("RGB"))
        return s

    def single(self) -> Scene:
        r = self.rng
        name = r.choice(self.e.names)
        style = r.choice(self.e.styles_of(name))
        colour = r.choice(list(COLOURS))
        canvas = background(r, None, colour)
        paste(canvas, self.e.image(name, style, r.randint(36, 50)), SIZE / 2 + r.randint(-4, 4), SIZE / 2 + r.randint(-4, 4))
        # the first edition's full form half the time: said less often, the model drifted off its colours
        text = r.choices([f"{name}, {style} style, on a {colour} background", f"{name}, {style} style",
                          article(name), name, f"{article(name)} on a {colour} background"], [10, 3, 2, 2, 3])[0]
        return self._finish(Scene("single", text, [name], style=style), canvas)

    def wearing(self, wearer: str | None = None, acc: str | None = None) -> Scene:
        """Random, or a new picture of the given wearer and accessory."""
        r = self.rng
        fixed = wearer is not None
        while True:
            if not fixed:
                wearer, acc = r.choice(self.wearers), r.choice(self.accessories)
            styles = self.e.styles_of(wearer, acc)
            if fixed or (styles and self.allowed(wearer, acc)):
                break
        style = r.choice(styles)
        colour = r.choice(list(COLOURS))
        canvas = background(r, None, colour)
        im = fit(wear(self.e, wearer, acc, style, 40, r.random() < 0.5), r.randint(44, 58))
        paste(canvas, im, SIZE / 2 + r.randint(-5, 5), SIZE / 2 + r.randint(-3, 3))
        text = wearing_caption(r, wearer, acc, style) + self.colour_suffix(colour, "wearing")
        return self._finish(Scene("wearing", text, [wearer], accessory=acc, style=style), canvas)

    def pair(self, left: str | None = None, right: str | None = None) -> Scene:
        """Random, or a new picture of the given two things."""
        r = self.rng
        fixed = left is not None
        while True:
            if not fixed:
                left, right = r.sample(self.things, 2)
            styles = self.e.styles_of(left, right)
            if fixed or (styles and self.allowed(left, right)):
                break
        style = r.choice(styles)
        colour = r.choice(list(COLOURS))
        canvas = background(r, None, colour)
        size = r.randint(24, 30)
        for name, cx in ((left, 16 + r.randint(-2, 3)), (right, 48 + r.randint(-3, 2))):
            paste(canvas, self.e.image(name, style, size, r.random() < 0.3), cx, SIZE / 2 + r.randint(-8, 8))
        text = pair_caption(r, left, right, style) + self.colour_suffix(colour, "pair")
        return self._finish(Scene("pair", text, [left, right], style=style, ordered=" left" in text or " right" in text),
                            canvas)

    def count(self) -> Scene:
        r = self.rng
        name, n = r.choice(self.things), r.choice([1, 2, 2, 3, 3])
        style = r.choice(self.e.styles_of(name))
        colour = r.choice(list(COLOURS))
        canvas = background(r, None, colour)
        size = {1: r.randint(32, 44), 2: r.randint(24, 28), 3: r.randint(18, 20)}[n]
        y = SIZE / 2 + r.randint(-6, 6)
        for i in range(n):
            cx = SIZE * (i + 1) / (n + 1) + r.randint(-2, 2)
            paste(canvas, self.e.image(name, style, size), cx, y + r.randint(-3, 3))
        text = count_caption(r, name, n, style) + self.colour_suffix(colour, "count")
        return self._finish(Scene("count", text, [name] * n, count=n, style=style), canvas)

    def place(self) -> Scene:
        r = self.rng
        place = r.choice(list(PLACES))
        fits = [n for n in PLACES[place][5] if (n in self.e.names)]
        name = r.choice(fits)
        style = r.choice(self.e.styles_of(name))
        canvas = background(r, place, None)
        _, _, ground, line, phrases, _ = PLACES[place]
        size = r.randint(26, 36)
        im = self.e.image(name, style, size, r.random() < 0.5)
        cy = r.randint(16, 44) if ground is None else line + 4 - im.height / 2
        paste(canvas, im, r.randint(18, 46), cy)
        text = f"{article(words(name, r))} {r.choice(phrases)}" + style_suffix(r, style)
        return self._finish(Scene("place", text, [name], place=place, style=style), canvas)


KINDS = ("single", "wearing", "pair", "count", "place")


def held_out_prompts(emoji: Emoji, n: int = 200, seed: int = 1, trained: bool = False) -> list[Scene]:
    """`n` prompts of combinations never trained on (60% wearing, 40% pairs), with a real composed image
    each (the judge's ceiling): (wearer, accessory) and (thing, thing) pairs that `held_out` keeps back.
    trained=True: combinations the training data has instead, in the same phrasings (memory against
    composition: what the model gets right on pairs it has seen)."""
    c = Composer(emoji, seed, train=False)
    out = []
    while len(out) < n:
        kind = "wearing" if len(out) < 0.6 * n else "pair"
        s = c.scene(kind)
        key = (s.things[0], s.accessory) if kind == "wearing" else tuple(s.things)
        if held_out(*key) != trained:
            out.append(s)
    return out


def _write_part(job: tuple) -> int:
    npz, out, kind, start, stop, seed, more_wearers = job
    c = Composer(Emoji(npz), seed * 7919 + KINDS.index(kind) * 1_000_003 + start, more_wearers=more_wearers)
    for i in range(start, stop):
        s = c.scene(kind)
        stem = out / f"{kind}-{i:06d}"
        Image.fromarray(s.image).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(s.caption)
    return stop - start


def write_folder(npz: Path, out: Path, per_kind: int, seed: int = 0, workers: int | None = None,
                 more_wearers: bool = False) -> int:
    """`per_kind` training scenes of every kind as PNG + .txt caption pairs, in parallel processes."""
    import os
    from multiprocessing import Pool

    out.mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(2000, per_kind))
    jobs = [(npz, out, kind, a, min(a + chunk, per_kind), seed, more_wearers)
            for kind in KINDS for a in range(0, per_kind, chunk)]
    with Pool(workers or os.cpu_count()) as pool:
        return sum(pool.imap_unordered(_write_part, jobs))


def load_folder(folder: Path, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(uint8 [N, 64, 64, 3] images, captions) of a folder write_folder made (sorted; the first `limit`)."""
    pngs = sorted(folder.glob("*.png"))
    if limit is not None and limit < len(pngs):
        pngs = [pngs[i] for i in np.linspace(0, len(pngs) - 1, limit).round().astype(int)]  # every kind
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    return images, [p.with_suffix(".txt").read_text() for p in pngs]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--per-kind", type=int, default=20000)
    ap.add_argument("--preview", type=Path, help="write an 8x8 grid of random scenes with their captions printed")
    ap.add_argument("--more-wearers", action="store_true",
                    help="wearing scenes also of 24 smiley faces (training only; the judge's prompts are unchanged)")
    args = ap.parse_args()
    emoji = Emoji(args.npz)
    if args.preview:
        c = Composer(emoji, 0, more_wearers=args.more_wearers)
        scenes = [c.scene(KINDS[i % len(KINDS)]) for i in range(64)]
        grid = np.concatenate([np.concatenate([s.image for s in scenes[r * 8:r * 8 + 8]], 1) for r in range(8)], 0)
        Image.fromarray(grid).save(args.preview)
        print("\n".join(s.caption for s in scenes))
    if args.out:
        print(f"wrote {write_folder(args.npz, args.out, args.per_kind, more_wearers=args.more_wearers)} scenes "
              f"to {args.out}")
