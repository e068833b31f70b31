"""The embedded world: deterministic, and its labels are true to its pixels."""
import numpy as np
import pytest

from dive_fast.world import COLOURS, POSITIONS, SHAPES, TASKS, caption_pair, render, task_image
from dive_fast.world.tasks import _rng, sample_scene


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = [task_image(TASKS["shapes"], "train", i, seed=3)[0] for i in range(5)]
    b = [task_image(TASKS["shapes"], "train", i, seed=3)[0] for i in range(5)]
    c = [task_image(TASKS["shapes"], "train", i, seed=4)[0] for i in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert caption_pair("reference", 7, seed=1)[1] == caption_pair("reference", 7, seed=1)[1]


def test_splits_and_labels_balanced():
    task = TASKS["colour"]
    labels = [task_image(task, "test", i)[1] for i in range(2 * len(task.classnames))]
    assert labels == list(range(len(task.classnames))) * 2
    with pytest.raises(ValueError, match="split must be one of"):
        task_image(task, "nope", 0)


def _object_pixels(img, scene):
    """Pixels far from the plain background colour: the object's."""
    bg = np.median(img.reshape(-1, 3), axis=0)
    return np.abs(img.astype(float) - bg).sum(-1) > 90


@pytest.mark.parametrize("index", range(12))
def test_colour_and_position_recoverable_from_pixels(index):
    rng = _rng(0, "pixel-test", index)
    scene = sample_scene(rng, styles=("photo",), backgrounds=("black",), count=1, size="large")
    img = render(scene, 32)
    mask = _object_pixels(img, scene)
    assert mask.sum() > 20
    mean = img[mask].mean(0) / 255
    nearest = min(COLOURS, key=lambda c: np.abs(np.asarray(COLOURS[c]) - mean).sum())
    assert nearest == scene["colour"]
    ys, xs = np.nonzero(mask)
    quadrant = (("top" if ys.mean() < 16 else "bottom") + " "
                + ("left" if xs.mean() < 16 else "right"))
    assert quadrant == scene["position"]
    assert scene["position"] in POSITIONS


def test_size_and_count_recoverable_from_pixels():
    areas = {}
    for size in ("small", "large"):
        scene = sample_scene(_rng(0, "size", size), styles=("photo",), backgrounds=("black",),
                             count=1, size=size, shape="square")
        areas[size] = _object_pixels(render(scene, 32), scene).sum()
    assert areas["large"] > 2.5 * areas["small"]
    from scipy import ndimage
    for count in (1, 2, 3):
        scene = sample_scene(_rng(0, "count", count), styles=("photo",), backgrounds=("black",),
                             count=count, shape="circle")
        assert ndimage.label(_object_pixels(render(scene, 64), scene))[1] == count


def test_captions_describe_the_scene():
    for i in range(50):
        _, text, scene = caption_pair("pretrain", i)
        words = text.lower()
        named = [c for c in COLOURS if c in words.split()]
        assert named in ([], [scene["colour"]])
        assert not any(s in words for s in SHAPES if s != scene["shape"] and s not in scene["shape"]
                       and not (s == "ring" and "background" in words))


def test_captions_name_the_shape_mostly_by_family():
    from dive_fast.world.language import FAMILIES, FAMILY_OF
    assert sorted(FAMILY_OF) == sorted(SHAPES)
    exact = family = 0
    for i in range(400):
        _, text, scene = caption_pair("pretrain", i)
        words = text.lower().replace(",", " ").replace(".", " ").split()
        exact += scene["shape"] in words or scene["shape"] + "s" in words or \
            scene["shape"] + "es" in words
        named = [f for f in FAMILIES if f in words]
        assert named in ([], [FAMILY_OF[scene["shape"]]])
        family += bool(named)
    assert 0.2 < exact / 400 < 0.4 and 0.45 < family / 400 < 0.65


def test_id_task_is_a_narrow_slice_the_reference_set_leaves_out():
    from dive_fast.world.tasks import in_id_slice, task_scene
    for i in range(20):
        scene, _ = task_scene(TASKS["shapes"], "train", i)
        assert in_id_slice(scene) and scene["count"] == 1 and scene["size"] == "large"
        assert not in_id_slice(task_scene(TASKS["shapes-sketch"], "test", i)[0])
    assert not any(in_id_slice(caption_pair("reference", i)[2]) for i in range(300))
    assert sum(in_id_slice(caption_pair("pretrain", i)[2]) for i in range(2000)) > 10


def test_spurious_colour_lever_touches_only_the_id_training_split(monkeypatch):
    from dive_fast.world import tasks
    from dive_fast.world.render import COLOURS
    shapes = TASKS["shapes"]
    sketch = TASKS["shapes-sketch"]
    before = [tasks.task_scene(shapes, split, i) for split in ("train", "test") for i in range(40)]
    sketch_before = [tasks.task_scene(sketch, "train", i) for i in range(20)]
    monkeypatch.setattr(tasks, "ID_TRAIN_SPURIOUS_COLOUR", 1.0)
    own = [tasks.task_scene(shapes, "train", i) for i in range(40)]
    assert all(scene["colour"] == tuple(COLOURS)[label % len(COLOURS)] for scene, label in own)
    assert [tasks.task_scene(shapes, "test", i) for i in range(40)] == before[40:]
    assert len({scene["colour"] for scene, _ in before[:40]}) > 4  # off: colours at random
    assert [tasks.task_scene(sketch, "train", i) for i in range(20)] == sketch_before


def test_family_only_reference_captions_never_name_the_exact_shape(monkeypatch):
    from dive_fast.world import tasks
    from dive_fast.world.language import FAMILY_OF, PLURALS
    pretrain_before = [caption_pair("pretrain", i)[1] for i in range(50)]
    monkeypatch.setattr(tasks, "REFERENCE_NAMES_EXACT_SHAPE", False)
    family = 0
    for i in range(300):
        _, text, scene = caption_pair("reference", i)
        words = text.lower().rstrip(".").replace(",", "").split()
        assert scene["shape"] not in words and PLURALS[scene["shape"]] not in words
        family += FAMILY_OF[scene["shape"]] in words
    assert 0.75 < family / 300 < 0.95  # the exact share moved to the family
    assert [caption_pair("pretrain", i)[1] for i in range(50)] == pretrain_before


@pytest.mark.parametrize("switch, attribute, narrowed", [
    ("REFERENCE_SHAPES", "shape", ("circle", "star")),
    ("REFERENCE_STYLES", "style", ("sketch", "textured"))])
def test_reference_switches_narrow_only_the_reference_scenes(monkeypatch, switch, attribute,
                                                               narrowed):
    from dive_fast.world import tasks
    default = [caption_pair("reference", i)[2] for i in range(40)]
    pretrain_before = [caption_pair("pretrain", i)[2] for i in range(40)]
    monkeypatch.setattr(tasks, switch, narrowed)
    shown = {caption_pair("reference", i)[2][attribute] for i in range(200)}
    assert shown == set(narrowed)
    assert [caption_pair("pretrain", i)[2] for i in range(40)] == pretrain_before
    monkeypatch.setattr(tasks, switch, None)
    assert [caption_pair("reference", i)[2] for i in range(40)] == default
    assert len({s[attribute] for s in default}) > 3


def test_every_task_renders_and_has_templates():
    kinds = {t.kind for t in TASKS.values()}
    assert kinds == {"id", "ood", "zeroshot"}
    assert len([t for t in TASKS.values() if t.kind == "ood"]) >= 3
    assert len([t for t in TASKS.values() if t.kind == "zeroshot"]) >= 4
    assert len(TASKS["shapes"].classnames) >= 10
    for task in TASKS.values():
        img, label = task_image(task, "val", 1)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert all("{}" in t for t in task.templates)


def test_reference_empty_share_adds_background_only_pairs(monkeypatch):
    from dive_fast.world import tasks
    default = [caption_pair("reference", i)[1] for i in range(40)]
    pretrain_before = [caption_pair("pretrain", i)[1] for i in range(40)]
    monkeypatch.setattr(tasks, "REFERENCE_EMPTY_SHARE", 0.5)
    pairs = [caption_pair("reference", i) for i in range(200)]
    empty = [(img, text, scene) for img, text, scene in pairs if scene["count"] == 0]
    assert 70 < len(empty) < 130
    for img, text, scene in empty:
        assert scene["background"] in text and "shape" not in text and "object" not in text
    plain = [img for img, _, scene in empty
             if scene["style"] == "photo" and scene["background"] in ("black", "gray")]
    assert len(plain) >= 3 and all(img.std() < 1 for img in plain)  # nothing drawn on them
    assert [caption_pair("pretrain", i)[1] for i in range(40)] == pretrain_before
    monkeypatch.setattr(tasks, "REFERENCE_EMPTY_SHARE", 0.0)
    assert [caption_pair("reference", i)[1] for i in range(40)] == default
