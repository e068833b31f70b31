"""Each zero-shot set's release as it lies on disk, read as CLIP_benchmark reads it
(torchvision's layouts): its test images with their labels and its class names, which are
CLIP_benchmark's (``clip_benchmark/datasets/en_classnames.json``, read as package data) or,
where CLIP_benchmark takes them from the release (Food101, SUN397, DTD, FGVC-Aircraft,
StanfordCars), the release's own, as CLIP_benchmark writes them. ``release_namer`` names
the images of CoOp's split files the same way."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .data import IMAGE_EXTENSIONS

# NAME -> (CLIP_benchmark's key, its layout, its usual folder names under a --zeroshot-suite DIR)
READ = {
    "caltech101": ("caltech101", "caltech101/101_ObjectCategories/<category>/*.jpg "
                   "(torchvision's; all 102 category folders, BACKGROUND_Google included)",
                   ("caltech101", "caltech-101")),
    "flowers102": ("flowers", "flowers-102/jpg/image_00001.jpg ... with imagelabels.mat and "
                   "setid.mat beside jpg/ (torchvision's; its test split)",
                   ("flowers-102", "flowers102", "oxford_flowers")),
    "food101": ("food101", "food-101/images/<class>/<id>.jpg with meta/test.json "
                "(torchvision's; its test split)", ("food-101", "food101")),
    "sun397": ("sun397", "SUN397/<letter>/<class>/sun_*.jpg with SUN397/ClassName.txt "
               "(torchvision's; all images)", ("SUN397", "sun397")),
    "dtd": ("dtd", "dtd/images/<class>/*.jpg with labels/test1.txt (torchvision's; test "
            "split 1)", ("dtd",)),
    "fgvc-aircraft": ("fgvc_aircraft", "fgvc-aircraft-2013b/data/images/<id>.jpg with "
                      "data/variants.txt and data/images_variant_test.txt (torchvision's; "
                      "its test split, the 100 variants; or CoOp's fgvc_aircraft/, that data/ "
                      "folder renamed)",
                      ("fgvc-aircraft-2013b", "fgvc-aircraft", "fgvc_aircraft")),
    "stanford-cars": ("cars", "stanford_cars/cars_test/*.jpg with devkit/cars_meta.mat and "
                      "cars_test_annos_withlabels.mat (torchvision's; its test split)",
                      ("stanford_cars", "stanford-cars")),
    "oxford-pets": ("pets", "oxford-iiit-pet/images/*.jpg with annotations/test.txt "
                    "(torchvision's; its test split)",
                    ("oxford-iiit-pet", "oxford-pets", "oxford_pets")),
    "eurosat": ("eurosat", "eurosat/2750/<class>/*.jpg (torchvision's; the 10 class folders)",
                ("eurosat",)),
    "ucf101": (None, "ucf101/UCF-101-midframes/<Class_Name>/*.jpg with "
               "split_zhou_UCF101.json (CoOp's middle frames and split)", ("ucf101",)),
}
# NAME -> CoOp's split file in the set's folder, and the folder its image paths start from
COOP = {
    "caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories"),
    "flowers102": ("split_zhou_OxfordFlowers.json", "jpg"),
    "food101": ("split_zhou_Food101.json", "images"),
    "sun397": ("split_zhou_SUN397.json", "SUN397"),
    "dtd": ("split_zhou_DescribableTextures.json", "images"),
    "stanford-cars": ("split_zhou_StanfordCars.json", "."),
    "oxford-pets": ("split_zhou_OxfordPets.json", "images"),
    "eurosat": ("split_zhou_EuroSAT.json", "2750"),
    "ucf101": ("split_zhou_UCF101.json", "UCF-101-midframes"),
}


@functools.cache
def clip_benchmark_data(file: str) -> dict:
    from importlib import resources
    try:
        return json.loads((resources.files("clip_benchmark.datasets") / file).read_text("utf-8"))
    except (ImportError, OSError) as exc:
        raise RuntimeError(f"the zero-shot suite's class names and templates come from the "
                           f"clip_benchmark package ({file} cannot be read: {exc}); pip install "
                           "'dive_fast[suite]' (or pip install --no-deps clip_benchmark)") from None


def listed_names(name: str) -> tuple:
    """CLIP_benchmark's own class names of a set (en_classnames.json)."""
    return tuple(clip_benchmark_data("en_classnames.json")[READ[name][0]])


def refuse(name: str, root: Path, what: str):
    coop = f", or CoOp's split file {COOP[name][0]} in it" if name in COOP else ""
    raise ValueError(f"{root} is not {name}'s layout ({what}); expected {READ[name][1]}{coop}")


def _inside(root: Path, child: str) -> Path | None:
    """``root/child`` or ``root`` itself when it is that folder."""
    return root / child if (root / child).is_dir() else root if root.name == child else None


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir()
                  if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))


def _loadmat(file: Path, name: str) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise RuntimeError(f"{file}: {name}'s labels are MATLAB files, read with scipy "
                           "(pip install scipy)") from None
    try:
        return loadmat(file)
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{file}: not a MATLAB file scipy reads ({exc})") from None


def _mat_text(cell) -> str:
    """A MATLAB cell's string (loadmat wraps each in an array)."""
    return str(cell.item() if hasattr(cell, "item") else cell).strip()


def _by_class_folder(name, root: Path, top: str) -> tuple[list, tuple]:
    """CLIP_benchmark's names of the class folders under ``top``, labelled in sorted order."""
    names = listed_names(name)
    found = _inside(root, top) or _inside(root / name, top)
    if found is None:
        refuse(name, root, f"no {top}/ folder")
    folders = _folders(found)
    if len(folders) != len(names):
        refuse(name, root, f"{len(folders)} class folders in {found}, not {len(names)}")
    return [(f, k) for k, d in enumerate(folders) for f in _images(d)], names


def _pets_classes(file: Path) -> list[tuple[str, int]]:
    """(image id, class index) of an Oxford Pets split file (class numbers are 1-based)."""
    out = []
    for line in file.read_text().splitlines():
        if line.strip():
            image_id, class_id, *_ = line.split()
            out.append((image_id, int(class_id) - 1))
    return out


def _pets(root: Path) -> tuple[list, tuple]:
    split = root / "annotations" / "test.txt"
    if not split.is_file():
        refuse("oxford-pets", root, f"no {split}")
    return ([(root / "images" / f"{image_id}.jpg", k) for image_id, k in _pets_classes(split)],
            listed_names("oxford-pets"))


def _flower_labels(root: Path) -> list[int]:
    """Flowers102's class index of image_00001.jpg, image_00002.jpg, ... (1-based there)."""
    mat = _loadmat(root / "imagelabels.mat", "flowers102")
    return [int(k) - 1 for k in mat["labels"].reshape(-1)]


def _flowers(root: Path) -> tuple[list, tuple]:
    if not all((root / f).is_file() for f in ("imagelabels.mat", "setid.mat")):
        refuse("flowers102", root, "no imagelabels.mat and setid.mat")
    labels = _flower_labels(root)
    test = _loadmat(root / "setid.mat", "flowers102")["tstid"].reshape(-1)
    return ([(root / "jpg" / f"image_{int(i):05d}.jpg", labels[int(i) - 1]) for i in test],
            listed_names("flowers102"))


def _split_lines(name: str, file: Path) -> list[str]:
    if not file.is_file():
        refuse(name, file.parents[1], f"no {file}")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _food101(root: Path) -> tuple[list, tuple]:
    """torchvision's Food101: classes the sorted keys of meta/test.json; names with spaces
    for underscores (CLIP_benchmark's)."""
    split = root / "meta" / "test.json"
    if not split.is_file():
        refuse("food101", root, f"no {split}")
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
    """torchvision's FGVCAircraft (variants): classes in variants.txt's order; in data/, or
    in the folder itself (CoOp's fgvc_aircraft/ is that data/ folder)."""
    data = root / "data" if (root / "data").is_dir() else root
    if not (data / "variants.txt").is_file():
        refuse("fgvc-aircraft", root, "no data/variants.txt")
    classes = _split_lines("fgvc-aircraft", data / "variants.txt")
    index = {c: k for k, c in enumerate(classes)}
    samples = []
    for line in _split_lines("fgvc-aircraft", data / "images_variant_test.txt"):
        image, variant = line.split(" ", 1)
        if variant not in index:
            refuse("fgvc-aircraft", root, f"variant {variant!r} is not in variants.txt")
        samples.append((data / "images" / f"{image}.jpg", index[variant]))
    return samples, tuple(classes)


def _sun_name(class_path: str) -> str:
    """CLIP_benchmark's name of a SUN397 class: 'apartment_building/outdoor' is
    'apartment building outdoor'."""
    return class_path.replace("_", " ").replace("/", " ")


def _sun397(root: Path) -> tuple[list, tuple]:
    """torchvision's SUN397: classes in ClassName.txt's order ('/a/abbey', the letter its
    folder), every sun_*.jpg of each class folder (there is no official test split)."""
    base = root / "SUN397" if (root / "SUN397").is_dir() else root
    listed = base / "ClassName.txt"
    if not listed.is_file():
        refuse("sun397", root, f"no {listed}")
    lines = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    odd = next((line for line in lines if len(line) < 4 or line[0] != "/" or line[2] != "/"),
               None)
    if odd is not None:
        refuse("sun397", root, f"{listed} lists {odd!r}, not /<letter>/<class>")
    samples = [(f, k) for k, line in enumerate(lines)
               for f in sorted((base / line[1:]).glob("sun_*.jpg"))]
    return samples, tuple(_sun_name(line[3:]) for line in lines)


def _car_files(root: Path) -> tuple[Path, Path, Path]:
    """StanfordCars' folder (``root`` or its stanford_cars/), its test labels and names."""
    base = _inside(root, "stanford_cars") or root
    files = (base / "cars_test_annos_withlabels.mat", base / "devkit" / "cars_meta.mat")
    missing = [f for f in files if not f.is_file()]
    if missing:
        refuse("stanford-cars", root, f"no {missing[0]}")
    return base, *files


def _car_names(meta: Path) -> tuple:
    return tuple(_mat_text(c) for c in _loadmat(meta, "stanford-cars")["class_names"]
                 .reshape(-1))


def _car_annotations(file: Path) -> list[tuple[str, int]]:
    """(image file, class index) of a devkit annotations file (struct array ``annotations``
    with fields fname and class, 1-based)."""
    try:
        return [(_mat_text(a["fname"]), int(a["class"].item()) - 1)
                for a in _loadmat(file, "stanford-cars")["annotations"].reshape(-1)]
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"{file}: no struct array 'annotations' with fields fname and "
                         f"class ({type(exc).__name__}: {exc})") from None


def _cars(root: Path) -> tuple[list, tuple]:
    base, annotations, meta = _car_files(root)
    return ([(base / "cars_test" / f, k) for f, k in _car_annotations(annotations)],
            _car_names(meta))


RELEASE = {"caltech101": lambda root: _by_class_folder("caltech101", root,
                                                       "101_ObjectCategories"),
           "eurosat": lambda root: _by_class_folder("eurosat", root, "2750"),
           "oxford-pets": _pets, "flowers102": _flowers, "food101": _food101, "dtd": _dtd,
           "fgvc-aircraft": _aircraft, "sun397": _sun397, "stanford-cars": _cars}


def release_namer(name: str, root: Path, image_dir: Path):
    """CLIP_benchmark's name of an image of CoOp's split (its path under ``image_dir``) as
    the release's own files beside it give it, or None where they are absent. Food101's
    and DTD's are the split's names with spaces (the same class folders); UCF101 has none."""
    if name in ("caltech101", "eurosat"):
        if not image_dir.is_dir():
            return None
        names, folders = listed_names(name), _folders(image_dir)
        if len(folders) != len(names):
            return None
        by_folder = dict(zip((f.name for f in folders), names))
        return lambda path: by_folder.get(path.split("/")[0])
    if name == "sun397":
        return lambda path: _sun_name("/".join(path.split("/")[1:-1]))
    if name == "oxford-pets":
        files = [root / "annotations" / f for f in ("test.txt", "trainval.txt")]
        if not any(f.is_file() for f in files):
            return None
        names = listed_names(name)
        by_file = {f"{i}.jpg": names[k] for f in files if f.is_file()
                   for i, k in _pets_classes(f) if 0 <= k < len(names)}
        return by_file.get
    if name == "flowers102" and (root / "imagelabels.mat").is_file():
        names = listed_names(name)
        by_file = {f"image_{i + 1:05d}.jpg": names[k]
                   for i, k in enumerate(_flower_labels(root)) if 0 <= k < len(names)}
        return by_file.get
    if name == "stanford-cars" and all(f.is_file() for f in (
            root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_meta.mat")):
        _, annotations, meta = _car_files(root)
        names = _car_names(meta)
        by_file = {f"cars_test/{f}": names[k] for f, k in _car_annotations(annotations)
                   if 0 <= k < len(names)}
        return by_file.get
    return None
