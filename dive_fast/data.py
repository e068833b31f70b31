"""Datasets: the embedded world in memory, and the real formats on disk (image folders in
the ImageNet layout, open_clip CSV and webdataset tar shards of image-caption pairs).

A sample that cannot be read comes back as None; ``collate`` drops it and counts it, so
a corrupt or missing image is logged, never the end of a long run.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .world.tasks import TASKS, Task, caption_pair, task_image

log = logging.getLogger(__name__)
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def collate(batch):
    """(images, targets, skipped): targets stay a list of strings for captions."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images = torch.stack([b[0] for b in kept])
    targets = [b[1] for b in kept]
    if isinstance(targets[0], int):
        targets = torch.tensor(targets)
    return images, targets, skipped


def _open_image(path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:  # missing, truncated or not an image
        log.warning("skipping unreadable image %s: %s", path, exc)
        return None


# --- the embedded world ----------------------------------------------------------------

class WorldTask(Dataset):
    """``n`` labelled samples of one task split, generated on access."""

    def __init__(self, task: Task | str, split: str, n: int, transform, seed: int = 0,
                 size: int = 32):
        self.task = TASKS[task] if isinstance(task, str) else task
        self.split, self.n, self.transform, self.seed, self.size = split, n, transform, seed, size
        self.classnames, self.templates = self.task.classnames, self.task.templates

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, label = task_image(self.task, self.split, i, self.seed, self.size)
        return self.transform(Image.fromarray(img)), label


class WorldCaptions(Dataset):
    """Image-caption pairs ``offset .. offset + n`` of a world corpus ("pretrain" or
    "reference"); the offset lets a resumed run continue the stream where it stopped."""

    def __init__(self, corpus: str, n: int, transform, seed: int = 0, size: int = 32,
                 offset: int = 0):
        self.corpus, self.n, self.transform = corpus, n, transform
        self.seed, self.size, self.offset = seed, size, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, text, _ = caption_pair(self.corpus, self.offset + i, self.seed, self.size)
        return self.transform(Image.fromarray(img)), text


# --- real data on disk -----------------------------------------------------------------

class ImageFolderTask(Dataset):
    """A labelled image folder: ROOT/<class folder>/<image>. Optional ROOT/classnames.txt
    (one name per line, in sorted folder order) and ROOT/templates.txt (one per line, with
    {}); otherwise folder names and the default templates."""

    def __init__(self, root, transform, templates=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"image folder {root} has no class sub-folders")
        self.samples = [(f, label) for label, d in enumerate(folders)
                        for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        names_file = root / "classnames.txt"
        if names_file.is_file():
            self.classnames = tuple(l.strip() for l in names_file.read_text().splitlines() if l.strip())
            if len(self.classnames) != len(folders):
                raise ValueError(f"{names_file} names {len(self.classnames)} classes but {root} "
                                 f"has {len(folders)} class folders")
        else:
            self.classnames = tuple(d.name.replace("_", " ") for d in folders)
        tmpl_file = root / "templates.txt"
        self.templates = tuple(templates or (
            [l.strip() for l in tmpl_file.read_text().splitlines() if l.strip()]
            if tmpl_file.is_file() else DEFAULT_TEMPLATES))
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = _open_image(path)
        return None if img is None else (self.transform(img), label)


class CsvCaptions(Dataset):
    """open_clip's CSV convention: a header naming the image-path and caption columns
    (default "filepath" and "title", tab-separated); relative paths are taken from the
    CSV's folder."""

    def __init__(self, path, transform, img_key="filepath", caption_key="title", sep="\t"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption CSV not found: {path}")
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter=sep)
            missing = {img_key, caption_key} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: header {reader.fieldnames} lacks column(s) "
                                 f"{sorted(missing)} (separator {sep!r})")
            rows = []
            for line, row in enumerate(reader, start=2):
                if row[img_key] is None or row[caption_key] is None:
                    raise ValueError(f"{path}:{line}: malformed row {row}")
                rows.append((row[img_key], row[caption_key]))
        if not rows:
            raise ValueError(f"caption CSV {path} has no rows")
        self.rows, self.root, self.transform = rows, path.parent, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        file, text = self.rows[i]
        img = _open_image(self.root / file)
        return None if img is None else (self.transform(img), text)


def webdataset_captions(urls, transform, shuffle_buffer: int = 1000, seed: int = 0):
    """Streamed (image, caption) pairs from webdataset tar shards (jpg/png + txt, as
    img2dataset writes CC3M), shuffled within a buffer. Undecodable samples are skipped
    and logged."""
    import webdataset as wds

    if isinstance(urls, (str, Path)) and not any(c in str(urls) for c in "{*"):
        if not Path(urls).exists():
            raise FileNotFoundError(f"webdataset shard not found: {urls}")

    def skip(exc):
        log.warning("skipping unreadable webdataset sample: %s", exc)
        return True

    def to_pair(sample):
        img = sample.get("jpg") or sample.get("png") or sample.get("jpeg")
        text = sample.get("txt")
        if img is None or text is None:
            return None
        return transform(img), text

    return (wds.WebDataset(str(urls) if isinstance(urls, Path) else urls, handler=skip,
                           shardshuffle=False, empty_check=False)
            .shuffle(shuffle_buffer, rng=__import__("random").Random(seed))
            .decode("pil", handler=skip).map(to_pair, handler=skip))


class Indexed(Dataset):
    """(image, (target, index)): lets the trainer look samples up in an embedding cache."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (item[0], (item[1], i))


class ResumableSampler(torch.utils.data.Sampler):
    """Indices of an endless sequence of seeded epoch permutations, from global position
    ``start`` on; under data parallelism each rank takes its slice of every global batch.
    A resumed run starts at step * global_batch and sees exactly the batches it would have."""

    def __init__(self, n: int, seed: int, batch_size: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.batch, self.step = n, seed, batch_size, start_step
        self.rank, self.world = rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _index(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[k % self.n])

    def __iter__(self):
        step = self.step
        while True:
            base = (step * self.world + self.rank) * self.batch
            for j in range(self.batch):
                yield self._index(base + j)
            step += 1
