"""Text truncation is exact: a trimmed batch through the installed short path gives open_clip's
own ``encode_text`` on the padded batch, for the tiny configs and for ViT-B-16 and ViT-B-32
text towers at random weights, in fp32 and bf16; towers it cannot cut stay at full length."""
import logging

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer

from dive_fast.train import text
from dive_fast.train.models import load_clip

CAPTIONS = ["a photo of a dog.", "a small red circle on a gray background, seen from above",
            "x", "an image of a very large spiky star shape in the top left corner of a picture"]


def padded_embeddings(model, tokens):
    """open_clip's own forward on the batch padded back to the context length."""
    ctx = model.context_length if isinstance(model, CLIP) else model.text.num_pos
    padded = torch.nn.functional.pad(tokens, (0, ctx - tokens.shape[1]), value=text.PAD_ID)
    if isinstance(model, CLIP):
        return CLIP.encode_text(model, padded)
    return TextTransformer.forward(model.text, padded)


def text_only(name):
    """An open_clip model at random weights, its image tower left tiny (only text is tested)."""
    model = open_clip.create_model(name, pretrained=None, force_image_size=32)
    return model.eval()


@pytest.mark.parametrize("name", ["dive-micro", "dive-tiny", "ViT-B-32", "ViT-B-16"])
def test_trimmed_batches_equal_open_clips_padded_forward(name):
    torch.manual_seed(0)
    model = text_only(name)
    tokenizer = text.install(model, open_clip.get_tokenizer(name))
    assert isinstance(tokenizer, text.TrimmingTokenizer)
    tokens = tokenizer(CAPTIONS)
    full = tokenizer.tokenizer(CAPTIONS)
    assert tokens.shape[1] % text.MULTIPLE == 0 and tokens.shape[1] < full.shape[1]
    assert torch.equal(tokens, full[:, :tokens.shape[1]])  # only padding was cut
    with torch.no_grad():
        short = model.encode_text(tokens)
        want = padded_embeddings(model, tokens)
    torch.testing.assert_close(short, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # bf16: within PyTorch's own bf16 error (autocast on the padded batch against fp32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        short16 = model.encode_text(tokens).float()
        want16 = padded_embeddings(model, tokens).float()
    own_error = (want16 - want).abs().max()
    assert (short16 - want).abs().max() <= 2 * own_error + 1e-6


def test_custom_text_clip_is_truncated_exactly():
    """A CustomTextCLIP (TextTransformer tower) with a causal mask and argmax pooling."""
    torch.manual_seed(0)
    cfg = dict(embed_dim=32,
               vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
               text_cfg=dict(context_length=32, width=32, heads=2, layers=2))
    model = CustomTextCLIP(**cfg).eval()
    tokenizer = text.install(model, open_clip.get_tokenizer("ViT-B-32", context_length=32))
    tokens = tokenizer(CAPTIONS[:3])
    assert tokens.shape[1] < 32
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), padded_embeddings(model, tokens),
                                   rtol=1e-5, atol=1e-6)


def test_towers_that_cannot_be_cut_stay_at_full_length(caplog, monkeypatch):
    monkeypatch.setattr(text, "_told", set())  # said once per process: from a clean slate
    model = text_only("dive-micro")
    model.text_pool_type = "last"  # pooling at the last position: cutting would move it
    caplog.set_level(logging.INFO, logger="dive_fast.train.text")
    base = open_clip.get_tokenizer("dive-micro")
    assert text.install(model, base) is base
    assert "encode_text" not in vars(model)
    assert "pools with 'last'" in caplog.text
    assert text.install(text_only("dive-micro"), base, enabled=False) is base


def test_the_frozen_copy_keeps_the_short_path():
    from dive_fast.train.models import frozen_copy
    bundle = load_clip("dive-micro")
    frozen = frozen_copy(bundle.model)
    tokens = bundle.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(frozen.encode_text(tokens), bundle.model.encode_text(tokens))
    assert frozen.encode_text.__self__ is frozen  # bound to the copy, not to the original


def test_trimmed_length_rounds_up_and_keeps_the_longest():
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :5] = 7
    tokens[1, :9] = 7
    assert text.trimmed_length(tokens) == 16
    tokens[2, :77] = 7
    assert text.trimmed_length(tokens) == 77
    assert text.trim(torch.zeros(2, 4, 77, dtype=torch.long)).shape == (2, 4, 8)
