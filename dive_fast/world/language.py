"""Captions of scenes: varied templates over the attributes, with synonyms, different word
orders and attributes left out, so that the text encoder learns words, not one sentence."""
from __future__ import annotations

import numpy as np

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


def caption(scene: dict, rng: np.random.Generator, drop: float = 0.25) -> str:
    """One caption of the scene; each optional attribute is left out with probability drop."""
    def keep():
        return rng.random() >= drop

    count = scene["count"]
    noun = scene["shape"] if rng.random() >= 0.1 else _pick(rng, ("shape", "object"))
    noun = noun if count == 1 else PLURALS[noun]
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
