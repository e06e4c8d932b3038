"""Install rlhf_fast.

`kernels/` is installed as `rlhf_fast.kernels` and `csrc/` as the package data `rlhf_fast._csrc`, so
that no top-level `kernels` package lands in site-packages and the JIT build finds its sources in
both editable and regular installs.

The sampling extension is built ahead of time only when torch and a C++ compiler are importable at
build time (`pip install --no-build-isolation .`); otherwise it is JIT-compiled on first use
(rlhf_fast/_extension.py).
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

PACKAGES = [
    "rlhf_fast", "rlhf_fast.ops", "rlhf_fast.reference", "rlhf_fast.model", "rlhf_fast.rlhf",
    "rlhf_fast.kernels", "rlhf_fast._csrc",
]
PACKAGE_DIR = {"rlhf_fast.kernels": "kernels", "rlhf_fast._csrc": "csrc"}
PACKAGE_DATA = {"rlhf_fast._csrc": ["*.cpp", "*.cu", "*.h", "include/rlhf_fast/*.h", "include/rlhf_fast/*.cuh"]}


def _source_digest(csrc: str) -> str:
    """rlhf_fast._extension.source_digest of the csrc tree (the loader compares the build's with it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_rlhf_fast_extension", os.path.join(os.path.dirname(os.path.abspath(__file__)), "rlhf_fast", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(Path(csrc))


def _extension_build():
    """Return (ext_modules, cmdclass) for an ahead-of-time build, or ([], {}) when it can't happen."""
    if os.environ.get("RLHF_FAST_NO_AOT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    cpp = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith(".cpp"))
    cu = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith(".cu"))
    if not cpp:
        return [], {}
    include = [os.path.join(here, "csrc", "include")]
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    digest = [("RLHF_FAST_SOURCE_DIGEST", _source_digest(csrc))]
    use_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "rlhf_fast._C", cpp + cu, include_dirs=include,
            define_macros=[("RLHF_FAST_WITH_CUDA", "1")] + digest,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "rlhf_fast._C", cpp, include_dirs=include, extra_compile_args=cxx, define_macros=digest,
            extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="rlhf_fast",
    version="0.1.0",
    description="Fused GPU kernels for RLHF and a minimal GPT + PPO pipeline that runs on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    install_requires=[
        "torch>=2.4",
        "ninja",
        "pybind11",
        "numpy",
        "packaging",
        "filelock",
        # Triton ships with CUDA builds of torch; CPU-only users get the reference ops without it.
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "transformers", "scipy", "safetensors",
                 "peft"],
        "train": ["tqdm", "matplotlib", "pyyaml", "safetensors"],
        # run.tokenizer='tiktoken:<encoding>' or 'hf:<local dir>'
        "tokenizers": ["tiktoken", "transformers"],
        # data files in Parquet (*.parquet) or a datasets save_to_disk folder (hf:DIR)
        "data": ["pyarrow", "datasets"],
        # run.report_to=tensorboard / wandb: copies of metrics.jsonl in an experiment tracker
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["rlhf-fast = rlhf_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
