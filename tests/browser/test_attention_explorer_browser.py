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
import shutil
import time

import pytest
from lab_helpers import DOCS_IMAGES, KERNEL_READY, check_clean, open_and_run, screenshot_on_failure, shot

NOTEBOOK = "views_demo.ipynb"
# The one screenshot per view that documents it.
VIEWS = {
    "attention_explorer": ".phi3lab-attention",
    "residual_stream": ".phi3lab-residual",
    "logit_lens": ".phi3lab-logit-lens",
    "rope": ".phi3lab-rope",
    "patching": ".phi3lab-patching",
}

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]


def test_attention_explorer_in_jupyterlab(lab, page):
    with screenshot_on_failure(page, "failure"):
        _drive(lab, page)


def _drive(lab, page):
    from playwright.sync_api import expect

    start = time.monotonic()
    mark = lambda what: print(f"{time.monotonic() - start:6.1f} s  {what}")  # shown when the test fails
    open_and_run(lab, page, NOTEBOOK)
    mark("kernel ready, run all")
    explorer = page.locator(".phi3lab-attention")
    image = explorer.locator(".phi3lab-heatmap .js-plotly-plot g.hm image")
    title = explorer.locator(".phi3lab-heatmap .js-plotly-plot .gtitle")
    for selector in VIEWS.values():  # every cell ran and rendered
        expect(page.locator(f"{selector} .js-plotly-plot").first).to_be_attached(timeout=180_000)
    mark("all views rendered")
    page.wait_for_function(KERNEL_READY, timeout=120_000)  # idle: widgets answer clicks
    explorer.locator(".phi3lab-heatmap").scroll_into_view_if_needed()  # plotly draws a plot once on screen
    expect(image).to_be_attached(timeout=60_000)
    mark("explorer drawn")
    expect(title).to_have_text("Layer 0 · head 0 (kv head 0): attention pattern (probability)")
    ticks = explorer.locator(".phi3lab-heatmap .js-plotly-plot .ytick text")
    expect(ticks).to_have_count(15)
    expect(ticks.filter(has_text=re.compile(r"^0 <s>$"))).to_have_count(1)  # token labels
    expect(explorer.locator(".phi3lab-heatmap .js-plotly-plot .cbtitle")).to_have_text("probability")  # colour bar
    expect(explorer.locator(".phi3lab-thumbnail")).to_have_count(4)
    paths = {"attention_explorer": shot(explorer, "attention_explorer")}
    mark("first screenshot")

    # Layer, then head: the title names them and the heatmap image changes each time.
    before = image.get_attribute("href")
    explorer.locator(".phi3lab-layer select").select_option(label="layer 1")
    expect(title).to_have_text("Layer 1 · head 0 (kv head 0): attention pattern (probability)", timeout=30_000)
    page.wait_for_function(
        "([el, b]) => el.getAttribute('href') !== b", arg=[image.element_handle(), before], timeout=30_000
    )
    before = image.get_attribute("href")
    explorer.locator(".phi3lab-head select").select_option(label="3 (kv 1)")
    expect(title).to_have_text("Layer 1 · head 3 (kv head 1): attention pattern (probability)", timeout=30_000)
    page.wait_for_function(
        "([el, b]) => el.getAttribute('href') !== b", arg=[image.element_handle(), before], timeout=30_000
    )
    explorer.locator(".phi3lab-thumbnail", has_text="head 2").click()  # a thumbnail selects
    expect(title).to_have_text("Layer 1 · head 2 (kv head 1): attention pattern (probability)", timeout=30_000)

    # Clicking a token outlines its row and column and colours both token strips.
    token = explorer.locator(".phi3lab-token").nth(4)
    expect(token).to_have_text("John")
    token.click()
    expect(token).to_have_class(re.compile(r"mod-warning"), timeout=30_000)
    expect(explorer.locator(".phi3lab-status")).to_contain_text("selected 4 John", timeout=30_000)
    expect(explorer.locator(".phi3lab-heatmap .js-plotly-plot .shapelayer path")).to_have_count(2, timeout=30_000)
    weights = explorer.locator(".phi3lab-weight")
    expect(weights).to_have_count(2 * 15)  # row + column
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
    check_clean(page)
    if os.environ.get("PHI3LAB_UPDATE_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        paths["attention_explorer"] = paths["attention_explorer_selected"]  # shows the token highlight
        for name in VIEWS:
            shutil.copy(paths[name], DOCS_IMAGES / f"{name}.png")
