"""The words of the embedded model's captions: what each emoji, accessory and style is called, in the
phrasings people use, and the caption templates of each kind of scene (scenes.py composes the pictures).
A fifth of wearing captions say only the generic word ("a cat wearing a hat"), which any hat satisfies
(`accessories_named`, the judge's rule)."""

import random
import re

STYLES = {"cartoon": ["cartoon", "cartoon style"], "flat": ["flat", "flat style", "flat vector"],
          "3d": ["3d", "3d style", "3d render"]}
# emoji name -> the words people use for it (the first is the judge's label word)
WEARERS = {
    "cat face": ["cat", "kitten", "kitty"], "dog face": ["dog", "puppy"], "bear face": ["bear", "brown bear"],
    "panda face": ["panda"], "rabbit face": ["rabbit", "bunny"], "mouse face": ["mouse"],
    "hamster face": ["hamster"], "tiger face": ["tiger"], "lion face": ["lion"], "cow face": ["cow"],
    "pig face": ["pig", "piggy"], "frog face": ["frog"], "monkey face": ["monkey"], "koala": ["koala"],
    "unicorn face": ["unicorn"], "penguin": ["penguin"], "owl": ["owl"], "chicken": ["chicken", "hen"],
    "grinning face": ["smiley", "smiling face", "happy face"], "robot face": ["robot"],
    "extraterrestrial alien": ["alien"]}
# round smiley faces that wear hats and glasses where "grinning face" does: more wearers per accessory for
# training only (scenes.py --more-wearers; never in the judge's prompts), "an angry face" or "an angry smiley"
MORE_WEARERS = {n: [n, n.replace(" face", " smiley")] for n in (
    "angry face", "anguished face", "astonished face", "confounded face", "confused face", "crying face",
    "disappointed face", "dizzy face", "expressionless face", "fearful face", "flushed face", "grimacing face",
    "hushed face", "kissing face", "neutral face", "pensive face", "relieved face", "slightly smiling face",
    "smirking face", "winking face", "worried face", "pouting face", "persevering face", "unamused face")}
OBJECTS = {
    "red apple": ["apple", "red apple"], "banana": ["banana"], "pear": ["pear"], "strawberry": ["strawberry"],
    "lemon": ["lemon"], "tangerine": ["orange", "tangerine"], "carrot": ["carrot"], "watermelon": ["watermelon"],
    "slice of pizza": ["pizza", "slice of pizza"], "doughnut": ["doughnut", "donut"], "birthday cake": ["cake"],
    "rocket": ["rocket"], "automobile": ["car"], "airplane": ["plane", "airplane"], "bicycle": ["bicycle", "bike"],
    "sailboat": ["sailboat", "boat"], "house building": ["house"], "deciduous tree": ["tree"],
    "evergreen tree": ["pine tree", "fir tree"], "cactus": ["cactus"], "mushroom": ["mushroom"],
    "sunflower": ["sunflower", "flower"], "tulip": ["tulip"], "balloon": ["balloon"], "soccer ball": ["ball", "football"],
    "white medium star": ["star"], "umbrella": ["umbrella"], "snowman without snow": ["snowman"],
    "butterfly": ["butterfly"], "snail": ["snail"], "turtle": ["turtle"], "fish": ["fish"], "whale": ["whale"],
    "duck": ["duck"], "polar bear": ["polar bear"]}
# accessory emoji -> (where it goes, words)
ACCESSORIES = {
    "top hat": ("hat", ["top hat", "tall black hat"]), "womans hat": ("hat", ["sun hat", "summer hat"]),
    "billed cap": ("hat", ["cap", "baseball cap"]), "graduation cap": ("hat", ["graduation cap", "mortarboard"]),
    "crown": ("hat", ["crown", "golden crown"]), "rescue worker’s helmet": ("hat", ["helmet", "hard hat"]),
    "eyeglasses": ("eyes", ["glasses", "eyeglasses", "spectacles"]), "sunglasses": ("eyes", ["sunglasses", "shades"]),
    "goggles": ("eyes", ["goggles"]), "ribbon": ("bow", ["bow", "ribbon"]), "scarf": ("neck", ["scarf"])}
GENERIC = {"hat": "hat", "eyes": "glasses"}  # "a cat wearing a hat": any hat
NUMBERS = {1: ["a", "one"], 2: ["two", "2"], 3: ["three", "3"]}
IRREGULAR = {"mouse": "mice", "fish": "fish", "cactus": "cacti", "sheep": "sheep", "puppy": "puppies",
             "butterfly": "butterflies", "strawberry": "strawberries", "kitty": "kitties", "piggy": "piggies",
             "slice of pizza": "slices of pizza", "snowman": "snowmen", "pine tree": "pine trees", "fir tree": "fir trees"}


def plural(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    return word + "s"


PAIR_NOUNS = {"glasses", "eyeglasses", "spectacles", "sunglasses", "shades", "goggles"}  # no "a"


def article(word: str) -> str:
    if word in PAIR_NOUNS:
        return word
    return ("an " if word[0] in "aeiou" else "a ") + word


def words(name: str, rng: random.Random) -> str:
    table = WEARERS.get(name) or OBJECTS.get(name) or MORE_WEARERS.get(name) or [name]
    return rng.choice(table)


def style_suffix(rng: random.Random, style: str) -> str:
    return f", {rng.choice(STYLES[style])}" if rng.random() < 0.3 else ""


def accessories_named(s) -> set[str]:
    """The accessories a wearing scene's caption (s: a scenes.Scene) allows: its own when the caption names it ("a top hat",
    "shades"), every one worn in the same place when it says only the generic word ("a cat wearing a hat":
    any hat; "with glasses": any eyewear)."""
    where, names = ACCESSORIES[s.accessory]
    said = lambda w: re.search(rf"\b{re.escape(w)}\b", s.caption) is not None  # noqa: E731
    if where in GENERIC and not any(said(n) for n in names if n != GENERIC[where]) and said(GENERIC[where]):
        return {a for a, (w, _) in ACCESSORIES.items() if w == where}
    return {s.accessory}


def wearing_caption(rng: random.Random, wearer: str, accessory: str, style: str) -> str:
    s = words(wearer, rng)
    where, names = ACCESSORIES[accessory]
    a = GENERIC[where] if where in GENERIC and rng.random() < 0.2 else rng.choice(names)
    text = rng.choice([f"{article(s)} wearing {article(a)}", f"{s} with {article(a)}", f"{article(s)} in {article(a)}",
                       f"{s} wearing {article(a)}", f"{article(s)} with {article(a)}", f"{article(s)} wearing {a}",
                       f"a picture of {article(s)} wearing {article(a)}"])
    return text + style_suffix(rng, style)


def pair_caption(rng: random.Random, left: str, right: str, style: str) -> str:
    a, b = article(words(left, rng)), article(words(right, rng))
    text = rng.choice([f"{a} next to {b}", f"{a} and {b}", f"{a} beside {b}", f"{a} on the left and {b} on the right",
                       f"{b} on the right and {a} on the left", f"{b} to the right of {a}", f"{a} to the left of {b}"])
    return text + style_suffix(rng, style)


def count_caption(rng: random.Random, name: str, n: int, style: str) -> str:
    w = words(name, rng)
    return (article(w) if n == 1 else f"{rng.choice(NUMBERS[n])} {plural(w)}") + style_suffix(rng, style)
