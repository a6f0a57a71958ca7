"""aigc_cli/data/native.py: the size a folder of mixed sizes is conformed
to, and the seeded subset, called directly."""

from __future__ import annotations

import torch
from PIL import Image

from aigc_cli.data.native import load_folder_native, most_common_size, real_indices, seeded_order


def test_most_common_size_breaks_ties_by_the_larger_area_then_the_first_seen():
    assert most_common_size([(8, 8), (16, 12), (16, 12), (8, 8)]) == (16, 12)
    assert most_common_size([(4, 6), (6, 4)]) == (4, 6)  # same area: the first seen
    assert most_common_size([(32, 32), (8, 8), (8, 8)]) == (8, 8)  # frequency first


def test_real_indices_are_n_sorted_members_of_the_seeded_order():
    idx = real_indices(20, 7, 3)
    assert len(idx) == 7 and idx.tolist() == sorted(seeded_order(20, 7, 3)[:7])
    assert real_indices(5, 9, 3).tolist() == list(range(5)) == seeded_order(5, 9, 3)


def test_every_transposing_exif_orientation_swaps_the_size_and_no_image_is_resampled(tmp_path):
    """Orientations 5-8 turn the stored image by 90 degrees: a folder of such photos, all one size as seen,
    is read at that size, with no 'not the most common size' warning (no image distorted by a rescale)."""
    for o in range(1, 9):
        img = Image.new("RGB", (24, 12), (30 * o, 0, 0))
        exif = Image.Exif()
        exif[0x0112] = o
        if o in (5, 6, 7, 8):
            img = img.transpose(Image.Transpose.TRANSPOSE)  # stored sideways: 12x24, seen 24x12
        img.save(tmp_path / f"o{o}.png", exif=exif.tobytes())
    said = []
    images = load_folder_native(str(tmp_path), warn=said.append)
    assert images.shape == (8, 3, 12, 24) and said == [], said
    assert torch.equal(images[:, 0, 6, 12], torch.tensor([30 * o for o in range(1, 9)], dtype=torch.uint8))


def test_limit_takes_exactly_the_first_files_in_sorted_order(tmp_path):
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"img{i}.png")
    images = load_folder_native(str(tmp_path), warn=print, limit=3)
    assert images[:, 0, 0, 0].tolist() == [0, 40, 80]


def test_strict_stops_on_a_file_that_does_not_decode_and_otherwise_it_is_skipped(tmp_path):
    import pytest

    from aigc_cli.errors import UsageError

    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img1.png").write_bytes(b"junk, not a png")
    with pytest.raises(UsageError, match="cannot use image file .*img1.png"):
        load_folder_native(str(tmp_path), warn=print, strict=True)
    said = []
    assert load_folder_native(str(tmp_path), warn=said.append)[:, 0, 0, 0].tolist() == [0, 80]
    assert any(s.startswith("skipping img1.png") for s in said), said
