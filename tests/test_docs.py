"""The README's and docs' code runs as written: every Python block is executed, every command
of the app and the benchmarks is parsed by its own argument parser (so a renamed flag breaks
this test, not a user), and the quick ones (`--help`, `info`, `tables.py`) are run. The
flag tables of docs/training.md are the parser's own, and every option of every command
line explains itself in its help."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "README.md"]
# Commands a user runs that this test cannot run here: installs, the test suite itself,
# the GPU check, shell built-ins. Anything else must match a rule below.
NOT_RUN = ("pip", "git", "cd", "bash", "python -m pytest", "nvidia-smi", "export")


def blocks(kind: str):
    for path in DOCS:
        for i, code in enumerate(re.findall(rf"```{kind}\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(code, id=f"{path.relative_to(ROOT)}#{i}")


def commands():
    """(doc, argv) of every shell command, continuation lines joined, comments dropped."""
    for param in blocks("bash"):
        code, = param.values
        text = code.replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    second = argv[1] if len(argv) > 1 else ""
                    yield pytest.param(argv, id=f"{param.id}:{argv[0]} {second}")


def _script_parser(path: Path) -> argparse.ArgumentParser | None:
    spec = importlib.util.spec_from_file_location(f"doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module.build_parser() if hasattr(module, "build_parser") else None


def module_parser(name: str) -> argparse.ArgumentParser:
    if name == "dive_fast.train":
        from dive_fast.train.cli import build_parser
    elif name == "dive_fast.train.evaluate":
        from dive_fast.train.evaluate import build_parser
    elif name == "dive_fast.train.pretrain":
        from dive_fast.train.pretrain import build_parser
    elif name == "dive_fast.world":
        from dive_fast.world.export import build_parser
    else:
        raise AssertionError(f"no rule for `python -m {name}` in the docs")
    return build_parser()


def parse_or_fail(parser: argparse.ArgumentParser, args: list[str]) -> None:
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{parser.prog} refuses {args}") from exc


def run(argv: list[str], tmp_path) -> None:
    expanded = [m for a in argv for m in (sorted(glob.glob(str(ROOT / a))) if "*" in a else [a])]
    proc = subprocess.run([sys.executable, *expanded[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("code", list(blocks("python")))
def test_python_blocks_run(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("argv", list(commands()))
def test_commands_parse_or_run(argv, tmp_path):
    line = " ".join(argv)
    if argv[0] in ("torchrun", "srun"):  # the launcher's options, then -m MODULE, arguments
        module = argv.index("-m")
        parse_or_fail(module_parser(argv[module + 1]), argv[module + 2:])
        return
    if any(line.startswith(p) for p in NOT_RUN):
        return
    assert argv[0] == "python", f"no rule for `{line}` in the docs test"
    if "--help" in argv or argv[1:3] in (["-m", "dive_fast.info"],) or \
            argv[1] in ("benchmarks/tables.py", "-c"):
        run(argv, tmp_path)
    elif argv[1] == "-m":
        parse_or_fail(module_parser(argv[2]), argv[3:])
    else:
        parser = _script_parser(ROOT / argv[1])
        assert parser is not None, f"{argv[1]} has no build_parser() for the docs test"
        parse_or_fail(parser, argv[2:])


def test_the_flag_tables_are_the_parsers():
    from dive_fast.train.cli import flag_tables
    text = (ROOT / "docs" / "training.md").read_text()
    begin = text.index("<!-- flag-tables")
    section = text[text.index("\n", begin) + 1:text.index("<!-- /flag-tables -->")]
    assert section == flag_tables(), "rewrite them: python tests/test_docs.py"


def _parsers():
    yield module_parser("dive_fast.train")
    yield module_parser("dive_fast.train.evaluate")
    yield module_parser("dive_fast.train.pretrain")
    yield module_parser("dive_fast.world")
    for script in sorted((ROOT / "benchmarks").rglob("*.py")):  # research/, gpu_check/ too
        if script.name.startswith("test_") or script.name == "common.py":
            continue
        parser = _script_parser(script)
        assert parser is not None, f"{script.name} has no build_parser()"
        yield parser


def test_every_option_has_help():
    for parser in _parsers():
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, \
                    f"{parser.prog}: {action.option_strings or action.dest} has no help"


def test_argument_errors_are_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dive_fast.train", "--steps", "-1", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "python -m dive_fast.train: error: --steps must be a finite number >= 0, got -1"


def write_flag_tables(path: Path = ROOT / "docs" / "training.md") -> None:
    """Rewrites the flag tables of docs/training.md from the parser: `python tests/test_docs.py`."""
    from dive_fast.train.cli import flag_tables
    text = path.read_text()
    begin = text.index("\n", text.index("<!-- flag-tables")) + 1
    path.write_text(text[:begin] + flag_tables() + text[text.index("<!-- /flag-tables -->"):])


if __name__ == "__main__":
    write_flag_tables()
