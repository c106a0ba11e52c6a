"""Constants and helpers of the browser tests (the fixtures are in conftest.py)."""

import contextlib
import json
import os
import urllib.request
from pathlib import Path

from conftest import require, require_binary

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
DOCS_IMAGES = ROOT / "docs" / "images"
CHROMIUM = Path("/usr/bin/chromium")
LOCAL_HOSTS = {"127.0.0.1"}
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
]
# Connected and idle kernel on a ready notebook (needs --LabApp.expose_app_in_browser=True).
KERNEL_READY = """() => { const w = window.jupyterapp?.shell.currentWidget;
  const k = w?.sessionContext?.session?.kernel;
  return !!(w?.context?.isReady && k && k.connectionStatus === 'connected' && k.status === 'idle'); }"""

# The text of the first error a cell raised ("" when none): run-all stops at
# an error, so a test waiting for a later cell's view can say why at once.
CELL_ERROR = """() => document.querySelector('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
  ?.textContent.slice(-600) ?? ''"""


def require_chromium():
    """Debian's Chromium and Playwright, or skip (fail under CI: `conftest.unavailable`)."""
    require_binary(CHROMIUM, "Debian's Chromium: `apt-get install chromium` (or `make browser`)")
    require("playwright.sync_api")


@contextlib.contextmanager
def screenshot_on_failure(page, name: str):
    """Whatever fails inside, a full-page screenshot `ARTIFACTS/{name}.png`
    is taken before the error goes on."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        raise


def shot(locator, name: str) -> Path:
    """Screenshot `locator`, after waiting (up to 30 s) for every visible
    plot in it to draw its traces. A plot still empty then is recorded in
    `undrawn.txt`; updating the docs images refuses such a screenshot."""
    from playwright.sync_api import Error

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    locator.scroll_into_view_if_needed()
    try:
        locator.page.wait_for_function(
            """el => [...el.querySelectorAll('.js-plotly-plot')].filter(p => p.offsetParent !== null).every(
                 p => p.querySelector('g.trace, g.hm, g.imagelayer image'))""",
            arg=locator.element_handle(),
            timeout=30_000,
        )
    except Error:
        with open(ARTIFACTS / "undrawn.txt", "a") as log:
            log.write(f"{name}: a plotly figure stayed empty\n")
        if os.environ.get("PHI3LAB_UPDATE_DOCS_IMAGES") == "1":
            raise
    locator.page.mouse.move(0, 0)  # no hover toolbar over the titles
    locator.screenshot(path=str(path), animations="disabled")
    return path


def open_and_run(lab, page, notebook: str) -> float:
    """Open `notebook` in a fresh workspace of its own (kernels of earlier
    tests shut down, so no other notebook's widgets are restored), wait for
    its kernel, start "run all" (not awaited); returns the page's clock (ms
    since epoch) when run-all was issued."""
    base, token = lab
    auth = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions", headers=auth)) as reply:
        sessions = json.load(reply)
    for session in sessions:
        urllib.request.urlopen(
            urllib.request.Request(f"{base}/api/sessions/{session['id']}", headers=auth, method="DELETE")
        )
    workspace = Path(notebook).stem
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={token}")
    page.wait_for_function(KERNEL_READY, timeout=90_000)
    return page.evaluate(
        "() => { const t = Date.now(); jupyterapp.commands.execute('notebook:run-all-cells'); return t; }"
    )


def check_clean(page) -> None:
    """Nothing left 127.0.0.1 and no widget or plotly error was raised."""
    assert page.outside_requests == [], f"the browser tried to leave 127.0.0.1: {page.outside_requests}"
    widget_errors = [e for e in page.errors if "plotly" in e.lower() or "widget" in e.lower()]
    assert widget_errors == [], widget_errors


def upload_notebook(lab, name: str, source: str) -> None:
    """Put a one-cell notebook running `source` on the JupyterLab server
    `lab = (base, token)` as `name`, through the contents API."""
    import nbformat

    base, token = lab
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    body = json.dumps({"type": "notebook", "format": "json", "content": json.loads(nbformat.writes(notebook))})
    request = urllib.request.Request(
        f"{base}/api/contents/{name}?token={token}",
        data=body.encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30)
