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
import stat
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..world.tasks import TASKS, Task, caption_pair, task_image
from . import protocol, shard_plan
from .listing import IMAGE_EXTENSIONS, walk
from .protocol import check_templates, text_lines

log = logging.getLogger(__name__)
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
_warned = [0]


def warn_unreadable(what, exc) -> None:
    """Logs the first 10 unreadable samples of this process, then every 100th."""
    _warned[0] += 1
    n = _warned[0]
    if n <= 10 or n % 100 == 0:
        more = (" (from now on every 100th is logged)" if n == 10
                else f" ({n} so far)" if n > 10 else "")
        log.warning("skipping unreadable %s: %s%s", what, exc, more)


def in_order_loader(dataset, batch_size: int, workers: int, collate_fn, seed: int = 0,
                    **kwargs) -> DataLoader:
    """A DataLoader in dataset order that draws nothing from the global RNG: without a
    generator of its own, each iterator it starts takes a seed from it, so the frozen cache
    (DiVE's alone) or an evaluation before step 1 would move the augmentation that
    ``--workers 0`` draws from that RNG, and FLYP and DiVE would train on other crops.
    ``seed``: its workers' seeds (their augmentation) derive from it."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


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


def is_utf8(name: str) -> bool:
    """Whether a file name read from the disk was valid UTF-8 (Python keeps other bytes as
    lone surrogates, which no text encoder takes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_regular(path):
    """``path`` opened for reading when it is a regular file (after links), else None;
    FileNotFoundError when nothing is there. Checked on the open descriptor (``fstat``), so
    that no separate stat looks the path up again, and opened without blocking: a FIFO or
    a device named *.png is never read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _decode(source, name) -> Image.Image | None:
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    # truncated, not an image
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        warn_unreadable(f"image {name}", exc)
        return None


def _open_image(source, name=None, *, elsewhere=()) -> Image.Image | None:
    """The image at path ``source`` (or, when nothing is there, at the first of
    ``elsewhere`` that holds a file), or in a file object; None, logged, when unreadable."""
    if not isinstance(source, (str, os.PathLike)):
        return _decode(source, name)
    for path in (source, *elsewhere):
        try:
            file = open_regular(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            warn_unreadable(f"image {name or path}", exc)
            return None
        if file is None:
            break
        with file:
            return _decode(file, name or path)
    warn_unreadable(f"image {name or source}", "missing, or not a regular file")
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
    (one name per line, in folder order: sorted, or by number when every folder is one) and
    ROOT/templates.txt (one per line, with {}). Without classnames.txt, ImageNet's WordNet
    ID folders (and ImageNet-V2's numbers) get ImageNet's names and open_clip's 80 templates
    (``protocol.folder_classes``); other folders their own names and three generic templates.
    ``preset``: a standard set's NAME (``protocol.PRESETS``); ``templates``: overrides
    templates.txt and the defaults. ``head_classes`` and ``projection`` (None unless the
    folder is a subset of ImageNet's classes): score over the rows ``projection`` of the
    head over ``head_classes``."""
    listing, label_order = None, ()  # a suite set's samples come from no listing

    def __init__(self, root, transform, templates=None, preset=None, listing=None):
        """``listing``: the folder's ``listing.FolderListing`` (the run's), else walked now."""
        root = Path(root)
        listing = listing or walk(root)
        hidden, empty, folders = listing.hidden, listing.empty, list(listing.folders)
        if hidden or empty:  # never a class: a hidden folder would shift every label
            log.warning("%s: skipped %s", root, "; ".join(
                part for part in (f"hidden folders {hidden}" if hidden else "",
                                  f"folders without images {empty}" if empty else "") if part))
        if not folders:
            raise ValueError(f"image folder {root} has no class sub-folders with images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        if listing.special:
            log.warning("%s: %d image name(s) that are not regular files (e.g. %s) are skipped",
                        root, len(listing.special), Path(listing.special[0]))
        names_file = root / "classnames.txt"
        has_names = names_file.name in listing.root_files
        unnamed = [d for d in folders if not is_utf8(d)]
        if unnamed and not has_names:  # the folder's name is its class's, in prompts
            raise ValueError(f"image folder {root}: the class folder name "
                             f"{os.fsencode(unnamed[0])!r} is not UTF-8; rename it, or "
                             "name the classes in a classnames.txt")
        classes = protocol.folder_classes(root, folders, names_file if has_names else None,
                                          preset)
        self.listing, self.folder_label = listing, dict(classes.label)
        self.label_order = protocol.folder_order(list(classes.label))
        self.samples = [(root / name / f, classes.label[name]) for name in self.label_order
                        for f in listing.folders[name].names]
        if not self.samples:
            raise ValueError(f"image folder {root} has no readable image files")
        self.classnames = classes.classnames
        self.head_classes, self.projection = classes.head_classes, classes.projection
        self.imagenet, self.crop_border = classes.imagenet, classes.crop_border
        # a repeated name is refused, but for the two of ImageNet's own list (the field's)
        twice = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
        if twice and not (classes.imagenet and set(twice) <= protocol.imagenet_repeats()):
            raise ValueError(f"{root}: class name(s) {twice} given to more than one class "
                             "(their zero-shot heads would be identical)")
        tmpl_file = root / "templates.txt"
        self.templates = tuple(templates or (
            text_lines(tmpl_file) if tmpl_file.name in listing.root_files else
            protocol.template_set("openai") if classes.imagenet else DEFAULT_TEMPLATES))
        check_templates(self.templates, "the templates given" if templates else tmpl_file)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def fingerprint(self) -> str:
        """A digest of what the folder holds: class names, templates, and each image's path,
        size and modification time (no image is read; the sizes and times are the listing's,
        no stat again). A folder at another spelling of the same path has the same one;
        other contents at the same path do not."""
        h = hashlib.sha256(repr((self.classnames, self.templates)).encode())
        if self.listing is None:  # a suite set, read from its release's own files
            for file, label in self.samples:
                st = os.stat(file)
                h.update(f"{file}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                         .encode("utf-8", "surrogateescape"))
        for name in self.label_order:
            files, label = self.listing.folders[name], self.folder_label[name]
            for file, size, mtime in zip(files.names, files.sizes, files.mtimes):
                h.update(f"{name}/{file}\0{label}\0{size}\0{mtime}\n"
                         .encode("utf-8", "surrogateescape"))  # any file name, UTF-8 or not
        return f"folder:{h.hexdigest()}"

    def image(self, i: int) -> Image.Image | None:
        """Sample ``i``'s image as read, untransformed (None when unreadable)."""
        return _open_image(self.samples[i][0])

    def describe(self, i: int) -> str:
        return str(self.samples[i][0])

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = _open_image(path)
        if img is None:
            return None
        b = self.crop_border  # ObjectNet's frame
        if b and img.width > 2 * b and img.height > 2 * b:
            img = img.crop((b, b, img.width - b, img.height - b))
        return self.transform(img), label


def read_caption_rows(path: Path, img_key: str, caption_key: str, sep: str):
    """(image, caption) rows of a caption CSV, and how many had an empty caption (dropped).

    Read as open_clip reads it (``pandas.read_csv(path, sep=sep)``): a field that opens with
    a double quote may hold the separator and newlines until its closing quote ("" is a
    quote); a quote inside an unquoted field is kept. Refused with their line, where pandas
    would swallow the rest of the file into one caption or stop without naming the cause:
    a quote that never closes, and a row with more fields than the header (a tab inside an
    unquoted caption)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption CSV {path} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason}); save it as UTF-8") from None
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))  # long captions are fine
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep, restkey=EXTRA)
    missing = {img_key, caption_key} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: header {reader.fieldnames} lacks column(s) "
                         f"{sorted(missing)} (separator {sep!r})")
    rows, empty, last = [], 0, reader.line_num
    for row in reader:
        first, last = last + 1, reader.line_num
        record = "".join(lines[first - 1:last])
        if '"' in record and not closes(record, sep):
            raise ValueError(f"{path}:{first}: a double quote opened on this line is never "
                             "closed, which would join the rest of the file into one caption; "
                             "close it (a quote inside a quoted caption is written \"\")")
        if EXTRA in row:
            raise ValueError(f"{path}:{first}: more fields than the header's "
                             f"{len(reader.fieldnames)} (separator {sep!r}); a caption that "
                             "holds the separator must be quoted: \"...\"")
        if row[img_key] is None or row[caption_key] is None:
            raise ValueError(f"{path}:{first}: malformed row {row} (too few columns for "
                             f"separator {sep!r})")
        if not row[caption_key].strip():
            empty += 1
            continue
        rows.append((row[img_key], row[caption_key]))
    return rows, empty


EXTRA = object()  # DictReader's key of the fields beyond the header's


def closes(record: str, sep: str) -> bool:
    """Whether every quoted field of one record's text is closed (a strict parse reaches
    no end of data inside quotes; its other complaints are pandas-compatible text)."""
    try:
        list(csv.reader(io.StringIO(record, newline=""), delimiter=sep, strict=True))
    except csv.Error as exc:
        return "unexpected end of data" not in str(exc)
    return True


class CsvCaptions(Dataset):
    """open_clip's CSV convention: a header naming the image-path and caption columns
    (default "filepath" and "title", tab-separated). A path is taken as written when it
    exists (absolute, or relative to the working directory, as open_clip reads it), else
    relative to the CSV's folder. Rows with an empty caption are dropped and counted."""

    def __init__(self, path, transform, img_key="filepath", caption_key="title", sep="\t"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption CSV not found: {path}")
        rows, empty = read_caption_rows(path, img_key, caption_key, sep)
        if empty:
            log.warning("%s: %d row(s) with an empty caption dropped", path, empty)
        if not rows:
            raise ValueError(f"caption CSV {path} has no rows with a caption")
        self.rows, self.root, self.transform = rows, path.parent, transform
        self.path, self.empty_captions = path, empty

    def image_path(self, i: int) -> Path:
        file = Path(self.rows[i][0])
        return file if file.is_absolute() or file.exists() else self.root / file

    def fingerprint(self) -> str:
        """A digest of what the pairs are: the CSV's bytes and each image file's size and
        modification time (a manifest: no image is read), so that a CSV or an image
        rewritten in place is a different data set (the embedding cache's key). One stat an
        image: where a relative path lies is read from its folders' listings."""
        h = hashlib.sha256(self.path.read_bytes())
        where = ImageLocations(self.root)
        for file, _ in self.rows:
            try:
                st = os.stat(where.path(file))
                h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{file}\0missing\n".encode())
        return f"csv:{h.hexdigest()}"

    def __len__(self):
        return len(self.rows)

    def describe(self, i: int) -> str:
        return str(self.image_path(i))

    def image(self, i: int) -> Image.Image | None:
        """Pair ``i``'s image as read, untransformed (None when unreadable): the path as
        written, else under the CSV's folder (no stat first: the first open that finds a
        file decides, as ``image_path`` would)."""
        file = Path(self.rows[i][0])
        return _open_image(file, elsewhere=() if file.is_absolute() else (self.root / file,))

    def __getitem__(self, i):
        img = self.image(i)
        return None if img is None else (self.transform(img), self.rows[i][1])


class ImageLocations:
    """Where a CSV's image paths lie (``CsvCaptions.image_path``'s rule) without a stat a
    path: a relative path is taken as written when its folder's listing (read once a
    folder) names it, else under ``root``."""

    def __init__(self, root: Path):
        self.root, self._names = root, {}

    def _listed(self, folder: str) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = set(os.listdir(folder or "."))
            except OSError:
                self._names[folder] = set()
        return self._names[folder]

    def path(self, file: str) -> str:
        if os.path.isabs(file):
            return file
        folder, name = os.path.split(file)
        return file if name in self._listed(folder) else os.path.join(self.root, file)


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


def shards_fingerprint(shards: list[str]) -> str:
    """A digest of a shard list's contents: each shard's name, size and modification time
    (remote shards by their URL)."""
    h = hashlib.sha256()
    for u in sorted(shards):
        local = "://" not in u and not u.startswith("pipe:")
        st = os.stat(u) if local else None
        h.update(f"{Path(u).name if local else u}\0{st.st_size if st else ''}\0"
                 f"{st.st_mtime_ns if st else ''}\n".encode("utf-8", "surrogateescape"))
    return f"shards:{h.hexdigest()}"


def _split_commas(pattern: str) -> list[str]:
    """A pattern split at the commas outside braces ('{a,b}' is one brace alternation)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(pattern):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    return [p for p in parts + [pattern[start:]] if p]


def shard_sources(urls) -> list[list[str]]:
    """The shards of each '::'-separated source of ``urls`` (a list: one source), each source
    a brace pattern ('/d/{00000..00331}.tar', '/d/{a,b}.tar'), glob (in any part of the path)
    or ','-separated list. A name that exists as written is taken whole (commas included).
    Missing local files, and a list whose local shards are all empty, fail here, before any
    training."""
    import braceexpand

    if isinstance(urls, (str, Path)):
        chunks = [[x for part in ([chunk] if Path(chunk).is_file() else _split_commas(chunk))
                   for x in braceexpand.braceexpand(part)]
                  for chunk in str(urls).split("::") if chunk]
    else:
        chunks = [list(map(str, urls))]
    sources = [_found(chunk) for chunk in chunks]
    out = [u for source in sources for u in source]
    if not out:
        raise ValueError(f"no webdataset shards in {urls!r}")
    local = [u for u in out if "://" not in u and not u.startswith("pipe:")]
    if local and len(local) == len(out) and not any(os.path.getsize(u) for u in local):
        raise ValueError(f"every webdataset shard is empty (0 bytes): {', '.join(local[:3])}"
                         f"{' ...' if len(local) > 3 else ''}")
    return sources


def _found(urls: list[str]) -> list[str]:
    """``urls`` with their globs expanded; a missing local shard fails."""
    import glob

    out = []
    for u in urls:
        remote = "://" in u or u.startswith("pipe:")
        if not remote and not Path(u).is_file() and any(c in u for c in "*?["):
            found = sorted(glob.glob(u))
            if not found:
                raise FileNotFoundError(f"no webdataset shard matches {u}")
            out += found
        elif not remote and not Path(u).is_file():
            raise FileNotFoundError(f"webdataset shard not found: {u}")
        else:
            out.append(u)
    return out


def shard_list(urls) -> list[str]:
    """Every shard of ``urls`` (``shard_sources``), the '::' sources one after another."""
    return [u for source in shard_sources(urls) for u in source]


SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def shard_pairs(shard: str, transform, counter: list, select=None):
    """(image, caption) of one tar shard (jpg/png/jpeg/webp + txt, as img2dataset writes CC3M).
    A truncated or corrupt shard ends at its last good member; each such failure, and
    each undecodable or incomplete sample, adds 1 to ``counter[0]``. ``select``: called once
    per sample, in order, before it is decoded; a sample it refuses is passed over unread."""
    from webdataset import tariterators

    def on_error(exc):
        counter[0] += 1
        warn_unreadable(f"webdataset shard {shard}", exc)
        return True

    for sample in tariterators.tarfile_samples([{"url": shard}], handler=on_error):
        if select is not None and not select():
            continue
        key = f"{sample.get('__key__')} of {shard}"
        # webdataset keys a member at its first dot: 'a.b.jpg' is key 'a', field 'b.jpg'
        data = next((v for k, v in sample.items() if not k.startswith("__")
                     and k.rsplit(".", 1)[-1].lower() in SHARD_IMAGE_FIELDS), None)
        text = next((v for k, v in sample.items() if k == "txt" or k.endswith(".txt")), None)
        img = None if data is None or text is None else _open_image(io.BytesIO(data), key)
        if img is None:
            counter[0] += 1
            if data is None or text is None:
                warn_unreadable(f"sample {key}", "no image or no caption")
            continue
        yield transform(img), text.decode("utf-8", "replace") if isinstance(text, bytes) else text


class ShardedCaptions(IterableDataset):
    """Reference pairs streamed from webdataset shards, endlessly, epoch after epoch.

    ``shard_plan`` says which shards, and which of their samples, each reader (a loader
    worker of a rank) reads in an epoch: without ``resampled``, each pair once per epoch
    across readers (by shards, or by samples when there are fewer shards than readers;
    when the shards do not divide among the readers, their epochs differ by a shard, and a
    warning says so); with it, shards drawn with replacement, weighted by the
    ``upsampling_factors`` ('F1::F2', one per '::' source of ``urls``) as open_clip's
    --dataset-resampled draws them. Pairs are shuffled within a buffer, drained at each
    epoch's end. Items are ``(image, caption, -1, skipped)``: streamed pairs have no index,
    so their frozen embeddings are computed each step rather than cached.
    Resuming starts the stream at epoch ``start_epoch`` (shards have no random access): a
    resumed run sees other pairs than an unbroken one would, the same ones each time it is
    resumed from the same step with the same workers; everything else is exact."""

    def __init__(self, urls, transform, seed: int = 0, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, start_epoch: int = 0,
                 resampled: bool = False, upsampling_factors: str | None = None):
        sources = shard_sources(urls)
        self.shards = [u for source in sources for u in source]
        self.weights = None
        if upsampling_factors is not None:
            if not resampled:
                raise ValueError("upsampling factors weigh shards drawn with replacement: "
                                 "they need resampled=True (open_clip's --dataset-resampled)")
            factors = shard_plan.parse_factors(upsampling_factors, len(sources))
            self.weights = shard_plan.shard_weights(sources, factors)
        self.transform, self.seed, self.buffer = transform, seed, shuffle_buffer
        self.rank, self.world, self.start_epoch = rank, world_size, start_epoch
        self.resampled = resampled

    def my_shards(self, epoch: int, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` reads in ``epoch``, in order (under the sample
        split: every shard, of which it decodes its share)."""
        _, readers = shard_plan.reader(self.rank, self.world, worker, workers)
        if self.resampled:
            return shard_plan.resampled(self.shards, self.weights, self.seed, epoch, self.rank,
                                        worker, shard_plan.draws_per_epoch(len(self.shards),
                                                                           readers))
        order = shard_plan.epoch_order(self.shards, self.seed, epoch)
        if shard_plan.splits_samples(len(self.shards), readers):
            return order
        return shard_plan.shard_split(order, self.rank, self.world, worker, workers)

    def epoch_pairs(self, epoch: int, worker: int = 0, workers: int = 1, counter=None):
        """The (image, caption) pairs this rank's ``worker`` reads in ``epoch``, in shard
        order (before the shuffle buffer); unreadable ones add to ``counter[0]``."""
        counter = [0] if counter is None else counter
        index, readers = shard_plan.reader(self.rank, self.world, worker, workers)
        select = None
        if not self.resampled and shard_plan.splits_samples(len(self.shards), readers):
            select = shard_plan.sample_share(index, readers)
        for shard in self.my_shards(epoch, worker, workers):
            yield from shard_pairs(shard, self.transform, counter, select)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        _, readers = shard_plan.reader(self.rank, self.world, worker, workers)
        if worker == 0 and self.rank == 0 and not self.resampled and \
                len(self.shards) > readers and len(self.shards) % readers:
            log.warning("%d shards do not divide among %d rank(s) x %d worker(s): epochs "
                        "differ by a shard between them", len(self.shards), self.world, workers)
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}/{self.start_epoch}")
        counter, buffer, epoch = [0], [], self.start_epoch
        while True:
            read = 0
            for pair in self.epoch_pairs(epoch, worker, workers, counter):
                read += 1
                buffer.append(pair)
                if len(buffer) >= self.buffer:
                    yield self._emit(buffer, rng, counter)
            if read == 0:
                raise RuntimeError(self._nothing_read(epoch, worker, workers, counter[0]))
            while buffer:  # drained at the epoch's end, so that epochs do not mix
                yield self._emit(buffer, rng, counter)
            epoch += 1

    def _nothing_read(self, epoch: int, worker: int, workers: int, unreadable: int) -> str:
        shards = self.my_shards(epoch, worker, workers)
        _, readers = shard_plan.reader(self.rank, self.world, worker, workers)
        if not self.resampled and shard_plan.splits_samples(len(self.shards), readers):
            return (f"no readable pairs for rank {self.rank}'s loader worker {worker} in "
                    f"webdataset shards {shards} ({unreadable} unreadable): split by samples "
                    f"among {self.world} rank(s) x {workers} worker(s), the shards hold fewer "
                    "readable pairs than readers; use fewer --workers or more pairs")
        return f"no readable pairs in webdataset shards {shards} ({unreadable} unreadable)"

    @staticmethod
    def _emit(buffer, rng, counter):
        image, caption = buffer.pop(rng.randrange(len(buffer)))
        skipped, counter[0] = counter[0], 0
        return image, caption, -1, skipped


def add_csv_flags(add) -> None:
    """open_clip's CSV flags (``add``: a parser's or group's ``add_argument``): every command
    that reads a CSV reads it alike."""
    add("--csv-separator", default="\t", help="column separator of the CSVs (open_clip's)")
    add("--csv-img-key", default="filepath", help="image-path column of the CSVs")
    add("--csv-caption-key", default="title", help="caption column of the CSVs")


def csv_options(args) -> dict:
    """The CSV reader's options from --csv-separator, --csv-img-key, --csv-caption-key."""
    return {"sep": args.csv_separator, "img_key": args.csv_img_key,
            "caption_key": args.csv_caption_key}


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
