"""Captions of scenes: varied templates over the attributes, with synonyms, different word
orders and attributes left out, so that the text encoder learns words, not one sentence."""
from __future__ import annotations

import numpy as np

# Shape families: what most captions say about the shape. The exact shape (the ID label)
# is named in a minority of captions only, so the pre-trained model knows it coarsely and
# fine-tuning has a fine-grained task to learn.
FAMILIES = {"round": ("circle", "ring"), "curvy": ("crescent", "heart"),
            "angular": ("square", "triangle", "diamond"), "spiky": ("star", "plus", "cross")}
FAMILY_OF = {shape: fam for fam, shapes in FAMILIES.items() for shape in shapes}
# Probabilities of naming the shape exactly, by its family, or not at all ("a shape").
NOUN_EXACT, NOUN_FAMILY = 0.3, 0.55

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "plus": "pluses", "cross": "crosses", "star": "stars",
           "heart": "hearts", "ring": "rings", "crescent": "crescents",
           "shape": "shapes", "object": "objects"}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
STYLE_WORDS = {"photo": ("a photo of", "an image of", "a picture of"),
               "sketch": ("a sketch of", "a drawing of", "an outline drawing of"),
               "textured": ("a textured picture of", "a patterned image of"),
               "noisy": ("a noisy photo of", "a grainy picture of")}
BACKGROUND_WORDS = ("on a {} background", "against a {} backdrop", "over a {} background")
POSITION_WORDS = ("in the {}", "at the {}", "in the {} corner")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _empty_caption(scene: dict, rng: np.random.Generator) -> str:
    """A caption of a scene without objects (count 0): its background and, maybe, style."""
    background = _pick(rng, ("an empty {} background", "a bare {} backdrop",
                             "nothing but a {} background")).format(scene["background"])
    style = _pick(rng, STYLE_WORDS[scene["style"]]) if rng.random() >= 0.25 else None
    text = f"{style} {background}" if style else background
    return text[0].upper() + text[1:] + "."


def caption(scene: dict, rng: np.random.Generator, drop: float = 0.25,
            exact: float = NOUN_EXACT, family: float = NOUN_FAMILY) -> str:
    """One caption of the scene; each optional attribute is left out with probability drop.
    The shape is named exactly with probability ``exact``, by its family ("a round shape")
    with probability ``family``, else only as "a shape" / "an object". A scene without
    objects (count 0) is captioned by its background and style alone."""
    if scene["count"] == 0:
        return _empty_caption(scene, rng)
    def keep():
        return rng.random() >= drop

    count = scene["count"]
    r = rng.random()
    generic = _pick(rng, ("shape", "object"))
    noun = scene["shape"] if r < exact else generic
    noun = noun if count == 1 else PLURALS[noun]
    if exact <= r < exact + family:
        noun = f"{FAMILY_OF[scene['shape']]} {noun}"
    count_word = _pick(rng, COUNT_WORDS[count])
    if count_word == "a" and noun[0] in "aeiou":
        count_word = "an"
    adjectives = [w for w, k in ((_pick(rng, SIZE_WORDS[scene["size"]]), keep()),
                                 (scene["colour"], keep())) if k]
    if count_word in ("a", "an") and adjectives and adjectives[0][0] in "aeiou":
        count_word = "an"
    elif count_word == "an" and adjectives:
        count_word = "a"
    phrase = " ".join([count_word, *adjectives, noun])
    extras = []
    if count == 1 and keep():
        extras.append(_pick(rng, POSITION_WORDS).format(scene["position"]))
    if scene["style"] != "sketch" and keep():  # sketches are drawn on blank paper
        extras.append(_pick(rng, BACKGROUND_WORDS).format(scene["background"]))
    if rng.random() < 0.5:
        extras = extras[::-1]
    style = _pick(rng, STYLE_WORDS[scene["style"]]) if keep() else None
    form = int(rng.integers(3))
    if form == 0 or style is None:
        text = " ".join(([style] if style else []) + [phrase] + extras)
    elif form == 1:
        text = f"{style} {phrase}" + (", " + ", ".join(extras) if extras else "")
    else:
        text = phrase + (" " + " ".join(extras) if extras else "") + f", {style.split(' of')[0]}"
    return text[0].upper() + text[1:] + "."
