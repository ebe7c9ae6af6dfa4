"""The progress panel: step/total, it/s, ETA, VRAM, loss, the phase message, errors and warnings, as HTML."""

from __future__ import annotations

import html
from typing import Any

from ..events import format_seconds


def progress_html(status: Any) -> str:
    """HTML for a ``RunStatus`` (or anything with its fields); ``data-*`` attributes carry the raw numbers."""
    step, total = int(status.step or 0), int(status.total or 0)
    fraction = min(1.0, step / total) if total else 0.0
    state = (
        "running"
        if status.running
        else (
            "failed" if status.error else "cancelled" if status.cancelled else "finished" if status.finished else "idle"
        )
    )
    facts = []
    if status.model:
        facts.append(html.escape(status.model))
    if total:
        facts.append(f"step {step}/{total}")
    if status.loss is not None:
        facts.append(f"loss {status.loss:.4f}")
    if status.lr is not None:
        facts.append(f"lr {status.lr:.2e}")
    if status.it_per_s is not None:
        facts.append(f"{status.it_per_s:.2f} it/s")
    if status.eta_s is not None and status.running:
        facts.append(f"ETA {format_seconds(status.eta_s)}")
    if status.memory_mb is not None:
        facts.append(f"VRAM {status.memory_mb:,.0f} MB")
    message = html.escape(status.message or ("No training has run yet." if state == "idle" else ""))
    lines = [
        f'<div class="dreambooth-progress" data-state="{state}" data-step="{step}" data-total="{total}">',
        f'<div class="dreambooth-bar"><div style="width:{100 * fraction:.1f}%"></div></div>',
        f'<div class="dreambooth-progress-text"><b>{message}</b> {" · ".join(facts)}</div>',
    ]
    if status.last_checkpoint:
        lines.append(f"<div>Last checkpoint: <code>{html.escape(str(status.last_checkpoint))}</code></div>")
    if status.error:
        lines.append(f'<div class="dreambooth-error">{html.escape(status.error)}</div>')
    for warning in status.warnings or []:
        lines.append(f'<div class="dreambooth-warning">{html.escape(warning)}</div>')
    lines.append("</div>")
    return "".join(lines)
