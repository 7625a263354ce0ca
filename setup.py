"""mmn_fast: find and edit multi-modal neurons in vision-language models.

`kernels/` (the Triton kernel sources and their pure-torch reference ops) is installed as
`mmn_fast.kernels`, never as a bare top-level `kernels` module: transformers probes for Hugging
Face's own `kernels` package under that name.
"""
from setuptools import find_packages, setup

setup(
    name="mmn_fast",
    version="0.1.0",
    description="Fast engine for finding and editing multi-modal neurons in vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["mmn_fast", "mmn_fast.*"]) + ["mmn_fast.kernels"],
    package_dir={"mmn_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "transformers>=5.0,<6",
        "safetensors>=0.8",  # save_file writes from the tensors' memory (older versions copy every tensor first)
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # triton: the kernel tests run it on CPU through its interpreter (Linux wheels only)
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0; platform_system == 'Linux'",
                 "webdataset", "braceexpand", "pyarrow", "accelerate"],
        "triton": ["triton>=3.0"],
        # corpus readers (mmn_fast.corpus): brace patterns for tar shards, parquet files
        "data": ["webdataset", "braceexpand", "pyarrow"],
        "nlp": ["spacy>=3.7"],
    },
    entry_points={"console_scripts": ["mmn=mmn_fast.cli:main"]},
)
