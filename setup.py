"""Build of the spd package and its native extension spd_ext._C.

Install with the torch you will run against already installed, without build isolation:

    pip install --no-build-isolation -e .

Environment:
  SPD_BUILD_CUDA=0/1     force the CPU-only or the CUDA build (default: CUDA when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST   CUDA archs (default: the visible GPUs, else "8.0;9.0")
  CUDA_HOME              CUDA toolkit root (default: guessed, preferring /usr/local/cuda-<torch's CUDA>)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "python/spd/_version.py").read_text()).group(1)

try:
    import torch
except ImportError:
    sys.exit("spd: building the extension needs torch installed first, e.g. `pip install torch`, "
             "then `pip install --no-build-isolation -e .`")


def _guess_cuda_home():
    """Set CUDA_HOME to a real toolkit before torch guesses (it takes /usr/local when nvcc is a wrapper)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or torch.version.cuda is None:
        return
    for cand in (f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


_guess_cuda_home()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    forced = os.environ.get("SPD_BUILD_CUDA")
    have = torch.version.cuda is not None and CUDA_HOME is not None and \
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if forced == "1" and not have:
        sys.exit(f"spd: SPD_BUILD_CUDA=1 but torch {torch.__version__} has no CUDA or nvcc was not found "
                 f"(CUDA_HOME={CUDA_HOME}); install a CUDA build of torch and set CUDA_HOME")
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        sys.exit(f"spd: SPD_BUILD_CUDA must be 0 or 1, got {forced!r}")
    return have


def _nvidia_include_dirs():
    """CUDA library headers (cusolverDn.h, cublas_v2.h, ...) shipped in the nvidia-* pip wheels."""
    dirs = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += sorted(glob.glob(os.path.join(entry, pattern)))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _cuda_link_args():
    """Link what csrc/cuda/rsvd.cpp calls: libtorch_cuda_linalg (at::cuda::getCurrentCUDASolverDnHandle,
    which a CUDAExtension does not link by default) and libcusolver (cusolverDnXgesvdr), preferring
    the copy in the nvidia-* wheels that torch itself loads; rpaths so that both resolve at import
    without LD_LIBRARY_PATH (torch loads libtorch_cuda_linalg lazily, so it may not be loaded yet)."""
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    args = [f"-L{torch_lib}", "-ltorch_cuda_linalg", f"-Wl,-rpath,{torch_lib}"]
    candidates = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/lib/libcusolver.so*", "nvidia/cusolver/lib/libcusolver.so*"):
            candidates += sorted(glob.glob(os.path.join(entry, pattern)))
    candidates += sorted(glob.glob(os.path.join(CUDA_HOME or "", "lib64", "libcusolver.so*")))
    candidates = [c for c in candidates if re.fullmatch(r"libcusolver\.so(\.\d+)?", os.path.basename(c))]
    if candidates:  # the first found, e.g. nvidia/cu13/lib/libcusolver.so.12 (the wheels ship no libcusolver.so)
        lib = candidates[0]
        libdir = os.path.dirname(lib)
        args += [f"-L{libdir}", f"-l:{os.path.basename(lib)}", f"-Wl,-rpath,{libdir}"]
    else:
        args += ["-lcusolver"]
    return args


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    define_macros = [
        ("SPD_VERSION", f'"{VERSION}"'),
        ("SPD_TORCH_VERSION", f'"{torch.__version__}"'),
        ("SPD_BUILD_SYSTEM", '"setuptools"'),
    ]
    cxx = ["-O3"]
    if not with_cuda:
        return CppExtension("spd_ext._C", sources, define_macros=define_macros,
                            extra_compile_args={"cxx": cxx})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs:  # torch derives the list from the visible GPUs; record what it will use
        archs = ";".join(sorted({f"{a}.{b}" for a, b in (torch.cuda.get_device_capability(i)
                                                           for i in range(torch.cuda.device_count()))}))
    define_macros += [("SPD_WITH_CUDA", None), ("SPD_CUDA_ARCHS", '"%s"' % archs.replace(";", ",")),
                      ("SPD_CUDA_VERSION", f'"{torch.version.cuda}"')]
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension("spd_ext._C", sources, define_macros=define_macros,
                         include_dirs=_nvidia_include_dirs(), extra_link_args=_cuda_link_args(),
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]})


# The `ninja` of the pip package sits beside the interpreter; make it findable without an activated venv.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

setup(
    version=VERSION,
    packages=[*find_packages("python"), "spd_ext"],
    package_dir={"": "python", "spd_ext": "spd_ext"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
