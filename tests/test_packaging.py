"""The repository never shadows Hugging Face's `kernels` package, and runs installed or from a plain checkout.

transformers imports `kernels` (Hugging Face's package). Our op sources sit in the top-level
`kernels/` folder, which must never be importable as a regular top-level `kernels` package from
any working directory: `python -m pytest`, `python -m mmn_fast` and torchrun put the working
directory first on `sys.path`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, cwd, env_extra: dict | None = None) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


def test_top_level_kernels_folder_is_not_a_package():
    assert (ROOT / "kernels" / "act_score.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_find_spec_kernels_never_resolves_into_the_repository(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    code = ("import importlib.util, sys\n"
            "sys.path.insert(0, '')\n"  # what `python -m` does: the working directory first
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else None)\n"
            "print(*(spec.submodule_search_locations or []) if spec else [], sep='\\n')\n")
    for line in run(code, cwd).splitlines():
        assert line == "None" or not Path(line).resolve().is_relative_to(ROOT), line


def test_without_the_real_package_the_folder_is_only_a_namespace(tmp_path):
    """With no `kernels` installed, the folder is at most an empty PEP 420 namespace portion (no
    module of ours under that name), and a regular `kernels` later on the path beats it."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    code = ("import sys, importlib.util\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and p not in ('', '.')]\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "assert spec is None or spec.origin in (None, 'namespace'), spec\n"
            "import kernels\n"
            "assert not hasattr(kernels, 'act_score') and getattr(kernels, '__file__', None) is None, kernels\n"
            "del sys.modules['kernels']\n"
            f"sys.path.append({str(fake.parent)!r})\n"
            "import kernels\n"
            "assert kernels.REAL\n")
    run(code, tmp_path)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_and_the_cli_import_from_any_directory(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    code = ("import sys; sys.path.insert(0, '')\n"
            "import transformers, mmn_fast, mmn_fast.kernels as k\n"
            "from transformers import LlavaForConditionalGeneration\n"
            "from transformers.utils import is_kernels_available\n"
            "is_kernels_available()\n"
            "print(k.act_score.__module__)\n")
    assert run(code, cwd) == "mmn_fast.kernels.act_score"
    res = subprocess.run([sys.executable, "-m", "mmn_fast", "--help"], capture_output=True, text=True, cwd=cwd,
                         timeout=300)
    assert res.returncode == 0 and "find" in res.stdout, res.stderr[-2000:]


def test_plain_checkout_runs_without_installing(tmp_path):
    """A copy of the tree (no install) imports from PYTHONPATH, as on a GPU machine without an index."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "mmn_fast", checkout / "mmn_fast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", checkout / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "bench", checkout / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, torch, mmn_fast, mmn_fast.kernels as k\n"
            "print(mmn_fast.__file__); print(sys.modules['mmn_fast.kernels.act_score'].__file__)\n"
            "out = k.act_score(torch.randn(3, 5), torch.randn(3, 5), 'silu', proj=torch.randn(5, 2))\n"
            "assert out.scores.shape == (1, 2, 5)\n")
    pkg, mod = run(code, checkout, {"PYTHONPATH": "."}).splitlines()
    assert Path(pkg).resolve().is_relative_to(checkout) and Path(mod).resolve() == (checkout / "kernels" / "act_score.py")
    env = dict(os.environ, PYTHONPATH=".", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "bench/run_kernels.py", "--help"], capture_output=True, text=True,
                         cwd=checkout, env=env, timeout=300)
    assert res.returncode == 0 and "--device" in res.stdout, res.stderr[-2000:]


def test_wheel_carries_the_kernels_inside_mmn_fast(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "out"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    import zipfile

    (wheel,) = (tmp_path / "whl").glob("mmn_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mmn_fast/kernels/__init__.py", "mmn_fast/kernels/act_score.py",
            "mmn_fast/kernels/_act_score_triton.py", "mmn_fast/kernels/vocab_topk.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)
