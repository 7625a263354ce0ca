"""mmn_fast: find and edit multi-modal neurons in vision-language models.

The op modules in the top-level `kernels/` folder are installed inside `mmn_fast.kernels`, never
as a top-level `kernels` module: that name is Hugging Face's `kernels` package, which
transformers imports. The folder has no `__init__.py` (see mmn_fast/kernels/__init__.py).
"""
from glob import glob
from os.path import basename, splitext

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Ships the top-level kernels/*.py modules inside the `mmn_fast.kernels` package."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "mmn_fast.kernels":
            modules += [(package, splitext(basename(f))[0], f) for f in sorted(glob("kernels/*.py"))]
        return modules


setup(
    name="mmn_fast",
    version="0.1.0",
    description="Fast engine for finding and editing multi-modal neurons in vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["mmn_fast", "mmn_fast.*"]),
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.1",
        "transformers>=5.0,<6",
        "safetensors>=0.8",  # save_file writes from the tensors' memory (older versions copy every tensor first)
        "numpy",
        "pillow",
        "tqdm",
        # mmn serve: the OpenAI-compatible server
        "fastapi",
        "uvicorn[standard]",  # httptools and uvloop: a faster HTTP parser and event loop
        "prometheus-client",
    ],
    extras_require={
        # triton: the kernel tests run it on CPU through its interpreter (Linux wheels only)
        # peft: the exported LoRA adapters are loaded with PEFT itself; openai, httpx: the server's tests (raw
        # HTTP, starlette's TestClient; openai itself now depends on httpx2)
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0; platform_system == 'Linux'",
                 "webdataset", "braceexpand", "pyarrow", "accelerate", "peft", "openai", "httpx"],
        "triton": ["triton>=3.0"],
        # corpus readers (mmn_fast.run.corpus): brace patterns for tar shards, parquet files
        "data": ["webdataset", "braceexpand", "pyarrow"],
        "nlp": ["spacy>=3.7"],
    },
    entry_points={"console_scripts": ["mmn=mmn_fast.cli:main"]},
)
