"""Cross-attention heatmaps as a PNG, for a person reading which source word each target word looks at.

One figure per text. On top, a large panel with the average over every layer and head shown (the quickest way
to read the alignment; the most attended source token of each row is outlined), with that alignment spelled
out beside it. Below, a grid with one panel per layer (rows) and head (columns), titled "layer i · head j"
with the model's 0-based indices. Every panel shares one colour scale (square-root, so diffuse heads stay
visible) and one colorbar. For several texts write one file per text: `png_paths(path, n)` names them
`stem-1.png`, `stem-2.png`, ... in input order (just `path` for a single text).

matplotlib's Agg canvas is used directly (no pyplot), so nothing needs a display and no global figure state is
shared between threads.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from matplotlib.transforms import blended_transform_factory

COLORMAP = "viridis"
DPI = 150
MAX_LABEL_CHARS = 16
# Long texts shrink the cells rather than grow the picture: the average panel's longer side and the grid of
# layer/head panels stay within these (at DPI, about 3,600 and 4,800 pixels), and labels thin out to every
# k-th token once a cell is smaller than a line of text.
MAX_PANEL_INCHES = 24.0
MAX_GRID_INCHES = 32.0


def png_paths(path: str | Path, count: int) -> list[Path]:
    """The file for each of `count` texts: `path` itself for one text, else stem-1.png, stem-2.png, ..."""
    path = Path(path)
    suffix = path.suffix or ".png"  # matplotlib adds it to a name without one: the name we report must too
    if count == 1:
        return [path.with_suffix(suffix)]
    return [path.with_name(f"{path.stem}-{i}{suffix}") for i in range(1, count + 1)]


def _label(token: str) -> str:
    # Long tokens (unknown words keep their surface form) would squeeze the panels; the HTML view shows them.
    return token if len(token) <= MAX_LABEL_CHARS else token[: MAX_LABEL_CHARS - 1] + "…"


def _clip(value: float, low: float, high: float) -> float:
    return float(min(max(value, low), high))


def _label_stride(cell: float, fontsize: float) -> int:
    """Label every k-th token: as many as fit one text line per label in cells of `cell` inches."""
    return max(1, int(np.ceil(fontsize * 1.15 / 72 / cell - 1e-9)))


def _heatmap(ax: Axes, weights: np.ndarray, norm: PowerNorm, source: Sequence[str] | None,
             target: Sequence[str] | None, fontsize: float, every: int = 1) -> AxesImage:
    image = ax.imshow(weights, cmap=COLORMAP, norm=norm, aspect="equal", interpolation="nearest")
    rows, cols = weights.shape
    # Thin gaps between cells make it easy to follow a row or a column by eye. Drawn as two line collections:
    # minor ticks would do it too, but every tick is an artist and they dominate the rendering time.
    style = {"colors": "white", "linewidth": 0.4, "alpha": 0.35}
    ax.hlines(np.arange(0.5, rows - 1), -0.5, cols - 0.5, **style)
    ax.vlines(np.arange(0.5, cols - 1), -0.5, rows - 0.5, **style)
    ax.tick_params(length=2, pad=1.5, labelsize=fontsize)
    if source is not None:
        ax.set_xticks(range(0, cols, every), [_label(t) for t in source[::every]], rotation=90)
    else:
        ax.set_xticks([])
    if target is not None:
        ax.set_yticks(range(0, rows, every), [_label(t) for t in target[::every]])
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    return image


def _alignment_list(ax: Axes, heatmap: Axes, average: np.ndarray, source: Sequence[str],
                    target: Sequence[str], fontsize: float, every: int = 1) -> None:
    """The alignment spelled out in `ax`, one line per target token beside its heatmap row: "perro  ←  dog
    0.62" (every k-th one when the rows are thinner than a line)."""
    ax.set_axis_off()
    rows = len(target)
    if not rows or not len(source):
        return
    # x in this panel, y in the heatmap's rows: each line sits level with its row whatever the panel heights.
    beside = blended_transform_factory(ax.transAxes, heatmap.transData)
    ax.text(0.0, -1.2, LEGEND_HEADING, fontsize=fontsize, fontweight="bold", va="center",
            transform=beside, clip_on=False)
    repeated = {t for t in source if list(source).count(t) > 1}
    for row in range(0, rows, every):
        col = int(average[row].argmax())
        # "the" may occur three times; its position says which one.
        where = f" (#{col})" if source[col] in repeated else ""
        ax.text(0.0, row, f"{_label(target[row])}  ←  {_label(source[col])}{where}   {average[row, col]:.2f}",
                fontsize=fontsize, va="center", transform=beside, clip_on=False)


def _colorbar_text(length: float, fontsize: float) -> tuple[str, list[float]]:
    """The colorbar's label and ticks for a bar `length` inches long. Along the bar the constrained layout
    leaves text alone, so a label longer than the bar ran into the panels above and below it (short texts):
    the label is the longest wording that fits in three lines, and a short bar gets fewer ticks."""
    per_line = max(6, int(length * 72 / (fontsize * 0.62)))
    for wording in COLORBAR_LABELS:
        lines = textwrap.wrap(wording, per_line, break_long_words=False, break_on_hyphens=False)
        if len(lines) <= 3 and max(map(len, lines)) <= per_line:
            break
    ticks = COLORBAR_TICKS if length * 72 >= len(COLORBAR_TICKS) * fontsize * 1.6 else COLORBAR_FEW_TICKS
    return "\n".join(lines), ticks


COLORBAR_LABELS = (
    # No-break spaces keep "(√ scale)" together when a label wraps.
    "attention weight, every panel (square-root\u00a0scale)",
    "attention weight (square-root\u00a0scale)",
    "weight (√\u00a0scale)",
    "weight",
)
COLORBAR_SHRINK = 0.8  # the bar's length, a fraction of the average panel's height
COLORBAR_TICKS = [0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0]
COLORBAR_FEW_TICKS = [0, 0.1, 0.4, 1.0]  # evenly spaced on the square-root scale
LEGEND_HEADING = "target  ←  most attended source"

# Tokens are data, not markup: "$" in a token must not switch matplotlib into mathtext.
STYLE = {"text.parse_math": False, "font.family": "DejaVu Sans"}


def render_cross_attention_png(path: str | Path, source_tokens: Sequence[str], target_tokens: Sequence[str],
                               weights: np.ndarray, layers: Sequence[int], heads: Sequence[int],
                               title: str | None = None) -> Path:
    """Write the cross-attention of one translation to `path` as a PNG and return the path.

    `weights` is [layers, heads, target, source], rows labelled by `target_tokens` and columns by
    `source_tokens`; `layers` and `heads` are the model indices of its first two dimensions.
    """
    figure = cross_attention_figure(source_tokens, target_tokens, weights, layers, heads, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with rc_context(STYLE):
        figure.savefig(path, dpi=DPI, facecolor="white")
    return Path(path)


def cross_attention_figure(source_tokens: Sequence[str], target_tokens: Sequence[str], weights: np.ndarray,
                           layers: Sequence[int], heads: Sequence[int], title: str | None = None) -> Figure:
    """The figure `render_cross_attention_png` writes (same arguments)."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 4:
        raise ValueError(f"weights must be [layers, heads, target, source], got shape {weights.shape}")
    n_layers, n_heads, rows, cols = weights.shape
    if (rows, cols) != (len(target_tokens), len(source_tokens)):
        raise ValueError(f"weights have {rows} rows x {cols} columns but there are {len(target_tokens)} "
                         f"target and {len(source_tokens)} source tokens")
    layers = list(layers) or list(range(n_layers))  # empty: all layers, as in the API
    heads = list(heads) or list(range(n_heads))
    if (n_layers, n_heads) != (len(layers), len(heads)):
        raise ValueError(f"weights have {n_layers} layers x {n_heads} heads, but {len(layers)} layer and "
                         f"{len(heads)} head indices were given")
    average = weights.mean(axis=(0, 1)) if n_layers and n_heads else np.zeros((rows, cols), np.float32)
    longest = max(rows, cols, 1)

    # Sizes in inches, chosen so that a cell stays legible from 5 to ~50 tokens; fonts follow the cell size.
    big_cell = min(_clip(7.5 / longest, 0.17, 0.42), MAX_PANEL_INCHES / longest)
    big_font = _clip(big_cell * 72 * 0.62, 6.5, 11)
    grid_cells = longest * max(n_heads, n_layers, 1)
    small_cell = min(_clip(3.0 / longest, 0.085, 0.2), MAX_GRID_INCHES / grid_cells)
    small_font = _clip(small_cell * 72 * 0.68, 5.0, 8.5)
    big_every, small_every = _label_stride(big_cell, big_font), _label_stride(small_cell, small_font)
    longest_label = max([len(_label(t)) for t in [*source_tokens, *target_tokens]] or [1])
    big_label = longest_label * big_font * 0.62 / 72 + 0.3  # room for tick labels beside the panel
    small_label = longest_label * small_font * 0.62 / 72 + 0.2

    big_w, big_h = cols * big_cell, rows * big_cell
    panel_w, panel_h = cols * small_cell, rows * small_cell
    grid_w = n_heads * (panel_w + 0.25) + small_label + 1.0
    grid_h = n_layers * (panel_h + 0.35) + small_label + 0.2
    top_h = big_h + big_label + 0.8
    # The bold heading is wider per character than the lines below it (wider than they are for short tokens).
    legend_w = max((longest_label * 2 + 12) * 0.6, len(LEGEND_HEADING) * 0.68) * big_font / 72 + 0.1
    width = max(big_w + big_label + legend_w + 1.6, grid_w, 8.0)
    title_lines = len(textwrap.wrap(title, width=max(40, int(width * 72 / (12 * 0.6))))) if title else 0
    height = top_h + grid_h + 0.25 * title_lines + 0.2

    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    with rc_context(STYLE):
        figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        if title:
            # Wrapped by hand: suptitle's own wrapping lets a long line run off the left edge.
            figure.suptitle(textwrap.fill(title, width=max(40, int(width * 72 / (12 * 0.6)))), fontsize=12)
        top, bottom = figure.subfigures(2, 1, height_ratios=[top_h, grid_h])

        ax, legend = top.subplots(1, 2, width_ratios=[big_w + big_label, legend_w])
        image = _heatmap(ax, average, norm, source_tokens, target_tokens, big_font, big_every)
        _alignment_list(legend, ax, average, source_tokens, target_tokens, big_font, big_every)
        ax.xaxis.tick_top()  # source words above the big panel, where the eye starts reading
        ax.xaxis.set_label_position("top")
        for row in range(rows):
            col = int(average[row].argmax())
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#ff3b30",
                                   linewidth=1.4))
        ax.set_title(f"average over {n_layers} layer{'s' * (n_layers != 1)} × {n_heads} head"
                     f"{'s' * (n_heads != 1)}\n(red box: most attended source token)", fontsize=big_font + 1,
                     pad=8)
        ax.set_xlabel("source", fontsize=big_font)
        ax.set_ylabel("target", fontsize=big_font)
        label, ticks = _colorbar_text(COLORBAR_SHRINK * big_h, big_font)
        colorbar = top.colorbar(image, ax=ax, shrink=COLORBAR_SHRINK, aspect=30, ticks=ticks)
        colorbar.set_label(label, fontsize=big_font)
        colorbar.ax.tick_params(labelsize=big_font - 1)

        if n_layers and n_heads:
            # Not sharex/sharey: shared axes share tick formatters, so blanking inner labels would blank all.
            axes = bottom.subplots(n_layers, n_heads, squeeze=False)
            for i, layer in enumerate(layers):
                for j, head in enumerate(heads):
                    panel = axes[i][j]
                    _heatmap(panel, weights[i, j], norm, source_tokens if i == n_layers - 1 else None,
                             target_tokens if j == 0 else None, small_font, small_every)
                    panel.set_title(f"layer {layer} · head {head}", fontsize=small_font + 1.5, pad=3)
    return figure
