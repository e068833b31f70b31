"""The package builds as kernel libraries do: without a C++ compiler, or with the extension
skipped (DIVE_FAST_BUILD_EXT=0), the build succeeds, the built package imports and runs
DiVELoss on the torch backend, and `dive_fast.info` says why dive_fast._C is absent; a
wheel holds the library and the app (with its model configs) and asks for torch alone,
never the build tools, the tests or the CUDA emulation. Each build runs in a copy of the
tree (setup.py writes build/ and egg-info beside itself)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.site import site_folder

ROOT = Path(__file__).resolve().parents[1]
SKIP_IN_COPY = shutil.ignore_patterns(".git", "build", "dist", "runs", ".venv*", "results",
                                      "__pycache__", "*.egg-info", ".pytest_cache", "*.so",
                                      "_C_not_built.txt", ".benchmarks", ".whl", ".gl")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("tree") / "dive_fast_src"
    shutil.copytree(ROOT, copy, ignore=SKIP_IN_COPY, symlinks=True)
    return copy


def _build_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIVE_FAST_")}
    return {**env, "DIVE_FAST_BUILD_CUDA": "0", **extra}


@pytest.mark.parametrize("knobs, in_place, reason", [
    ({"CXX": "false", "CC": "false"}, True, "not built: the compile failed"),
    ({"DIVE_FAST_BUILD_EXT": "0"}, False, "not built: DIVE_FAST_BUILD_EXT=0"),
], ids=["no-compiler-in-place", "skipped"])
def test_the_build_succeeds_without_the_extension(tree, tmp_path, knobs, in_place, reason):
    """In place (what an editable install does) and into a build folder (a wheel's way)."""
    base = tmp_path / "build"
    command = ["build_ext", "--inplace"] if in_place else ["build", "--build-base", str(base)]
    proc = subprocess.run([sys.executable, "setup.py", "-q", *command], cwd=tree,
                          env=_build_env(**knobs), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lib = tree if in_place else next(base.glob("lib*"))
    assert not list(lib.glob("dive_fast/_C*.so"))
    assert (lib / "dive_fast" / "_C_not_built.txt").read_text().startswith(reason)
    code = f"""
import sys
sys.path[:0] = [{str(lib)!r}, {str(site_folder(tmp_path / "site"))!r}]
import torch
import dive_fast
from dive_fast import DiVELoss, info
assert dive_fast.__file__.startswith({str(lib)!r}), dive_fast.__file__
x = [torch.randn(6, 8, requires_grad=i % 2 == 0) for i in range(4)]
for backend in ("torch", None):
    loss = DiVELoss(8, backend=backend)(*x)
    loss.backward()
    assert torch.isfinite(loss) and x[0].grad is not None
info.main()
"""
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"dive_fast._C: absent, {reason}" in run.stdout, run.stdout


def test_the_wheel_holds_the_package_alone_and_asks_for_torch(tree, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                           "--no-deps", "--no-index", "-q", "-w", str(tmp_path), "."],
                          cwd=tree, env=_build_env(DIVE_FAST_BUILD_EXT="0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("dive_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.split("/")[0] == "dive_fast" or ".dist-info/" in n for n in names), \
        [n for n in names if not n.startswith("dive_fast")]
    for kept in ("dive_fast/ops/dive_triton.py", "dive_fast/train/model_configs/dive-tiny.json",
                 "dive_fast/train/suite_templates/ucf101.txt", "dive_fast/world/render.py",
                 "dive_fast/_C_not_built.txt"):
        assert kept in names, kept
    assert not [n for n in names if "emulat" in n or n.endswith((".cpp", ".cu", ".h"))]
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert [r.split()[1].split(">")[0] for r in unconditional] == ["torch"], requires
    assert any("open_clip_torch" in r and "extra == \"train\"" in r for r in requires), requires
