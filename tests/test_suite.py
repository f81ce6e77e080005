"""The test suite itself, run as the README runs it: a test that hangs fails, with its traceback, and the others still
run."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HANGING = '''
import threading

def test_loops_forever():
    while True:
        pass

def test_waits_on_a_peer_that_never_comes():
    threading.Event().wait()

def test_after_them():
    assert True
'''


def test_a_hanging_test_fails_after_the_timeout_and_the_suite_goes_on(tmp_path, request):
    assert float(request.config.getini("timeout")) == 600  # pytest.ini's, read by pytest-timeout
    (tmp_path / "test_hanging.py").write_text(HANGING)
    command = [sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
               "-p", "no:cacheprovider", "-n", "2", "-o", "timeout=2", str(tmp_path / "test_hanging.py")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "COLUMNS": "200"})  # the summary lines whole
    assert run.returncode == 1, run.stdout + run.stderr
    assert "2 failed, 1 passed" in run.stdout, run.stdout
    for name in ("test_loops_forever", "test_waits_on_a_peer_that_never_comes"):
        assert f"FAILED test_hanging.py::{name} - Failed: Timeout (>2.0s) from pytest-timeout" in run.stdout, run.stdout
    assert "while True" in run.stdout and "threading.Event().wait()" in run.stdout  # the tracebacks
