"""What a `model.weights.h5` may hold before phi3lab reads a tensor from it.

HDF5 lets a file point outside itself: a dataset's bytes can live in other
files (external storage), be assembled from other files' datasets (virtual
datasets), or a name can be a link into another file or elsewhere in this
one. A weights file needs none of that, and following it would read files
the preset does not contain. A compressed dataset can also declare far
more bytes than it stores (a decompression bomb). So every tensor is
reached by hard links only, and refused when its storage is external or
virtual or when it declares more than `MAX_EXPANSION` times the bytes it
stores (above `EXPANSION_FLOOR` bytes): Keras' own loader makes the same
kinds of checks; keras-hub and phi3lab write plain, uncompressed datasets.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py

# A dataset may declare at most this many times the bytes it stores...
MAX_EXPANSION = 64
# ...once it declares more than this (small tensors are never refused).
EXPANSION_FLOOR = 1 << 20


def check_links(path: Path, group: h5py.Group) -> None:
    """Refuse a soft or external link anywhere below `group`.

    Example:
    >>> check_links(Path("model.weights.h5"), handle["layers"])
    """
    # The first link that is not hard, by name (h5py stops at a value returned).
    found = group.visititems_links(lambda name, link: None if isinstance(link, h5py.HardLink) else (name, link))
    if found is not None:
        name, link = found
        raise _link_refused(path, f"{group.name}/{name}", link)


def checked_dataset(path: Path, group: h5py.Group, name: str) -> h5py.Dataset:
    """`group[name]` (a `/`-separated path), reached by hard links only and
    checked by `check_dataset`.

    Example:
    >>> checked_dataset(Path("model.weights.h5"), layers, "phi3_layer_norm/vars/0")[()]
    """
    item = group
    for part in name.split("/"):
        link = item.get(part, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise _link_refused(path, f"{item.name}/{part}", link)
        item = item[part]
    if not isinstance(item, h5py.Dataset):
        raise ValueError(f"{path}: '{item.name}' is a {type(item).__name__}, not a tensor.")
    check_dataset(path, item)
    return item


def check_dataset(path: Path, dataset: h5py.Dataset) -> None:
    """Refuse `dataset` if its bytes live outside the file (external or
    virtual storage) or it declares over `MAX_EXPANSION` times what it stores."""
    where = f"{path}: tensor '{dataset.name}'"
    if dataset.external:
        files = sorted({entry[0] for entry in dataset.external})
        raise ValueError(f"{where} keeps its bytes in other files ({files}); phi3lab reads tensors stored in the file.")
    if dataset.is_virtual:
        raise ValueError(f"{where} is a virtual dataset (assembled from other datasets or files); refused.")
    declared = math.prod(dataset.shape) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    if declared > EXPANSION_FLOOR and declared > MAX_EXPANSION * stored:
        raise ValueError(
            f"{where} declares {declared:,} bytes but stores {stored:,} (more than {MAX_EXPANSION}x: a decompression "
            "or shape bomb, or a tensor never written); refused before reading it."
        )


def _link_refused(path: Path, name: str, link) -> ValueError:
    if isinstance(link, h5py.ExternalLink):
        kind = f"a link to another file ({link.filename!r})"
    elif isinstance(link, h5py.SoftLink):
        kind = f"a soft link (to {link.path!r})"
    else:
        kind = "missing" if link is None else f"a {type(link).__name__}"
    return ValueError(f"{path}: '{name}' is {kind}; a weights file holds its tensors.")
