"""The paper's zero-shot suite: tiny trees in each layout read (torchvision's), labels
checked against class mappings written out here by hand; the layouts not read are refused
by name. Class names and templates: the clip_benchmark package's (the extra ``suite``)."""
import logging

import clip_benchmark  # noqa: F401  (the extra `suite`, in the test extra: a failure, not a skip)
import pytest
from PIL import Image

from dive_fast.train import evaluate, validate
from dive_fast.train.suite import SuiteSet, with_suite

CALTECH = (  # torchvision's 101_ObjectCategories, BACKGROUND_Google included (102)
    "BACKGROUND_Google Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant "
    "barrel bass beaver binocular bonsai brain brontosaurus buddha butterfly camera cannon "
    "car_side ceiling_fan cellphone chair chandelier cougar_body cougar_face crab crayfish "
    "crocodile crocodile_head cup dalmatian dollar_bill dolphin dragonfly electric_guitar "
    "elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone "
    "grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree "
    "kangaroo ketch lamp laptop llama lobster lotus mandolin mayfly menorah metronome minaret "
    "nautilus octopus okapi pagoda panda pigeon pizza platypus pyramid revolver rhino rooster "
    "saxophone schooner scissors scorpion sea_horse snoopy soccer_ball stapler starfish "
    "stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch water_lilly "
    "wheelchair wild_cat windsor_chair wrench yin_yang").split()
CALTECH_NAMES = {"BACKGROUND_Google": "background", "Faces": "off-center face",
                 "Faces_easy": "centered face", "Leopards": "leopard",
                 "Motorbikes": "motorbike", "accordion": "accordion", "airplanes": "airplane",
                 "car_side": "side of a car", "cougar_face": "face of a cougar cat",
                 "snoopy": "snoopy (cartoon beagle)", "wild_cat": "wild cat",
                 "windsor_chair": "windsor chair", "yin_yang": "yin and yang symbol"}
EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river",
    "SeaLake": "lake or sea"}


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 9 % 256, 40, 90)).save(path)


def _class_tree(top, folders):
    for name in folders:
        _image(top / name / "image_0001.jpg")


def _named(ds):
    """{image path: class name} of a suite set."""
    return {str(path): ds.classnames[label] for path, label in ds.samples}


def test_caltech101_by_sorted_category_folder(tmp_path):
    assert len(CALTECH) == 102 and len(set(CALTECH)) == 102
    top = tmp_path / "caltech101" / "101_ObjectCategories"
    _class_tree(top, CALTECH)
    for given in (tmp_path, tmp_path / "caltech101", top):
        named = _named(SuiteSet("caltech101", given, None))
        assert len(named) == 102
        for folder, name in CALTECH_NAMES.items():
            assert named[str(top / folder / "image_0001.jpg")] == name
    (top / "yin_yang" / "image_0001.jpg").unlink()
    (top / "yin_yang").rmdir()
    with pytest.raises(ValueError, match=r".* is not caltech101's layout \(101 class "
                                         r"folders .*, not 102\); expected caltech101/101_Obj"):
        SuiteSet("caltech101", tmp_path, None)


def test_eurosat_by_sorted_class_folder_with_its_templates(tmp_path):
    top = tmp_path / "eurosat" / "2750"
    _class_tree(top, EUROSAT_NAMES)
    ds = SuiteSet("eurosat", tmp_path / "eurosat", None)
    assert _named(ds) == {str(top / f / "image_0001.jpg"): n for f, n in EUROSAT_NAMES.items()}
    assert ds.templates[0] == "a centered satellite photo of {}."


def test_oxford_pets_by_the_test_splits_class_numbers(tmp_path):
    root = tmp_path / "oxford-iiit-pet"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "test.txt").write_text(
        "Abyssinian_201 1 1 1\nkeeshond_3 19 2 8\nyorkshire_terrier_7 37 2 25\n")
    ds = SuiteSet("pets", root, None)
    assert _named(ds) == {str(root / "images" / "Abyssinian_201.jpg"): "Abyssinian",
                          str(root / "images" / "keeshond_3.jpg"): "Keeshond",
                          str(root / "images" / "yorkshire_terrier_7.jpg"): "Yorkshire Terrier"}
    assert ds.templates == ("a photo of a {}, a type of pet.",)


def test_flowers102_by_its_test_split_and_label_files(tmp_path):
    from scipy.io import savemat
    root = tmp_path / "flowers-102"
    root.mkdir()
    savemat(root / "imagelabels.mat", {"labels": [[1, 102, 3, 1, 2]]})  # 1-based classes
    savemat(root / "setid.mat", {"tstid": [[2, 3, 5]], "trnid": [[1]], "valid": [[4]]})
    assert _named(SuiteSet("flowers102", root, None)) == {
        str(root / "jpg" / "image_00002.jpg"): "blackberry lily",
        str(root / "jpg" / "image_00003.jpg"): "canterbury bells",
        str(root / "jpg" / "image_00005.jpg"): "hard-leaved pocket orchid"}


def test_food101_by_its_test_split_with_its_own_class_names(tmp_path):
    root = tmp_path / "food-101"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "test.json").write_text(
        '{"waffles": ["waffles/7"], "apple_pie": ["apple_pie/12", "apple_pie/3"], '
        '"baby_back_ribs": ["baby_back_ribs/5"]}')
    ds = SuiteSet("food101", root, None)
    assert _named(ds) == {str(root / "images" / "apple_pie" / "12.jpg"): "apple pie",
                          str(root / "images" / "apple_pie" / "3.jpg"): "apple pie",
                          str(root / "images" / "baby_back_ribs" / "5.jpg"): "baby back ribs",
                          str(root / "images" / "waffles" / "7.jpg"): "waffles"}
    assert "a photo of {}, a type of food." in ds.templates


def test_dtd_by_its_first_test_split(tmp_path):
    root = tmp_path / "dtd"
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "test1.txt").write_text(
        "zigzagged/zigzagged_0010.jpg\nbanded/banded_0004.jpg\nlined/lined_0001.jpg\n")
    assert _named(SuiteSet("dtd", root, None)) == {
        str(root / "images" / "banded" / "banded_0004.jpg"): "banded",
        str(root / "images" / "lined" / "lined_0001.jpg"): "lined",
        str(root / "images" / "zigzagged" / "zigzagged_0010.jpg"): "zigzagged"}


def test_fgvc_aircraft_by_variant_in_the_variants_files_order(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    (data / "images_variant_test.txt").write_text(
        "1514522 Cessna 172\n0056978 707-320\n0062781 A300B4\n")
    ds = SuiteSet("fgvc-aircraft", tmp_path / "fgvc-aircraft-2013b", None)
    assert ds.samples == [(data / "images" / "1514522.jpg", 2),
                          (data / "images" / "0056978.jpg", 0),
                          (data / "images" / "0062781.jpg", 1)]
    assert ds.classnames == ("707-320", "A300B4", "Cessna 172")
    (data / "images_variant_test.txt").write_text("1514522 Cessna 182\n")
    with pytest.raises(ValueError, match=r"variant 'Cessna 182' is not in variants.txt"):
        SuiteSet("fgvc-aircraft", tmp_path / "fgvc-aircraft-2013b", None)


def test_the_sets_not_read_are_refused_by_name_with_their_layout(tmp_path):
    with pytest.raises(ValueError, match=r"--task 'zeroshot:sun397:.*': sun397's layout "
                                         r"\(SUN397/<letter>/<class>/\*.jpg with "
                                         r"ClassName.txt .*\) is not read yet"):
        validate.eval_folders([f"zeroshot:sun397:{tmp_path}"])
    with pytest.raises(ValueError, match=r"stanford-cars's layout"):
        SuiteSet("cars", tmp_path, None)


def test_the_paper_suite_adds_the_sets_present_and_names_the_others(tmp_path, caplog):
    _class_tree(tmp_path / "eurosat" / "2750", EUROSAT_NAMES)
    given = ["id:shapes:/x"]
    with caplog.at_level(logging.WARNING):
        tasks = with_suite(given, "paper", tmp_path)
    assert tasks == given + [f"zeroshot:eurosat:{tmp_path / 'eurosat'}"]
    assert ("caltech101; flowers102; food101; sun397 (layout not read yet); dtd; "
            "fgvc-aircraft; stanford-cars (layout not read yet); oxford-pets; ucf101 (layout "
            "not read yet)") in caplog.text
    args = evaluate.build_parser().parse_args(["--zeroshot-suite", "paper", str(tmp_path)])
    evaluate.check_args(args)
    assert args.task == [f"zeroshot:eurosat:{tmp_path / 'eurosat'}"]
    with pytest.raises(ValueError, match=r"--zeroshot-suite paper .*: none of the suite's sets"):
        with_suite([], "paper", tmp_path / "eurosat")
    with pytest.raises(ValueError, match=r"--zeroshot-suite mine: the one suite is 'paper'"):
        with_suite([], "mine", tmp_path)


def test_a_suite_set_is_evaluated_under_its_own_names(micro_cache, tmp_path):
    _class_tree(tmp_path / "eurosat" / "2750", EUROSAT_NAMES)
    report = evaluate.main(["--model", "dive-micro", "--zeroshot-suite", "paper", str(tmp_path),
                            "--templates", "simple"])
    assert list(report["zeroshot"]) == ["eurosat"]
    assert report["metrics"]["eurosat"]["top1"] in {k / 10 for k in range(11)}  # 10 images
