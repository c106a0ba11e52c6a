"""`Trace`: the host-side result of `phi3lab.trace`."""

from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import pandas as pd

from phi3lab.checks import check_index
from phi3lab.errors import bad_argument, close_matches
from phi3lab.tracing.names import block_name
from phi3lab.tracing.rope import RotaryDescription


class Trace(Mapping):
    """Captured activations of one run, by hook name, as NumPy arrays.

    A read-only mapping (`tr["blocks.3.attn.hook_pattern"]`) with helpers.
    `tr.save(path)` writes it to one `.npz` file and `Trace.load(path)`
    reads it back (arrays and metadata only, no pickle).

    Attributes:
        names: every captured name, in forward order.
        token_ids: int `[B, T]`.
        padding_mask: bool `[B, T]` (True for real tokens).
        tokens: display strings per row (`[B][T]`) when a tokenizer was
            given, else None.
        output: the backbone's output (final normalized hidden states).
        rope: `RotaryDescription` of the rotary embedding in this run.
        num_layers, num_query_heads, num_key_value_heads: model shape.
        query_window: `(start, stop)` query rows held by the attention maps,
            or None for all rows.
        attention_heads: the query heads held by the attention maps (in
            that order), or None for all heads.
        prompt_length: for a generation trace, how many positions (from the
            left, padding included) were the prompt; None for a plain trace.
    """

    def __init__(
        self,
        arrays,
        *,
        token_ids,
        padding_mask,
        tokens,
        output,
        rope,
        model,
        query_window=None,
        attention_heads=None,
        prompt_length=None,
    ):
        self._arrays = arrays
        self.names = list(arrays)
        self.token_ids = token_ids
        self.padding_mask = padding_mask
        self.tokens = tokens
        self.output = output
        self.rope: RotaryDescription = rope
        self.num_layers = model.num_layers
        self.num_query_heads = model.num_query_heads
        self.num_key_value_heads = model.num_key_value_heads
        self.query_window = query_window
        self.attention_heads = attention_heads
        self.prompt_length = prompt_length

    def __getitem__(self, name: str) -> np.ndarray:
        """The captured activation `name` (a hook name such as
        `"blocks.0.attn.hook_pattern"`); a `KeyError` listing close captured
        names if it was not captured."""
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(
                f"{name!r} was not captured in this trace. Captured names close to it: "
                f"{close_matches(name, self.names)}. Capture it with "
                f"phi3lab.trace(..., names=[{name!r}]) (or names=None for everything)."
            ) from None

    def get(self, name: str, default=None):
        """The captured activation `name`, or `default` if it was not captured."""
        return self._arrays.get(name, default)

    def __contains__(self, name) -> bool:
        """Whether activation `name` was captured."""
        return name in self._arrays

    def keys(self):
        """The captured names, in forward order (a view, like `dict.keys`)."""
        return self._arrays.keys()

    def values(self):
        """The captured arrays, in forward order."""
        return self._arrays.values()

    def items(self):
        """`(name, array)` pairs, in forward order."""
        return self._arrays.items()

    def __iter__(self) -> Iterator[str]:
        """Iterate over the captured names, in forward order."""
        return iter(self.names)

    def __len__(self) -> int:
        """How many activations were captured."""
        return len(self.names)

    def __repr__(self) -> str:
        """`<Trace batch=B positions=T names=N>`."""
        batch, length = self.token_ids.shape
        return f"<Trace batch={batch} positions={length} names={len(self.names)}>"

    def _layer(self, layer: int) -> int:
        return check_index("layer", layer, self.num_layers, "layer")

    def attention(self, layer: int, head: int | None = None) -> np.ndarray:
        """Attention probabilities `[B, H, Tq, Tk]`, or `[B, Tq, Tk]` for one head."""
        pattern = self[block_name(self._layer(layer), "attn.hook_pattern")]
        if head is None:
            return pattern
        kept = self.attention_heads or tuple(range(self.num_query_heads))
        chosen = check_index("head", head, self.num_query_heads, "query head")
        if chosen not in kept:
            raise bad_argument("head", head, f"one of the captured query heads {list(kept)}")
        return pattern[:, kept.index(chosen)]

    def resid(self, layer: int, where: str = "post") -> np.ndarray:
        """Residual stream `[B, T, D]` before (`"pre"`), between (`"mid"`) or
        after (`"post"`) block `layer`."""
        if where not in ("pre", "mid", "post"):
            raise bad_argument("where", where, '"pre", "mid" or "post"')
        return self[block_name(self._layer(layer), f"hook_resid_{where}")]

    @property
    def logits(self) -> np.ndarray:
        """Next-token logits `[B, T, V]` (`hook_logits`)."""
        return self["hook_logits"]

    def loss(self, per_token: bool = False):
        """Next-token cross-entropy of the traced tokens (from `hook_logits`).

        Position `t` predicts token `t + 1`; pairs where either token is
        padding do not count.

        Args:
            per_token: bool. Return the loss of every position, float64
                `[B, T - 1]` with NaN where it does not count, instead of the
                mean over the positions that count.

        Example:
        >>> tr = phi3lab.trace(model, ids, names="hook_logits")
        >>> tr.loss(), tr.loss(per_token=True)[0, :5]
        """
        logits = np.asarray(self.logits[:, :-1], np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        chosen = np.take_along_axis(shifted, self.token_ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
        losses = log_norm - chosen
        counts = self.padding_mask[:, :-1] & self.padding_mask[:, 1:]
        if per_token:
            return np.where(counts, losses, np.nan)
        return float(losses[counts].mean()) if counts.any() else float("nan")

    def to_pandas(self, name: str, batch: int = 0) -> pd.DataFrame:
        """A tidy per-token table of activation `name` for row `batch`.

        Attention scores/patterns give one row per (head, query, key) with
        both tokens (only the captured heads and query window); every other site gives one row per position with its
        token, the vector's L2 norm, and the values as columns `0, 1, ...`.
        """
        batch = check_index("batch", batch, self.token_ids.shape[0], "batch row")
        values = self[name][batch]
        length = self.token_ids.shape[1]
        tokens = self.tokens[batch] if self.tokens is not None else [str(t) for t in self.token_ids[batch]]
        valid = self.padding_mask[batch]
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            # Respect a query window and a head selection (`trace(queries=,
            # heads=)`): rows are labelled with true positions and heads.
            head_ids = np.asarray(self.attention_heads or range(values.shape[0]))
            start, stop = self.query_window or (0, length)
            heads, queries, keys = np.meshgrid(head_ids, np.arange(start, stop), np.arange(length), indexing="ij")
            table = pd.DataFrame(
                {
                    "head": heads.ravel(),
                    "query": queries.ravel(),
                    "key": keys.ravel(),
                    "query_token": np.asarray(tokens, object)[queries.ravel()],
                    "key_token": np.asarray(tokens, object)[keys.ravel()],
                    "value": values.ravel(),
                }
            )
            return table[np.asarray(valid)[table["query"]] & np.asarray(valid)[table["key"]]].reset_index(drop=True)
        flat = values.reshape(length, -1)
        table = pd.DataFrame(flat, columns=[str(i) for i in range(flat.shape[1])])
        table.insert(0, "norm", np.linalg.norm(flat.astype(np.float64), axis=-1))
        table.insert(0, "token", tokens)
        table.insert(0, "position", np.arange(length))
        return table[np.asarray(valid)].reset_index(drop=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to one NumPy `.npz` file (no pickle).

        Holds every captured array with its name, the token ids, padding
        mask, display tokens, output, the rotary description and the window,
        head and prompt-length settings; `Trace.load` reads it back.

        Args:
            path: the file; `.npz` is appended when missing.

        Returns:
            The `Path` written.

        Example:
        >>> tr.save("ioi_trace.npz")
        >>> same = phi3lab.Trace.load("ioi_trace.npz")
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {f"activation/{name}": value for name, value in self._arrays.items()}
        arrays.update(token_ids=self.token_ids, padding_mask=self.padding_mask, output=self.output)
        if self.tokens is not None:
            arrays["tokens"] = np.asarray(self.tokens, dtype=str).reshape(self.token_ids.shape)
        rope = {}
        for field in dataclasses.fields(self.rope):
            value = getattr(self.rope, field.name)
            if isinstance(value, np.ndarray):
                arrays[f"rope/{field.name}"] = value
            else:
                rope[field.name] = _plain(value)
        dtypes = {}
        for key, value in arrays.items():
            if value.dtype.kind == "V":  # ml_dtypes types such as bfloat16: stored as their bits
                dtypes[key] = value.dtype.name
                arrays[key] = value.view(f"uint{8 * value.dtype.itemsize}")
        meta = {
            "format": _FORMAT,
            "names": self.names,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "query_window": _plain(self.query_window),
            "attention_heads": _plain(self.attention_heads),
            "prompt_length": _plain(self.prompt_length),
            "rope": rope,
            "dtypes": dtypes,
        }
        np.savez(path, **{_META: np.asarray(json.dumps(meta))}, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        """Read a trace written by `Trace.save` (with `allow_pickle=False`).

        Args:
            path: a `.npz` file from `Trace.save`.

        Returns:
            A `Trace` equal to the saved one (same names, arrays, tokens,
            rotary description and settings).

        Example:
        >>> tr = phi3lab.Trace.load("ioi_trace.npz")
        >>> tr.attention(0, head=1).shape
        """
        not_a_trace = lambda why: ValueError(
            f"`path` must be a trace file written by Trace.save; received path={str(path)!r} ({why})."
        )
        try:
            stored = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise not_a_trace(error) from None
        if not isinstance(stored, np.lib.npyio.NpzFile):
            raise not_a_trace("a single NumPy array, not an .npz archive")
        with stored:
            if _META not in stored.files:
                raise not_a_trace("no trace metadata")
            data = {key: stored[key] for key in stored.files}
        meta = json.loads(str(data.pop(_META)))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"`path` holds trace format {meta.get('format')!r}; this phi3lab reads format {_FORMAT}.")
        for key, name in meta["dtypes"].items():
            data[key] = data[key].view(np.dtype(getattr(ml_dtypes, name, name)))
        rope_fields = {field.name for field in dataclasses.fields(RotaryDescription)}
        rope = {name: data.get(f"rope/{name}") for name in rope_fields}
        rope.update(meta["rope"])
        tokens = data.get("tokens")
        shape = types.SimpleNamespace(
            **{key: meta[key] for key in ("num_layers", "num_query_heads", "num_key_value_heads")}
        )
        as_tuple = lambda value: None if value is None else tuple(value)
        return cls(
            {name: data[f"activation/{name}"] for name in meta["names"]},
            token_ids=data["token_ids"],
            padding_mask=data["padding_mask"],
            tokens=None if tokens is None else tokens.tolist(),
            output=data["output"],
            rope=RotaryDescription(**rope),
            model=shape,
            query_window=as_tuple(meta["query_window"]),
            attention_heads=as_tuple(meta["attention_heads"]),
            prompt_length=meta["prompt_length"],
        )


_FORMAT = 1
_META = "phi3lab_trace"


def _plain(value):
    """`value` with NumPy scalars and tuples made JSON types."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
