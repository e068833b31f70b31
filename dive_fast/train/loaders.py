"""The run's data as its arguments name it: the target set (with its training transform),
the reference pairs, the evaluation and RSA sets, the loaders, and the stream of ``Batch``es
a step takes. The formats themselves (image folders, CSVs, shards, the world) are
``data.py``'s."""
from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, IterableDataset

from . import listing, validate
from .data import (
    CsvCaptions,
    ImageFolderTask,
    Readable,
    ResumableSampler,
    ShardedCaptions,
    WorldCaptions,
    WorldTask,
    csv_options,
    heldout_pairs,
    in_order_loader,
    train_collate,
)
from .methods import Batch
from .protocol import chosen_templates
from .scoring import folder_eval_sets, world_eval_sets, world_rsa_set


def data_sources(args) -> dict[str, str]:
    """Where each data set comes from, for the report: a path, 'world' or 'none'."""
    own = {"target": args.train_folder, "reference": args.reference_csv or args.reference_shards,
           "eval": ", ".join(args.task), "rsa": args.rsa_csv or args.rsa_shards}
    return {part: own[part] or ("world" if part in args.world_parts else "none") for part in own}


def train_transform(args, bundle):
    """The target images' transform: open_clip's training one; the evaluation one with
    ``--no-augment``; for the world's target, FLYP's crop at the world's resolution."""
    if not args.augment:
        return bundle.preprocess_val
    if args.train_folder is None:
        from torchvision import transforms as T
        return T.Compose([T.RandomResizedCrop(bundle.image_size, scale=(0.9, 1.0),
                                              interpolation=T.InterpolationMode.BICUBIC),
                          *bundle.preprocess_val.transforms[-2:]])
    return bundle.preprocess_train


def target_data(args, bundle):
    """The labelled target set: ``--train-folder``, else the world's ID task."""
    tf = train_transform(args, bundle)
    if args.train_folder:  # the listing the argument checks made (``listing.folder``)
        return ImageFolderTask(args.train_folder, tf, templates=chosen_templates(args.templates),
                               listing=listing.folder(args.train_folder))
    return WorldTask("shapes", "train", args.train_size, tf, args.world_seed, bundle.image_size)


def reference_data(args, bundle, rank, world):
    """(dataset, id for the cache key; None when streamed)."""
    tf = bundle.preprocess_val  # deterministic, so the frozen embeddings can be cached
    if args.reference_shards:
        return ShardedCaptions(args.reference_shards, tf, seed=args.seed, rank=rank,
                               world_size=world, resampled=args.dataset_resampled,
                               upsampling_factors=args.reference_upsampling_factors), None
    if args.reference_csv:
        ds = CsvCaptions(args.reference_csv, tf, **csv_options(args))
        # its contents (cli.check_inputs digested them): a CSV rewritten in place is new data
        return ds, args.data_ids.get("reference") or ds.fingerprint()
    if "reference" not in args.world_parts:  # cli.resolve_world_parts refuses this earlier
        raise ValueError("no reference pairs: give --reference-csv or --reference-shards")
    ds = WorldCaptions("reference", args.ref_size, tf, args.world_seed, bundle.image_size)
    return ds, f"world:{args.world_seed}:{args.ref_size}"


def eval_sets(args, bundle):
    """({name: (kind, dataset)}, RSA pairs or None): the ``--task`` folders, else the
    world's tasks; the held-out pairs, the world's, or none."""
    tf = bundle.preprocess_val
    if args.rsa_csv or args.rsa_shards:
        rsa = heldout_pairs(tf, args.rsa_csv, args.rsa_shards, args.rsa_size,
                            csv_options=csv_options(args))
    elif "rsa" in args.world_parts:
        rsa = world_rsa_set(tf, n=args.rsa_size, seed=args.world_seed, size=bundle.image_size)
    else:
        rsa = None
    if args.task:
        return folder_eval_sets(validate.eval_folders(args.task, check_folders=False), tf,
                                chosen_templates(args.templates)), rsa
    return world_eval_sets(tf, args.eval_per_task, args.world_seed, bundle.image_size), rsa


def loader(ds, batch, seed, start_step, rank, world, workers, pin, tokenizer=None):
    collate = functools.partial(train_collate, tokenizer=tokenizer)
    if isinstance(ds, IterableDataset):  # streamed shards: split by rank inside, no sampler
        # each rank's workers augment with their own seeds, as they drew them from the
        # global RNG (seeded per rank) before
        return in_order_loader(ds, batch, workers, collate, seed=seed * 1009 + rank,
                               pin_memory=pin, persistent_workers=workers > 0)
    sampler = ResumableSampler(len(ds), seed, batch, start_step, rank, world)
    # An own generator: creating the iterator must not draw from the global RNG, whose
    # state a resumed run restores (and which drives the augmentation with workers=0).
    return DataLoader(Readable(ds), batch_size=batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def batch_stream(targets, references):
    """Endless ``Batch``es: a target batch and, where the method uses them, reference pairs."""
    targets = iter(targets)
    references = iter(references) if references is not None else None
    while True:
        images, labels, _, skipped, _ = next(targets)
        batch = Batch(images, labels, skipped=skipped)
        if references is not None:
            ref_images, _, index, ref_skipped, tokens = next(references)
            batch.ref_images, batch.ref_tokens = ref_images, tokens
            batch.skipped = skipped + ref_skipped
            batch.ref_index = index if bool((index >= 0).all()) else None
        yield batch


def batches(args, method, target_ds, ref_ds, tokenizer, start_step=0, rank=0, world=1):
    """The run's ``Batch`` stream from ``start_step`` on (loaders for targets and, where the
    method uses them, reference pairs), each ``Batch`` one step: --accum-freq x the batch
    sizes."""
    pin = method.device.type == "cuda"
    k = args.accum_freq  # a step holds K micro-batches of --batch-size (open_clip's meaning)
    targets = loader(target_ds, k * args.batch_size, args.seed, start_step, rank, world,
                     args.workers, pin)
    references = None
    if method.uses_reference:
        if isinstance(ref_ds, ShardedCaptions):  # a resumed stream starts a fresh epoch
            ref_ds.start_epoch = start_step
        references = loader(ref_ds, k * (args.ref_batch_size or args.batch_size), args.seed + 1,
                            start_step, rank, world, args.workers, pin, tokenizer)
    return batch_stream(targets, references)
