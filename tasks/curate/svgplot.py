"""Small inline-SVG charts for the HTML report: no plotting library, no JavaScript, no network.

Each function returns one `<svg>` string; coordinates are data -> pixel maps over a fixed frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

WIDTH, HEIGHT = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 16, 44  # frame margins: room for tick labels and axis titles
NEGATIVE, ZERO, POSITIVE = (178, 24, 43), (247, 247, 247), (33, 102, 172)  # diverging red-white-blue
MARKER_COLOURS = ("#d95f02", "#7570b3", "#1b9e77", "#e7298a", "#66a61e", "#e6ab02")
# px per character and per label row at font-size 11. A label is drawn at exactly CHAR_WIDTH x its length
# (textLength): laid out by an estimate alone, labels still met in browsers whose sans-serif is wider (DejaVu
# Sans, Linux's usual one: digits 0.64 em against Helvetica's 0.56, ">=" half as wide again).
CHAR_WIDTH, ROW_HEIGHT = 6.5, 14


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = max((hi - lo) / n, 1.0) if integer else (hi - lo) / n  # counts get whole-number ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi == lo:  # a constant series still needs a frame
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


class _Frame:
    """Maps data coordinates to pixels and draws the axes."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], y_counts: bool = False) -> None:
        (self.x0, self.x1), (self.y0, self.y1) = x_range, y_range
        self.y_counts = y_counts

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def axes(self, x_label: str, y_label: str) -> list[str]:
        parts = [f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
                 'fill="none" stroke="#999"/>']
        for x in nice_ticks(self.x0, self.x1):
            parts.append(f'<text x="{self.px(x):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{x:g}</text>')
        for y in nice_ticks(self.y0, self.y1, integer=self.y_counts):
            parts.append(f'<text x="{LEFT - 6}" y="{self.py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
                     f'{escape(x_label)}</text>')
        parts.append(f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
        return parts


def marker_rows(spans: Sequence[tuple[float, float]], gap: float = 4.0) -> list[int]:
    """Row of each label's (left, right) pixel span: the first row where it overlaps no earlier label."""
    taken: list[list[tuple[float, float]]] = []
    rows = []
    for left, right in spans:
        row = next((r for r, used in enumerate(taken)
                    if all(right + gap <= a or left >= b + gap for a, b in used)), len(taken))
        if row == len(taken):
            taken.append([])
        taken[row].append((left, right))
        rows.append(row)
    return rows


def _markers(frame: _Frame, markers: Sequence[tuple[float, str]]) -> list[str]:
    """Dashed vertical lines with labels that never overlap: a label sits left of its line (right of it
    where the frame begins, inside the frame's right edge), on the first free row, with a white halo to stay
    legible over bars. Each label is drawn exactly as wide as laid out (textLength), whatever the font."""
    spans = []
    for x, label in markers:
        px, width = frame.px(x), CHAR_WIDTH * len(label)
        left = px - 3 - width if px - 3 - width >= LEFT else min(px + 3, WIDTH - RIGHT - width)
        spans.append((left, left + width))
    parts = []
    for i, ((x, label), (left, right), row) in enumerate(zip(markers, spans, marker_rows(spans))):
        colour, px = MARKER_COLOURS[i % len(MARKER_COLOURS)], frame.px(x)
        parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="{colour}" '
                     f'stroke-width="1.5" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{left:.1f}" y="{TOP + 12 + ROW_HEIGHT * row}" textLength="{right - left:.1f}" '
                     f'lengthAdjust="spacingAndGlyphs" fill="{colour}" stroke="white" stroke-width="3" '
                     f'paint-order="stroke">{escape(label)}</text>')
    return parts


def _svg(parts: list[str], title: str) -> str:
    return (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" font-family="sans-serif" font-size="11" role="img" aria-label="{escape(title)}">'
            f'<title>{escape(title)}</title>' + "".join(parts) + "</svg>")


def histogram(counts: np.ndarray, edges: np.ndarray, markers: Sequence[tuple[float, str]], x_label: str,
              title: str) -> str:
    """Bars of a precomputed histogram (counts (B,), edges (B+1,)) with labelled vertical markers."""
    frame = _Frame((float(edges[0]), float(edges[-1])), (0.0, max(float(counts.max(initial=0)), 1.0)), y_counts=True)
    parts = frame.axes(x_label, "count")
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        y = frame.py(float(count))
        parts.append(f'<rect x="{frame.px(left):.1f}" y="{y:.1f}" width="{max(frame.px(right) - frame.px(left) - 1, 0.5):.1f}" '
                     f'height="{frame.py(0) - y:.1f}" fill="#6b8fb8"><title>[{left:.4g}, {right:.4g}): {int(count)}</title></rect>')
    return _svg(parts + _markers(frame, markers), title)


def scatter(x: np.ndarray, y: np.ndarray, x_label: str, y_label: str, title: str) -> str:
    frame = _Frame(_range(x), _range(y))
    parts = frame.axes(x_label, y_label)
    parts += [f'<circle cx="{frame.px(a):.1f}" cy="{frame.py(b):.1f}" r="1.6" fill="#2166ac" fill-opacity="0.35"/>'
              for a, b in zip(x.tolist(), y.tolist())]
    return _svg(parts, title)


def line(x: np.ndarray, y: np.ndarray, x_label: str, y_label: str, title: str,
         markers: Sequence[tuple[float, str]] = ()) -> str:
    """A count curve (y >= 0) with labelled vertical markers."""
    frame = _Frame(_range(x), (0.0, max(float(y.max(initial=0)), 1.0)), y_counts=True)
    parts = frame.axes(x_label, y_label)
    points = " ".join(f"{frame.px(a):.1f},{frame.py(b):.1f}" for a, b in zip(x.tolist(), y.tolist()))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#2166ac" stroke-width="1.5"/>')
    return _svg(parts + _markers(frame, markers), title)


def diverging_colour(value: float | None, limit: float) -> str:
    """CSS colour of a value on a red (-limit) / white (0) / blue (+limit) scale; grey for None."""
    if value is None or not math.isfinite(value):
        return "#d9d9d9"
    t = 0.8 * max(-1.0, min(1.0, value / limit))  # at most 80% of the way to the end colour: text stays legible
    end = POSITIVE if t > 0 else NEGATIVE
    rgb = [round(z + abs(t) * (e - z)) for z, e in zip(ZERO, end)]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def colour_legend(limit: float, label: str) -> str:
    """A horizontal gradient bar from -limit to +limit, matching `diverging_colour`."""
    width, height, bar_x, bar_w = 420, 46, 20, 380
    stops = "".join(f'<stop offset="{o}" stop-color="{diverging_colour(v, limit)}"/>'
                    for o, v in ((0, -limit), (0.5, 0.0), (1, limit)))
    ticks = "".join(f'<text x="{bar_x + f * bar_w}" y="36" text-anchor="middle">{v:+.3g}</text>'
                    for f, v in ((0, -limit), (0.5, 0.0), (1, limit)))
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" font-family="sans-serif" font-size="11"><title>{escape(label)}</title>'
            f'<defs><linearGradient id="scale">{stops}</linearGradient></defs>'
            f'<rect x="{bar_x}" y="4" width="{bar_w}" height="18" fill="url(#scale)" stroke="#999"/>{ticks}</svg>')
