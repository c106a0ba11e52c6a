"""FeatureView and CircuitView in a real JupyterLab (Chromium through Playwright).

Each test puts a small notebook on the server through the contents API, runs
it and drives the view: FeatureView's search box switches the feature (its
contexts change); CircuitView's slider changes how many edges are drawn (the
segments of the plotly paths are counted in the page) and a click on a node
shows its table row. Every wait is on a condition in the page.
"""

from pathlib import Path

import pytest
from lab_helpers import (
    CELL_ERROR,
    KERNEL_READY,
    check_clean,
    open_and_run,
    screenshot_on_failure,
    shot,
    upload_notebook,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

FEATURE_SOURCE = """import phi3lab
import phi3lab.features as F
from phi3lab import tasks
model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
sae = F.from_preset("phi3lab_tiny_en", "resid_post_2")
texts = [p.text for p in tasks.name_mover_prompts(48, seed=5)]
view = phi3lab.widgets.FeatureView(sae, model, texts, tokenizer=tok, feature=91, contexts=5)
view"""
CIRCUIT_SOURCE = (Path(__file__).parent.parent / "graph_fixtures.py").read_text() + (
    "\nimport phi3lab\nview = phi3lab.widgets.CircuitView(head_graph(layers=3, heads=2, seed=1), edges=5)\nview"
)
# Line segments drawn by the plot's line traces: each starts a path piece with "M".
DRAWN_SEGMENTS = """el => [...el.querySelectorAll('.scatterlayer .trace path.js-line')]
  .reduce((n, p) => n + ((p.getAttribute('d') || '').match(/M/g) || []).length, 0)"""


def _run(lab, page, name: str, source: str) -> None:
    """Upload a one-cell notebook, open it in a fresh workspace (earlier
    kernels shut down) and run it (not awaited)."""
    upload_notebook(lab, name, source)
    open_and_run(lab, page, name)


def _wait_for(page, selector: str, timeout: float = 180_000):
    """The first element matching `selector`, or the cell's error at once."""
    page.wait_for_function(
        f"() => document.querySelector({selector!r}) || ({CELL_ERROR})()", timeout=timeout, polling=500
    )
    error = page.evaluate(CELL_ERROR)
    assert not error, error
    return page.locator(selector).first


def test_feature_view_search_box_switches_feature(lab, page):
    from playwright.sync_api import expect

    _run(lab, page, "feature_view_demo.ipynb", FEATURE_SOURCE)
    with screenshot_on_failure(page, "feature_view_failure"):
        view = _wait_for(page, ".phi3lab-feature")
        contexts = view.locator(".phi3lab-feature-context")
        expect(contexts).to_have_count(5, timeout=60_000)
        expect(view.locator("[data-feature='91']")).to_have_count(1)
        before = contexts.all_text_contents()
        page.wait_for_function(KERNEL_READY, timeout=120_000)  # idle: the widgets answer
        search = view.locator(".phi3lab-feature-search input")
        search.fill("815")
        search.press("Enter")
        expect(view.locator("[data-feature='815']")).to_have_count(1, timeout=30_000)
        expect(view.locator(".phi3lab-feature-contexts")).to_contain_text("Top contexts of feature 815")
        expect(contexts).to_have_count(5)
        assert contexts.all_text_contents() != before
        expect(view.locator(".js-plotly-plot .gtitle").first).to_have_text(
            "Activations of feature 815 where it fires", timeout=30_000
        )
        shot(view, "feature_view")
    check_clean(page)


def test_circuit_view_slider_and_node_click(lab, page):
    from playwright.sync_api import expect

    _run(lab, page, "circuit_view_demo.ipynb", CIRCUIT_SOURCE)
    with screenshot_on_failure(page, "circuit_view_failure"):
        view = _wait_for(page, ".phi3lab-circuit")
        plot = view.locator(".js-plotly-plot")
        plot.scroll_into_view_if_needed()  # plotly draws a plot once on screen
        page.wait_for_function(f"el => ({DRAWN_SEGMENTS})(el) === 5", arg=plot.element_handle(), timeout=60_000)
        expect(view.locator(".phi3lab-circuit-status [data-edges='5']")).to_have_count(1)
        page.wait_for_function(KERNEL_READY, timeout=120_000)
        readout = view.locator(".phi3lab-circuit-edges .widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("20")
        page.keyboard.press("Enter")
        expect(view.locator(".phi3lab-circuit-status [data-edges='20']")).to_have_count(1, timeout=30_000)
        page.wait_for_function(f"el => ({DRAWN_SEGMENTS})(el) === 20", arg=plot.element_handle(), timeout=30_000)

        point = plot.locator(".scatterlayer .trace").last.locator("path.point").first
        box = point.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        expect(plot.locator(".hoverlayer .hovertext")).to_have_count(1, timeout=10_000)
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        row = view.locator(".phi3lab-circuit-node")
        expect(row).to_have_count(1, timeout=30_000)
        node = row.get_attribute("data-node")
        expect(row).to_contain_text(f"node{node}")
        expect(row).to_contain_text("kind")
        shot(view, "circuit_view")
    check_clean(page)
