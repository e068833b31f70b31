"""``python -m dive_fast.world --out DIR``: the embedded world on disk, in the real formats.

    DIR/tasks/<task>/<split>/<NN_class>/<index>.png   image folders (ImageNet layout),
        with classnames.txt, templates.txt and task.json beside the class folders
    DIR/<corpus>/images/<index>.jpg + captions.csv    open_clip CSV (tab, filepath/title);
        corpora: reference (--pairs), pretrain (--pretrain-pairs), rsa-heldout (--rsa-pairs)
    DIR/<corpus>/shards/<corpus>-NNNNNN.tar           webdataset shards (jpg + txt)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path

from PIL import Image

from .._cli.progress import progress_bar
from .tasks import DEFAULT_SEED, SPLITS, TASKS, caption_pair, task_image


def write_task(out: Path, name: str, split: str, n: int, seed: int, size: int) -> Path:
    task = TASKS[name]
    root = out / "tasks" / name / split
    folders = [root / f"{i:02d}_{c.replace(' ', '_')}" for i, c in enumerate(task.classnames)]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, label = task_image(task, split, i, seed, size)
        Image.fromarray(img).save(folders[label] / f"{i:06d}.png")
    (root / "classnames.txt").write_text("\n".join(task.classnames) + "\n")
    (root / "templates.txt").write_text("\n".join(task.templates) + "\n")
    (root / "task.json").write_text(json.dumps({"task": name, "kind": task.kind, "split": split,
                                                "seed": seed, "n": n}))
    return root


def write_captions(out: Path, corpus: str, n: int, seed: int, size: int, shard_size: int,
                   formats=("csv", "wds")) -> Path:
    import webdataset as wds

    root = out / corpus
    (root / "images").mkdir(parents=True, exist_ok=True)
    writer = None
    if "wds" in formats:
        (root / "shards").mkdir(exist_ok=True)
        writer = wds.ShardWriter(str(root / "shards" / f"{corpus}-%06d.tar"), maxcount=shard_size,
                                 verbose=0)
    with open(root / "captions.csv", "w", newline="") as f:
        table = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # as dive_fast reads it
        table.writerow(["filepath", "title"])
        for i in progress_bar(range(n), desc=corpus, leave=False):
            img, text, _ = caption_pair(corpus, i, seed, size)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            if "csv" in formats:
                (root / "images" / f"{i:07d}.jpg").write_bytes(buf.getvalue())
                table.writerow([f"images/{i:07d}.jpg", text])
            if writer is not None:
                writer.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "txt": text})
    if writer is not None:
        writer.close()
    return root


MARKER = ".dive_fast_world.json"  # what says a folder holds a world this command wrote
MAX_IMAGE_BYTES = 1 << 30  # one rendered image's working memory: float64 RGB, S x S


def check_output(out: Path, size: int, images: int, formats) -> None:
    """--out is a folder this command may write: new, empty, or a world it wrote before
    (never a user's own files), with room for what it will write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"--out {out} holds files that no `python -m dive_fast.world` wrote; "
                         "give a new or empty folder")
    if 3 * 8 * size * size > MAX_IMAGE_BYTES:
        raise ValueError(f"--size {size}: one image would need about "
                         f"{3 * 8 * size * size / 2**30:.1f} GiB of memory to render (at most "
                         f"{MAX_IMAGE_BYTES >> 30} GiB); the world is drawn at 16 to 1024 pixels")
    per_image = 3 * size * size * (len(formats) if formats else 1)  # uncompressed, per format
    need = images * per_image
    probe = out if out.is_dir() else next(p for p in out.parents if p.is_dir())
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ValueError(f"the world asked for ({images} images at {size} px) may need up to "
                         f"{need / 2**30:.1f} GiB, and {probe} has {free / 2**30:.1f} GiB free")


def build_parser() -> argparse.ArgumentParser:
    from .._cli.arguments import DefaultsFormatter
    p = argparse.ArgumentParser(
        prog="python -m dive_fast.world", formatter_class=DefaultsFormatter,
        description="Write the generated world to disk in the formats real data comes in: "
                    "image folders per task split, open_clip CSVs and webdataset shards of "
                    "image-caption pairs.",
        epilog="example:\n  python -m dive_fast.world --out w --tasks shapes,colour "
               "--n 100 --pairs 500 --rsa-pairs 64")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--tasks", default="all",
                   help=f"comma-separated task names ({', '.join(TASKS)}), or 'all'")
    p.add_argument("--splits", default="train,test", help="comma-separated splits to write")
    p.add_argument("--n", type=int, default=200, help="images per task split")
    p.add_argument("--pairs", type=int, default=1000, help="reference image-caption pairs")
    p.add_argument("--pretrain-pairs", type=int, default=0, help="pre-training pairs")
    p.add_argument("--rsa-pairs", type=int, default=0,
                   help="held-out pairs for RSA (the rsa-heldout corpus)")
    p.add_argument("--shard-size", type=int, default=500, help="pairs per webdataset shard")
    p.add_argument("--formats", default="csv,wds",
                   help="comma-separated: csv (open_clip CSV + image files), wds (tar shards)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for name, low in (("size", 8), ("n", 0), ("pairs", 0), ("pretrain_pairs", 0),
                      ("rsa_pairs", 0), ("shard_size", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 32:  # numpy's generators take 0 .. 2**32 - 1
        p.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    formats = tuple(f for f in args.formats.split(",") if f)
    if not formats or set(formats) - {"csv", "wds"}:
        p.error(f"--formats wants a comma-separated subset of csv,wds, got {args.formats!r}")
    out = Path(args.out)
    names = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    try:
        check_output(out, args.size, len(names) * len(args.splits.split(",")) * args.n
                     + args.pairs + args.pretrain_pairs + args.rsa_pairs, formats)
    except ValueError as exc:
        p.error(str(exc))
    splits = args.splits.split(",")
    for name in names:
        if name not in TASKS:
            p.error(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    for split in splits:
        if split not in SPLITS:
            p.error(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    out.mkdir(parents=True, exist_ok=True)  # everything checked: now write
    (out / MARKER).write_text(json.dumps({"seed": args.seed, "size": args.size}) + "\n")
    for name in names:
        for split in splits:
            write_task(out, name, split, args.n, args.seed, args.size)
    if args.pairs:
        write_captions(out, "reference", args.pairs, args.seed, args.size, args.shard_size, formats)
    if args.pretrain_pairs:
        write_captions(out, "pretrain", args.pretrain_pairs, args.seed, args.size,
                       args.shard_size, formats)
    if args.rsa_pairs:
        write_captions(out, "rsa-heldout", args.rsa_pairs, args.seed, args.size,
                       args.shard_size, formats)
    print(f"wrote the world (seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
