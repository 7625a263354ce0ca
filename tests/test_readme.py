"""The README's Python examples run as written (on the demo model, with a default install: no spaCy)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_as_written(demo_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.setenv("MMN_CACHE", str(demo_path.parent))  # the session's demo model: no second build
    exec(compile(code, str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(re.fullmatch(r"\S+ \[\[\d+, \d+, -?[\d.e-]+\].*\]", ln) for ln in lines), lines


def test_readme_serve_section_runs_as_written(demo_path, tmp_path, capsys):
    """The Serve section: its shell line (edit, then serve) and its `openai` snippet, which must show the
    edit changing the answer."""
    section = README.read_text().split("## Serve", 1)[1]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "MMN_CACHE": str(demo_path.parent)}
    mmn = f'mmn() {{ "{sys.executable}" -m mmn_fast "$@"; }}\n'  # `mmn` whether or not the venv's bin is on PATH
    if not (demo_path.parent / "demo-run" / "run.json").is_file():
        subprocess.run(["bash", "-c", mmn + "mmn demo"], env=env, check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen(["bash", "-c", mmn + shell.replace("mmn serve", f"mmn serve --port {port}")], cwd=tmp_path,
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        exec(compile(code.replace("8000", str(port)), str(README), "exec"), {})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0].strip() for ln in lines] == ["demo", "red2blue"]
    answers = [ln.split(":", 1)[1].split() for ln in lines]
    assert "red" in answers[0] and "blue" in answers[1] and "red" not in answers[1], lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
