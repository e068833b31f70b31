"""``python -m dive_fast.world``: its arguments checked before anything is written, and it
writes only into a folder that is new or that it wrote."""
import pytest

from dive_fast.world.export import main


@pytest.mark.parametrize("bad, message", [
    (["--pairs", "-3"], "--pairs must be at least 0, got -3"),
    (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["--formats", "nope"], "--formats wants a comma-separated subset of csv,wds, got 'nope'"),
    (["--tasks", "shapes,nope"], "unknown task 'nope'"),
])
def test_world_export_refuses_invalid_values(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "w"), "--n", "1", *bad])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written before the check


@pytest.mark.parametrize("case", ["file", "foreign", "huge", "disk"])
def test_world_export_writes_only_where_it_may(tmp_path, capsys, case):
    out = tmp_path / "w"
    args = ["--out", str(out), "--tasks", "colour", "--splits", "test", "--n", "2", "--pairs", "0"]
    if case == "file":
        out.write_text("mine")
        message = "is a file; give a folder"
    elif case == "foreign":
        (out / "reference").mkdir(parents=True)
        (out / "reference" / "captions.csv").write_text("a user's own file")
        message = "holds files that no `python -m dive_fast.world` wrote"
    elif case == "huge":
        args += ["--size", "100000"]
        message = "GiB of memory to render"
    else:
        args += ["--size", "1024", "--n", "10000000"]
        message = "GiB free"
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    if case == "foreign":
        assert (out / "reference" / "captions.csv").read_text() == "a user's own file"


def test_world_export_may_add_to_a_world_it_wrote(tmp_path):
    out = tmp_path / "w"
    main(["--out", str(out), "--tasks", "colour", "--splits", "test", "--n", "2", "--pairs", "0"])
    main(["--out", str(out), "--tasks", "size", "--splits", "test", "--n", "2", "--pairs", "0"])
    assert {p.name for p in (out / "tasks").iterdir()} == {"colour", "size"}
