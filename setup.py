"""Build of collat and its one extension, collat._C.

CUDAExtension where torch has CUDA and nvcc is found (a GPU is not needed to compile), else a
CppExtension with the CPU kernels only. Install with: pip install --no-build-isolation -e .
"""
import glob
import os

# torch guesses CUDA_HOME from `which nvcc`; with nvcc in /usr/local/bin that guess is /usr/local,
# which has no libcudart. Prefer the real toolkit when the user did not say.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and os.environ.get("COLLAT_NO_CUDA", "0") != "1"
    )
    if use_cuda:
        return CUDAExtension(
            "collat._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DCOLLAT_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("collat._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])


setup(
    name="collat",
    version="0.1.0",
    description="CoLLAT: contrastive locked language and audio tuning, with fused Triton/CUDA kernels",
    packages=["collat", "collat.ops", "collat.model", "collat.data", "collat.train", "collat.evaluate",
              "collat.captioning", "collat.kernels"],
    package_dir={"collat": "collat", "collat.kernels": "kernels"},
    package_data={"collat": ["configs/*.json", "configs/README.md"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "transformers",
        "safetensors",
        "soundfile",
        "tqdm",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
    ],
)
