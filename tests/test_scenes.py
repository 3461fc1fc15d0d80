"""The embedded model's composed training scenes (recipes/tiny-emoji/scenes.py) and the judge's scoring rule
(judge.py), on a synthetic emoji table: accessories land where they belong, held-out combinations never reach
training, captions read as English, and a scene passes only when what it names is found."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "recipes" / "tiny-emoji"))
scenes = pytest.importorskip("scenes")
captions = pytest.importorskip("captions")


def blob(colour, box):
    """A 48x48 RGBA emoji: an opaque rectangle `box` (x0, y0, x1, y1) of one colour."""
    px = np.zeros((48, 48, 4), np.uint8)
    x0, y0, x1, y1 = box
    px[y0:y1, x0:x1] = colour + (255,)
    return px


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    names = list(scenes.WEARERS) + list(scenes.OBJECTS) + list(scenes.ACCESSORIES) + list(scenes.MORE_WEARERS)
    rgba, name, style = [], [], []
    for i, n in enumerate(names):
        # wearers: a red square face; accessories: a flat blue bar; other things: green, varied sizes
        face = n in scenes.WEARERS or n in scenes.MORE_WEARERS
        box = (8, 8, 40, 40) if face else (4, 18, 44, 30) if n in scenes.ACCESSORIES else (10 + i % 5, 10, 38, 38)
        colour = (255, 0, 0) if n in scenes.WEARERS else (0, 0, 255) if n in scenes.ACCESSORIES else (0, 200, i % 200)
        for s in scenes.STYLES:
            rgba.append(blob(colour, box))
            name.append(n)
            style.append(s)
    path = tmp_path_factory.mktemp("emoji") / "emoji.npz"
    np.savez(path, rgba=np.stack(rgba), name=np.array(name), keywords=np.array([""] * len(name)),
             style=np.array(style), held_out=np.zeros(len(name), bool))
    return scenes.Emoji(path)


def rows_of(im, channel):
    """Rows where the given colour channel dominates (the wearer is red, the accessory blue)."""
    a = np.asarray(im)
    mask = (a[..., channel] > 200) & (a[..., 3] > 0) & (a[..., [c for c in range(3) if c != channel]].max(-1) < 60)
    return np.flatnonzero(mask.any(1))


@pytest.mark.parametrize("wearer,accessory,where", [("cat face", "top hat", "hat"), ("cat face", "eyeglasses", "eyes"),
                                                    ("penguin", "eyeglasses", "eyes"), ("cat face", "scarf", "neck")])
def test_accessories_go_where_they_belong(emoji, wearer, accessory, where):
    im = scenes.wear(emoji, wearer, accessory, "flat", 40, mirror=False)
    face, acc = rows_of(im, 0), rows_of(im, 2)
    assert len(face) and len(acc)
    top, height = face[0], face[-1] - face[0] + 1
    centre = (acc[0] + acc[-1]) / 2
    if where == "hat":
        assert acc[0] < top, "a hat sticks out above the head"
        assert acc[-1] <= top + 0.35 * height, "and covers at most the top of it"
    elif where == "eyes":  # a penguin's eyes are near the top of its drawn box, a face's ~42% down
        assert abs(centre - (top + (0.2 if wearer == "penguin" else 0.42) * height)) <= 2
    else:
        assert centre >= top + 0.85 * height


def test_held_out_combinations_never_reach_training(emoji):
    assert scenes.held_out("cat face", "crown") == scenes.held_out("crown", "cat face")
    c = scenes.Composer(emoji, seed=3)
    for _ in range(300):
        s = c.wearing()
        assert not scenes.held_out(s.things[0], s.accessory)
        s = c.pair()
        assert not scenes.held_out(*s.things)
    prompts = scenes.held_out_prompts(emoji, 50)
    assert len(prompts) == 50 and {p.kind for p in prompts} == {"wearing", "pair"}
    assert all(scenes.held_out(p.things[0], p.accessory) if p.kind == "wearing" else scenes.held_out(*p.things)
               for p in prompts)
    assert len({p.caption for p in prompts}) > 40  # varied, not one template
    seen = scenes.held_out_prompts(emoji, 50, trained=True)  # the same phrasings over trained combinations
    assert len(seen) == 50 and {p.kind for p in seen} == {"wearing", "pair"}
    assert not any(scenes.held_out(p.things[0], p.accessory) if p.kind == "wearing" else scenes.held_out(*p.things)
                   for p in seen)


def test_captions_read_as_english(emoji):
    c = scenes.Composer(emoji, seed=5)
    texts = [c.wearing().caption for _ in range(300)]
    assert not any(f"a {w}" in t.split(",")[0] for t in texts for w in captions.PAIR_NOUNS)  # "wearing glasses"
    assert any(t.startswith(("a cat wearing", "a kitten wearing")) for t in texts)
    counts = [c.count() for _ in range(200)]
    assert all(s.caption.split(",")[0].split()[0] in ("two", "2") for s in counts if s.count == 2)
    assert [captions.plural(w) for w in ("apple", "fox", "puppy", "fish")] == ["apples", "foxes", "puppies", "fish"]
    pairs = [c.pair() for _ in range(200)]
    assert all(s.ordered == (" left" in s.caption or " right" in s.caption) for s in pairs)
    assert {s.kind for s in [c.place(), c.single()]} == {"place", "single"}


def test_pictures_vary_for_one_caption(emoji):
    c = scenes.Composer(emoji, seed=1)
    s = c.wearing()
    others = [c.again(s) for _ in range(4)]
    assert all(o.things == s.things and o.accessory == s.accessory for o in others)
    assert np.mean([np.abs(o.image.astype(int) - s.image).mean() for o in others]) > 5


def test_the_judge_passes_only_what_the_caption_names(monkeypatch, emoji):
    judge = pytest.importorskip("judge")
    c = scenes.Composer(emoji, seed=2)
    wear, pair = c.wearing(), c.pair()
    pair.ordered = True
    t_w, t_p = judge.labels(wear), judge.labels(pair)
    right = {"left": [t_w["left"], t_p["left"]], "right": [t_w["right"], t_p["right"]],
             "accessory": [t_w["accessory"], t_p["accessory"]], "count": [0, 0], "place": [0, 0]}

    def run(pred):
        monkeypatch.setattr(judge, "predict", lambda j, images: {k: np.array(v) for k, v in pred.items()})
        return judge.passes(None, [wear, pair], np.zeros((2, 64, 64, 3), np.uint8)).tolist()

    assert run(right) == [True, True]
    wrong_acc = {**right, "accessory": [(t_w["accessory"] + 1) % len(judge.ACCS), t_p["accessory"]]}
    assert run(wrong_acc) == [False, True]
    swapped = {**right, "left": [t_w["left"], t_p["right"]], "right": [t_w["right"], t_p["left"]]}
    assert run(swapped) == [True, False]  # the caption said which is on the left
    pair.ordered = False
    assert run(swapped) == [True, True]


@pytest.mark.parametrize("caption, accessory, drawn, ok", [
    ("a cat wearing a hat", "crown", "top hat", True),          # "a hat": any hat
    ("a cat wearing a hat", "crown", "sunglasses", False),
    ("a cat wearing a crown", "crown", "top hat", False),       # named: that one only
    ("a cat wearing a top hat", "top hat", "crown", False),     # "hat" in "top hat" is not the generic word
    ("kitten with glasses", "sunglasses", "goggles", True),     # "glasses": any eyewear
    ("kitten with sunglasses", "sunglasses", "eyeglasses", False),
    ("kitten with a scarf", "scarf", "ribbon", False),
])
def test_a_generic_accessory_word_allows_any_of_its_kind(caption, accessory, drawn, ok):
    judge = pytest.importorskip("judge")
    s = scenes.Scene("wearing", caption, ["cat face"], accessory=accessory)
    assert judge.accessory_ok(s, judge.ACCS.index(drawn)) is ok
    assert judge.accessory_ok(s, len(judge.ACCS)) is False  # none drawn


def test_more_wearers_wear_in_training_scenes_only(emoji):
    more = set(captions.MORE_WEARERS) & set(emoji.names)
    assert len(more) == 24
    c = scenes.Composer(emoji, seed=4, more_wearers=True)
    worn = [c.wearing() for _ in range(400)]
    extra = [s for s in worn if s.things[0] in more]
    assert 0.3 < len(extra) / len(worn) < 0.7  # about half: 24 smileys beside the 21 wearers
    assert all(s.caption.split(" wearing")[0].split(" with")[0].split(" in ")[0].removeprefix("a picture of ")
               .removeprefix("an ").removeprefix("a ") in captions.MORE_WEARERS[s.things[0]] for s in extra)
    assert not any(t in more for _ in range(200) for t in c.pair().things)  # pairs keep their things
    plain = scenes.Composer(emoji, seed=4)
    assert not any(plain.wearing().things[0] in more for _ in range(200))  # and by default none at all
    assert not any(s.things[0] in more for s in scenes.held_out_prompts(emoji, 100))
