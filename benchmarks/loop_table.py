"""The closed loop's per-round table by subset of cases (docs/results.md, "The closed loop"): a loop job
labels several sets at once (ACDC's validation volumes and the holdout volumes in one dataset folder, with
`--all`); this reads each round's `score.json` (`vessa label score`'s per-case Dice, written by the job)
and averages it per subset, then scores each round's student on the dataset's splits (`vessa eval`).

    python -m benchmarks.loop_table OUT --subset val=DATA/val.list --subset holdout=DATA/test.list \
        [--eval DATA --split val --split test] [--json FILE]

A subset is NAME=FILE with one case id per line. Mean Dice is as everywhere in the project: per class over
the subset's volumes, then over classes, in %.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def subset_dice(score: dict, cases: set[str]) -> float | None:
    """Mean Dice (%) of `score`'s cases that are in `cases`, summarised as the job summarises a round
    (`shared.metrics.summarise`: per class over volumes, then over classes)."""
    from shared.metrics import summarise

    chosen = [case for case in score["cases"] if case["case_id"] in cases]
    if not chosen:
        return None
    return round(100.0 * summarise(chosen)["mean"]["dice"], 2)


def loop_table(out: Path, subsets: dict[str, set[str]], data: Path | None = None, splits: tuple[str, ...] = ()) -> list[dict]:
    """One row per finished round of the loop job at `out`: pseudo-label Dice per subset, and with `data`
    its student's Dice on each of `splits`."""
    rows = []
    rounds = sorted(int(p.name) for p in (out / "rounds").iterdir() if p.name.isdigit())
    for r in rounds:
        rdir = out / "rounds" / str(r)
        if not (rdir / "round.json").is_file():
            continue
        row: dict = {"round": r}
        score = json.loads((rdir / "score.json").read_text())
        for name, cases in subsets.items():
            row[f"pseudo_{name}"] = subset_dice(score, cases)
        student = rdir / "student.pt"
        if data is not None and student.is_file():
            from student_trainer.evaluate import run_eval

            for split in splits:
                rep = run_eval(student, data, split, device="cpu")
                row[f"student_{split}"] = round(100.0 * float(rep["summary"]["mean"]["dice"]), 2)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the loop job's output directory")
    ap.add_argument("--subset", action="append", default=[], help="NAME=FILE of case ids (repeatable)")
    ap.add_argument("--eval", type=Path, default=None, help="dataset whose splits score each round's student")
    ap.add_argument("--split", action="append", default=[], help="split for --eval (repeatable)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    subsets = {}
    for item in args.subset:
        name, _, path = item.partition("=")
        subsets[name] = {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}
    rows = loop_table(args.out, subsets, args.eval, tuple(args.split))
    cols = sorted({k for row in rows for k in row if k != "round"})
    print("| round | " + " | ".join(cols) + " |")
    print("| ---: |" + " ---: |" * len(cols))
    for row in rows:
        print(f"| {row['round']} | " + " | ".join("" if row.get(c) is None else f"{row[c]:.2f}" for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
