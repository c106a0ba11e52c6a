"""Interactive views of traces (ipywidgets + plotly), with static fallbacks.

Every view has a live `.widget` and a `.static()` picture; displayed in a
notebook it shows the widget where a widget frontend runs (JupyterLab) and
the picture elsewhere (nbconvert, nbmake, GitHub). Everything renders
offline: plotly's widget bundles its JavaScript, static HTML inlines it.
"""

from phi3lab.widgets.attention import AttentionExplorer
from phi3lab.widgets.circuit_view import CircuitView
from phi3lab.widgets.common import payload_bytes
from phi3lab.widgets.feature_view import FeatureView
from phi3lab.widgets.generation import GenerationView
from phi3lab.widgets.head_grid import HeadGrid
from phi3lab.widgets.logit_lens import LogitLensView
from phi3lab.widgets.patching import PatchingView
from phi3lab.widgets.residual import ResidualStreamView
from phi3lab.widgets.rope import RopeView
from phi3lab.widgets.tokens import TokenView

__all__ = [
    "AttentionExplorer",
    "CircuitView",
    "FeatureView",
    "GenerationView",
    "HeadGrid",
    "LogitLensView",
    "PatchingView",
    "ResidualStreamView",
    "RopeView",
    "TokenView",
    "payload_bytes",
]
