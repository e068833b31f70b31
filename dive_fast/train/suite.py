"""The paper's zero-shot suite (``--task zeroshot:NAME:PATH``, ``--zeroshot-suite paper
DIR``): each set read from its usual on-disk layout (torchvision's, which CLIP_benchmark
reads too), scored over CLIP_benchmark's class names with its templates.

Class names and templates are the ``clip_benchmark`` package's
(``clip_benchmark/datasets/en_classnames.json``, ``en_zeroshot_classification_templates.json``,
read as package data: its dataset builder, with its heavy imports, is never imported); it is
the optional extra ``suite`` (``pip install 'dive_fast[suite]'``, or ``pip install --no-deps
clip_benchmark``: only its data files are read). Labels follow CLIP_benchmark's reading of
each layout: Caltech101 and EuroSAT by sorted class folder (all images: neither has an
official test split), Oxford Pets and Flowers102 by the release's own test split and class
numbers; Food101, DTD and FGVC-Aircraft by their test split, with the class names their own
files give (as CLIP_benchmark takes them from torchvision). SUN397, StanfordCars and UCF101
are refused by name, saying the layout they need."""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from . import listing
from .data import ImageFolderTask
from .listing import IMAGE_EXTENSIONS
from .protocol import check_templates

log = logging.getLogger(__name__)

# NAME -> (CLIP_benchmark's key, its layout, its usual folder names under a --zeroshot-suite DIR)
READ = {
    "caltech101": ("caltech101", "caltech101/101_ObjectCategories/<category>/*.jpg "
                   "(torchvision's; all 102 category folders, BACKGROUND_Google included)",
                   ("caltech101", "caltech-101")),
    "flowers102": ("flowers", "flowers-102/jpg/image_00001.jpg ... with imagelabels.mat and "
                   "setid.mat beside jpg/ (torchvision's; its test split)",
                   ("flowers-102", "flowers102")),
    "food101": ("food101", "food-101/images/<class>/<id>.jpg with meta/test.json "
                "(torchvision's; its test split)", ("food-101", "food101")),
    "dtd": ("dtd", "dtd/images/<class>/*.jpg with labels/test1.txt (torchvision's; test "
            "split 1)", ("dtd",)),
    "fgvc-aircraft": ("fgvc_aircraft", "fgvc-aircraft-2013b/data/images/<id>.jpg with "
                      "data/variants.txt and data/images_variant_test.txt (torchvision's; "
                      "its test split, the 100 variants)",
                      ("fgvc-aircraft-2013b", "fgvc-aircraft")),
    "oxford-pets": ("pets", "oxford-iiit-pet/images/*.jpg with annotations/test.txt "
                    "(torchvision's; its test split)", ("oxford-iiit-pet", "oxford-pets")),
    "eurosat": ("eurosat", "eurosat/2750/<class>/*.jpg (torchvision's; the 10 class folders)",
                ("eurosat",)),
}
# The paper's other sets: their layout, refused until it is read (a plain class-folder
# reading would mix their train and test images or take the wrong names).
NOT_READ = {
    "sun397": "SUN397/<letter>/<class>/*.jpg with ClassName.txt (CLIP_benchmark reads all "
              "of its images, torchvision's SUN397)",
    "stanford-cars": "stanford_cars/cars_test/*.jpg with devkit/cars_meta.mat and "
                     "cars_test_annos_withlabels.mat",
    "ucf101": "UCF-101-midframes/<class>/*.jpg (CoOp's middle frames; CLIP_benchmark has no "
              "UCF101)",
}
PAPER = ("caltech101", "flowers102", "food101", "sun397", "dtd", "fgvc-aircraft",
         "stanford-cars", "oxford-pets", "eurosat", "ucf101")
ALIASES = {"flowers": "flowers102", "pets": "oxford-pets", "oxfordpets": "oxford-pets",
           "fgvc_aircraft": "fgvc-aircraft", "cars": "stanford-cars",
           "stanfordcars": "stanford-cars"}


def suite_name(name: str) -> str | None:
    """The suite set a --task NAME means (READ or NOT_READ), or None."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in READ or key in NOT_READ else None


@functools.cache
def clip_benchmark_data(file: str) -> dict:
    from importlib import resources
    try:
        return json.loads((resources.files("clip_benchmark.datasets") / file).read_text("utf-8"))
    except (ImportError, OSError) as exc:
        raise RuntimeError(f"the zero-shot suite's class names and templates come from the "
                           f"clip_benchmark package ({file} cannot be read: {exc}); pip install "
                           "'dive_fast[suite]' (or pip install --no-deps clip_benchmark)") from None


def templates_of(key: str) -> tuple:
    listed = clip_benchmark_data("en_zeroshot_classification_templates.json")[key]
    templates = tuple(t.replace("{c}", "{}") for t in listed)  # its templates say {c}
    check_templates(templates, f"clip_benchmark's {key} templates")
    return templates


def names_and_templates(key: str) -> tuple[tuple, tuple]:
    return tuple(clip_benchmark_data("en_classnames.json")[key]), templates_of(key)


def _refuse(name: str, root: Path, what: str):
    raise ValueError(f"{root} is not {name}'s layout ({what}); expected {READ[name][1]}")


def _inside(root: Path, child: str) -> Path | None:
    """``root/child`` or ``root`` itself when it is that folder."""
    return root / child if (root / child).is_dir() else root if root.name == child else None


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir()
                  if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))


def _by_class_folder(name, root: Path, top: str, count: int) -> list:
    """Samples of ``count`` class folders under ``top``, labelled in sorted folder order."""
    found = _inside(root, top) or _inside(root / name, top)
    if found is None:
        _refuse(name, root, f"no {top}/ folder")
    folders = _folders(found)
    if len(folders) != count:
        _refuse(name, root, f"{len(folders)} class folders in {found}, not {count}")
    return [(f, k) for k, d in enumerate(folders) for f in _images(d)]


def _pets(root: Path) -> list:
    split = root / "annotations" / "test.txt"
    if not split.is_file():
        _refuse("oxford-pets", root, f"no {split}")
    samples = []
    for line in split.read_text().splitlines():
        if line.strip():
            image_id, class_id, *_ = line.split()
            samples.append((root / "images" / f"{image_id}.jpg", int(class_id) - 1))
    return samples


def _flowers(root: Path) -> list:
    if not all((root / f).is_file() for f in ("imagelabels.mat", "setid.mat")):
        _refuse("flowers102", root, "no imagelabels.mat and setid.mat")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise RuntimeError(f"{root}: Flowers102's labels are MATLAB files, read with scipy "
                           "(pip install scipy)") from None
    labels = loadmat(root / "imagelabels.mat")["labels"].reshape(-1)
    test = loadmat(root / "setid.mat")["tstid"].reshape(-1)
    return [(root / "jpg" / f"image_{int(i):05d}.jpg", int(labels[int(i) - 1]) - 1) for i in test]


def _split_lines(name: str, file: Path) -> list[str]:
    if not file.is_file():
        _refuse(name, file.parents[1], f"no {file}")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _food101(root: Path) -> tuple[list, tuple]:
    """torchvision's Food101: classes the sorted keys of meta/test.json; names with spaces
    for underscores (CLIP_benchmark's)."""
    split = root / "meta" / "test.json"
    if not split.is_file():
        _refuse("food101", root, f"no {split}")
    listed = json.loads(split.read_text())
    classes = sorted(listed)
    samples = [(root / "images" / f"{rel}.jpg", k) for k, c in enumerate(classes)
               for rel in listed[c]]
    return samples, tuple(c.replace("_", " ") for c in classes)


def _dtd(root: Path) -> tuple[list, tuple]:
    """torchvision's DTD: classes the sorted class folders named in labels/test1.txt."""
    files = [line.split("/") for line in _split_lines("dtd", root / "labels" / "test1.txt")]
    classes = sorted({c for c, _ in files})
    index = {c: k for k, c in enumerate(classes)}
    return [(root / "images" / c / f, index[c]) for c, f in files], tuple(classes)


def _aircraft(root: Path) -> tuple[list, tuple]:
    """torchvision's FGVCAircraft (variants): classes in data/variants.txt's order."""
    data = root / "data"
    classes = _split_lines("fgvc-aircraft", data / "variants.txt")
    index = {c: k for k, c in enumerate(classes)}
    samples = []
    for line in _split_lines("fgvc-aircraft", data / "images_variant_test.txt"):
        image, variant = line.split(" ", 1)
        if variant not in index:
            _refuse("fgvc-aircraft", root, f"variant {variant!r} is not in variants.txt")
        samples.append((data / "images" / f"{image}.jpg", index[variant]))
    return samples, tuple(classes)


FILE_NAMED = {"food101": _food101, "dtd": _dtd, "fgvc-aircraft": _aircraft}  # names: files'


class SuiteSet(ImageFolderTask):
    """One set of the suite: its samples from the release's layout, CLIP_benchmark's names
    and templates (``templates`` overrides them); reads as an ``ImageFolderTask``."""

    def __init__(self, name: str, root, transform, templates=None):
        key = suite_name(name)
        root = Path(root)
        if key in NOT_READ:
            raise ValueError(f"{key}'s layout ({NOT_READ[key]}) is not read yet; give "
                             "it as a class-folder tree of its test images under another NAME "
                             "with a classnames.txt")
        if not root.is_dir():
            raise FileNotFoundError(f"{key}: folder not found: {root}")
        if key in FILE_NAMED:
            samples, self.classnames = FILE_NAMED[key](root)
            default = templates_of(READ[key][0])
        else:
            self.classnames, default = names_and_templates(READ[key][0])
        if key == "caltech101":
            samples = _by_class_folder(key, root, "101_ObjectCategories",
                                       len(self.classnames))
        elif key == "eurosat":
            samples = _by_class_folder(key, root, "2750", len(self.classnames))
        elif key == "oxford-pets":
            samples = _pets(root)
        elif key == "flowers102":
            samples = _flowers(root)
        bad = sorted({label for _, label in samples if not 0 <= label < len(self.classnames)})
        if bad:
            _refuse(key, root, f"class numbers {bad[:5]} outside its "
                                    f"{len(self.classnames)} classes")
        if not samples:
            _refuse(key, root, "no images listed")
        self.samples = samples
        self.templates = tuple(templates or default)
        self.head_classes = self.projection = None
        self.imagenet, self.crop_border = False, 0
        self.transform = transform


def with_suite(tasks: list[str], suite: str, root, arg: str = "--zeroshot-suite") -> list[str]:
    """``--task`` entries and, after them, a ``zeroshot`` entry for each set of the suite
    found under DIR by its usual folder name; the sets absent, or present in a layout not
    read yet, are named in the log."""
    if suite != "paper":
        raise ValueError(f"{arg} {suite}: the one suite is 'paper' (its ten sets)")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{arg} {suite} {root}: folder not found")
    taken = {suite_name(spec.partition(":")[2].partition(":")[0].strip()) for spec in tasks}
    tasks, absent = list(tasks), []
    for name in PAPER:
        folders = READ[name][2] if name in READ else ()
        found = next((root / f for f in folders if (root / f).is_dir()), None)
        if name in taken:
            continue
        if found is None:
            absent.append(name if name in READ else f"{name} (layout not read yet)")
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
