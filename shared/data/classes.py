"""Class tables: label index, short name and a one-line anatomical description per class.

The descriptions are meant to be read by people and by the language side of the assistant, so they
say what the structure looks like on short-axis cine MRI, not just what it is.
"""

from __future__ import annotations

from shared.data.types import ClassInfo

#: ACDC / cardiac short-axis classes (0 background, 1 RV, 2 Myo, 3 LV), as in the ACDC challenge.
CARDIAC_CLASSES: list[ClassInfo] = [
    ClassInfo(
        0,
        "background",
        "everything that is not RV, LV myocardium or LV cavity: lungs, chest wall, liver, great vessels, air",
    ),
    ClassInfo(
        1,
        "RV",
        "right ventricular cavity: bright blood-filled crescent wrapped around the septal side of the left ventricle",
    ),
    ClassInfo(
        2,
        "Myo",
        "left ventricular myocardium: dark muscular ring, roughly 6-12 mm thick, around the left ventricular cavity",
    ),
    ClassInfo(
        3,
        "LV",
        "left ventricular cavity: round bright blood pool inside the myocardial ring, papillary muscles included",
    ),
]

# Names by which cardiac classes appear in other datasets' label tables (lower case).
_CARDIAC_ALIASES = {
    "background": 0,
    "bg": 0,
    "rv": 1,
    "right ventricle": 1,
    "right_ventricle": 1,
    "myo": 2,
    "myocardium": 2,
    "lv myocardium": 2,
    "lv": 3,
    "left ventricle": 3,
    "left_ventricle": 3,
}


def describe_class(name: str) -> str:
    """The cardiac description of a class called `name` (case-insensitive), or "" when unknown."""
    idx = _CARDIAC_ALIASES.get(name.strip().lower())
    return CARDIAC_CLASSES[idx].description if idx is not None else ""


def classes_from_names(names: dict[int, str]) -> list[ClassInfo]:
    """A class table from {index: name}, sorted by index, with cardiac descriptions where names match.

    Raises ValueError unless the indices are 0..K-1 (label maps index classes densely).
    """
    indices = sorted(names)
    if indices != list(range(len(indices))):
        raise ValueError(f"class indices must be 0..K-1 without gaps, got {indices}")
    return [ClassInfo(i, names[i], describe_class(names[i])) for i in indices]


def classes_to_json(classes: list[ClassInfo]) -> list[dict]:
    return [{"index": c.index, "name": c.name, "description": c.description} for c in classes]


def classes_from_json(items: list[dict]) -> list[ClassInfo]:
    return [ClassInfo(int(d["index"]), str(d["name"]), str(d.get("description", ""))) for d in items]
