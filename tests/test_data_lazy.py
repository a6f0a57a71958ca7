"""aigc_cli/data/lazy.py: LazyFolder's replacement of a file that does not
decode, called directly on a few tiny PNGs."""

from __future__ import annotations

import torch
from PIL import Image

from aigc_cli.data.lazy import LazyFolder


def _folder(tmp_path, n=4):
    rels = []
    for i in range(n):
        cls = "a" if i < n // 2 else "b"
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 10, 200 - 40 * i)).save(tmp_path / cls / f"img{i}.png")
        rels.append(f"{cls}/img{i}.png")
    return rels


def test_a_bad_last_file_is_replaced_by_the_first_wrapping_around(tmp_path):
    rels = _folder(tmp_path)
    (tmp_path / rels[-1]).write_bytes(b"junk, not a png")
    lazy = LazyFolder(str(tmp_path), rels, channels=3, resolution=8)
    images, labels, failures = lazy.fetch([3])
    first, first_labels, _ = lazy.fetch([0])
    assert torch.equal(images, first)
    assert labels.tolist() == first_labels.tolist() == [0]  # the label of the file used, not of the bad one
    assert failures == [(rels[3], failures[0][1], rels[0])]


def test_int_index_wraps_and_split_covers_every_image(tmp_path):
    rels = _folder(tmp_path, n=5)
    lazy = LazyFolder(str(tmp_path), rels, channels=1, resolution=8)
    whole = lazy[0:5]
    assert whole.shape == (5, 1, 8, 8) and lazy.shape == (5, 1, 8, 8)
    assert torch.equal(lazy[-1], whole[4]) and torch.equal(lazy[5], whole[0])
    assert torch.equal(torch.cat(list(lazy.split(2))), whole)


def test_picking_from_a_streamed_folder_where_nothing_decodes_is_one_usage_error(tmp_path):
    import pytest

    from aigc_cli.data.lazy import pick
    from aigc_cli.errors import UsageError

    rels = _folder(tmp_path, n=2)
    for rel in rels:
        (tmp_path / rel).write_bytes(b"junk, not a png")
    lazy = LazyFolder(str(tmp_path), rels, channels=3, resolution=8)
    said = []
    with pytest.raises(UsageError, match="none of the image files under .* could be decoded"):
        pick(lazy, None, torch.arange(2), said.append, strict=False)
    assert said == []  # no substitute to name
    for key in (0, slice(0, 2)):  # an int was a TypeError (None subscripted)
        with pytest.raises(UsageError, match="none of the image files under .* could be decoded"):
            lazy[key]
