"""Classifier heads for evaluation: zero-shot heads built from class names and templates as
open_clip builds them, trained heads matched to a set's classes by name, and the projected
rows of a subset of a larger class list (ImageNet-R's 200, ObjectNet's 113)."""
from __future__ import annotations

import torch

from .precision import autocast
from .protocol import projection_rows

PROMPTS_PER_BATCH = 1024  # text forwards of ~1024 prompts: ImageNet's 1000 x 80 in ~80


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device="cpu",
                  amp_dtype=None) -> torch.Tensor:
    """[classes, dim] float32: per class the normalised mean of its normalised prompt
    embeddings, built by open_clip's ``build_zero_shot_classifier`` under the run's
    autocast, batched over classes."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    with autocast(device, amp_dtype):
        weights = build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates),
            num_classes_per_batch=max(1, PROMPTS_PER_BATCH // len(templates)), device=device)
    return weights.T.float()


def trained_head(heads: dict, classnames) -> tuple[torch.Tensor | None, str | None]:
    """The trained head's rows for a set's classes, matched by name in the set's order
    (a test set with 9 of the 10 training classes uses those 9 rows); None with a note
    saying why when some class has no trained row (then the zero-shot head serves)."""
    names = tuple(classnames)
    for trained, weight in heads.items():
        if names == tuple(trained):  # by position: ImageNet's own list repeats two names
            return weight, None
        rows = {c: i for i, c in enumerate(trained)}
        missing = [c for c in names if c not in rows]
        if not missing:
            index = torch.tensor([rows[c] for c in names], device=weight.device)
            subset = "" if names == tuple(trained) else \
                f" ({len(names)} of its {len(trained)} classes, matched by name)"
            return weight[index], f"trained head{subset}" if subset else None
        if len(missing) < len(names):
            return None, (f"zero-shot head: class(es) {missing[:5]} are not among the trained "
                          f"head's {len(trained)} classes")
    if heads:  # a method with a trained head, on a set that shares no class name with it
        return None, "zero-shot head: no class of this set is among the trained head's"
    return None, None


def set_head(model, tokenizer, dataset, heads: dict, cache: dict, device="cpu",
             amp_dtype=None):
    """(head [rows, dim], note): the trained head when it covers the set's classes, else the
    zero-shot head. A subset of a larger class list (ImageNet-R's 200 of ImageNet's 1000,
    ObjectNet's 113: ``head_classes``, ``projection``) is scored with the larger head's
    rows ``projection`` (``protocol.projection_rows``): projected logits, as WiSE-FT and
    FLYP score it. A zero-shot row depends on its class name and the templates alone, so
    each is built once per templates in ``cache`` (ImageNet's shifts share them)."""
    full = getattr(dataset, "head_classes", None)
    rows, owner = projection_rows(dataset.projection) if full is not None else (None, None)
    if full is not None and tuple(full) in heads:  # by position: two ImageNet names repeat
        weight = heads[tuple(full)]
        return weight[torch.tensor(rows, device=weight.device)], None
    note = None
    if owner is None:  # one row per class: a trained head's rows by name
        head, note = trained_head(heads, dataset.classnames)
        if head is not None:
            return head, note
    names = dataset.classnames if full is None else [full[r] for r in rows]
    built = cache.setdefault(tuple(dataset.templates), {})
    todo = list(dict.fromkeys(c for c in names if c not in built))
    if todo:
        built.update(zip(todo, zeroshot_head(model, tokenizer, todo, dataset.templates, device,
                                             amp_dtype)))
    return torch.stack([built[c] for c in names]), note
