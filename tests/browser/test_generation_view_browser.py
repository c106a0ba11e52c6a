"""GenerationView in a real JupyterLab (Chromium through Playwright).

Reuses the JupyterLab server, page and screenshot helpers of
`test_attention_explorer_browser.py`; puts a small notebook (the shipped
model answering a prompt, its GenerationView) on the server through the
contents API, runs it, and checks that the token strip renders and follows
the generated-token, layer and head selectors.
"""

import re

import pytest
from lab_helpers import KERNEL_READY, screenshot_on_failure, shot, upload_notebook

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = "generation_demo.ipynb"
PROMPT = "When Mary and John went to the store, John gave a drink to"
SOURCE = f"""import phi3lab
model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
g = phi3lab.generate(model, {PROMPT!r}, tokenizer=tok, max_new_tokens=3, stop=[], names="blocks.*.attn.hook_pattern")
view = phi3lab.widgets.GenerationView(g.trace)
print(g.prompt_length, len(g.token_ids))
view"""


def _upload(lab) -> tuple[int, int]:
    """Upload the notebook; return the prompt's and the whole sequence's lengths."""
    upload_notebook(lab, NOTEBOOK, SOURCE)
    import phi3lab

    tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    prompt = len(tok.encode(PROMPT))
    return prompt, prompt + 3


def test_generation_view_in_jupyterlab(lab, page):  # noqa: F811
    from playwright.sync_api import expect

    base, token = lab
    prompt, total = _upload(lab)
    page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    page.wait_for_function(KERNEL_READY, timeout=60_000)
    page.evaluate("() => { jupyterapp.commands.execute('notebook:run-all-cells'); }")
    view = page.locator(".phi3lab-generation")
    weights = view.locator(".phi3lab-weight")
    with screenshot_on_failure(page, "generation_failure"):
        expect(weights).to_have_count(prompt + 1, timeout=180_000)  # the first generated token's row
        expect(view.locator(".phi3lab-generated")).to_have_count(1)
        expect(view.locator(".phi3lab-strip-title")).to_contain_text(f"generated token {prompt}")
        before = [weights.nth(i).get_attribute("data-weight") for i in range(prompt + 1)]
        view.locator(".phi3lab-layer select").select_option(label="layer 1")
        expect(view.locator(".phi3lab-strip-title")).to_contain_text("layer 1", timeout=30_000)
        view.locator(".phi3lab-head select").select_option(label="head 0")
        expect(view.locator(".phi3lab-strip-title")).to_contain_text("head 0", timeout=30_000)
        after = [weights.nth(i).get_attribute("data-weight") for i in range(prompt + 1)]
        assert before != after
        view.locator(".phi3lab-position select").select_option(index=2)  # the last generated token
        expect(weights).to_have_count(total, timeout=30_000)
        expect(view.locator(".phi3lab-generated")).to_have_count(3)
        expect(weights.nth(total - 1)).to_have_css("border-top-width", "2px")
        shot(view, "generation_view")
    assert not re.search("widget|plotly", " ".join(page.errors), re.IGNORECASE), page.errors
    assert page.outside_requests == [], page.outside_requests
