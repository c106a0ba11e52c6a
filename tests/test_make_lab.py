"""`make lab`, the README's first command, really opens the front-door notebook
(and `make browser` tells a user without root how to get the browser tests).

Runs the Makefile's own `lab` target in the background, as whoever runs the
tests (root included: containers, cloud VMs), with no browser, on a free
127.0.0.1 port and with temporary Jupyter config, data and runtime folders.
It reads the URL that `make lab` prints, checks that the server serves the
notebook named in that URL (contents API) and starts a kernel, in the same
environment, that imports phi3lab, then stops the whole process group by its PID.

The environment under test is the one running pytest (`make test`'s `.venv`):
`VENV=sys.prefix` and `-o STAMP` keep make from (re)installing anything.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
FRONT_DOOR = ROOT / "notebooks" / "attention_explorer.ipynb"
URL = re.compile(r"http://127\.0\.0\.1:(\d+)/lab/tree/(\S+)\?token=(\w+)")


def make_command(target: str, *variables: str, venv: str = sys.prefix) -> list[str]:
    """`make TARGET` in the repository on the environment `venv`, without installing."""
    make = require_binary("make", "`apt-get install make` (the README's commands need it)")
    return [
        make,
        "--no-print-directory",
        "-C",
        str(ROOT),
        target,
        f"VENV={venv}",
        "-o",
        f"{venv}/.installed",
        *variables,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(method: str, url: str, token: str, body: dict | None = None):
    """(status, decoded JSON or text) of one REST call, token in the header."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as response:
        text = response.read().decode()
        kind = response.headers.get("Content-Type", "")
        return response.status, json.loads(text) if text and "json" in kind else text


def quiet_jupyter_env(home: Path) -> dict:
    """The caller's environment with Jupyter's folders in `home` and no display."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "JUPYTER_TOKEN")}
    for name, folder in {
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "IPYTHONDIR": "ipython",
    }.items():
        (home / folder).mkdir()
        env[name] = str(home / folder)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    return env


def wait_for_url(server: subprocess.Popen, log: Path, deadline: float) -> re.Match:
    """The URL `make lab` printed, once the server behind it answers."""
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`make lab` exited with {server.returncode}:\n{log.read_text()}")
        found = URL.search(log.read_text())
        if found:
            try:
                request("GET", f"http://127.0.0.1:{found[1]}/api/status", found[3])
                return found
            except OSError:
                pass
        time.sleep(0.5)
    pytest.fail(f"`make lab` printed no URL that answered in time:\n{log.read_text()}")


def run_in_kernel(base: str, kernel_id: str, token: str, code: str, timeout: float = 120) -> str:
    """What `code` prints, run in the kernel through the server's websocket."""
    import websocket  # websocket-client, a jupyter_server dependency

    url = base.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
    ws = websocket.create_connection(url, header=[f"Authorization: token {token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "session": uuid.uuid4().hex,
                        "username": "test",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "buffers": [],
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                }
            )
        )
        printed, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                pytest.fail("the kernel raised:\n" + "\n".join(message["content"]["traceback"]))
            elif message["msg_type"] == "execute_reply":
                assert message["content"]["status"] == "ok", message["content"]
                return "".join(printed)
        pytest.fail(f"no reply from the kernel within {timeout} s")
    finally:
        ws.close()


def stop_group(leader: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process group led by `leader` (make and JupyterLab, which
    then shuts down its kernels); SIGKILL whatever is left after `grace` s."""
    deadline = time.monotonic() + grace
    try:
        os.killpg(leader.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            leader.poll()  # reap make so the group can empty
            os.killpg(leader.pid, 0)  # ProcessLookupError once nobody is left
            time.sleep(0.2)
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leader.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_make_lab_opens_the_front_door_notebook_and_starts_a_kernel(tmp_path):
    port = free_port()
    log = tmp_path / "lab.log"
    # The Makefile opens no browser without a display; --no-browser also covers
    # a desktop session, and the inactivity shutdown is a safety net should the
    # process group ever outlive this test.
    lab_args = "LAB_ARGS=--no-browser --ServerApp.shutdown_no_activity_timeout=300"
    command = make_command("lab", f"PORT={port}", lab_args)
    with open(log, "w") as out:
        server = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=quiet_jupyter_env(tmp_path),
            start_new_session=True,
        )
    try:
        found = wait_for_url(server, log, time.monotonic() + 120)
        assert int(found[1]) == port, f"`make lab PORT={port}` printed port {found[1]}"
        path, token = urllib.parse.unquote(found[2]), found[3]
        assert path == FRONT_DOOR.name  # JupyterLab serves the notebook's folder
        base = f"http://127.0.0.1:{port}"

        status, page = request("GET", found[0].split("?")[0], token)
        assert status == 200 and "<html" in page.lower()
        status, model = request("GET", f"{base}/api/contents/{path}", token)
        assert status == 200 and model["type"] == "notebook"
        served = [cell["source"] for cell in model["content"]["cells"]]
        assert served == [cell.source for cell in nbformat.read(FRONT_DOOR, as_version=4).cells]

        status, kernel = request("POST", f"{base}/api/kernels", token, {"name": "python3"})
        assert status == 201, kernel
        try:
            printed = run_in_kernel(base, kernel["id"], token, "import sys, phi3lab; print(sys.prefix)")
            assert printed.strip() == sys.prefix, "the kernel must run in the environment make installed"
        finally:
            assert request("DELETE", f"{base}/api/kernels/{kernel['id']}", token)[0] == 204
        assert request("GET", f"{base}/api/kernels", token)[1] == []
    finally:
        stop_group(server)


def as_user(tmp_path: Path, user_id: int, env: dict) -> dict:
    """`env` with an `id` on PATH whose `id -u` answers `user_id` (root or not, without being either)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "id").write_text(f"#!/bin/sh\necho {user_id}\n")
    (tools / "id").chmod(0o755)
    return {**env, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}


def fake_lab(tmp_path: Path, user_id: int, env: dict, *variables: str) -> tuple[str, list[str], str]:
    """(what `make lab` prints, the arguments and token it gives `jupyter`), run by
    `user_id` with a stand-in `jupyter` that only reports them."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "jupyter").write_text('#!/bin/sh\necho "token=$JUPYTER_TOKEN"; for a in "$@"; do echo "arg=$a"; done\n')
    (bin_dir / "jupyter").chmod(0o755)
    command = make_command("lab", *variables, venv=str(tmp_path / "venv"))
    out = subprocess.run(
        command, env=as_user(tmp_path, user_id, env), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    args = [line[4:] for line in out.splitlines() if line.startswith("arg=")]
    token = next(line[6:] for line in out.splitlines() if line.startswith("token="))
    return out, args, token


def test_make_lab_listens_where_asked(tmp_path):
    _, args, _ = fake_lab(tmp_path, 1000, dict(os.environ), "IP=0.0.0.0")
    assert [arg for arg in args if arg.startswith("--ip")] == ["--ip=0.0.0.0"]  # JupyterLab refuses two --ip


@pytest.mark.parametrize("user_id", [0, 1000], ids=["root", "user"])
def test_make_lab_allows_root_only_for_root(tmp_path, user_id):
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    out, args, token = fake_lab(tmp_path, user_id, env, "PORT=8765", "LAB_ARGS=--ServerApp.base_url=/x/ --debug")
    assert ("--allow-root" in args) == (user_id == 0)
    assert "--port=8765" in args and "--ip=127.0.0.1" in args
    assert args[-3:] == ["--ServerApp.base_url=/x/", "--debug", "notebooks/attention_explorer.ipynb"]
    assert re.fullmatch(r"[0-9a-f]{48}", token), token
    assert f"http://127.0.0.1:8765/lab/tree/attention_explorer.ipynb?token={token}" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display check is for Linux")
@pytest.mark.parametrize("display", [None, ":0"], ids=["no-display", "display"])
def test_make_lab_opens_a_browser_only_with_a_display(tmp_path, display):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["JUPYTER_TOKEN"] = "chosen-by-the-user"
    if display:
        env["DISPLAY"] = display
    out, args, token = fake_lab(tmp_path, 1000, env)
    assert ("--no-browser" in args) == (display is None)
    assert ("No display here" in out) == (display is None)
    assert token == "chosen-by-the-user"
    assert "http://127.0.0.1:8888/lab/tree/attention_explorer.ipynb?token=chosen-by-the-user" in out


def test_make_browser_without_root_says_how_to_get_chromium(tmp_path):
    missing = tmp_path / "no-chromium"
    command = make_command("browser", f"CHROMIUM={missing}")
    done = subprocess.run(
        command, env=as_user(tmp_path, 1000, dict(os.environ)), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr  # `make test` goes on, the browser tests skip
    assert f"{missing} missing" in done.stdout and "sudo apt-get install chromium" in done.stdout
