"""The paper's zero-shot suite (``--task zeroshot:NAME:PATH``, ``--zeroshot-suite paper
DIR``): its ten sets, each read from its folder in one of two layouts, and scored with
CLIP_benchmark's templates (UCF101's: OpenAI CLIP's, shipped in ``suite_templates/``).

Where the folder holds CoOp's split file (``split_zhou_<Name>.json``, ``COOP``), the
layout the papers evaluate in, its "test" list and labels are read (``coop_split``); else
the release's own layout, as CLIP_benchmark reads it (``suite_releases``). Class names
are CLIP_benchmark's (package data of the optional extra ``suite``: ``pip install
'dive_fast[suite]'``, or ``pip install --no-deps clip_benchmark``; its dataset builder is
never imported), mapped onto a split file's labels through the release's own files where
they are beside it; UCF101's are its split file's."""
from __future__ import annotations

import logging
from pathlib import Path

from . import listing
from .coop_split import read_test
from .data import ImageFolderTask
from .protocol import check_templates
from .suite_releases import COOP, READ, RELEASE, clip_benchmark_data, refuse, release_namer

log = logging.getLogger(__name__)

PAPER = ("caltech101", "flowers102", "food101", "sun397", "dtd", "fgvc-aircraft",
         "stanford-cars", "oxford-pets", "eurosat", "ucf101")
ALIASES = {"flowers": "flowers102", "pets": "oxford-pets", "oxfordpets": "oxford-pets",
           "fgvc_aircraft": "fgvc-aircraft", "cars": "stanford-cars",
           "stanfordcars": "stanford-cars", "oxford_pets": "oxford-pets",
           "oxford_flowers": "flowers102", "stanford_cars": "stanford-cars"}
# OpenAI CLIP's UCF101 templates (CLIP_benchmark has no UCF101), shipped as package data
UCF101_TEMPLATES = Path(__file__).parent / "suite_templates" / "ucf101.txt"


def suite_name(name: str) -> str | None:
    """The suite set a --task NAME means, or None."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in READ else None


def templates_of(name: str) -> tuple:
    """CLIP_benchmark's templates of a set; UCF101's, OpenAI CLIP's (the file shipped)."""
    if name == "ucf101":
        lines = UCF101_TEMPLATES.read_text("utf-8").splitlines()
        templates = tuple(t for t in lines if t.strip() and not t.startswith("#"))
        source = str(UCF101_TEMPLATES)
    else:
        listed = clip_benchmark_data("en_zeroshot_classification_templates.json")[READ[name][0]]
        templates = tuple(t.replace("{c}", "{}") for t in listed)  # its templates say {c}
        source = f"clip_benchmark's {READ[name][0]} templates"
    check_templates(templates, source)
    return templates


def coop_split_file(name: str, root: Path) -> Path | None:
    """CoOp's split file of a set in its folder ``root``, if it is there."""
    file = root / COOP[name][0] if name in COOP else None
    return file if file is not None and file.is_file() else None


def _coop(name: str, root: Path, file: Path) -> tuple[list, tuple]:
    image_dir = root / COOP[name][1]
    namer = release_namer(name, root, image_dir)
    if namer is None and name not in ("food101", "dtd", "ucf101"):
        log.info("%s: the release's own class files are not beside %s; its class names are "
                 "used", root, file.name)
    return read_test(file, image_dir, namer)


class SuiteSet(ImageFolderTask):
    """One set of the suite: its samples from CoOp's split file where the folder holds it,
    else from the release's layout; CLIP_benchmark's names and templates where it has them
    (``templates`` overrides them); reads as an ``ImageFolderTask``."""

    def __init__(self, name: str, root, transform, templates=None):
        key = suite_name(name)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{key}: folder not found: {root}")
        split = coop_split_file(key, root)
        if split is not None:
            samples, self.classnames = _coop(key, root, split)
        elif key == "ucf101":
            raise ValueError(f"{root}: ucf101 is read from CoOp's split file; expected "
                             f"{COOP[key][0]} in it, beside UCF-101-midframes/")
        else:
            samples, self.classnames = RELEASE[key](root)
        bad = sorted({label for _, label in samples if not 0 <= label < len(self.classnames)})
        if bad:
            refuse(key, root, f"class numbers {bad[:5]} outside its "
                               f"{len(self.classnames)} classes")
        if not samples:
            refuse(key, root, "no images listed")
        self.samples = samples
        self.templates = tuple(templates or templates_of(key))
        self.head_classes = self.projection = None
        self.imagenet, self.crop_border = False, 0
        self.transform = transform


def _found(name: str, root: Path) -> Path | None:
    """The set's folder under a suite's DIR: one holding CoOp's split file first (the
    papers' test lists), else the first of its usual names there."""
    present = [root / f for f in READ[name][2] if (root / f).is_dir()]
    return next((p for p in present if coop_split_file(name, p)), present[0] if present else None)


def with_suite(tasks: list[str], suite: str, root, arg: str = "--zeroshot-suite") -> list[str]:
    """``--task`` entries and, after them, a ``zeroshot`` entry for each set of the suite
    found under DIR by its usual folder name; the sets absent are named in the log."""
    if suite != "paper":
        raise ValueError(f"{arg} {suite}: the one suite is 'paper' (its ten sets)")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{arg} {suite} {root}: folder not found")
    taken = {suite_name(spec.partition(":")[2].partition(":")[0].strip()) for spec in tasks}
    tasks, absent = list(tasks), []
    for name in PAPER:
        if name in taken:
            continue
        found = _found(name, root)
        if found is None:
            absent.append(name)
        else:
            tasks.append(f"zeroshot:{name}:{found}")
    if len(absent) == len(PAPER):
        raise ValueError(f"{arg} {suite} {root}: none of the suite's sets is there (usual "
                         f"folders: {', '.join(f for v in READ.values() for f in v[2])})")
    if absent:
        log.warning("%s %s %s: not evaluated: %s", arg, suite, root, "; ".join(absent))
    return tasks


def eval_dataset(path, transform, preset=None, templates=None):
    """A ``--task`` folder as its NAME reads it: a suite set (``SuiteSet``), else an
    ``ImageFolderTask`` (with ImageNet's presets) of the run's listing of the folder."""
    if preset is not None and suite_name(preset):
        return SuiteSet(preset, path, transform, templates)
    return ImageFolderTask(path, transform, templates=templates, preset=preset,
                           listing=listing.folder(path))
