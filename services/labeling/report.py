"""The closing summary table of a labeling run."""

from __future__ import annotations

from services.labeling.outputs import CaseRecord


def summary_table(records: dict[str, CaseRecord], summary, max_rows: int = 30) -> str:
    """Per case (least trusted first; failures on top), then the totals. Over `max_rows` cases, only
    the failures and the least trusted are listed."""
    rows = sorted(records.values(), key=lambda r: (r.status == "ok", r.confidence if r.confidence is not None else -1.0))
    shown = rows if len(rows) <= max_rows else rows[:max_rows]
    lines = [f"{'case':<28} {'status':<7} {'slices':>6} {'conf':>6} {'s':>7}  note", "-" * 72]
    for r in shown:
        conf = f"{r.confidence:.3f}" if r.confidence is not None else "-"
        note = (r.error or "")[:60] if r.status != "ok" else ""
        lines.append(f"{r.case_id[:28]:<28} {r.status:<7} {r.slices:>6} {conf:>6} {r.seconds:>7.1f}  {note}")
    if len(rows) > len(shown):
        lines.append(f"… {len(rows) - len(shown)} more cases in labels.json / labels.csv")
    lines.append("-" * 72)
    lines.append(
        f"{summary.cases} cases: {summary.labeled} labeled, {summary.skipped} already done, {summary.failed} failed"
        f"{' (cancelled)' if summary.cancelled else ''}; {summary.slices} slices in {summary.seconds:.1f} s "
        f"({summary.slices_per_s:.2f} slices/s); model {summary.model_version or '?'}, bank v{summary.bank_version}"
    )
    return "\n".join(lines)
