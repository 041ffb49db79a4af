"""Build pissa_fast's native library: CPU kernels always, CUDA kernels when torch has CUDA and nvcc
is found (FORCE_CUDA=1 / FORCE_ONLY_CPU=1 override). Honours TORCH_CUDA_ARCH_LIST, MAX_JOBS, DEBUG=1.

torch must already be installed: `pip install --no-build-isolation .`
"""
import glob
import os
import runpy
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """nvcc's toolkit: $CUDA_HOME/$CUDA_PATH, else /usr/local/cuda, else the real path of `nvcc` on PATH.

    Set before torch.utils.cpp_extension is imported, which otherwise guesses from a symlinked
    /usr/local/bin/nvcc and lands on /usr/local.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("pissa_fast: FORCE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _nvidia_pip_dirs(sub):
    """include/ or lib/ folders of the nvidia-* pip wheels (cuBLAS, cuSPARSE headers that ATen's CUDA
    headers include but a bare nvcc toolkit may lack)."""
    dirs = []
    try:
        import nvidia  # namespace package from the nvidia-* wheels torch depends on

        for base in list(nvidia.__path__):
            dirs += sorted(glob.glob(os.path.join(base, "*", sub)))
    except ImportError:
        pass
    return [d for d in dirs if os.path.isdir(d)]


def _arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        # Hopper first, correct on any sm_80+ (Ampere/Ada run the sm_80 code).
        archs = "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs.replace(" ", ";")


def extensions():
    debug = _flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fdiagnostics-color=always"]
    # at::parallel_for is OpenMP in torch's wheels, inlined from the headers: without -fopenmp it runs
    # serially. The library then uses the libgomp that torch has already loaded (same soname).
    cxx += ["-fopenmp"]
    link = ["-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda = _want_cuda() and bool(glob.glob("csrc/cuda/*.cu"))
    if not cuda:
        return [CppExtension("pissa_fast._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=link, py_limited_api=False)]
    archs = _arch_list()
    # csrc/cuda/*.cpp: host code that needs the CUDA headers (the switch between the kernels and the
    # ATen passes); *.cu: the kernels.
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    define = [("PISSA_FAST_CUDA_ARCHS", '"%s"' % archs.replace(";", ","))]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc += ["-std=c++20", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
    return [CUDAExtension(
        "pissa_fast._C", sources, define_macros=define,
        include_dirs=_nvidia_pip_dirs("include"), library_dirs=_nvidia_pip_dirs("lib"),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)]


# --- peft backend (i9): PISSA_FAST_PEFT=1 startup hook and the tested peft range ---
PTH = "pissa_fast_peft.pth"  # one line: imports _pissa_fast_peft_hook only when PISSA_FAST_PEFT is set
PEFT_SPECIFIER = runpy.run_path(os.path.join(ROOT, "pissa_fast", "peft", "versions.py"))["PEFT_SPECIFIER"]


class build_py_with_pth(build_py):
    """Ship pissa_fast_peft.pth at the top of site-packages, as coverage.py's process-startup hook is
    installed: in a wheel it sits in build_lib's root; in an editable install (`pip install -e .`,
    PEP 660) setuptools builds the wheel from the `install` command's install_lib folder instead."""

    def run(self):
        super().run()
        target = self.build_lib
        if getattr(self, "editable_mode", False):
            target = self.distribution.get_command_obj("install").install_lib
        if target:
            self.copy_file(os.path.join(ROOT, PTH), os.path.join(target, PTH), preserve_mode=0)


setup(
    name="pissa_fast",
    version="0.1.0",
    description="Fast, accurate PiSSA initialization: randomized SVD and fused residual kernels for PyTorch",
    packages=find_packages(include=["pissa_fast", "pissa_fast.*"]),
    py_modules=["_pissa_fast_peft_hook"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False), "build_py": build_py_with_pth},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm"],
    # QPiSSA and its QLoRA/LoftQ baselines quantize with bitsandbytes' own NF4 (CPU and CUDA since 0.48).
    extras_require={"peft": [f"peft{PEFT_SPECIFIER}", "transformers>=4.56"], "quant": ["bitsandbytes==0.50.2"]},
    entry_points={"console_scripts": ["pissa-fast=pissa_fast.cli:main"]},
)
