"""The paper's zero-shot suite: tiny trees in each layout read (torchvision's, and CoOp's
split files), labels checked against class mappings written out here by hand. Class names
and templates: the clip_benchmark package's (the extra ``suite``); UCF101's templates,
OpenAI CLIP's."""
import json
import logging

import clip_benchmark  # noqa: F401  (the extra `suite`, in the test extra: a failure, not a skip)
import pytest
from PIL import Image

from dive_fast.train import evaluate, validate
from dive_fast.train.suite import PAPER, SuiteSet, with_suite

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


CARS = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012")


def _car_files(folder, annotations):
    """The devkit's files: class names a cell array, test annotations a struct array with
    the devkit's fields (class 1-based)."""
    import numpy as np
    from scipy.io import savemat
    (folder / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CARS)), dtype=object)
    names[0, :] = CARS
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = [(f, object) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class",
                                    "fname")]
    records = np.zeros((1, len(annotations)), dtype=fields)
    for i, (fname, number) in enumerate(annotations):
        records[0, i] = (1, 2, 30, 40, number, fname)
    savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": records})


def test_stanford_cars_by_its_test_annotations_and_the_devkits_names(tmp_path, monkeypatch):
    root = tmp_path / "stanford_cars"
    _car_files(root, [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 3)])
    expected = {str(root / "cars_test" / "00001.jpg"): "Acura TL Sedan 2012",
                str(root / "cars_test" / "00002.jpg"): "AM General Hummer SUV 2000",
                str(root / "cars_test" / "00003.jpg"): "Acura TL Sedan 2012"}
    for given in (tmp_path, root):  # torchvision's root, or the folder itself
        ds = SuiteSet("cars", given, None)
        assert _named(ds) == expected
        assert ds.classnames == CARS and "a photo of my {}." in ds.templates
    monkeypatch.setitem(__import__("sys").modules, "scipy.io", None)
    with pytest.raises(RuntimeError, match=r"stanford-cars's labels are MATLAB files, read "
                                           r"with scipy \(pip install scipy\)"):
        SuiteSet("stanford-cars", root, None)


def test_stanford_cars_without_its_devkit_is_refused_with_its_layout(tmp_path):
    with pytest.raises(ValueError, match=r"is not stanford-cars's layout \(no .*cars_test_annos"
                                         r"_withlabels.mat\); expected stanford_cars/cars_test/"):
        SuiteSet("stanford-cars", tmp_path, None)


def _sun_tree(top):
    (top / "ClassName.txt").parent.mkdir(parents=True)
    (top / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n"
                                       "/b/bakery/shop\n")
    for image in ("a/abbey/sun_aaa.jpg", "a/abbey/sun_bbb.jpg",
                  "a/apartment_building/outdoor/sun_ccc.jpg", "b/bakery/shop/sun_ddd.jpg"):
        _image(top / image)
    _image(top / "a" / "abbey" / "notes.jpg")  # not sun_*.jpg: not SUN397's (torchvision's glob)


def test_sun397_all_images_by_classname_txt_with_clip_benchmarks_names(tmp_path):
    top = tmp_path / "SUN397"
    _sun_tree(top)
    expected = {str(top / "a/abbey/sun_aaa.jpg"): "abbey",
                str(top / "a/abbey/sun_bbb.jpg"): "abbey",
                str(top / "a/apartment_building/outdoor/sun_ccc.jpg"):
                    "apartment building outdoor",
                str(top / "b/bakery/shop/sun_ddd.jpg"): "bakery shop"}
    for given in (tmp_path, top):
        ds = SuiteSet("sun397", given, None)
        assert _named(ds) == expected
        assert ds.classnames == ("abbey", "apartment building outdoor", "bakery shop")
    (top / "ClassName.txt").write_text("/a/abbey\nabbey\n")
    with pytest.raises(ValueError, match=r"ClassName.txt lists 'abbey', not /<letter>/<class>"):
        SuiteSet("sun397", top, None)


def _split(folder, test, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(
        {"train": [], "val": [], "test": test}))


def test_coop_ucf101_by_its_split_file_with_openai_clips_templates(tmp_path):
    root = tmp_path / "ucf101"
    _split(root, [["Yo_Yo/v_YoYo_g01_c02.jpg", 1, "Yo_Yo"],
                  ["Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg", 0, "Apply_Eye_Makeup"]],
           "UCF101")
    ds = SuiteSet("ucf101", root, None)
    frames = root / "UCF-101-midframes"
    assert _named(ds) == {str(frames / "Yo_Yo/v_YoYo_g01_c02.jpg"): "Yo Yo",
                          str(frames / "Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg"):
                              "Apply Eye Makeup"}
    assert len(ds.templates) == 48 and ds.templates[0] == "a photo of a person {}."
    assert ds.templates[-1] == "a demonstration of the person practicing {}."
    (root / "split_zhou_UCF101.json").unlink()
    with pytest.raises(ValueError, match=r"ucf101 is read from CoOp's split file; expected "
                                         r"split_zhou_UCF101.json in it, beside UCF-101-midfr"):
        validate.eval_folders([f"zeroshot:ucf101:{root}"])


def test_coop_splits_named_by_clip_benchmark_through_the_releases_own_files(tmp_path):
    """The split's labels and test images; each label named as CLIP_benchmark names its
    images (the release's files beside the split), else by the split's names."""
    caltech = tmp_path / "caltech-101"
    _class_tree(caltech / "101_ObjectCategories", CALTECH)
    _split(caltech, [["yin_yang/image_0001.jpg", 2, "yin_yang"],
                     ["Faces/image_0001.jpg", 0, "face"],
                     ["Leopards/image_0003.jpg", 1, "leopard"],
                     ["Faces/image_0009.jpg", 0, "face"]], "Caltech101")
    assert SuiteSet("caltech101", caltech, None).classnames == (
        "off-center face", "leopard", "yin and yang symbol")
    sun = tmp_path / "sun397"
    _split(sun, [["a/apartment_building/outdoor/sun_ccc.jpg", 1, "outdoor apartment_building"],
                 ["a/abbey/sun_aaa.jpg", 0, "abbey"]], "SUN397")
    ds = SuiteSet("sun397", sun, None)  # no SUN397/ClassName.txt needed: the path says it
    assert _named(ds) == {
        str(sun / "SUN397/a/apartment_building/outdoor/sun_ccc.jpg"): "apartment building outdoor",
        str(sun / "SUN397/a/abbey/sun_aaa.jpg"): "abbey"}
    cars = tmp_path / "stanford_cars"
    _split(cars, [["cars_test/00002.jpg", 1, "2012 Acura RL Sedan"],
                  ["cars_test/00001.jpg", 0, "2000 AM General Hummer SUV"]], "StanfordCars")
    assert SuiteSet("cars", cars, None).classnames == (
        "2000 AM General Hummer SUV", "2012 Acura RL Sedan")  # no devkit: the split's names
    _car_files(cars, [("00001.jpg", 1), ("00002.jpg", 2)])
    ds = SuiteSet("cars", cars, None)
    assert _named(ds) == {str(cars / "cars_test" / "00002.jpg"): "Acura RL Sedan 2012",
                          str(cars / "cars_test" / "00001.jpg"): "AM General Hummer SUV 2000"}
    pets = tmp_path / "oxford_pets"
    (pets / "annotations").mkdir(parents=True)
    (pets / "annotations" / "test.txt").write_text("Abyssinian_201 1 1 1\nkeeshond_3 19 2 8\n")
    _split(pets, [["keeshond_3.jpg", 1, "keeshond"], ["Abyssinian_201.jpg", 0, "abyssinian"]],
           "OxfordPets")
    assert _named(SuiteSet("pets", pets, None)) == {
        str(pets / "images" / "keeshond_3.jpg"): "Keeshond",
        str(pets / "images" / "Abyssinian_201.jpg"): "Abyssinian"}
    eurosat = tmp_path / "eurosat"
    _class_tree(eurosat / "2750", EUROSAT_NAMES)
    _split(eurosat, [["SeaLake/SeaLake_7.jpg", 1, "Sea or Lake"],
                     ["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"]], "EuroSAT")
    assert SuiteSet("eurosat", eurosat, None).classnames == ("annual crop land", "lake or sea")
    flowers = tmp_path / "oxford_flowers"
    _split(flowers, [["image_00005.jpg", 0, "orchid"], ["image_00002.jpg", 1, "lily"]],
           "OxfordFlowers")
    assert SuiteSet("flowers", flowers, None).classnames == ("orchid", "lily")
    from scipy.io import savemat
    savemat(flowers / "imagelabels.mat", {"labels": [[1, 102, 3, 1, 2]]})  # 1-based classes
    assert SuiteSet("flowers", flowers, None).classnames == ("hard-leaved pocket orchid",
                                                            "blackberry lily")
    food = tmp_path / "food-101"
    _split(food, [["waffles/7.jpg", 1, "waffles"], ["apple_pie/12.jpg", 0, "apple_pie"]],
           "Food101")
    assert _named(SuiteSet("food101", food, None)) == {
        str(food / "images" / "waffles" / "7.jpg"): "waffles",
        str(food / "images" / "apple_pie" / "12.jpg"): "apple pie"}


def test_a_split_that_the_release_contradicts_keeps_its_own_names(tmp_path, caplog):
    caltech = tmp_path / "caltech-101"
    _class_tree(caltech / "101_ObjectCategories", CALTECH)
    _split(caltech, [["Faces/image_0001.jpg", 0, "face"], ["Leopards/image_0003.jpg", 0, "face"],
                     ["airplanes/image_0002.jpg", 1, "airplane"]], "Caltech101")
    with caplog.at_level(logging.WARNING):
        assert SuiteSet("caltech101", caltech, None).classnames == ("face", "airplane")
    assert "do not match the release's own classes one to one" in caplog.text
    (caltech / "101_ObjectCategories" / "yin_yang" / "image_0001.jpg").unlink()
    (caltech / "101_ObjectCategories" / "yin_yang").rmdir()  # 101 folders: no mapping
    _split(caltech, [["yin_yang/image_0001.jpg", 0, "yin_yang"]], "Caltech101")
    assert SuiteSet("caltech101", caltech, None).classnames == ("yin yang",)


@pytest.mark.parametrize("test, message", [
    ([["a/1.jpg", 0, "a"], ["b/1.jpg", 0, "b"]], r"label 0 is named \['a', 'b'\]; expected "
                                                 r"one name per label"),
    ([["a/1.jpg", 0, "a"], ["c/1.jpg", 2, "c"]], r"its labels are not 0..1 \(missing \[1\]"),
    ([["a/1.jpg", 1, "a"], ["b/1.jpg", 2, "b"]], r"its labels are not 0..1 \(missing \[0\]"),
    ([["a/1.jpg", 0, "a"], ["b/1.jpg", 1, "a"]], r"class name\(s\) \['a'\] given to more "),
    ([["a/1.jpg", "0", "a"]], r"a \"test\" entry is \['a/1.jpg', '0', 'a'\]; expected \[image "),
    ([], r"its \"test\" list is empty"),
])
def test_a_split_file_with_inconsistent_labels_is_refused_naming_it(tmp_path, test, message):
    _split(tmp_path / "dtd", test, "DescribableTextures")
    with pytest.raises(ValueError, match=r".*split_zhou_DescribableTextures.json: " + message):
        SuiteSet("dtd", tmp_path / "dtd", None)


def test_a_split_file_that_is_not_json_is_refused_naming_it(tmp_path):
    (tmp_path / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"split_zhou_DescribableTextures.json: not a CoOp "
                                         r"split file with a \"test\" list \(JSONDecodeError"):
        SuiteSet("dtd", tmp_path, None)


def test_coop_fgvc_aircraft_is_the_data_folder_renamed(tmp_path):
    data = tmp_path / "fgvc_aircraft"
    data.mkdir()
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    (data / "images_variant_test.txt").write_text("0062781 A300B4\n")
    assert SuiteSet("fgvc_aircraft", data, None).samples == [(data / "images" / "0062781.jpg", 1)]


# Each set under CoOp's folder name, with its split file (fgvc_aircraft: its data files)
COOP_FOLDERS = {"caltech101": ("caltech-101", "Caltech101"),
                "flowers102": ("oxford_flowers", "OxfordFlowers"),
                "food101": ("food-101", "Food101"), "sun397": ("sun397", "SUN397"),
                "dtd": ("dtd", "DescribableTextures"), "fgvc-aircraft": ("fgvc_aircraft", None),
                "stanford-cars": ("stanford_cars", "StanfordCars"),
                "oxford-pets": ("oxford_pets", "OxfordPets"), "eurosat": ("eurosat", "EuroSAT"),
                "ucf101": ("ucf101", "UCF101")}


def test_the_paper_suite_finds_all_ten_in_coops_folders(tmp_path):
    for folder, split in COOP_FOLDERS.values():
        if split:
            _split(tmp_path / folder, [["x/1.jpg", 0, "x"]], split)
    (tmp_path / "fgvc_aircraft" / "variants.txt").parent.mkdir()
    (tmp_path / "fgvc_aircraft" / "variants.txt").write_text("707-320\n")
    _sun_tree(tmp_path / "SUN397")  # torchvision's too: the folder with the split file wins
    tasks = with_suite([], "paper", tmp_path)
    assert tasks == [f"zeroshot:{name}:{tmp_path / COOP_FOLDERS[name][0]}" for name in PAPER]
    assert len(PAPER) == 10


def test_the_paper_suite_adds_the_sets_present_and_names_the_others(tmp_path, caplog):
    _class_tree(tmp_path / "eurosat" / "2750", EUROSAT_NAMES)
    given = ["id:shapes:/x"]
    with caplog.at_level(logging.WARNING):
        tasks = with_suite(given, "paper", tmp_path)
    assert tasks == given + [f"zeroshot:eurosat:{tmp_path / 'eurosat'}"]
    assert ("caltech101; flowers102; food101; sun397; dtd; fgvc-aircraft; stanford-cars; "
            "oxford-pets; ucf101") in caplog.text
    args = evaluate.build_parser().parse_args(["--zeroshot-suite", "paper", str(tmp_path)])
    evaluate.check_args(args)
    assert args.task == [f"zeroshot:eurosat:{tmp_path / 'eurosat'}"]
    with pytest.raises(ValueError, match=r"--zeroshot-suite paper .*: none of the suite's sets"):
        with_suite([], "paper", tmp_path / "eurosat")
    with pytest.raises(ValueError, match=r"--zeroshot-suite mine: the one suite is 'paper'"):
        with_suite([], "mine", tmp_path)


def test_a_suite_set_is_evaluated_under_its_own_names(micro_cache, tmp_path):
    _class_tree(tmp_path / "eurosat" / "2750", EUROSAT_NAMES)
    frames = ["Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg", "Yo_Yo/v_YoYo_g01_c02.jpg"]
    _split(tmp_path / "ucf101", [[f, k, f.split("/")[0]] for k, f in enumerate(frames)], "UCF101")
    for frame in frames:
        _image(tmp_path / "ucf101" / "UCF-101-midframes" / frame)
    report = evaluate.main(["--model", "dive-micro", "--zeroshot-suite", "paper", str(tmp_path),
                            "--templates", "simple"])
    assert list(report["zeroshot"]) == ["eurosat", "ucf101"]
    assert report["metrics"]["eurosat"]["top1"] in {k / 10 for k in range(11)}  # 10 images
    assert report["metrics"]["ucf101"]["top1"] in {0, 0.5, 1}  # its 2 middle frames
