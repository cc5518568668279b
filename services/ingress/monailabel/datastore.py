"""MONAI Label's datastore, made of what VESSA already has: a dataset directory under the data root (the
nnU-Net/MSD layout or a folder of NIfTI files) and the labels VESSA wrote for it.

Tags, as MONAI Label's clients know them:
  original   the pseudo-label of the newest labeling job whose record points at the image (read only)
  final      a reviewed correction: a version beside the pseudo-label, in the job's review
             (OUT/reviews, OUT/reviewed: the review page shows it); for an image no job labeled, the same
             layout in the facade's own store
  other      any other tag a client saves, kept in the store

The store (default `<job_output_root>/monailabel/<dataset name>`):

    STORE/images/<id>.nii.gz            images uploaded through PUT /datastore/image
    STORE/info/images/<id>.json         image info (what clients PUT, which strategy handed it out)
    STORE/info/labels/<tag>/<id>.json   label info (the params a client sent with the label)
    STORE/reviews/, STORE/reviewed/     final labels of images without a job (services/labeling/review.py)
    STORE/tags/<tag>/<id>.nii.gz        labels of other tags

Image ids are file names, never paths: an id with a separator or `..` is refused before anything is
looked up, and an image whose file resolves outside the data root (a symlink out) is not served.
Every write is atomic (outputs.write_atomic).
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.labeling import review as reviews
from services.labeling.cases import discover
from services.labeling.outputs import CaseRecord, read_records, safe_name, write_atomic

FINAL, ORIGINAL = "final", "original"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
MAX_INFO_BYTES = 64 * 1024


class DatastoreError(Exception):
    """A request the datastore refuses; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_id(image_id: str | None, what: str = "image") -> str:
    if not image_id:
        raise DatastoreError(f"no {what} id given")
    if "/" in image_id or "\\" in image_id or ".." in image_id or "\x00" in image_id:
        raise DatastoreError(f"{what} id {image_id[:80]!r} tries to leave the datastore: ids are names, not paths")
    if not _ID.fullmatch(image_id):
        raise DatastoreError(f"{what} ids are 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return image_id


def check_tag(tag: str | None) -> str:
    tag = tag or FINAL
    if not _TAG.fullmatch(tag):
        raise DatastoreError("a tag is 1-32 letters, digits, '_' or '-'")
    return tag


@dataclass(frozen=True)
class DatastoreImage:
    id: str
    path: Path
    ext: str  # ".nii.gz" or ".nii"
    uploaded: bool  # through PUT /datastore/image (in the store), not part of the dataset


@dataclass(frozen=True)
class JobLabel:
    out: Path  # the job's OUT
    record: CaseRecord

    @property
    def path(self) -> Path:
        return self.out / str(self.record.output)


@dataclass(frozen=True)
class FinalLabel:
    out: Path  # where the review lives: a job's OUT or the store
    review: reviews.Review

    @property
    def version(self) -> reviews.LabelVersion:
        return self.review.versions[-1]

    @property
    def path(self) -> Path:
        return self.out / self.version.path


def _ext(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii"


class Datastore:
    """root: the dataset directory (already confined to the data root); data_root: what every served
    file must resolve under; store: the facade's own files; job_root: where labeling jobs write."""

    def __init__(self, root: Path, data_root: Path, store: Path, job_root: Path | None):
        self.root = Path(root).resolve()
        self.data_root = Path(data_root).resolve()
        self.store = Path(store)
        self.job_root = Path(job_root).resolve() if job_root else None
        self.name = self.root.name
        self._lock = threading.Lock()
        self._job_sig: tuple = ()
        self._job_index: dict[str, JobLabel] = {}

    # -------------------------------------------------------------------------------------- images
    def images(self) -> dict[str, DatastoreImage]:
        """Every image: the dataset's NIfTI cases, then the uploaded ones."""
        out: dict[str, DatastoreImage] = {}
        try:
            found = discover(self.root)
            cases = [c for c in found.cases if c.kind == "nifti"]
        except (ValueError, FileNotFoundError):
            cases = []  # an empty dataset directory is an empty datastore (uploads can fill it)
        for c in cases:
            real = c.path.resolve()
            if real.is_relative_to(self.data_root) and _ID.fullmatch(c.case_id):
                out[c.case_id] = DatastoreImage(c.case_id, real, _ext(real.name), False)
        folder = self.store / "images"
        if folder.is_dir():
            for p in sorted(folder.glob("*.nii.gz")):
                cid = p.name[: -len(".nii.gz")]
                if _ID.fullmatch(cid) and cid not in out:
                    out[cid] = DatastoreImage(cid, p, ".nii.gz", True)
        return out

    def image(self, image_id: str | None) -> DatastoreImage:
        images = self.images()
        img = images.get(check_id(image_id))
        if img is None:
            raise DatastoreError(f"no image {image_id!r} in the datastore {self.name!r}", 404)
        if not img.path.is_file():
            raise DatastoreError(f"the file of image {image_id!r} is gone", 404)
        return img

    def image_info(self, img: DatastoreImage) -> dict:
        info = self._read_json(self._info_path("images", img.id))
        try:
            ts = int(img.path.stat().st_mtime)
        except OSError:
            ts = 0
        return {**info, "ts": info.get("ts", ts), "name": img.id + img.ext, "path": str(img.path)}

    def add_image(self, image_id: str, nifti: bytes, info: dict) -> str:
        """Store an uploaded (already validated) NIfTI image as `image_id`; 409 if the id is taken."""
        check_id(image_id)
        with self._lock:
            if image_id in self.images():
                raise DatastoreError(f"image {image_id!r} is already in the datastore", 409)
            data = nifti if nifti[:2] == b"\x1f\x8b" else gzip.compress(nifti, compresslevel=6, mtime=0)
            write_atomic(self.store / "images" / f"{image_id}.nii.gz", data)
            self._write_json(self._info_path("images", image_id), {**info, "ts": int(time.time())})
        return image_id

    def remove_image(self, image_id: str) -> None:
        img = self.image(image_id)
        if not img.uploaded:
            raise DatastoreError(
                f"image {image_id!r} is a file of the dataset {self.name!r}: VESSA never deletes source data", 409
            )
        img.path.unlink(missing_ok=True)
        self._info_path("images", image_id).unlink(missing_ok=True)
        for tag_dir in (self.store / "tags").glob("*") if (self.store / "tags").is_dir() else []:
            (tag_dir / f"{image_id}.nii.gz").unlink(missing_ok=True)

    def update_image_info(self, image_id: str, info: dict) -> dict:
        img = self.image(image_id)
        path = self._info_path("images", img.id)
        with self._lock:
            merged = {**self._read_json(path), **info}
            self._write_json(path, merged)
        return self.image_info(img)

    # -------------------------------------------------------------------------------------- labels
    def jobs(self) -> dict[str, JobLabel]:
        """Resolved input path → the newest ok record of any labeling job for it (rebuilt when a job's
        records/ changes; a record is renamed into place, so its directory's mtime moves)."""
        if self.job_root is None or not self.job_root.is_dir():
            return {}
        dirs = [d for d in sorted(self.job_root.iterdir()) if (d / "records").is_dir()]
        sig = tuple((d.name, (d / "records").stat().st_mtime_ns) for d in dirs)
        with self._lock:
            if sig == self._job_sig:
                return self._job_index
        index: dict[str, JobLabel] = {}
        for d in dirs:
            for rec in read_records(d).values():
                if rec.status != "ok" or not rec.output:
                    continue
                label = (d / rec.output).resolve()
                if not label.is_relative_to(d.resolve()) or not label.is_file():
                    continue
                key = str(Path(rec.input).resolve())
                if key not in index or rec.finished_at > index[key].record.finished_at:
                    index[key] = JobLabel(d, rec)
        with self._lock:
            self._job_sig, self._job_index = sig, index
        return index

    def original(self, img: DatastoreImage) -> JobLabel | None:
        return self.jobs().get(str(img.path))

    def final(self, img: DatastoreImage) -> FinalLabel | None:
        """The newest correction, from the job's review or the store's."""
        best: FinalLabel | None = None
        places = [(self.store, img.id)]
        job = self.original(img)
        if job is not None:
            places.insert(0, (job.out, job.record.case_id))
        for out, case_id in places:
            rev = reviews.read_review(out, case_id)
            if rev.versions and (out / rev.versions[-1].path).is_file():
                if best is None or rev.versions[-1].uploaded_at > best.version.uploaded_at:
                    best = FinalLabel(out, rev)
        return best

    def _tag_path(self, tag: str, image_id: str) -> Path:
        return self.store / "tags" / tag / f"{safe_name(image_id)}.nii.gz"

    def labels(self, img: DatastoreImage) -> dict[str, dict]:
        """tag → {"ext", "info"} as MONAI Label's datastore lists them."""
        out: dict[str, dict] = {}
        job = self.original(img)
        if job is not None:
            rec = job.record
            out[ORIGINAL] = {
                "ext": ".nii.gz",
                "info": {
                    "ts": int(rec.finished_at),
                    "name": f"{img.id}.nii.gz",
                    "params": {
                        "label_names": {n: s.index for n, s in sorted(rec.classes.items(), key=lambda kv: kv[1].index)},
                        "confidence": rec.confidence,
                        "model_version": rec.model_version,
                        "bank_version": rec.bank_version,
                        "job": job.out.name,
                    },
                },
            }
        fin = self.final(img)
        if fin is not None:
            info = self._read_json(self._info_path("labels", img.id, FINAL))
            out[FINAL] = {
                "ext": ".nii.gz",
                "info": {
                    **info,
                    "ts": int(fin.version.uploaded_at),
                    "name": f"{img.id}.nii.gz",
                    "version": fin.version.version,
                    "review": str(fin.out),
                    "bank_version": fin.review.bank_version,
                },
            }
        tags = self.store / "tags"
        if tags.is_dir():
            for d in sorted(tags.iterdir()):
                p = d / f"{safe_name(img.id)}.nii.gz"
                if p.is_file():
                    info = self._read_json(self._info_path("labels", img.id, d.name))
                    out[d.name] = {"ext": ".nii.gz", "info": {**info, "ts": int(p.stat().st_mtime), "name": p.name}}
        return out

    def label_file(self, image_id: str, tag: str) -> Path:
        img = self.image(image_id)
        tag = check_tag(tag)
        if tag == ORIGINAL:
            job = self.original(img)
            path = job.path if job else None
        elif tag == FINAL:
            fin = self.final(img)
            path = fin.path if fin else None
        else:
            path = self._tag_path(tag, img.id)
        if path is None or not path.is_file():
            raise DatastoreError(f"image {image_id!r} has no label with tag {tag!r}", 404)
        return path

    def save_final(self, img: DatastoreImage, nifti: bytes, info: dict) -> FinalLabel:
        """A reviewed correction (validated NIfTI bytes in the image's geometry): the next version in the
        job's review when a job labeled the image (the review page shows it), else in the store."""
        job = self.original(img)
        out, case_id = (job.out, job.record.case_id) if job is not None else (self.store, img.id)
        with self._lock:
            rev = reviews.add_corrected(out, case_id, nifti, comment=str(info.get("comment", ""))[: reviews.MAX_COMMENT])
            self._write_json(self._info_path("labels", img.id, FINAL), {**info, "version": rev.versions[-1].version})
        return FinalLabel(out, rev)

    def mark_in_bank(self, fin: FinalLabel, bank_version: int) -> reviews.Review:
        rev = fin.review
        rev.bank_version, rev.added_label = bank_version, fin.version.path
        rev.history.append({"at": time.time(), "state": rev.state, "bank_version": bank_version})
        return reviews.write_review(fin.out, rev)

    def save_tag(self, img: DatastoreImage, tag: str, nifti: bytes, info: dict) -> Path:
        tag = check_tag(tag)
        if tag in (ORIGINAL, FINAL):
            raise DatastoreError(f"tag {tag!r} is not saved this way", 400)
        path = self._tag_path(tag, img.id)
        write_atomic(path, nifti)
        self._write_json(self._info_path("labels", img.id, tag), {**info, "ts": int(time.time())})
        return path

    def remove_label(self, image_id: str, tag: str) -> None:
        img = self.image(image_id)
        tag = check_tag(tag)
        if tag == ORIGINAL:
            raise DatastoreError("the 'original' label is a labeling job's output: rerun or delete the job instead", 409)
        if tag == FINAL:
            fin = self.final(img)
            if fin is None:
                raise DatastoreError(f"image {image_id!r} has no final label", 404)
            if fin.out != self.store:
                raise DatastoreError(
                    f"the final label of {image_id!r} is a version in the review of job {fin.out.name}: "
                    "reviews keep every version (save a new one instead)",
                    409,
                )
            for v in fin.review.versions:
                (self.store / v.path).unlink(missing_ok=True)
            reviews.review_path(self.store, img.id).unlink(missing_ok=True)
        else:
            path = self._tag_path(tag, img.id)
            if not path.is_file():
                raise DatastoreError(f"image {image_id!r} has no label with tag {tag!r}", 404)
            path.unlink()
        self._info_path("labels", img.id, tag).unlink(missing_ok=True)

    def label_info(self, image_id: str, tag: str) -> dict:
        img = self.image(image_id)
        tag = check_tag(tag)
        labels = self.labels(img)
        if tag not in labels:
            raise DatastoreError(f"image {image_id!r} has no label with tag {tag!r}", 404)
        return labels[tag]["info"]

    def update_label_info(self, image_id: str, tag: str, info: dict) -> dict:
        self.label_info(image_id, tag)  # 404 unless the label exists
        path = self._info_path("labels", image_id, check_tag(tag))
        with self._lock:
            self._write_json(path, {**self._read_json(path), **info})
        return self.label_info(image_id, tag)

    # -------------------------------------------------------------------------------------- views
    def status(self) -> dict:
        tags: dict[str, int] = {}
        images = self.images()
        completed = 0
        for img in images.values():
            labels = self.labels(img)
            completed += FINAL in labels
            for tag in labels:
                tags[tag] = tags.get(tag, 0) + 1
        return {"total": len(images), "completed": completed, "label_tags": tags}

    def json(self) -> dict:
        return {
            "name": self.name,
            "description": f"VESSA datastore over {self.name} (under the data root) and its labels",
            "images_dir": str(self.root),
            "labels_dir": str(self.store),
            "objects": {
                img.id: {"image": {"ext": img.ext, "info": self.image_info(img)}, "labels": self.labels(img)}
                for img in self.images().values()
            },
        }

    def datalist(self) -> list[dict]:
        """MONAI Label's `output=train`: the image/label pairs with a final label."""
        out = []
        for img in self.images().values():
            fin = self.final(img)
            if fin is not None:
                out.append({"image": str(img.path), "label": str(fin.path)})
        return out

    # -------------------------------------------------------------------------------------- files
    def _info_path(self, kind: str, image_id: str, tag: str | None = None) -> Path:
        base = self.store / "info" / kind
        if tag is not None:
            base = base / tag
        return base / f"{safe_name(image_id)}.json"

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _write_json(path: Path, data: dict) -> None:
        text = json.dumps(data, default=str)
        if len(text) > MAX_INFO_BYTES:
            raise DatastoreError(f"info over {MAX_INFO_BYTES} bytes")
        write_atomic(path, text.encode())


def parse_info(text: str | None, what: str = "params") -> dict:
    """A JSON object from a form field ("{}" when absent); a 400 otherwise."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise DatastoreError(f"{what} must be a JSON object") from None
    if not isinstance(value, dict):
        raise DatastoreError(f"{what} must be a JSON object")
    if len(text) > MAX_INFO_BYTES // 2:  # room for what the datastore adds to it
        raise DatastoreError(f"{what} over {MAX_INFO_BYTES // 2} bytes")
    return value
