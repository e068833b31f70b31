"""RSA: how well the fine-tuned embedding space keeps the pre-trained one's pairwise
similarities (Spearman correlation of the two cosine-similarity matrices; 1 = intact)."""
from __future__ import annotations

import torch

from . import distributed
from .precision import autocast


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def rsa(pre: torch.Tensor, ft: torch.Tensor) -> float:
    """Spearman correlation of the upper triangles of the two cosine-similarity matrices."""
    if pre.shape != ft.shape or pre.shape[0] < 3:
        raise ValueError(f"RSA needs two [N>=3, dim] embeddings of one set, got "
                         f"{tuple(pre.shape)} and {tuple(ft.shape)}")
    pre = torch.nn.functional.normalize(pre.double(), dim=1)
    ft = torch.nn.functional.normalize(ft.double(), dim=1)
    iu = torch.triu_indices(len(pre), len(pre), offset=1)
    return spearman((pre @ pre.T)[iu[0], iu[1]], (ft @ ft.T)[iu[0], iu[1]])


@torch.no_grad()
def embed_pairs(model, tokenizer, loader, device="cpu", amp_dtype=None, weight_setters=(None,),
                over_ranks: bool = False):
    """[(image embeddings, text embeddings)] of the pairs, one per weight setter (None: the
    model as it is), in one pass over ``loader``. ``over_ranks``: ``loader`` is this rank's
    share (``share``), and every rank gets all the rows, in rank order."""
    found, applied = [([], []) for _ in weight_setters], None
    for images, texts, _ in loader:
        if images is None:
            continue
        tokens = tokenizer(texts).to(device)
        for set_weights, (imgs, txts) in zip(weight_setters, found):
            if set_weights is not None and set_weights is not applied:  # one variant: once
                set_weights()
                applied = set_weights
            with autocast(device, amp_dtype):
                imgs.append(model.encode_image(images.to(device), normalize=True).float().cpu())
                txts.append(model.encode_text(tokens, normalize=True).float().cpu())
    found = [(torch.cat(imgs) if imgs else None, torch.cat(txts) if txts else None)
             for imgs, txts in found]
    if over_ranks:  # every_rank[rank][setter] = (images, texts); None: a share with none
        every_rank = distributed.gather_in_rank_order(found)
        found = [tuple(torch.cat([t for t in column if t is not None]) for column in zip(*ranks))
                 for ranks in zip(*every_rank)]
    return found


def rsa_of(pre: tuple, ft: tuple) -> dict:
    (pi, pt), (fi, ft_) = pre, ft
    return {"image": rsa(pi, fi), "text": rsa(pt, ft_),
            "joint": rsa(torch.cat((pi, pt)), torch.cat((fi, ft_)))}


def rsa_report(pre_model, model, tokenizer, loader, device="cpu", amp_dtype=None) -> dict:
    (pre,) = embed_pairs(pre_model, tokenizer, loader, device, amp_dtype)
    (ft,) = embed_pairs(model, tokenizer, loader, device, amp_dtype)
    return rsa_of(pre, ft)
