"""Live plotly figures that share one copy of plotly.js per page.

plotly's `FigureWidget` is an anywidget whose state carries its whole
JavaScript bundle (plotly.js, ~5 MB): every figure sends it to the browser,
which parses it once per figure, and a saved notebook stores it once per
figure. `FigureWidget` carries a 2 KB loader instead, and a reference to one
`PlotlyBundle` widget per kernel that holds the bundle: the browser imports
it once (the first figure to load starts the import, the others wait on the
same promise) and every figure on the page runs from that module.

Works wherever anywidget does (JupyterLab, Notebook 7, VS Code, Colab): the
loader asks the page's widget manager for the bundle's model, as anywidget's
own child-widget support does.
"""

from __future__ import annotations

import pathlib

import anywidget
import plotly
import plotly.graph_objects as go
import traitlets
from ipywidgets import widget_serialization

BUNDLE_PATH = pathlib.Path(plotly.__file__).parent / "package_data" / "widgetbundle.js"

_LOADER = """
const modules = (globalThis.__phi3labPlotlyModules ??= new Map());

function plotlyModule(model) {
  const id = String(model.get("_bundle")).replace(/^IPY_MODEL_/, "");
  if (!modules.has(id)) {
    modules.set(id, (async () => {
      const bundle = await model.widget_manager.get_model(id);
      const url = URL.createObjectURL(new Blob([bundle.get("code")], { type: "text/javascript" }));
      try {
        return (await import(url)).default;
      } finally {
        URL.revokeObjectURL(url);
      }
    })());
  }
  return modules.get(id);
}

export default () => {
  let ready;
  return {
    initialize(ctx) {
      ready = plotlyModule(ctx.model).then(async (definition) => {
        const widget = typeof definition === "function" ? await definition() : definition;
        await widget.initialize?.(ctx);
        return widget;
      });
      return ready.then(() => undefined);
    },
    async render(ctx) {
      const widget = await ready;
      return widget.render?.(ctx);
    },
  };
};
"""


class PlotlyBundle(anywidget.AnyWidget):
    """Holds plotly's widget bundle once per kernel (nothing to display)."""

    _esm = "export default { render() {} };"
    code = traitlets.Unicode().tag(sync=True)


_shared: PlotlyBundle | None = None


def shared_bundle() -> PlotlyBundle:
    """The kernel's one `PlotlyBundle` (created on first use)."""
    global _shared
    if _shared is None or _shared.comm is None:
        _shared = PlotlyBundle(code=BUNDLE_PATH.read_text(encoding="utf-8"))
    return _shared


class FigureWidget(go.FigureWidget):
    """A plotly `FigureWidget` whose JavaScript comes from the kernel's
    shared `PlotlyBundle` instead of its own state.

    Args:
        figure: anything `go.FigureWidget` takes (a `go.Figure`, a dict).

    Example:
    >>> widget = FigureWidget(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])))
    >>> payload_bytes(widget) < 100_000   # plotly.js is counted once, in the bundle
    """

    _esm = _LOADER
    _bundle = traitlets.Instance(PlotlyBundle).tag(sync=True, **widget_serialization)

    @traitlets.default("_bundle")
    def _default_bundle(self):
        return shared_bundle()
