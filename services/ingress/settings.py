"""Settings of the HTTP ingress (Serve application args or `VESSA_` environment variables)."""

from __future__ import annotations

from shared.config import VessaSettings
from shared.wire.protocol import Limits


class ApiSettings(VessaSettings):
    """Ingress settings (Serve application args or `VESSA_` env vars)."""

    api_token: str | None = None
    max_upload_mb: float = 256.0
    request_timeout_s: float = 120.0
    # a pseudo-label call's limit grows with its slices: a 3D scan of 88 slices at the ~2-5 s a slice of
    # an unaccelerated CPU replica must get its answer, not a timeout after minutes of work
    request_timeout_per_slice_s: float = 10.0
    redis_url: str | None = None  # when set, /metrics reports the request stream's depth; jobs need it
    request_stream: str = "vessa:requests"
    limits: Limits = Limits()
    data_root: str | None = None  # labeling jobs read datasets only under this directory (None: jobs off)
    job_output_root: str | None = None  # where jobs write (default <data_root>/vessa-labels)
    # MONAI Label's dialect (docs/monailabel.md): the dataset directory under data_root it serves as its
    # datastore (None: the datastore routes answer 404), and where it keeps uploads, labels of other
    # tags and the corrections of images no job labeled (default <job_output_root>/monailabel/<dataset>)
    monailabel_datastore: str | None = None
    monailabel_store: str | None = None
    # PACS a job may read with `dicomweb` (URL prefixes, comma-separated; empty: DICOMweb jobs refused,
    # so a client cannot make the service fetch from an address of its choosing)
    dicomweb_allowed: str = ""
