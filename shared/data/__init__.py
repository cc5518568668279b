"""VESSA's data layer: dataset readers, the protocol split, synthetic data, the prepared cache.

from shared.data import open_dataset, split_by_patient
ds = open_dataset("/path/to/acdc")        # SSL4MIS HDF5, nnU-Net/MSD NIfTI or a prepared cache
split = split_by_patient(ds, n_labeled=3)  # split.labeled[i] -> LabeledSlice
                                           # split.unlabeled[i] -> UnlabeledSlice (no label)
"""

from shared.data.base import SliceDataset
from shared.data.classes import CARDIAC_CLASSES
from shared.data.layouts import detect_format, open_dataset
from shared.data.split import LabeledPool, ProtocolSplit, UnlabeledPool, split_by_patient
from shared.data.types import ClassInfo, LabeledSlice, SliceRef, UnlabeledSlice, Volume

__all__ = [
    "CARDIAC_CLASSES",
    "ClassInfo",
    "LabeledPool",
    "LabeledSlice",
    "ProtocolSplit",
    "SliceDataset",
    "SliceRef",
    "UnlabeledPool",
    "UnlabeledSlice",
    "Volume",
    "detect_format",
    "open_dataset",
    "split_by_patient",
]
