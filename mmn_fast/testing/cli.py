"""Running `mmn` commands in tests: the exit code and both streams, and the one-line error contract."""
from __future__ import annotations

from ..cli.main import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mmn argv...` run in-process; capsys is pytest's fixture."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """Bad input's contract: exit code 2, no traceback, exactly one `mmn: error:` line holding every needle;
    returns that line."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("mmn: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
