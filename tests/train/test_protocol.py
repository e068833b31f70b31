"""The standard sets' protocol on ImageNet-shaped trees of tiny images: class names, labels,
templates, the ImageNet-R/-A projection, V2's numeric folders and the presets, checked
against mappings written out by hand here (from ImageNet's published class list)."""
import pytest
import torch
from PIL import Image

from dive_fast.train import heads, protocol, scoring, validate
from dive_fast.train.data import DEFAULT_TEMPLATES, ImageFolderTask, collate

PILToTensor = __import__("torchvision").transforms.PILToTensor

# ImageNet-1k class order, by hand: index, WordNet ID, open_clip's name
TENCH, GOLDFISH, SHARK = (0, "n01440764", "tench"), (1, "n01443537", "goldfish"), \
    (2, "n01484850", "great white shark")
BRAMBLING = (10, "n01530575", "brambling")
TOILET_PAPER = (999, "n15075141", "toilet paper")
# ImageNet-R's first classes (ImageNet 1, 2, 4) and ImageNet-A's (6, 11, 13)
R_FIRST = (1, 2, 4)
A_FIRST = (6, 11, 13)


def tree(root, folders):
    """ROOT/<folder>/0.png, one 2x2 image each."""
    for name in folders:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (2, 2), (len(name), 0, 0)).save(root / name / "0.png")
    return root


def labels_by_folder(ds):
    return {path.parent.name: label for path, label in ds.samples}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return tree(tmp_path_factory.mktemp("imagenet") / "val", protocol.imagenet_wnids())


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return tree(tmp_path_factory.mktemp("v2") / "v2", [str(i) for i in range(1000)])


def test_wordnet_folders_get_imagenet_names_and_openai_templates(imagenet):
    ds = ImageFolderTask(imagenet, None)
    labels = labels_by_folder(ds)
    for index, wnid, name in (TENCH, GOLDFISH, SHARK, BRAMBLING, TOILET_PAPER):
        assert labels[wnid] == index
        assert ds.classnames[index] == name
    assert len(ds.classnames) == 1000 and ds.projection is None
    assert len(ds.templates) == 80 and ds.templates[0] == "a bad photo of a {}."


def test_v2_numeric_folders_map_by_number_not_string_order(v2):
    ds = ImageFolderTask(v2, None)
    labels = labels_by_folder(ds)
    assert labels["1"] == 1 and labels["10"] == 10 and labels["2"] == 2
    assert labels["100"] == 100 and labels["999"] == 999
    assert ds.classnames[10] == "brambling" and ds.classnames[1] == "goldfish"
    assert len(ds.templates) == 80


def test_v2_preset_keeps_numbers_with_folders_missing(tmp_path):
    ds = ImageFolderTask(tree(tmp_path, ["1", "10", "2"]), None, preset="imagenet-v2")
    assert labels_by_folder(ds) == {"1": 1, "2": 2, "10": 10}
    assert len(ds.classnames) == 1000
    with pytest.raises(ValueError, match="0..999"):
        ImageFolderTask(tree(tmp_path / "bad", ["1", "1000"]), None, preset="imagenet-v2")


def test_subset_of_wordnet_ids_is_projected_from_the_1000(tmp_path):
    ds = ImageFolderTask(tree(tmp_path, [SHARK[1], GOLDFISH[1]]), None)
    assert ds.classnames == ("goldfish", "great white shark")
    assert labels_by_folder(ds) == {GOLDFISH[1]: 0, SHARK[1]: 1}
    assert ds.projection == (1, 2) and len(ds.head_classes) == 1000


def test_imagenet_r_and_a_presets_score_their_own_200(tmp_path):
    r = ImageFolderTask(tree(tmp_path / "r", [GOLDFISH[1], SHARK[1]]), None,
                        preset="imagenet-r")
    assert len(r.classnames) == 200 and r.projection[:3] == R_FIRST
    assert r.classnames[:2] == ("goldfish", "great white shark")
    assert labels_by_folder(r) == {GOLDFISH[1]: 0, SHARK[1]: 1}  # R's classes 0 and 1
    a = ImageFolderTask(tree(tmp_path / "a", ["n01498041"]), None, preset="imagenet-a")
    assert a.projection[:3] == A_FIRST and a.classnames[0] == "stingray"
    assert labels_by_folder(a) == {"n01498041": 0}
    with pytest.raises(ValueError, match="not among imagenet-r's 200"):
        ImageFolderTask(tree(tmp_path / "r2", [TENCH[1]]), None, preset="imagenet-r")


class Stub(torch.nn.Module):
    """encode_image: one fixed feature; encode_text: the one-hot of the prompt's ImageNet
    class (the tokenizer below gives its index), so each zero-shot row is known by hand."""

    def __init__(self, feature):
        super().__init__()
        self.feature = feature

    def encode_image(self, images, normalize=True):  # no feature: the images are features
        return images if self.feature is None else self.feature.expand(len(images), -1)

    def encode_text(self, prompts, normalize=True):
        return torch.nn.functional.one_hot(prompts, 1000).float()


def test_r_image_is_scored_only_among_r_classes(tmp_path):
    r = ImageFolderTask(tree(tmp_path, [GOLDFISH[1]]), lambda img: torch.zeros(3),
                        templates=("{}",), preset="imagenet-r")
    names = protocol.imagenet_classnames()
    index = {n: i for i, n in enumerate(names)}
    def tokenizer(prompts):
        return torch.tensor([index[p] for p in prompts])
    feature = torch.zeros(1000)
    feature[TENCH[0]], feature[GOLDFISH[0]] = 1.0, 0.5  # tench (not in R) is best of 1000
    model = Stub(feature)
    head, _ = heads.set_head(model, tokenizer, r, {}, {})
    assert head.shape == (200, 1000) and head[0].argmax() == GOLDFISH[0]
    loader = torch.utils.data.DataLoader(r, batch_size=4, collate_fn=collate)
    top1, seen, _ = scoring.accuracy(model, head, loader)
    assert (top1, seen) == (1.0, 1)  # among R's 200, goldfish (R's class 0) wins
    trained = torch.arange(1000.)[:, None].expand(1000, 3)  # row i holds i
    head, _ = heads.set_head(model, tokenizer, r, {names: trained}, {})
    assert head[:3, 0].tolist() == list(R_FIRST)  # the 1000-way head's rows, by position


def test_unknown_ids_and_numbers_are_refused_naming_classnames_txt(tmp_path):
    unknown = tree(tmp_path / "u", ["n99999999", GOLDFISH[1]])
    with pytest.raises(ValueError, match=r"u/classnames\.txt"):
        ImageFolderTask(unknown, None)
    (unknown / "classnames.txt").write_text("goldfish\nmystery\n")
    assert ImageFolderTask(unknown, None).classnames == ("goldfish", "mystery")
    numbers = tree(tmp_path / "n", ["1", "2", "10"])
    with pytest.raises(ValueError, match=r"classnames\.txt .*numeric"):
        ImageFolderTask(numbers, None)
    (numbers / "classnames.txt").write_text("one\ntwo\nten\n")
    ds = ImageFolderTask(numbers, None)
    assert labels_by_folder(ds) == {"1": 0, "2": 1, "10": 2} and ds.classnames[2] == "ten"
    assert ds.templates == DEFAULT_TEMPLATES


def test_template_choices(tmp_path):
    assert len(protocol.template_set("openai")) == 80
    assert protocol.template_set("simple")[0] == "itap of a {}."
    file = tmp_path / "t.txt"
    file.write_text("a {} photo\n")
    assert protocol.template_set(str(file)) == ("a {} photo",)
    with pytest.raises(ValueError, match="--templates nope"):
        protocol.template_set("nope")
    ds = ImageFolderTask(tree(tmp_path / "f", [GOLDFISH[1], SHARK[1]]), None,
                         templates=protocol.template_set("simple"))
    assert len(ds.templates) == 7


def objectnet_release(root):
    """A miniature ObjectNet release: images/ (with a 2-pixel red frame, as the release has)
    and mappings/ in the release's formats, by hand: ObjectNet's "Alarm clock" is ImageNet's
    analog clock (409) and digital clock (530), "Banana" its banana (954); "Chair" is not
    one of the 113 classes ImageNet shares."""
    import json
    for folder in ("alarm_clock", "banana", "chair"):
        (root / "images" / folder).mkdir(parents=True)
        img = Image.new("RGB", (6, 6), (255, 0, 0))
        img.paste((0, 255, 0), (2, 2, 4, 4))
        img.save(root / "images" / folder / "0.png")
    maps = root / "mappings"
    maps.mkdir()
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair"}))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Banana": "banana"}))
    (maps / "imagenet_to_label_2012_v2").write_text("analog clock\nbanana\ndigital clock\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(
        {"409": 0, "954": 1, "530": 2}))
    return root / "images"


def test_objectnet_scores_each_class_by_its_best_imagenet_class(tmp_path):
    images = objectnet_release(tmp_path / "objectnet-1.0")
    ds = ImageFolderTask(images, PILToTensor(), templates=("{}",), preset="objectnet")
    assert ds.classnames == ("alarm clock", "banana")
    assert labels_by_folder(ds) == {"alarm_clock": 0, "banana": 1}  # chair is not read
    assert ds.projection == ((409, 530), (954,))
    img, _ = ds[0]
    assert img.shape == (3, 2, 2) and (img[1] == 255).all()  # the red frame is cut
    names = protocol.imagenet_classnames()
    index = {n: i for i, n in enumerate(names)}
    def tokenizer(prompts):
        return torch.tensor([index[p] for p in prompts])
    feature = torch.zeros(1000)
    feature[TENCH[0]], feature[530], feature[954] = 1.0, 0.6, 0.5
    model = Stub(feature)
    head, _ = heads.set_head(model, tokenizer, ds, {}, {})
    assert [int(r.argmax()) for r in head] == [409, 530, 954]
    report = scoring.evaluate(model, tokenizer, {"objectnet": ("ood", ds)}, progress=False)
    assert report["ood"]["objectnet"] == 0.5  # both read as the alarm clock (digital: 0.6)
    # a class's logit is its rows' largest: analog 0, digital .6 beat banana .5
    logits = torch.tensor([[0., .6, .5]])
    found, _, _ = scoring.scores(Stub(None), torch.eye(3), [(logits, torch.tensor([0]), 0)],
                                  owner=[0, 0, 1])
    assert found["top1"] == 1.0
    with pytest.raises(ValueError, match="mappings folder"):
        ImageFolderTask(tree(tmp_path / "bare", ["banana"]), None, preset="objectnet")


def test_imagenet_root_finds_the_usual_folders(tmp_path):
    tree(tmp_path / "imagenet" / "val", [GOLDFISH[1]])
    tree(tmp_path / "imagenet-r", [GOLDFISH[1]])
    objectnet_release(tmp_path / "objectnet-1.0")
    tasks = protocol.with_imagenet_root(["ood:imagenet-r:/elsewhere"], tmp_path)
    assert tasks == ["ood:imagenet-r:/elsewhere", f"id:imagenet:{tmp_path}/imagenet/val",
                     f"ood:objectnet:{tmp_path}/objectnet-1.0/images"]
    specs = validate.eval_folders(tasks[1:])
    assert [s.preset for s in specs] == ["imagenet", "objectnet"]


def test_paper_sets_end_to_end_with_imagenet_root(micro_cache, tmp_path):
    from helpers.runs import train_args

    from dive_fast import train
    pair = [GOLDFISH[1], SHARK[1]]
    tree(tmp_path / "train", pair)  # the target: 2 ImageNet classes of 4 images each
    for wnid in pair:
        for i in range(1, 4):
            Image.new("RGB", (2, 2), (0, 9 * i, 0)).save(tmp_path / "train" / wnid / f"{i}.png")
    root = tmp_path / "sets"
    tree(root / "imagenet" / "val", pair)
    tree(root / "imagenet-r", pair)
    tree(root / "imagenetv2-matched-frequency-format-val", ["1", "2", "10"])
    report = train.main(train_args(
        tmp_path / "run", "--train-folder", str(tmp_path / "train"), "--use-world",
        "reference", "--imagenet-root", str(root), "--templates", "simple"))
    for row in report.values():
        assert set(row["id"]) == {"imagenet"}
        assert set(row["ood"]) == {"imagenet-r", "imagenet-v2"}
        assert all(0 <= v <= 1 for v in (*row["id"].values(), *row["ood"].values()))
        assert 0 <= row["metrics"]["imagenet-r"]["top5"] <= 1  # R: 200 classes
    assert "Top-1 / top-5" in (tmp_path / "run" / "table.md").read_text()
