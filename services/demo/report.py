"""The demo's report: report.md, overlays of a validation slice, and validation Dice over iterations."""

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


def _labeling_section(out: Path, labeling: dict, plt) -> str:
    """The labeling job's ranking table and overlays of its least and most trusted cases."""
    from services.labeling.cases import CaseInput, read_case
    from shared.data.nifti import load_label_nifti

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
            rec = records[r["case_id"]]
            kind = "h5" if rec.input.endswith(".h5") else "nifti"
            vol = read_case(CaseInput(rec.case_id, Path(rec.input), kind, False))
            lab = load_label_nifti(Path(labeling["out"]) / rec.output, axes=vol.meta.get("axes", (2, 0, 1)))
            z = int(np.argmax((lab > 0).reshape(lab.shape[0], -1).sum(1)))
            _overlay(ax, vol.image[z], lab[z], f"{what}: {r['case_id']} ({r['confidence']:.3f}), slice {z}")
        fig.tight_layout()
        fig.savefig(out / "labels_ranking.png", dpi=110)
        plt.close(fig)
        picture = "\n![least and most trusted labels](labels_ranking.png)\n"
    root = Path(labeling["out"]).resolve().parent
    return f"""
## Labeling job: the unlabeled cases

The unlabeled cases went through the Redis path as one labeling job (`vessa label`'s runner):
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


def write_report(
    out: Path,
    data: Path,
    url: str,
    results: dict,
    evals: dict,
    pseudo: dict,
    elapsed: float,
    schedule: dict | None = None,
    stage_s: dict[str, float] | None = None,
    labeling: dict | None = None,
) -> dict:
    """schedule: the run's settings worth stating (steps, warm-up, fusion); stage_s: seconds per stage;
    labeling: the labeling job's summary, ranking and records (services/demo/pipeline.py `_label_unlabeled`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.ingress.client import AssistantClient
    from shared.data import open_dataset
    from shared.metrics import comparison_table

    # Dice over iterations -------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, label in (("bcp", "BCP (teacher only)"), ("bcp_vessa", "BCP + VESSA")):
        pts = [(s, d) for s, phase, d in results[name].get("val_dice", []) if phase == "train"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mean Dice")
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
    preds = {name: _student_prediction(out / sub / "best.pt", image) for name, sub in (("bcp", "student_bcp"), ("bcp_vessa", "student_vessa"))}
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    _overlay(axes[0], image, None, f"{case} slice {z}")
    _overlay(axes[1], image, vol.label[z], "ground truth")
    _overlay(axes[2], image, assistant_label, "VESSA pseudo-label (REST)")
    _overlay(axes[3], image, preds["bcp"], "student: BCP")
    _overlay(axes[4], image, preds["bcp_vessa"], "student: BCP + VESSA")
    fig.tight_layout()
    fig.savefig(out / "overlays.png", dpi=110)
    plt.close(fig)
    # Pseudo-labels of unlabeled slices as the trainer got them (no ground truth: it is never read)
    keys = list(pseudo)[:: max(1, len(pseudo) // 4)][:4]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
        for ax, k in zip(np.atleast_1d(axes), keys):
            img, lab = pseudo[k]
            _overlay(ax, img, lab, k)
        fig.tight_layout()
        fig.savefig(out / "pseudo_labels.png", dpi=110)
        plt.close(fig)

    labeling_md = _labeling_section(out, labeling, plt) if labeling else ""
    summaries = {"BCP": evals["bcp"]["summary"], "BCP + VESSA": evals["bcp_vessa"]["summary"]}
    table = comparison_table(summaries)
    d_bcp = 100 * evals["bcp"]["summary"]["mean"]["dice"]
    d_vessa = 100 * evals["bcp_vessa"]["summary"]["mean"]["dice"]
    verdict = "ahead of" if d_vessa > d_bcp else "not ahead of"
    assistant = results["bcp_vessa"].get("assistant", {})
    md = f"""# VESSA demo report

Data: `{data}` ({len(ds.patients())} training patients, {len(ds.volume_ids('val'))} validation volumes).
Run time: {elapsed / 60:.1f} min. Same seed and schedule for both students; the VESSA student got its
pseudo-labels from the assistant over Redis (Ray Serve, CPU profile).

## Validation volumes (3D, per class)

```
{table}
```

The VESSA-in-the-loop student is **{verdict}** the student trained without it: mean Dice
{d_vessa:.2f}% vs {d_bcp:.2f}% ({d_vessa - d_bcp:+.2f} points).

Schedule: {json.dumps(schedule or {})}

Time per stage (s): {json.dumps({k: round(v) for k, v in (stage_s or {}).items()})}

Assistant traffic during training: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in assistant.items()})}

## Pictures

![overlays](overlays.png)

Image, ground truth, the assistant's pseudo-label (REST), and both students' predictions
(red RV, green Myo, blue LV).

![validation Dice over iterations](val_dice.png)

![pseudo-labels of unlabeled slices](pseudo_labels.png)

Pseudo-labels of unlabeled training slices as the trainer received them (their ground truth is never
read by training code, so none is shown).

Predictions as NIfTI: `eval/bcp/predictions/`, `eval/bcp_vessa/predictions/`.
{labeling_md}"""
    (out / "report.md").write_text(md)
    summary = {
        "dice_bcp": d_bcp,
        "dice_vessa": d_vessa,
        "summary_table": table,
        "elapsed_s": elapsed,
        "schedule": schedule or {},
        "stage_s": stage_s or {},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    return summary
