"""A labeling job's progress on the terminal: the runner's events as a slice bar per labeling pass and a
line per round of the loop (`vessa label` run here, `vessa demo`)."""

from __future__ import annotations

import typer

from services.labeling.runner import Event


def terminal_progress(show: bool = True) -> Event:
    """An `on_event` for `run_label_job`: a tqdm bar of slices per pass (cases done, skipped and failed
    after it) and, for a loop, which round is running; `show=False` keeps only the round lines."""
    from tqdm import tqdm

    bar: dict = {}

    def on_event(kind: str, data: dict) -> None:
        if kind == "round":
            if data["round"] < data["rounds"] or not data["table"] or data["table"][-1]["round"] != data["round"]:
                typer.echo(f"round {data['round']} of {data['rounds']}" + (" (0: templates only)" if data["round"] == 0 else ": student, then relabel"), err=True)
        elif kind == "start":
            bar["t"] = tqdm(total=data["slices"], unit="slice", desc="labeling", disable=not show, dynamic_ncols=True)
            bar["counts"] = {"ok": 0, "skipped": 0, "failed": 0}
            bar["n"] = data["cases"]
        elif kind == "case":
            rec = data["record"]
            key = "skipped" if rec is None else ("ok" if rec.status == "ok" else "failed")
            bar["counts"][key] += 1
            c = bar["counts"]
            bar["t"].set_postfix_str(f"cases {sum(c.values())}/{bar['n']} ok {c['ok']} skipped {c['skipped']} failed {c['failed']}")
            bar["t"].update(data["slices"])
        elif kind == "done" and "t" in bar:
            bar["t"].close()

    return on_event
