"""Colour scales shared by plotly, matplotlib and CSS, and block-max pooling.

Colour scales are defined once, from matplotlib colormaps, so the live plotly
figures, the static PNGs and the coloured token strips agree:

- `SEQUENTIAL` ("Blues", white = 0) for probabilities and norms;
- `DIVERGING` ("RdBu_r", blue < 0 < red, white = 0) for signed values;
- `BLANK` (light grey) for cells that have no value (masked, `-inf`).
"""

from __future__ import annotations

import dataclasses
import io

import matplotlib
import numpy as np

SEQUENTIAL = "Blues"
DIVERGING = "RdBu_r"
BLANK = "#d9d9d9"
HIGHLIGHT = "#ff7f0e"
GENERATED = "#2ca02c"  # marks generated tokens (after a trace's prompt_length)


@dataclasses.dataclass(frozen=True)
class Scale:
    """A colormap and its value range, usable by plotly, matplotlib and CSS."""

    cmap: str
    vmin: float
    vmax: float

    @classmethod
    def probability(cls) -> "Scale":
        return cls(SEQUENTIAL, 0.0, 1.0)

    @classmethod
    def magnitude(cls, values) -> "Scale":
        """Sequential from 0 to the largest finite value."""
        top = _finite_max(np.abs(values))
        return cls(SEQUENTIAL, 0.0, top)

    @classmethod
    def signed(cls, values) -> "Scale":
        """Diverging, symmetric around 0 (0 is white)."""
        top = _finite_max(np.abs(values))
        return cls(DIVERGING, -top, top)

    def plotly(self, steps: int = 11) -> dict:
        """`colorscale`, `zmin`, `zmax` for a plotly heatmap."""
        cmap = matplotlib.colormaps[self.cmap]
        scale = [[i / (steps - 1), matplotlib.colors.to_hex(cmap(i / (steps - 1)))] for i in range(steps)]
        return dict(colorscale=scale, zmin=self.vmin, zmax=self.vmax)

    def matplotlib(self) -> dict:
        """`cmap`, `vmin`, `vmax` for `imshow` (NaN drawn in `BLANK`)."""
        cmap = matplotlib.colormaps[self.cmap].with_extremes(bad=BLANK)
        return dict(cmap=cmap, vmin=self.vmin, vmax=self.vmax)

    def rgb(self, values) -> np.ndarray:
        """uint8 RGB `[..., 3]` for `values`; NaN becomes `BLANK`."""
        values = np.asarray(values, np.float64)
        span = (self.vmax - self.vmin) or 1.0
        unit = np.clip((values - self.vmin) / span, 0.0, 1.0)
        colours = np.asarray(matplotlib.colormaps[self.cmap](np.nan_to_num(unit).ravel()))[:, :3]
        colours = colours.reshape(values.shape + (3,))
        colours[np.isnan(values)] = matplotlib.colors.to_rgb(BLANK)
        return np.round(colours * 255).astype(np.uint8)

    def css(self, value: float) -> tuple[str, str]:
        """Background and readable text colour for one value, as CSS hex."""
        r, g, b = (int(c) for c in self.rgb(value))
        text = "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"
        return f"#{r:02x}{g:02x}{b:02x}", text

    def png(self, values, pixels: int) -> bytes:
        """`values [rows, cols]` as a `pixels`-wide PNG (nearest neighbour)."""
        from PIL import Image

        height = max(1, round(pixels * values.shape[0] / max(values.shape[1], 1)))
        return png(np.asarray(Image.fromarray(self.rgb(values)).resize((pixels, height), Image.NEAREST)))


def png(rgb: np.ndarray) -> bytes:
    """uint8 RGB `[rows, cols, 3]` as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _finite_max(values) -> float:
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def blank_infinite(values) -> np.ndarray:
    """A copy with `-inf`/`inf` replaced by NaN, which every view draws blank."""
    values = np.array(values, copy=True)
    values[np.isinf(values)] = np.nan
    return values


def pool_max(values, size: int) -> np.ndarray:
    """Downsample `[..., rows, cols]` to at most `size x size` by block maxima
    (NaN-aware), so a thumbnail keeps the sharp, sparse attention peaks.
    Blocks are `ceil(n / size)` long from the start; the last may be shorter."""
    values = np.asarray(values, np.float32)
    for axis in (-2, -1):  # rows first: whole contiguous rows at a time
        factor = pool_factor(values.shape[axis], size)
        if factor > 1:
            values = np.fmax.reduceat(values, np.arange(0, values.shape[axis], factor), axis=axis)
    return values


def pool_factor(length: int, size: int) -> int:
    """How many positions one cell of `pool_max(..., size)` covers."""
    return -(-length // size)
