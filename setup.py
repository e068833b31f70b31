"""Build of dive_fast: the kernel library (torch alone), the training app's extras, and the
optional compiled kernels (dive_fast._C: C++ for the CPU, CUDA where a toolkit is found).

    pip install --no-build-isolation .           # the library: DiVELoss, needs torch alone
    pip install --no-build-isolation ".[train]"  # + the app (python -m dive_fast.train)
    pip install --no-build-isolation ".[test]"   # + what the tests need
    python -m build --wheel --no-isolation       # a wheel, built against this torch

The extension compiles against the installed torch, hence --no-build-isolation. It is
optional: without a C++ compiler (or with DIVE_FAST_BUILD_EXT=0) the install succeeds with
the torch and Triton backends, and `python -m dive_fast.info` says why _C is absent.

Knobs (environment variables; none needs a visible GPU):
  DIVE_FAST_BUILD_EXT    unset: build dive_fast._C, and install without it (warning) if the
                         compile fails; 1: a failed compile fails the install; 0: skip it.
  DIVE_FAST_BUILD_CUDA   1: build the CUDA kernels (fail if no toolkit), 0: CPU only,
                         unset: build them when a CUDA toolkit is found.
  TORCH_CUDA_ARCH_LIST   target architectures, default "8.0;9.0+PTX" (A100, H100/H200, and
                         PTX that newer GPUs compile).
  CUDA_HOME              the toolkit root; found from nvcc on PATH when unset.
  DIVE_FAST_CPU_ARCH     -march for the C++ kernels. Unset: the compiler's portable default,
                         with the hot loops also built for x86-64-v3 (AVX2, FMA) and chosen
                         at run time; "native" (or any -march value) builds for that CPU only.
  MAX_JOBS               parallel compile jobs (ninja).
  CXX                    the C++ compiler (torch's default: c++).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# Why dive_fast._C is absent, written beside where it would be (read by dive_fast.info).
BUILD_NOTE = "_C_not_built.txt"
BUILD_EXT = os.environ.get("DIVE_FAST_BUILD_EXT", "")
if BUILD_EXT not in ("", "0", "1"):
    sys.exit(f"DIVE_FAST_BUILD_EXT={BUILD_EXT!r}: expected 1 (build dive_fast._C or fail), "
             "0 (skip it) or unset (build it when the compile succeeds)")
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "dive_fast" / "__init__.py").read_text(),
                    re.M).group(1)

# The app: open_clip >= 3.0 (create_model_and_transforms(weights_only=), TextTransformer's
# _embeds, open_clip_train for the step benchmark); pandas: open_clip_train imports it;
# tensorboard: --report-to tensorboard; matplotlib: the run's curves.png (optional: a run
# without it logs why and writes no plot).
TRAIN = ["open_clip_torch>=3.0", "numpy", "pillow", "tqdm", "webdataset", "braceexpand",
         "safetensors", "pandas", "tensorboard", "matplotlib"]
TEST = ["pytest>=7.3", "pytest-benchmark", "scipy", "ruff", "wandb"]
# The paper's zero-shot suite (--zeroshot-suite paper, --task zeroshot:flowers102:PATH): class
# names and templates from clip_benchmark's data files (its builder is never imported, so
# `pip install --no-deps clip_benchmark` is enough); scipy reads Flowers102's and
# StanfordCars' MATLAB label files.
SUITE = ["clip_benchmark>=1.6", "scipy"]


def cuda_toolkit_root():
    """The real toolkit root. A wrapper script for nvcc on PATH (e.g. /usr/local/bin/nvcc
    exec'ing /usr/local/cuda-X/bin/nvcc) misleads torch's guess of dirname(dirname(nvcc)),
    after which the link cannot find cudart; nvcc's dry run names its own TOP."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
        if top:
            return os.path.realpath(top.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cpu_flags() -> list[str]:
    arch = os.environ.get("DIVE_FAST_CPU_ARCH")
    # A named -march replaces the run-time choice (dive_cpu.cpp's DIVE_CPU_CLONES).
    return ["-O3", "-fopenmp"] + ([f"-march={arch}", "-DDIVE_CPU_NO_CLONES"] if arch else [])


def extensions():
    """dive_fast._C: the op schema, the CPU kernels, the CUDA launch plans (host arithmetic,
    read by the checks), and the CUDA kernels when they are built."""
    sources = ["csrc/dive_schema.cpp", "csrc/dive_cpu.cpp", "csrc/dive_cuda_plan_ops.cpp"]
    if BUILD_EXT == "0":
        from setuptools import Extension  # a placeholder: build_ext only records the skip
        return [Extension("dive_fast._C", sources)]
    root = cuda_toolkit_root()
    if root:
        os.environ["CUDA_HOME"] = root  # before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    want = os.environ.get("DIVE_FAST_BUILD_CUDA")
    build_cuda = want == "1" or (want is None and root is not None)
    if build_cuda and root is None:
        raise RuntimeError("DIVE_FAST_BUILD_CUDA=1 but no CUDA toolkit was found "
                           "(set CUDA_HOME or put nvcc on PATH)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    include = [os.path.abspath("csrc")]
    if build_cuda:
        return [CUDAExtension(
            "dive_fast._C", sources + ["csrc/dive_cuda.cu"], include_dirs=include,
            extra_compile_args={"cxx": cpu_flags(), "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"])]
    return [CppExtension("dive_fast._C", sources, include_dirs=include,
                         extra_compile_args={"cxx": cpu_flags()}, extra_link_args=["-fopenmp"])]


class NoteMixin:
    """Records beside the extension's place why it is not there (or removes a stale note)."""

    def note_folder(self) -> Path:
        """Where _C goes: the source tree for an in-place or editable build, else build_lib.
        Read before the build: setuptools' run() clears inplace while it builds, and a
        failed build leaves it cleared."""
        return Path(self.get_ext_fullpath("dive_fast._C")).parent

    def note(self, reason: str | None, folder: Path | None = None) -> None:
        folder = folder or self.note_folder()
        path = folder / BUILD_NOTE
        if reason is None:
            path.unlink(missing_ok=True)
            return
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(reason + "\n")
        print(f"\nWARNING: dive_fast._C {reason}\n", file=sys.stderr)


class SkipBuildExt(NoteMixin, build_ext):
    """DIVE_FAST_BUILD_EXT=0: no compile, and no torch needed to build."""

    def run(self):
        self.note("not built: DIVE_FAST_BUILD_EXT=0 when dive_fast was built; "
                  "reinstall without it (and with a C++ compiler) for the C++/CUDA backends")


def build_ext_class():
    if BUILD_EXT == "0":
        return SkipBuildExt
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExt(NoteMixin, BuildExtension.with_options(use_ninja=True)):
        """torch's build of the extension; a failed compile leaves the package without it
        (unless DIVE_FAST_BUILD_EXT=1), with the reason for dive_fast.info."""

        def run(self):
            folder = self.note_folder()
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing: ninja, distutils, OSError
                if BUILD_EXT == "1":
                    raise
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                self.note(f"not built: the compile failed when dive_fast was built "
                          f"({type(exc).__name__}: {first}); install a C++ compiler and "
                          f"reinstall for the C++/CUDA backends (DIVE_FAST_BUILD_EXT=1 "
                          f"makes a failed compile fail the install)", folder)
            else:
                self.note(None, folder)

    return OptionalBuildExt


setup(
    name="dive_fast",
    version=VERSION,
    description="Fused kernels and a lean training loop for DiVE robust fine-tuning of CLIP",
    packages=find_packages(include=["dive_fast", "dive_fast.*"]),
    package_data={"dive_fast.train": ["model_configs/*.json", "suite_templates/*.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"train": TRAIN, "test": TRAIN + TEST + SUITE, "suite": TRAIN + SUITE,
                    "triton": ["triton"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
