"""A real JupyterLab on 127.0.0.1 (fresh token, temporary root holding this
folder's notebooks) and Debian's Chromium driven by Playwright, shared by
the browser tests. Every request leaving 127.0.0.1 is blocked and recorded
(`page.outside_requests`); screenshots go to `test-artifacts/browser/`.

Needs `/usr/bin/chromium` (`apt-get install chromium`, or `make browser`);
never downloads a browser. Without it the tests are skipped, except under CI
(`CI=true`), where a skip would hide a broken set-up and fails instead.
"""

import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from browser.lab_helpers import ARTIFACTS, CHROME_ARGS, CHROMIUM, HERE, LOCAL_HOSTS, require_chromium


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    require_chromium()
    root = tmp_path_factory.mktemp("lab")  # autosave must not touch the repo
    for notebook in HERE.glob("*.ipynb"):
        shutil.copy(notebook, root)
    for rel, cfg in {
        "apputils-extension/notification": '{"fetchNews": "false", "checkForUpdates": false}',
        "notebook-extension/tracker": '{"windowingMode": "none"}',
    }.items():
        settings = root / ".settings/@jupyterlab" / f"{rel}.jupyterlab-settings"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={root}/.ws",
        f"--LabApp.user_settings_dir={root}/.settings",
        "--LabApp.expose_app_in_browser=True",
    ]
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start:\n" + (root / "lab.log").read_text())
        if server.poll() is not None:
            pytest.fail("JupyterLab exited:\n" + (root / "lab.log").read_text())
        yield base, token
    finally:
        server.terminate()  # by its PID; it shuts down its kernels
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "lab.log", ARTIFACTS / "lab.log")


@pytest.fixture
def page(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROME_ARGS)
        context = browser.new_context(viewport={"width": 1500, "height": 2200}, service_workers="block")
        outside = []

        def only_local(route):
            url = urllib.parse.urlsplit(route.request.url)
            if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in LOCAL_HOSTS:
                outside.append(route.request.url)
                route.abort()
            else:
                route.continue_()

        context.route("**/*", only_local)
        pg = context.new_page()
        pg.outside_requests = outside
        pg.errors, console = [], []
        pg.on("pageerror", lambda error: pg.errors.append(str(error)))
        pg.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        yield pg
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "console.log").write_text("\n".join(console + [f"pageerror: {e}" for e in pg.errors]))
        browser.close()
