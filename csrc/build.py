"""Extension modules for setup.py: hope_kernels._C_cpu always, hope_kernels._C_cuda when torch has CUDA and nvcc.

Both are optional: a failed build prints one line and pip install goes on (tests/kernels/test_backends.py
fails in CI if the CPU one is missing, so a broken build is still noticed).
"""
from __future__ import annotations

import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))
#: targets: sm_80 and sm_90 by default; HOPE_CUDA_ARCH="90" (comma list) narrows them, e.g. for a faster build on the GPU
CUDA_ARCH_FLAGS = [f"-gencode=arch=compute_{a},code=sm_{a}"
                   for a in os.environ.get("HOPE_CUDA_ARCH", "80,90").replace(" ", "").split(",") if a]


def _rel(path: str) -> str:
    return os.path.relpath(path, os.path.dirname(HERE))


def extension_modules_and_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:  # torch absent at build time: pure-Python install
        print(f"hope: skipping C++/CUDA extensions (torch not importable: {err})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension; a failure prints one line instead of failing pip install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - optional extension, reported not raised
                print(f"hope: extension {ext.name} FAILED to build, backend unavailable: {err}")

    omp = ["-fopenmp"] if os.name != "nt" else []
    cxx_flags = ["-O3", "-std=c++20", *omp]
    ext_modules = [
        CppExtension(
            "hope_kernels._C_cpu",
            [_rel(os.path.join(HERE, f)) for f in ("bindings_cpu.cpp", "cms_update_cpu.cpp", "titan_linear_cpu.cpp",
                                                       "titan_mlp_cpu.cpp", "self_modifying_titans_cpu.cpp",
                                                       "self_modifying_titans_cpu_avx2.cpp")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp,
        )
    ]
    if torch.version.cuda is None:
        print("hope: skipping CUDA extension (torch was built without CUDA)")
    elif CUDA_HOME is None:
        print("hope: skipping CUDA extension (nvcc not found: set CUDA_HOME)")
    else:
        cu_files = sorted(glob.glob(os.path.join(HERE, "*.cu")))
        # teach_signal.cu calls cublasGemmEx: link cuBLAS where the toolkit has it; elsewhere the symbol resolves
        # through libtorch_cuda's own dependency on libcublas
        cublas = ["cublas"] if glob.glob(os.path.join(CUDA_HOME, "lib64", "libcublas.so*")) else []
        ext_modules.append(
            CUDAExtension(
                "hope_kernels._C_cuda",
                [_rel(os.path.join(HERE, "bindings_cuda.cpp"))] + [_rel(f) for f in cu_files],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", *CUDA_ARCH_FLAGS]},
                libraries=cublas,
            )
        )
    return ext_modules, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
