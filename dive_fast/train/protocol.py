"""The standard sets' protocol: which classes an image folder holds and how its folders map
to labels, ImageNet's class names and prompt templates, and the ``--task`` presets.

Sources (nothing here is typed by hand): ImageNet-1k's 1000 WordNet IDs in class order and
the 200-class subsets of ImageNet-R and ImageNet-A with their indices are timm's
(``timm/data/_info/``: imagenet_synsets.txt, imagenet_{r,a}_{synsets,indices}.txt); the
class names and the prompt templates are open_clip's (``open_clip.zero_shot_metadata``:
``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``, ``SIMPLE_IMAGENET_TEMPLATES``).
timm is one of open_clip's own requirements. ObjectNet's map to ImageNet is shipped by no
installed package: it is read from the release's own ``mappings`` folder.

A subset (ImageNet-R, -A, ObjectNet, or any folder of some ImageNet IDs) is scored over
its own classes with projected logits, as WiSE-FT's and FLYP's code does: the 1000-way
head restricted to the subset's ImageNet indices (``FolderClasses.projection``).
"""
from __future__ import annotations

import functools
import logging
import pkgutil
import re
import string
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WNID = re.compile(r"n\d{8}")
TEMPLATE_SETS = ("openai", "simple")
# --task NAME -> its kind under --imagenet-root DIR and its usual folder names there (first
# found); a NAME not here is read as a generic image folder
PRESET_FOLDERS = {
    "imagenet": ("id", ("imagenet/val", "val")),
    "imagenet-v2": ("ood", ("imagenetv2-matched-frequency-format-val", "imagenet-v2",
                            "imagenetv2")),
    "imagenet-r": ("ood", ("imagenet-r",)),
    "imagenet-a": ("ood", ("imagenet-a",)),
    "imagenet-sketch": ("ood", ("sketch", "imagenet-sketch")),
    "objectnet": ("ood", ("objectnet-1.0/images", "objectnet/images", "objectnet")),
}
PRESETS = tuple(PRESET_FOLDERS)
SUBSETS = {"imagenet-r": "imagenet_r", "imagenet-a": "imagenet_a"}


def text_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (a byte-order mark dropped), stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_templates(templates, source) -> None:
    """Each prompt template must put the class name somewhere ('a photo of a {}.'):
    without it every class gets the same prompt and the same zero-shot head."""
    if not templates:
        raise ValueError(f"{source}: no prompt templates")
    for t in templates:
        try:  # only a bare {}: '{.upper}' or '{[0]}' would reach into the class name's str
            fields = [f[1:] for f in string.Formatter().parse(t) if f[1] is not None]
        except ValueError:
            fields = []
        if fields != [("", "", None)]:
            raise ValueError(f"{source}: prompt template {t!r} must contain {{}} once, bare, for "
                             "the class name, e.g. 'a photo of a {}.'")


def _timm_lines(name: str) -> list[str]:
    """A list file of timm's ``data/_info`` folder, as lines."""
    try:
        raw = pkgutil.get_data("timm.data", f"_info/{name}")
    except (ImportError, OSError) as exc:
        raise RuntimeError(f"ImageNet's class list comes from timm (an open_clip requirement): "
                           f"timm/data/_info/{name} cannot be read ({exc}); pip install "
                           "'timm>=1.0'") from None
    return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's 1000 WordNet IDs in class order (class i is folder ``wnids[i]``)."""
    wnids = tuple(_timm_lines("imagenet_synsets.txt"))
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise RuntimeError(f"timm's imagenet_synsets.txt holds {len(wnids)} IDs, not 1000")
    return wnids


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's 1000 ImageNet class names (CLIP's), in class order. Two pairs repeat
    (classes 657/744 'missile', 836/837 'sunglasses'): the field's list, kept as it is."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return tuple(IMAGENET_CLASSNAMES)


@functools.cache
def imagenet_repeats() -> frozenset:
    """The names open_clip's ImageNet list gives to two classes each."""
    names = imagenet_classnames()
    return frozenset(n for n in names if names.count(n) > 1)


@functools.cache
def subset_indices(preset: str) -> tuple[int, ...]:
    """ImageNet indices of a 200-class subset ('imagenet-r', 'imagenet-a'), ascending;
    timm's index list is checked against its WordNet ID list."""
    stem = SUBSETS[preset]
    indices = tuple(int(i) for i in _timm_lines(f"{stem}_indices.txt"))
    wnids = _timm_lines(f"{stem}_synsets.txt")
    if [imagenet_wnids()[i] for i in indices] != wnids:
        raise RuntimeError(f"timm's {stem} indices and synsets disagree")
    return indices


@functools.cache
def template_set(choice: str) -> tuple[str, ...]:
    """--templates: 'openai' (open_clip's 80, the paper's), 'simple' (open_clip's 7), or a
    UTF-8 file of templates, one per line, each with {} for the class name."""
    if choice in TEMPLATE_SETS:
        from open_clip import zero_shot_metadata as z
        fns = z.OPENAI_IMAGENET_TEMPLATES if choice == "openai" else z.SIMPLE_IMAGENET_TEMPLATES
        return tuple(f("{}") for f in fns)  # open_clip's are functions of the class name
    path = Path(choice)
    if not path.is_file():
        raise ValueError(f"--templates {choice}: expected openai, simple or a file of "
                         "templates (one per line, with {} for the class name)")
    found = tuple(text_lines(path))
    check_templates(found, f"--templates {choice}")
    return found


def chosen_templates(choice: str | None) -> tuple[str, ...] | None:
    """--templates as a tuple; None when unset (each folder's own: templates.txt, else
    openai for ImageNet's classes, else the generic three)."""
    return template_set(choice) if choice else None


@dataclass(frozen=True)
class FolderClasses:
    """What an image folder's class folders mean.

    ``label``: class folder name -> label (folders not in it are not read);
    ``classnames``: the classes a sample is scored over; ``head_classes`` and
    ``projection``: where set, the head is built over ``head_classes`` and class k scored
    by its row ``projection[k]`` (projected logits), or, where that is a tuple of rows, by
    the largest of their logits (ObjectNet's classes, each one or more of ImageNet's);
    ``imagenet``: the classes are ImageNet's (openai templates by default);
    ``crop_border``: pixels cut from each side of an image before its transform."""
    label: dict
    classnames: tuple
    head_classes: tuple | None = None
    projection: tuple | None = None
    imagenet: bool = False
    crop_border: int = 0


def projection_rows(projection) -> tuple[list[int], list[int] | None]:
    """(head rows, the class each scores; None when each class is one row)."""
    groups = [p if isinstance(p, tuple) else (p,) for p in projection]
    rows = [r for g in groups for r in g]
    owner = [k for k, g in enumerate(groups) for _ in g]
    return rows, None if len(rows) == len(groups) else owner


def is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


def folder_order(names: list[str]) -> list[str]:
    """Class folders in label order: by value when all are numbers ('10' after '9', not
    after '1'), else sorted by name."""
    if names and all(is_number(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _imagenet_subset(indices: list[int]) -> FolderClasses:
    """ImageNet classes ``indices`` (ascending), scored over themselves."""
    names = imagenet_classnames()
    full = len(indices) == 1000
    return FolderClasses(label={}, classnames=tuple(names[i] for i in indices),
                         head_classes=None if full else names,
                         projection=None if full else tuple(indices), imagenet=True)


def _refuse_unknown(root, what: str, names: list[str], fix: str):
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    raise ValueError(f"{root}: {len(names)} class folder(s) {what} ({shown}); {fix}")


def preset_classes(preset: str, root, names: list[str]) -> FolderClasses:
    """The classes and labels of a standard set's folder (``PRESETS``)."""
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    if preset == "objectnet":
        return objectnet_classes(root, names)
    if preset == "imagenet-v2":
        bad = [n for n in names if not (is_number(n) and int(n) < 1000)]
        if bad:
            _refuse_unknown(root, "are not ImageNet-V2's numbers 0..999", bad,
                            "ImageNet-V2's folders are named by class number")
        classes = _imagenet_subset(list(range(1000)))
        return _with_labels(classes, {n: int(n) for n in names}, root, preset)
    allowed = subset_indices(preset) if preset in SUBSETS else tuple(range(1000))
    allowed_ids = {wnids[i] for i in allowed}
    bad = [n for n in names if n not in allowed_ids]
    if bad:
        _refuse_unknown(root, f"are not among {preset}'s {len(allowed)} WordNet IDs", bad,
                        f"is this {preset}'s folder?")
    classes = _imagenet_subset(list(allowed))
    position = {i: k for k, i in enumerate(allowed)}
    return _with_labels(classes, {n: position[index[n]] for n in names}, root, preset)


def _with_labels(classes: FolderClasses, label: dict, root, preset: str) -> FolderClasses:
    missing = len(classes.classnames) - len(label)
    if missing:
        log.warning("%s: %d of %s's %d classes have no folder with images; it is still scored "
                    "over all %d", root, missing, preset, len(classes.classnames),
                    len(classes.classnames))
    return FolderClasses(label, classes.classnames, classes.head_classes, classes.projection,
                         classes.imagenet)


OBJECTNET_MAPS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                  "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")


def objectnet_mappings(root) -> Path:
    """The ``mappings`` folder of the ObjectNet release (objectnet-1.0/mappings), beside or
    inside ``root`` (its images folder or the release's top)."""
    root = Path(root)
    for folder in (root / "mappings", root.parent / "mappings",
                   root / "objectnet-1.0" / "mappings"):
        if all((folder / f).is_file() for f in OBJECTNET_MAPS):
            return folder
    raise ValueError(
        f"--task objectnet {root}: ObjectNet's class map is read from the release's own "
        f"mappings folder ({', '.join(OBJECTNET_MAPS)}), which is not beside or inside "
        f"{root}; no installed package ships it. Give the images folder of the unpacked "
        "release (objectnet-1.0/images, with objectnet-1.0/mappings beside it)")


def objectnet_classes(root, names: list[str]) -> FolderClasses:
    """ObjectNet's 113 classes that ImageNet shares, from the release's mappings (read as
    WiSE-FT and CLIP_benchmark read them): class k is the k-th of those folders in sorted
    order, scored by the largest logit of its ImageNet classes; images lose a 2-pixel
    border (the release's frame); the other 200 folders are not read."""
    import json
    maps = objectnet_mappings(root)
    folder_map, to_imagenet, pytorch_map = (
        json.loads((maps / name).read_text(encoding="utf-8")) for name in OBJECTNET_MAPS[:3])
    folder_of = {label: folder for folder, label in folder_map.items()}
    pytorch_of = {int(v): int(k) for k, v in pytorch_map.items()}  # 2012 ID -> class
    lines = (maps / OBJECTNET_MAPS[3]).read_text(encoding="utf-8").splitlines()
    index_of = {line.strip(): pytorch_of[i] for i, line in enumerate(lines) if line.strip()}
    groups = {folder_of[label]: (label, tuple(sorted(index_of[n] for n in names_.split("; "))))
              for label, names_ in to_imagenet.items()}
    order = sorted(groups)
    present = set(names)
    missing = [f for f in order if f not in present]
    if missing:
        log.warning("%s: %d of ObjectNet's %d classes have no folder with images; it is still "
                    "scored over all %d", root, len(missing), len(order), len(order))
    return FolderClasses({f: k for k, f in enumerate(order) if f in present},
                         tuple(groups[f][0].lower() for f in order),
                         head_classes=imagenet_classnames(),
                         projection=tuple(groups[f][1] for f in order), imagenet=True,
                         crop_border=2)


def folder_classes(root, names: list[str], names_file: Path | None = None,
                   preset: str | None = None) -> FolderClasses:
    """The classes of an image folder whose non-empty class folders are ``names``.

    A preset NAME reads its standard layout. Otherwise, with ``names_file``
    (classnames.txt), its names in label order (``folder_order``). Without one: folders
    that are all ImageNet WordNet IDs get ImageNet's names (scored over the IDs present,
    projected from the 1000-way head), ImageNet-V2's 1000 numbered folders ImageNet's
    classes by number, and ordinary folder names themselves; WordNet IDs ImageNet lacks
    and other numbered folders are refused, naming the file to add."""
    if preset is not None:
        if names_file is not None:
            log.warning("%s: %s's class names are the standard ones; %s is not used", root,
                        preset, names_file)
        return preset_classes(preset, root, names)
    order = folder_order(names)
    label = {n: k for k, n in enumerate(order)}
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    numbered = bool(names) and all(is_number(n) for n in names)
    v2 = numbered and sorted(int(n) for n in names) == list(range(1000))
    is_imagenet = v2 or (bool(names) and all(n in index for n in names))
    if names_file is not None:
        given = tuple(text_lines(names_file))
        if len(given) != len(names):
            raise ValueError(f"{names_file} names {len(given)} classes but {root} has "
                             f"{len(names)} class folders")
        return FolderClasses(label, given, imagenet=is_imagenet)
    add = (f"add {Path(root) / 'classnames.txt'} (one class name per line, in "
           f"{'numeric' if numbered else 'sorted'} folder order)")
    if any(WNID.fullmatch(n) for n in names):
        unknown = [n for n in order if n not in index]
        if unknown:
            _refuse_unknown(root, "are not ImageNet-1k WordNet IDs", unknown, add)
        classes = _imagenet_subset(sorted(index[n] for n in names))
        return FolderClasses(label, classes.classnames, classes.head_classes,
                             classes.projection, True)
    if numbered:
        if not v2:
            _refuse_unknown(root, "are numbers, but not ImageNet-V2's 0..999", order,
                            add + ", or use the preset --task ood:imagenet-v2:PATH")
        return FolderClasses({n: int(n) for n in names}, imagenet_classnames(), imagenet=True)
    return FolderClasses(label, tuple(n.replace("_", " ") for n in order))


def with_imagenet_root(tasks: list[str], root) -> list[str]:
    """``--task`` entries and, after them, --imagenet-root DIR's: one per set whose usual
    folder is under DIR (``PRESET_FOLDERS``) and whose NAME --task does not already give;
    each set not found is named in the log."""
    taken = {spec.partition(":")[2].partition(":")[0].strip().lower() for spec in tasks}
    tasks, root = list(tasks), Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--imagenet-root: folder not found: {root}")
    absent, added = [], 0
    for name, (kind, folders) in PRESET_FOLDERS.items():
        found = next((root / f for f in folders if (root / f).is_dir()), None)
        if name in taken:
            continue
        if found is None:
            absent.append(f"{name} ({' or '.join(folders)})")
        else:
            tasks.append(f"{kind}:{name}:{found}")
            added += 1
    if not added:
        raise ValueError(f"--imagenet-root {root}: none of the usual folders is there: "
                         f"{'; '.join(absent)}")
    if absent:
        log.warning("--imagenet-root %s: not found, so not evaluated: %s", root, "; ".join(absent))
    return tasks
