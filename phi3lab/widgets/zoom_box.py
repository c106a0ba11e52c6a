"""A draggable zoom window over an overview image.

`ZoomBox` shows a PNG overview of a long attention head with the zoom
window drawn over it as a box: drag the box, or click anywhere on the
overview to centre it there, and its new position comes back to Python as
`window`. The image itself carries no box, so moving the window sends only
four numbers, not a new picture.
"""

from __future__ import annotations

import anywidget
import traitlets

from phi3lab.widgets.colours import HIGHLIGHT

_ZOOM_BOX = """
export default {
  render({ model, el }) {
    // The box is placed in percent of this frame, which is exactly the picture's size
    // (`el` itself may be stretched by its flex container).
    const frame = document.createElement("div");
    frame.className = "phi3lab-zoom-box";
    frame.style.cssText = "position:relative;display:inline-block;line-height:0;user-select:none";
    const img = document.createElement("img");
    img.draggable = false;
    img.style.cssText = "max-width:100%;cursor:crosshair";
    const box = document.createElement("div");
    box.className = "phi3lab-zoom-window";
    box.style.cssText = `position:absolute;box-sizing:border-box;border:2px solid ${model.get("_colour")};cursor:move`;
    frame.append(img, box);
    el.append(frame);
    let url;
    const drawImage = () => {
      if (url) URL.revokeObjectURL(url);
      url = URL.createObjectURL(new Blob([model.get("image")], { type: "image/png" }));
      img.src = url;
    };
    // Window [q0, k0, q_size, k_size] in positions; extent [row0, rows, keys, covered_rows, covered_keys].
    const place = ([q0, k0, qs, ks]) => {
      const [row0, , , coveredRows, coveredKeys] = model.get("extent");
      Object.assign(box.style, {
        top: `${(100 * (q0 - row0)) / coveredRows}%`, height: `${(100 * qs) / coveredRows}%`,
        left: `${(100 * k0) / coveredKeys}%`, width: `${(100 * ks) / coveredKeys}%`,
      });
    };
    const clamped = (q0, k0) => {
      const [row0, rows, keys] = model.get("extent");
      const [, , qs, ks] = model.get("window");
      const q = Math.min(Math.max(Math.round(q0), row0), Math.max(row0, row0 + rows - qs));
      const k = Math.min(Math.max(Math.round(k0), 0), Math.max(0, keys - ks));
      return [q, k, qs, ks];
    };
    const perPixel = () => {
      const [, , , coveredRows, coveredKeys] = model.get("extent");
      return [coveredRows / img.clientHeight, coveredKeys / img.clientWidth];
    };
    const send = (win) => { model.set("window", win); model.save_changes(); };
    let drag = null;
    box.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      box.setPointerCapture(event.pointerId);
      drag = { x: event.clientX, y: event.clientY, start: model.get("window"), now: model.get("window") };
    });
    box.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const [rowsPerPx, keysPerPx] = perPixel();
      drag.now = clamped(drag.start[0] + (event.clientY - drag.y) * rowsPerPx,
                         drag.start[1] + (event.clientX - drag.x) * keysPerPx);
      place(drag.now);
    });
    box.addEventListener("pointerup", () => { if (drag) send(drag.now); drag = null; });
    img.addEventListener("click", (event) => {
      const bounds = img.getBoundingClientRect();
      const [rowsPerPx, keysPerPx] = perPixel();
      const [row0] = model.get("extent");
      const [, , qs, ks] = model.get("window");
      const win = clamped(row0 + (event.clientY - bounds.top) * rowsPerPx - qs / 2,
                          (event.clientX - bounds.left) * keysPerPx - ks / 2);
      place(win);
      send(win);
    });
    model.on("change:image", drawImage);
    model.on("change:window", () => place(model.get("window")));
    model.on("change:extent", () => place(model.get("window")));
    drawImage();
    place(model.get("window"));
    return () => { if (url) URL.revokeObjectURL(url); };
  },
};
"""


class ZoomBox(anywidget.AnyWidget):
    """An overview image with a draggable zoom-window box.

    Args:
        image: PNG bytes of the overview (no box drawn in it).
        extent: `[first_row, rows, keys, covered_rows, covered_keys]`: the
            query rows the image shows start at `first_row`, `rows` of them
            over `keys` keys; the image's full height and width stand for
            `covered_rows` and `covered_keys` positions (block pooling may
            cover a few more than there are).
        window: `[query_start, key_start, query_size, key_size]`, in
            positions; set by Python to move the box, and by the browser when
            the box is dragged or the overview clicked (starts clamped inside
            the extent).

    Example:
    >>> box = ZoomBox(image=png_bytes, extent=[0, 600, 600, 602, 602], window=[0, 0, 64, 64])
    >>> box.observe(lambda change: print(change["new"]), names="window")
    """

    _esm = _ZOOM_BOX
    _colour = traitlets.Unicode(HIGHLIGHT).tag(sync=True)
    image = traitlets.Bytes(b"").tag(sync=True)
    extent = traitlets.List(traitlets.Int(), [0, 1, 1, 1, 1]).tag(sync=True)
    window = traitlets.List(traitlets.Int(), [0, 0, 1, 1]).tag(sync=True)
