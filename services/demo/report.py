"""The demo's report: report.md with the loop's per-round table and both students, overlays of a validation
slice and of one unlabeled case over the rounds, validation Dice over student steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = np.array([[0, 0, 0, 0], [0.95, 0.3, 0.2, 0.55], [0.2, 0.8, 0.3, 0.55], [0.2, 0.5, 1.0, 0.55]])


def _overlay(ax, image: np.ndarray, label: np.ndarray | None, title: str) -> None:
    ax.imshow(image, cmap="gray")
    if label is not None:
        ax.imshow(COLORS[np.clip(label, 0, len(COLORS) - 1)], interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _student_prediction(ckpt: Path, image: np.ndarray) -> np.ndarray:
    from student_trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from student_trainer.inference import predict_slices

    model, _, size = model_from_checkpoint(load_checkpoint(ckpt))
    return predict_slices(model, image[None], size, "cpu", amp=False).numpy()[0]


def _case_labels(rec, label_dirs: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A job record's image volume (D, H, W) and its label file under each of `label_dirs` (a job OUT, a
    round's folder), read in the image's axes."""
    from services.labeling.cases import case_input, read_case
    from shared.data.nifti import load_label_nifti

    vol = read_case(case_input(rec.case_id, Path(rec.input)))
    axes = vol.meta.get("axes", (2, 0, 1))
    return vol.image, [load_label_nifti(Path(d) / rec.output, axes=axes) for d in label_dirs]


def _labeling_section(out: Path, labeling: dict, plt) -> str:
    """The labeling job's ranking table and overlays of its least and most trusted cases."""
    ranking, records, s = labeling["ranking"], labeling["records"], labeling["summary"]
    rows = ["| rank | case | confidence | " + " | ".join(ranking[0]["classes"]) + " |" if ranking else "| rank | case | confidence |"]
    rows.append("|" + " --- |" * (3 + (len(ranking[0]["classes"]) if ranking else 0)))
    for r in ranking:
        per = " | ".join(f"{v:.3f}" if v is not None else "-" for v in r["classes"].values())
        rows.append(f"| {r['rank']} | {r['case_id']} | {r['confidence']:.3f} | {per} |")
    picture = ""
    if len(ranking) >= 1:
        ends = [("least trusted", ranking[0]), ("most trusted", ranking[-1])]
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
        for ax, (what, r) in zip(axes, ends):
            image, (lab,) = _case_labels(records[r["case_id"]], [labeling["out"]])
            z = int(np.argmax((lab > 0).reshape(lab.shape[0], -1).sum(1)))
            _overlay(ax, image[z], lab[z], f"{what}: {r['case_id']} ({r['confidence']:.3f}), slice {z}")
        fig.tight_layout()
        fig.savefig(out / "labels_ranking.png", dpi=110)
        plt.close(fig)
        picture = "\n![least and most trusted labels](labels_ranking.png)\n"
    root = Path(labeling["out"]).resolve().parent
    rounds = labeling.get("rounds") or []
    last_pass = f"; its last pass (round {rounds[-1]['round']})" if rounds else ""
    return f"""
## Labeling job: the unlabeled cases

The unlabeled cases went through the Redis path as one labeling job (`vessa label`'s runner){last_pass}:
{s.labeled} labeled, {s.skipped} already done, {s.failed} failed, {s.slices} slices in {s.seconds:.1f} s
({s.slices_per_s:.2f} slices/s). Labels and manifest: `labels/` (`labels/labels.json`). Ranked from
least to most trusted by the assistant's confidence (`vessa label rank {labeling['out']}`):

{chr(10).join(rows)}
{picture}
To look at these labels in the browser, approve or correct them and add them to the template bank,
serve the demo's assistant with jobs on and open the review page (docs/review.md):

    VESSA_DATA_ROOT={root} vessa serve --stream --ckpt {root}/assistant/assistant.pt --bank {root}/bank
    vessa label --url http://127.0.0.1:8000 --data data     # the same job, on the service
    # then open http://127.0.0.1:8000/ui/ (with VESSA_API_TOKEN set, the page asks for it)
"""


def _rounds_section(out: Path, labeling: dict, loop_evals: dict[int, dict], plt) -> str:
    """The loop's per-round table (pseudo-labels of the unlabeled cases; that round's student on the
    validation volumes, `loop_evals`: round → `run_eval` report) and the least trusted case's labels
    round by round."""
    rows = ["| round | pseudo-labels: mean Dice (unlabeled cases) | per class | mean confidence | Spearman (confidence, Dice) | student: validation Dice | student steps | seconds (student + labels) |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in labeling["rounds"]:
        r = row["round"]
        ev = loop_evals.get(r)
        student = f"{100 * ev['summary']['mean']['dice']:.2f}" if ev else "-"
        per = ", ".join(f"{k} {v:.1f}" for k, v in (row.get("dice_per_class") or {}).items())
        dice = "-" if row.get("dice") is None else f"{row['dice']:.2f}"
        rho = row.get("spearman_confidence_dice")
        t = row.get("train") or {}
        secs = f"{t.get('seconds', 0):.0f} + {row.get('label_seconds', 0):.0f}"
        rows.append(f"| {r} | {dice} | {per} | {row.get('confidence_mean') or 0:.3f} | {'-' if rho is None else f'{rho:.2f}'} | {student} | {t.get('steps', '-')} | {secs} |")
    picture = ""
    ranking, records = labeling["ranking"], labeling["records"]
    if ranking:
        case_id = ranking[0]["case_id"]
        round_dirs = [Path(labeling["out"]) / "rounds" / str(r["round"]) for r in labeling["rounds"]]
        image, labs = _case_labels(records[case_id], round_dirs)
        z = int(np.argmax((labs[-1] > 0).reshape(labs[-1].shape[0], -1).sum(1)))
        fig, axes = plt.subplots(1, len(labs) + 1, figsize=(3.2 * (len(labs) + 1), 3.4))
        _overlay(axes[0], image[z], None, f"{case_id} slice {z}")
        for ax, r, lab in zip(axes[1:], labeling["rounds"], labs):
            _overlay(ax, image[z], lab[z], f"round {r['round']}" + (" (templates only)" if r["round"] == 0 else ""))
        fig.tight_layout()
        fig.savefig(out / "rounds.png", dpi=110)
        plt.close(fig)
        picture = f"\n![the least trusted case's labels, round by round](rounds.png)\n\nThe least trusted case ({case_id}) after the last round, its labels round by round.\n"
    return f"""
## The loop, round by round

Round 0 is the assistant's templates-only labels; in each later round a student learns from the
labeled patients plus the previous round's pseudo-labels (each slice weighted by the assistant's
confidence), and its softmax is the prompt of the assistant's next labels (docs/jobs.md, "The loop").
The pseudo-labels' Dice is against the unlabeled cases' ground truth, read only to score them
(`vessa label score`); training never reads it. The students are scored on the validation volumes.

{chr(10).join(rows)}
{picture}"""


def write_report(
    out: Path,
    data: Path,
    url: str,
    bcp: dict,
    bcp_eval: dict,
    loop_evals: dict[int, dict],
    students: dict[int, Path],
    elapsed: float,
    schedule: dict | None = None,
    stage_s: dict[str, float] | None = None,
    labeling: dict | None = None,
) -> dict:
    """bcp: BCP alone's training result, bcp_eval its `run_eval` report; loop_evals: round → the `run_eval`
    report of that round's student; students: round → student checkpoint; schedule: the run's
    settings worth stating; stage_s: seconds per stage; labeling: the labeling job's summary, ranking,
    records and per-round table (services/demo/pipeline.py `_label_unlabeled`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.ingress.client import AssistantClient
    from shared.data import open_dataset
    from shared.metrics import comparison_table

    last = max(students) if students else None
    steps = (schedule or {}).get("student_steps_per_round", 0)
    # Validation Dice over student steps: BCP alone's curve, the loop's student after each round -------
    fig, ax = plt.subplots(figsize=(6, 3.5))
    pts = [(s, 100 * d) for s, _phase, d in bcp.get("val_dice", [])]
    if pts:
        ax.plot(*zip(*pts), marker="o", label="BCP alone")
    loop_dice = {r: 100 * rep["summary"]["mean"]["dice"] for r, rep in sorted(loop_evals.items())}
    loop_pts = [(r * steps, d) for r, d in loop_dice.items()]
    if loop_pts:
        ax.plot(*zip(*loop_pts), marker="s", label="the loop's student (end of each round)")
    ax.set_xlabel("student steps")
    ax.set_ylabel("validation mean Dice (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_dice.png", dpi=110)
    plt.close(fig)

    # Overlays: a validation slice: image, ground truth, assistant pseudo-label, both students ----------
    ds = open_dataset(data)
    case = ds.volume_ids("val")[0]
    vol = ds.read_volume(case, "val")
    z = int(np.argmax((vol.label > 0).reshape(vol.label.shape[0], -1).sum(1)))
    image = vol.image[z]
    client = AssistantClient(url, timeout=600)
    assistant_label = client.pseudo_labels(image[None].astype(np.float32)).labels[0]
    client.close()
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    _overlay(axes[0], image, None, f"{case} slice {z}")
    _overlay(axes[1], image, vol.label[z], "ground truth")
    _overlay(axes[2], image, assistant_label, "VESSA, templates only (REST)")
    _overlay(axes[3], image, _student_prediction(out / "student_bcp" / "latest.pt", image), "student: BCP alone")
    if last is not None:
        _overlay(axes[4], image, _student_prediction(students[last], image), f"student: the loop, round {last}")
    fig.tight_layout()
    fig.savefig(out / "overlays.png", dpi=110)
    plt.close(fig)

    rounds_md = _rounds_section(out, labeling, loop_evals, plt) if labeling and labeling.get("rounds") else ""
    labeling_md = _labeling_section(out, labeling, plt) if labeling else ""
    summaries = {"BCP alone": bcp_eval["summary"]}
    if last is not None:
        summaries[f"the loop's student (round {last})"] = loop_evals[last]["summary"]
    table = comparison_table(summaries)
    d_bcp = 100 * bcp_eval["summary"]["mean"]["dice"]
    d_loop = loop_dice[last] if last is not None else float("nan")
    verdict = "ahead of" if d_loop > d_bcp else "not ahead of"
    pseudo = [row.get("dice") for row in (labeling or {}).get("rounds", [])]
    pseudo_line = ""
    if pseudo and all(d is not None for d in pseudo):
        pseudo_line = f"The pseudo-labels of the unlabeled cases went from {pseudo[0]:.2f} (round 0, templates only) to {pseudo[-1]:.2f} mean Dice (round {len(pseudo) - 1}).\n"
    md = f"""# VESSA demo report

Data: `{data}` ({len(ds.patients())} training patients, {len(ds.volume_ids('val'))} validation volumes).
Run time: {elapsed / 60:.1f} min. The assistant served from Ray Serve (CPU profile); every label went
through the Redis path as one labeling job with the closed loop (`vessa label --rounds`). BCP alone had
as many student steps as the loop's students together, the same seed, batch and input size.

## Validation volumes (3D, per class)

```
{table}
```

The loop's student is **{verdict}** BCP alone at the same budget: mean Dice {d_loop:.2f}% vs {d_bcp:.2f}%
({d_loop - d_bcp:+.2f} points). Both as they ended (neither picked on the validation volumes).
{pseudo_line}
Schedule: {json.dumps(schedule or {})}

Time per stage (s): {json.dumps({k: round(v) for k, v in (stage_s or {}).items()})}
{rounds_md}
## Pictures

![overlays](overlays.png)

Image, ground truth, the assistant's templates-only pseudo-label (REST), BCP alone's prediction and the
loop's student's (red RV, green Myo, blue LV).

![validation Dice over student steps](val_dice.png)

Predictions as NIfTI: `eval/bcp/predictions/`, `eval/loop/predictions/`; the loop's students
`labels/rounds/<r>/student.pt` (`vessa predict --ckpt …`).
{labeling_md}"""
    (out / "report.md").write_text(md)
    summary = {
        "dice_bcp": d_bcp,
        "dice_loop": d_loop,
        "pseudo_dice_per_round": pseudo,
        "student_dice_per_round": loop_dice,
        "summary_table": table,
        "elapsed_s": elapsed,
        "schedule": schedule or {},
        "stage_s": stage_s or {},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    return summary
