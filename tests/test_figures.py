"""Plots are stored as palette PNGs (atomic.save_figure): the same picture in fewer bytes."""

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from faircalib import atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture
def figure():
    fig, ax = plt.subplots(figsize=(4, 3))
    x = np.linspace(1, 4096, 50)
    for k in range(6):  # a benchmark plot: several coloured lines with markers, a legend
        ax.plot(x, np.log(x) * (k + 1), marker="o", label=f"backend {k}")
    ax.set(xscale="log", title="speed vs bf16")
    ax.legend()
    yield fig
    plt.close(fig)


def test_png_is_a_palette_image_close_to_matplotlibs_own(tmp_path, figure):
    reference = io.BytesIO()
    figure.savefig(reference, format="png", dpi=80)  # matplotlib's full-colour rendering
    atomic.save_figure(figure, tmp_path / "plot.png", dpi=80)
    saved = Image.open(tmp_path / "plot.png")
    assert saved.mode == "P" and len(saved.getcolors()) <= atomic.PNG_COLOURS
    ours = np.asarray(saved.convert("RGB"), dtype=float)
    full = np.asarray(Image.open(reference).convert("RGB"), dtype=float)
    assert ours.shape == full.shape
    # palette rounding moves antialiased edge pixels a little; the picture stays the same
    assert np.abs(ours - full).mean() < 2.0
    assert (np.abs(ours - full).max(-1) > 60).mean() < 0.002
    assert (tmp_path / "plot.png").stat().st_size < 0.6 * len(reference.getvalue())
    assert not [p for p in tmp_path.iterdir() if p.name != "plot.png"]  # no temporary left


def test_other_formats_are_left_as_matplotlib_writes_them(tmp_path, figure):
    atomic.save_figure(figure, tmp_path / "plot.svg")
    assert (tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
