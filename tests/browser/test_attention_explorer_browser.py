"""The views in a real JupyterLab, driven by Debian's Chromium (Playwright).

Starts JupyterLab on 127.0.0.1 (fresh token, temporary root), runs
`views_demo.ipynb`, then checks that the AttentionExplorer heatmap renders,
follows the layer and head selectors and highlights a clicked token, and
that the browser never tried to reach anything but 127.0.0.1. Screenshots go
to `test-artifacts/browser/`; with `PHI3LAB_UPDATE_DOCS_IMAGES=1` one per view
is also copied to `docs/images/` for the README.

Needs `/usr/bin/chromium` (`apt-get install chromium`, or `make browser`);
never downloads a browser. Without it the test is skipped, except under CI
(`CI=true`), where a skip would hide a broken set-up and fails instead.
"""

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
DOCS_IMAGES = ROOT / "docs" / "images"
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "views_demo.ipynb"
LOCAL_HOSTS = {"127.0.0.1"}
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-domain-reliability", "--no-pings"]
# Connected and idle kernel on a ready notebook (needs --LabApp.expose_app_in_browser=True).
KERNEL_READY = """() => { const w = window.jupyterapp?.shell.currentWidget;
  const k = w?.sessionContext?.session?.kernel;
  return !!(w?.context?.isReady && k && k.connectionStatus === 'connected' && k.status === 'idle'); }"""
# The one screenshot per view that documents it.
VIEWS = {
    "attention_explorer": ".phi3lab-attention",
    "residual_stream": ".phi3lab-residual",
    "logit_lens": ".phi3lab-logit-lens",
    "rope": ".phi3lab-rope",
    "patching": ".phi3lab-patching",
}

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]


def _require_chromium():
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing; install Debian's Chromium with `apt-get install chromium` (or `make browser`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser test cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require_chromium()
    root = tmp_path_factory.mktemp("lab")                           # autosave must not touch the repo
    shutil.copy(HERE / NOTEBOOK, root)
    for rel, cfg in {"apputils-extension/notification": '{"fetchNews": "false", "checkForUpdates": false}',
                     "notebook-extension/tracker": '{"windowingMode": "none"}'}.items():
        settings = root / ".settings/@jupyterlab" / f"{rel}.jupyterlab-settings"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", f"--LabApp.workspaces_dir={root}/.ws",
               f"--LabApp.user_settings_dir={root}/.settings", "--LabApp.expose_app_in_browser=True"]
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
        server.terminate()                                          # by its PID; it shuts down its kernels
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


def shot(locator, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    locator.scroll_into_view_if_needed()
    locator.page.mouse.move(0, 0)                                   # no hover toolbar over the titles
    locator.screenshot(path=str(path), animations="disabled")
    return path


def test_attention_explorer_in_jupyterlab(lab, page):
    try:
        _drive(lab, page)
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
        raise


def _drive(lab, page):
    from playwright.sync_api import expect

    start = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - start:6.1f} s  {what}")     # shown when the test fails
    base, token = lab
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    page.wait_for_function(KERNEL_READY, timeout=60_000)
    mark("kernel ready")
    page.evaluate("() => { jupyterapp.commands.execute('notebook:run-all-cells'); }")   # never await it
    explorer = page.locator(".phi3lab-attention")
    image = explorer.locator(".js-plotly-plot g.hm image")
    title = explorer.locator(".js-plotly-plot .gtitle")
    expect(image).to_be_attached(timeout=120_000)
    mark("explorer rendered")
    for selector in VIEWS.values():                                 # every cell ran and rendered
        expect(page.locator(f"{selector} .js-plotly-plot").first).to_be_attached(timeout=120_000)
    mark("all views rendered")
    expect(title).to_have_text("Layer 0 · head 0 (kv head 0): attention pattern (probability)")
    ticks = explorer.locator(".js-plotly-plot .ytick text")
    expect(ticks).to_have_count(15)
    expect(ticks.filter(has_text=re.compile(r"^0 <s>$"))).to_have_count(1)                 # token labels
    expect(explorer.locator(".js-plotly-plot .cbtitle")).to_have_text("probability")        # colour bar
    expect(explorer.locator(".phi3lab-thumbnail")).to_have_count(4)
    paths = {"attention_explorer": shot(explorer, "attention_explorer")}
    mark("first screenshot")

    # Layer, then head: the title names them and the heatmap image changes each time.
    before = image.get_attribute("href")
    explorer.locator(".phi3lab-layer select").select_option(label="layer 1")
    expect(title).to_have_text("Layer 1 · head 0 (kv head 0): attention pattern (probability)", timeout=30_000)
    page.wait_for_function("([el, b]) => el.getAttribute('href') !== b", arg=[image.element_handle(), before],
                           timeout=30_000)
    before = image.get_attribute("href")
    explorer.locator(".phi3lab-head select").select_option(label="3 (kv 1)")
    expect(title).to_have_text("Layer 1 · head 3 (kv head 1): attention pattern (probability)", timeout=30_000)
    page.wait_for_function("([el, b]) => el.getAttribute('href') !== b", arg=[image.element_handle(), before],
                           timeout=30_000)
    explorer.locator(".phi3lab-thumbnail", has_text="head 2").click()                      # a thumbnail selects
    expect(title).to_have_text("Layer 1 · head 2 (kv head 1): attention pattern (probability)", timeout=30_000)

    # Clicking a token outlines its row and column and colours both token strips.
    token = explorer.locator(".phi3lab-token").nth(4)
    expect(token).to_have_text("John")
    token.click()
    expect(token).to_have_class(re.compile(r"mod-warning"), timeout=30_000)
    expect(explorer.locator(".phi3lab-status")).to_contain_text("selected 4 John", timeout=30_000)
    expect(explorer.locator(".js-plotly-plot .shapelayer path")).to_have_count(2, timeout=30_000)
    weights = explorer.locator(".phi3lab-weight")
    expect(weights).to_have_count(2 * 15)                                                   # row + column
    assert weights.first.get_attribute("data-weight") != weights.nth(1).get_attribute("data-weight")
    expect(explorer.locator(".phi3lab-weight[data-position='4']").first).to_have_css("border-top-width", "2px")
    paths["attention_explorer_selected"] = shot(explorer, "attention_explorer_selected")
    mark("token selected")

    # Clicking a heatmap cell selects its query: row 7 ("the") of the 15 x 15 window.
    box = image.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5 / 15, box["y"] + box["height"] * 7.5 / 15)
    expect(explorer.locator(".phi3lab-status")).to_contain_text("selected 7 the", timeout=30_000)

    for name, selector in VIEWS.items():
        if name != "attention_explorer":
            view = page.locator(selector)
            expect(view.locator(".js-plotly-plot .gtitle").first).not_to_have_text("", timeout=30_000)
            paths[name] = shot(view, name)

    mark("all screenshots")
    assert page.outside_requests == [], f"the browser tried to leave 127.0.0.1: {page.outside_requests}"
    widget_errors = [e for e in page.errors if "plotly" in e.lower() or "widget" in e.lower()]
    assert widget_errors == [], widget_errors
    if os.environ.get("PHI3LAB_UPDATE_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        paths["attention_explorer"] = paths["attention_explorer_selected"]    # shows the token highlight
        for name in VIEWS:
            shutil.copy(paths[name], DOCS_IMAGES / f"{name}.png")
