"""The script server (tests/script_server.py) gives what subprocess.Popen gives for each run."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.script_server import shared_server

SCRIPT = textwrap.dedent("""
    import os, sys, time
    preloaded = "torch" in sys.modules  # imported by the server, before this script ran
    import helper  # beside the script: the script's folder comes first on sys.path
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "value", os.environ.get("PROBE"), flush=True)
    print("session", os.getsid(0) == os.getpid(), "stdin", sys.stdin.read() == "", "preloaded", preloaded,
          flush=True)
    print("to stderr", file=sys.stderr)
    action = sys.argv[1]
    if action == "wait":
        time.sleep(60)
    if action == "message":
        sys.exit("a message")
    if action == "raise":
        raise ValueError("raised")
    sys.exit(int(action))
""")


@pytest.fixture
def script(tmp_path):
    (tmp_path / "helper.py").write_text("")
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def start(script, *args, **kwargs):
    env = {**os.environ, "PROBE": "given"}
    return shared_server().popen([sys.executable, script, *args], env=env, **kwargs)


def test_exit_status_output_environment_and_folder(script, tmp_path):
    process = start(script, "3", cwd=tmp_path)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 3 and process.poll() == 3
    assert out.splitlines() == [f"argv ['3'] cwd {tmp_path} value given", "session False stdin True preloaded True"]
    assert err == "to stderr\n"


@pytest.mark.parametrize("action, status, last_line", [("message", 1, "a message"), ("raise", 1, "ValueError: raised"),
                                                       ("0", 0, "to stderr")])
def test_exits_as_the_interpreter_does(script, tmp_path, action, status, last_line):
    process = start(script, action, cwd=tmp_path)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status and err.splitlines()[-1] == last_line


def test_signals_timeouts_and_sessions(script, tmp_path):
    process = start(script, "wait", cwd=tmp_path, start_new_session=True)
    with pytest.raises(subprocess.TimeoutExpired):
        process.communicate(timeout=0.5)
    assert process.poll() is None
    assert os.getpgid(process.pid) == process.pid  # a session of its own: killpg reaches it
    os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=60)  # what was printed before the timeout is still there
    assert process.returncode == -signal.SIGTERM and "session True" in out
