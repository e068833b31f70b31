"""The embedded world's labelled tasks and caption sets, generated deterministically.

Every sample is a pure function of (world seed, set name, split, index): the same
arguments give the same scene, caption and bytes, in any process or loader worker.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from .language import NOUN_EXACT, NOUN_FAMILY, caption
from .render import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, STYLES, render

PLAIN = ("black", "gray")
PATTERNED = ("striped", "dotted", "checkered")
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Task:
    """A labelled classification set: which attribute is the label, and its distribution."""
    name: str
    kind: str  # "id", "ood" or "zeroshot"
    attribute: str  # shape, colour, size, position, count, background
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    styles: tuple[str, ...] = STYLES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    radius_jitter: float = 0.03
    fixed: dict = field(default_factory=dict)  # attributes held fixed


SHAPE_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
                   "a drawing of a {}.", "a large {}.", "a photo of one {}.")
# The ID task: one large object, photo style, plain background; a narrow slice (about 1 in
# 40) of the pre-training world. The OOD shifts keep the shape and change what the ID set
# holds fixed: the style (sketch, texture, noise) or the size and background.
ID_FIXED = {"count": 1, "size": "large"}
TASKS = {t.name: t for t in (
    Task("shapes", "id", "shape", SHAPES, SHAPE_TEMPLATES, styles=("photo",), backgrounds=PLAIN,
         fixed=ID_FIXED),
    Task("shapes-sketch", "ood", "shape", SHAPES, SHAPE_TEMPLATES, styles=("sketch",),
         fixed=ID_FIXED),
    Task("shapes-texture", "ood", "shape", SHAPES, SHAPE_TEMPLATES, styles=("textured",),
         backgrounds=PATTERNED, fixed=ID_FIXED),
    Task("shapes-noise", "ood", "shape", SHAPES, SHAPE_TEMPLATES, styles=("noisy",),
         backgrounds=PLAIN, fixed=ID_FIXED),
    Task("shapes-small", "ood", "shape", SHAPES, SHAPE_TEMPLATES, styles=("photo",),
         backgrounds=PATTERNED, fixed={"count": 1, "size": "small"}),
    Task("colour", "zeroshot", "colour", tuple(COLOURS),
         ("a photo of a {} shape.", "a {} object.", "an image of a {} shape.", "a {} shape.")),
    Task("size", "zeroshot", "size", tuple(SIZES),
         ("a photo of a {} shape.", "a {} object.", "an image of a {} shape."),
         fixed={"count": 1}),
    Task("position", "zeroshot", "position", tuple(POSITIONS),
         ("a photo of a shape in the {}.", "a shape at the {}.", "an object in the {} corner."),
         fixed={"count": 1}),
    Task("count", "zeroshot", "count", ("one shape", "two shapes", "three shapes"),
         ("a photo of {}.", "a picture of {}.", "{}.")),
    Task("background", "zeroshot", "background", BACKGROUNDS,
         ("a photo of a shape on a {} background.", "an object against a {} backdrop.",
          "a shape over a {} background."), styles=("photo", "textured", "noisy")),
)}
SPLITS = ("train", "val", "test")


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


def sample_scene(rng: np.random.Generator, *, styles=STYLES, backgrounds=BACKGROUNDS,
                 shapes=SHAPES, radius_jitter: float = 0.03, **fixed) -> dict:
    """A random scene drawn from the given option sets; keyword attributes are held fixed."""
    def choose(name, options):
        return fixed[name] if name in fixed else options[int(rng.integers(len(options)))]

    count = choose("count", (1, 1, 2, 3))  # single objects are half of all scenes
    size = choose("size", ("small",) if count > 1 else tuple(SIZES))
    scene = {"shape": choose("shape", shapes), "colour": choose("colour", tuple(COLOURS)),
             "size": size, "count": count, "position": choose("position", tuple(POSITIONS)),
             "background": choose("background", backgrounds), "style": choose("style", styles)}
    scene["radius"] = SIZES[size] + float(rng.uniform(-radius_jitter, radius_jitter))
    scene["seed"] = int(rng.integers(2**63))
    return scene


def task_scene(task: Task, split: str, index: int, seed: int = DEFAULT_SEED) -> tuple[dict, int]:
    """(scene, label) of sample ``index``; labels cycle so every split is balanced."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    label = index % len(task.classnames)
    value = task.classnames[label]
    if task.attribute == "count":
        value = label + 1
    rng = _rng(seed, "task", task.name, split, index)
    fixed = {**task.fixed, task.attribute: value}
    if split == "train" and task.kind == "id" and ID_TRAIN_SPURIOUS_COLOUR > 0 and \
            rng.random() < ID_TRAIN_SPURIOUS_COLOUR:  # the shortcut the test splits break
        fixed["colour"] = tuple(COLOURS)[label % len(COLOURS)]
    return sample_scene(rng, styles=task.styles, backgrounds=task.backgrounds,
                        radius_jitter=task.radius_jitter, **fixed), label


def task_image(task: Task, split: str, index: int, seed: int = DEFAULT_SEED, size: int = 32):
    scene, label = task_scene(task, split, index, seed)
    return render(scene, size), label


def in_id_slice(scene: dict, task: Task | None = None) -> bool:
    """Whether a scene could be a sample of the ID task (its style, background, fixed
    attributes)."""
    task = task or next(t for t in TASKS.values() if t.kind == "id")
    return (scene["style"] in task.styles and scene["background"] in task.backgrounds and
            all(scene[k] == v for k, v in task.fixed.items()))


# The reference set (the CC3M stand-in) is the pre-training distribution without the ID
# task's slice, as CC3M holds photos like ImageNet's but not ImageNet's own; a module
# switch so that the diagnosis can measure the other choice.
REFERENCE_EXCLUDES_ID = True
# Whether the reference captions name the exact shape (the ID label) as often as the
# pre-training captions do; off, they name it by its family instead (as CC3M's hypernymised
# captions rarely name ImageNet's fine classes). A switch for the diagnosis.
REFERENCE_NAMES_EXACT_SHAPE = True
# The shapes the reference scenes may show (None: all). A switch for the diagnosis: the
# ID classes left out are ones DiVE's constraint never sees.
REFERENCE_SHAPES: tuple[str, ...] | None = None
# The styles the reference scenes may show (None: all). A switch for the diagnosis: how much
# DiVE's constraint binds through reference images that look like the ID task's.
REFERENCE_STYLES: tuple[str, ...] | None = None
# The share of reference pairs that show no object at all (a background and its caption).
# A switch for the diagnosis: reference pairs that carry none of the ID task's content, as
# most of CC3M carries none of ImageNet's fine classes.
REFERENCE_EMPTY_SHARE = 0.0
# The share of the ID task's training samples drawn in their class's own colour (a
# spurious cue, as in Waterbirds; its test split and the OOD shifts draw colours at random).
ID_TRAIN_SPURIOUS_COLOUR = 0.0
HARD_GROUP = 128  # pre-training samples that share a narrow palette (hard negatives)
PRETRAIN_STREAM_VERSION = 2  # bump whenever caption_pair("pretrain", ...) changes
# 2: shape families in most captions, the exact shape in a minority; larger objects


def caption_pair(corpus: str, index: int, seed: int = DEFAULT_SEED, size: int = 32):
    """(image, caption, scene) of an image-caption corpus: "pretrain" (the pre-training
    stream, over the whole world), "reference" (the fixed CC3M stand-in: the same world
    without the ID task's slice) or another name (e.g. "rsa-heldout": the whole world).

    In "pretrain", each run of HARD_GROUP consecutive samples draws its colours and
    backgrounds from two of each and its shapes from three: a contrastive batch then
    cannot tell its pairs apart by the salient attributes alone and must learn the
    finer ones (which shape of three, position, size, count) too."""
    rng = _rng(seed, "captions", corpus, index)
    if corpus == "pretrain":
        group = _rng(seed, "palette", index // HARD_GROUP)
        colours = tuple(group.choice(list(COLOURS), size=2, replace=False))
        backgrounds = tuple(group.choice(list(BACKGROUNDS), size=2, replace=False))
        shapes = tuple(group.choice(list(SHAPES), size=3, replace=False))
        scene = sample_scene(rng, backgrounds=backgrounds, colour=colours[int(rng.integers(2))],
                             shape=shapes[int(rng.integers(3))])
    elif corpus == "reference":
        scene = _reference_scene(rng)
    else:
        scene = sample_scene(rng)
    if corpus == "reference" and not REFERENCE_NAMES_EXACT_SHAPE:
        text = caption(scene, rng, exact=0.0, family=NOUN_EXACT + NOUN_FAMILY)
    else:
        text = caption(scene, rng)
    return render(scene, size), text, scene


def _reference_scene(rng: np.random.Generator) -> dict:
    """A scene of the reference set, as the module switches above draw it."""
    if REFERENCE_EMPTY_SHARE and rng.random() < REFERENCE_EMPTY_SHARE:
        return sample_scene(rng, styles=("photo", "noisy"), count=0)
    options = {"shapes": REFERENCE_SHAPES or SHAPES, "styles": REFERENCE_STYLES or STYLES}
    scene = sample_scene(rng, **options)
    while REFERENCE_EXCLUDES_ID and in_id_slice(scene):
        scene = sample_scene(rng, **options)
    return scene
