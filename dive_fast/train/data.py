"""Datasets: the embedded world in memory, and the real formats on disk (image folders in
the ImageNet layout, open_clip CSV and webdataset tar shards of image-caption pairs).

A sample that cannot be read comes back as None. Evaluation drops it (``collate``); the
training loaders replace it (``Readable``, ``ShardedCaptions``) so that every batch is
full, which data parallelism needs (ranks gather equal-sized feature blocks). Either way
it is counted, logged (rate-limited) and reported, never the end of a long run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import random
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..world.tasks import TASKS, Task, caption_pair, task_image

log = logging.getLogger(__name__)
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_warned = [0]


def warn_unreadable(what, exc) -> None:
    """Logs the first 10 unreadable samples of this process, then every 100th."""
    _warned[0] += 1
    n = _warned[0]
    if n <= 10 or n % 100 == 0:
        more = " (from now on every 100th is logged)" if n == 10 else f" ({n} so far)" if n > 10 else ""
        log.warning("skipping unreadable %s: %s%s", what, exc, more)


def collate(batch):
    """(images, targets, skipped) for evaluation: unreadable samples dropped and counted;
    targets stay a list of strings for captions."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images = torch.stack([b[0] for b in kept])
    targets = [b[1] for b in kept]
    if isinstance(targets[0], int):
        targets = torch.tensor(targets)
    return images, targets, skipped


def text_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "save it as UTF-8") from None
    return [l.strip() for l in text.splitlines() if l.strip()]


def check_templates(templates, source) -> None:
    """Each prompt template must put the class name somewhere ('a photo of a {}.'):
    without it every class gets the same prompt and the same zero-shot head."""
    if not templates:
        raise ValueError(f"{source}: no prompt templates")
    for t in templates:
        try:
            ok = t.format("x") != t.format("y")
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{source}: prompt template {t!r} must contain {{}} once for the "
                             "class name, e.g. 'a photo of a {}.'")


def _open_image(source, name=None) -> Image.Image | None:
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # missing, truncated, not an image
        warn_unreadable(f"image {name or source}", exc)
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
            self.classnames = tuple(text_lines(names_file))
            if len(self.classnames) != len(folders):
                raise ValueError(f"{names_file} names {len(self.classnames)} classes but {root} "
                                 f"has {len(folders)} class folders")
        else:
            self.classnames = tuple(d.name.replace("_", " ") for d in folders)
        twice = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
        if twice:
            raise ValueError(f"{root}: class name(s) {twice} given to more than one class "
                             "(their zero-shot heads would be identical)")
        tmpl_file = root / "templates.txt"
        self.templates = tuple(templates or (
            text_lines(tmpl_file) if tmpl_file.is_file() else DEFAULT_TEMPLATES))
        check_templates(self.templates, "the templates given" if templates else tmpl_file)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def describe(self, i: int) -> str:
        return str(self.samples[i][0])

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = _open_image(path)
        return None if img is None else (self.transform(img), label)


class CsvCaptions(Dataset):
    """open_clip's CSV convention: a header naming the image-path and caption columns
    (default "filepath" and "title", tab-separated). A path is taken as written when it
    exists (absolute, or relative to the working directory, as open_clip reads it), else
    relative to the CSV's folder."""

    def __init__(self, path, transform, img_key="filepath", caption_key="title", sep="\t"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption CSV not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"caption CSV {path} is not UTF-8 text (byte {exc.start}: "
                             f"{exc.reason}); save it as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
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
        self.path = path

    def image_path(self, i: int) -> Path:
        file = Path(self.rows[i][0])
        return file if file.is_absolute() or file.exists() else self.root / file

    def fingerprint(self) -> str:
        """A digest of what the pairs are: the CSV's bytes and each image file's size and
        modification time (a manifest: no image is read), so that a CSV or an image
        rewritten in place is a different data set (the embedding cache's key)."""
        h = hashlib.sha256(self.path.read_bytes())
        for i, (file, _) in enumerate(self.rows):
            try:
                st = os.stat(self.image_path(i))
                h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{file}\0missing\n".encode())
        return f"csv:{h.hexdigest()}"

    def __len__(self):
        return len(self.rows)

    def describe(self, i: int) -> str:
        return str(self.image_path(i))

    def __getitem__(self, i):
        text = self.rows[i][1]
        img = _open_image(self.image_path(i))
        return None if img is None else (self.transform(img), text)




# --- training views: full batches, unreadable samples replaced and counted ---------------

class Readable(Dataset):
    """Training view of a map-style dataset: item i is ``(image, target, index, skipped)``.
    An unreadable sample is replaced by the next readable one of a fixed probe sequence
    (i + k * stride mod n), so batches stay full and a resumed run reads what an unbroken
    one read; ``index`` is the sample actually used (the frozen-embedding cache's row) and
    ``skipped`` how many were passed over. ``max_consecutive`` unreadable in a row end the
    run with the count and the first paths: a data set that is all or mostly broken must
    not spin."""

    def __init__(self, dataset, max_consecutive: int = 64):
        self.dataset, self.max_consecutive = dataset, max_consecutive
        n = len(dataset)
        self.stride = next(s for s in (7919, 104729, 1299709) if n % s)

    def __len__(self):
        return len(self.dataset)

    def _probe(self, i: int, k: int) -> int:
        return (i + k * self.stride) % len(self.dataset)

    def __getitem__(self, i):
        tries = min(self.max_consecutive, len(self.dataset))
        for k in range(tries):
            j = self._probe(i, k)
            item = self.dataset[j]
            if item is not None:
                return item[0], item[1], j, k
        describe = getattr(self.dataset, "describe", lambda j: f"sample {j}")
        raise RuntimeError(
            f"{tries} consecutive unreadable samples in {type(self.dataset).__name__} "
            f"({len(self.dataset)} in all), e.g. "
            f"{', '.join(describe(self._probe(i, k)) for k in range(min(3, tries)))}: "
            "fix or remove them")


def train_collate(batch, tokenizer=None):
    """(images, targets, indices, skipped, tokens) from ``Readable`` / ``ShardedCaptions``
    items. Captions are tokenised here, in the loader workers, off the training loop's
    critical path."""
    images = torch.stack([b[0] for b in batch])
    targets = [b[1] for b in batch]
    tokens = None
    if isinstance(targets[0], int):
        targets = torch.tensor(targets)
    elif tokenizer is not None:
        tokens = tokenizer(targets)
    indices = torch.tensor([b[2] for b in batch])
    return images, targets, indices, sum(b[3] for b in batch), tokens


def shard_list(urls) -> list[str]:
    """Shard paths from a brace pattern ('/d/{00000..00331}.tar'), a glob, a '::'- or
    ','-separated list, or a list; missing local files fail here, before any training."""
    import braceexpand

    if isinstance(urls, (str, Path)):
        parts = [u for chunk in str(urls).split("::") for u in chunk.split(",") if u]
        urls = [x for u in parts for x in braceexpand.braceexpand(u)]
    out = []
    for u in map(str, urls):
        if any(c in u for c in "*?["):
            found = sorted(str(p) for p in Path(u).parent.glob(Path(u).name))
            if not found:
                raise FileNotFoundError(f"no webdataset shard matches {u}")
            out += found
        elif "://" not in u and not u.startswith("pipe:") and not Path(u).is_file():
            raise FileNotFoundError(f"webdataset shard not found: {u}")
        else:
            out.append(u)
    if not out:
        raise ValueError(f"no webdataset shards in {urls!r}")
    return out


def shard_pairs(shard: str, transform, counter: list):
    """(image, caption) of one tar shard (jpg/png/jpeg/webp + txt, as img2dataset writes CC3M).
    A truncated or corrupt shard ends at its last good member; each such failure, and
    each undecodable or incomplete sample, adds 1 to ``counter[0]``."""
    from webdataset import tariterators

    def on_error(exc):
        counter[0] += 1
        warn_unreadable(f"webdataset shard {shard}", exc)
        return True

    for sample in tariterators.tarfile_samples([{"url": shard}], handler=on_error):
        key = f"{sample.get('__key__')} of {shard}"
        data = sample.get("jpg") or sample.get("png") or sample.get("jpeg") or sample.get("webp")
        text = sample.get("txt")
        img = None if data is None or text is None else _open_image(io.BytesIO(data), key)
        if img is None:
            counter[0] += 1
            if data is None or text is None:
                warn_unreadable(f"sample {key}", "no image or no caption")
            continue
        yield transform(img), text.decode("utf-8", "replace") if isinstance(text, bytes) else text


class ShardedCaptions(IterableDataset):
    """Reference pairs streamed from webdataset shards, endlessly, epoch after epoch.

    Each epoch shuffles the shard list with (seed, epoch); rank r of R takes shards r, r+R,
    ... and loader worker w of W every W-th of those, so across ranks and workers each pair
    is read once per epoch (exactly so when the shard count divides by R*W; otherwise the
    ranks' epochs differ by a shard, and a warning says so). Pairs are shuffled within a
    buffer, drained at each epoch's end. Items are ``(image, caption, -1, skipped)``:
    streamed pairs have no index, so their frozen embeddings are computed each step
    rather than cached.
    Resuming starts the stream at epoch ``start_epoch`` (shards have no random access): a
    resumed run sees other pairs than an unbroken one would; everything else is exact."""

    def __init__(self, urls, transform, seed: int = 0, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, start_epoch: int = 0):
        self.shards = shard_list(urls)
        self.transform, self.seed, self.buffer = transform, seed, shuffle_buffer
        self.rank, self.world, self.start_epoch = rank, world_size, start_epoch

    def my_shards(self, epoch: int, worker: int = 0, workers: int = 1) -> list[str]:
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank::self.world][worker::workers]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if len(self.shards) < self.world * workers:
            raise ValueError(f"{len(self.shards)} webdataset shard(s) for {self.world} rank(s) x "
                             f"{workers} loader worker(s): each needs at least one; write "
                             "more, smaller shards or use fewer --workers")
        if worker == 0 and self.rank == 0 and len(self.shards) % (self.world * workers):
            log.warning("%d shards do not divide among %d rank(s) x %d worker(s): epochs "
                        "differ by a shard between them", len(self.shards), self.world, workers)
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_epoch}")
        counter, buffer, epoch = [0], [], self.start_epoch
        while True:
            shards = self.my_shards(epoch, worker, workers)
            read = 0
            for pair in (p for s in shards for p in shard_pairs(s, self.transform, counter)):
                read += 1
                buffer.append(pair)
                if len(buffer) >= self.buffer:
                    yield self._emit(buffer, rng, counter)
            if read == 0:
                raise RuntimeError(f"no readable pairs in webdataset shards {shards} "
                                   f"({counter[0]} unreadable)")
            while buffer:  # drained at the epoch's end, so that epochs do not mix
                yield self._emit(buffer, rng, counter)
            epoch += 1

    @staticmethod
    def _emit(buffer, rng, counter):
        image, caption = buffer.pop(rng.randrange(len(buffer)))
        skipped, counter[0] = counter[0], 0
        return image, caption, -1, skipped


def heldout_pairs(transform, csv_path=None, shards=None, n: int = 256,
                  csv_options: dict | None = None) -> list:
    """The first ``n`` readable (image, caption) pairs of a held-out CSV or shard list, in
    order: the fixed set over which RSA compares pre-trained and fine-tuned geometry."""
    pairs = []
    if csv_path:
        ds = CsvCaptions(csv_path, transform, **(csv_options or {}))
        for i in range(len(ds)):
            if len(pairs) == n:
                break
            if (item := ds[i]) is not None:
                pairs.append(item)
    else:
        counter = [0]
        for s in shard_list(shards):
            pairs += [p for _, p in zip(range(n - len(pairs)), shard_pairs(s, transform, counter))]
            if len(pairs) == n:
                break
    if len(pairs) < 3:
        raise ValueError(f"RSA needs at least 3 readable held-out pairs, found {len(pairs)} in "
                         f"{csv_path or shards}")
    return pairs


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
