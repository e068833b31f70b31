"""Build of dive_fast and its compiled kernels (dive_fast._C).

Knobs (environment variables; none needs a visible GPU):
  DIVE_FAST_BUILD_CUDA   1: build the CUDA kernels (fail if no toolkit), 0: CPU only,
                         unset: build them when a CUDA toolkit is found.
  TORCH_CUDA_ARCH_LIST   target architectures, default "8.0;9.0" (A100, H100/H200).
  CUDA_HOME              the toolkit root; found from nvcc on PATH when unset.
  DIVE_FAST_CPU_ARCH     -march for the C++ kernels, default "native" (this machine's SIMD);
                         set e.g. "x86-64-v2" for a binary that runs on other CPUs.
  MAX_JOBS               parallel compile jobs (ninja).
"""
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


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


def extensions():
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
    cxx = ["-O3", "-fopenmp", f"-march={os.environ.get('DIVE_FAST_CPU_ARCH', 'native')}"]
    sources = ["csrc/dive_cpu.cpp"]
    if build_cuda:
        return [CUDAExtension(
            "dive_fast._C", sources + ["csrc/dive_cuda.cu"],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"])]
    return [CppExtension("dive_fast._C", sources, include_dirs=[os.path.abspath("csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="dive_fast",
    version="0.1.0",
    description="Fused kernels and a lean training loop for DiVE robust fine-tuning of CLIP",
    packages=find_packages(include=["dive_fast", "dive_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "open_clip_torch>=2.24", "numpy", "pillow", "tqdm",
                      "matplotlib", "webdataset", "braceexpand", "safetensors"],
    # pandas: open_clip's trainer (the step benchmark's anchor) imports it; tensorboard:
    # --report-to tensorboard.
    extras_require={"test": ["pytest>=7.3", "pytest-benchmark", "scipy", "pandas", "tensorboard"],
                    "triton": ["triton"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
