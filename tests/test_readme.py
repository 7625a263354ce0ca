"""The README's Python example runs as written (on the demo model, with a default install: no spaCy)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_written(demo_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.setenv("MMN_CACHE", str(demo_path.parent))  # the session's demo model: no second build
    exec(compile(code, str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(re.fullmatch(r"\S+ \[\[\d+, \d+, -?[\d.e-]+\].*\]", ln) for ln in lines), lines
