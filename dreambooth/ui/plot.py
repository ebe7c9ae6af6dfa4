"""The live loss / learning-rate plot, drawn as a small SVG (the same on every gradio version)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

WIDTH, HEIGHT = 600, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 64, 14, 30


def _scale(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if math.isclose(lo, hi):
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _points(
    steps: Sequence[int], values: Sequence[float], x_range: tuple[float, float], y_range: tuple[float, float]
) -> str:
    (x0, x1), (y0, y1) = x_range, y_range
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = []
    for step, value in zip(steps, values):
        x = LEFT + inner_w * ((step - x0) / (x1 - x0) if x1 > x0 else 0.5)
        y = TOP + inner_h * (1 - (value - y0) / (y1 - y0))
        out.append(f"{x:.1f},{y:.1f}")
    return " ".join(out)


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def loss_lr_svg(history: Sequence[dict[str, Any]]) -> str:
    """An SVG of loss (left axis) and learning rate (right axis) against the step, for ``RunStatus.history``."""
    loss = [
        (int(p["step"]), float(p["loss"])) for p in history if p.get("loss") is not None and math.isfinite(p["loss"])
    ]
    lr = [(int(p["step"]), float(p["lr"])) for p in history if p.get("lr") is not None and math.isfinite(p["lr"])]
    parts = [
        (
            f'<svg id="dreambooth_plot_svg" class="dreambooth-plot" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="loss and learning rate" '
            f'data-points="{len(loss)}">'
        )
    ]
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" class="frame"/>')
    if not loss and not lr:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">No training steps yet</text></svg>')
        return "".join(parts)
    all_steps = [s for s, _ in loss + lr]
    x_range = (min(all_steps), max(all_steps))
    for series, css, x_text, anchor in ((loss, "loss", LEFT - 4, "end"), (lr, "lr", right + 4, "start")):
        if not series:
            continue
        steps, values = zip(*series)
        y_range = _scale(values)
        parts.append(f'<polyline class="{css}" fill="none" points="{_points(steps, values, x_range, y_range)}"/>')
        parts.append(
            f'<text class="{css}" x="{x_text}" y="{TOP + 10}" text-anchor="{anchor}">{_number(y_range[1])}</text>'
        )
        parts.append(
            f'<text class="{css}" x="{x_text}" y="{bottom}" text-anchor="{anchor}">{_number(y_range[0])}</text>'
        )
    parts.append(f'<text x="{LEFT}" y="{HEIGHT - 8}">step {x_range[0]}</text>')
    parts.append(f'<text x="{right}" y="{HEIGHT - 8}" text-anchor="end">step {x_range[1]}</text>')
    parts.append(f'<text class="loss" x="{LEFT + 8}" y="{TOP + 14}">loss</text>')
    parts.append(f'<text class="lr" x="{right - 8}" y="{TOP + 14}" text-anchor="end">learning rate</text>')
    parts.append("</svg>")
    return "".join(parts)
