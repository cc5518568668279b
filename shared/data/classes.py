"""Class tables: label index, short name and an optional one-line description per class.

A class's text (its name, and its description when there is one) is what the language side of the
assistant reads. Descriptions come from the dataset itself (the SSL4MIS ACDC layout defines its own,
CARDIAC_CLASSES; an MSD/nnU-Net dataset may give them in dataset.json or a classes.json,
shared/data/msd_layout.py) or are absent: a class is then just its name. No dataset's descriptions are
lent to another's classes by name.
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


def parse_descriptions(table: dict | list, names: dict[int, str], where: str = "") -> dict[int, str]:
    """{index: description} from a dataset's own class descriptions.

    `table` is either {name or "index": description} (dataset.json's "label_descriptions", or a
    classes.json mapping) or a list of {"index" and/or "name", "description"} (the bank manifest's and
    `vessa data prepare`'s class table). Every entry must name a class of `names` (a description of a class
    the dataset does not have is another dataset's: refused, never matched loosely).
    """
    by_name = {n: i for i, n in names.items()}
    items: list[tuple[object, object]]
    if isinstance(table, dict):
        items = list(table.items())
    elif isinstance(table, list):
        items = []
        for d in table:
            if not isinstance(d, dict) or ("index" not in d and "name" not in d):
                raise ValueError(f"{where}: class entries need an 'index' or a 'name', got {d!r}")
            if "index" in d and "name" in d and names.get(int(d["index"])) != d["name"]:
                raise ValueError(
                    f"{where}: class {d['index']} is {names.get(int(d['index']))!r}, not {d['name']!r}"
                )
            items.append((d["index"] if "index" in d else d["name"], d.get("description", "")))
    else:
        raise ValueError(
            f"{where}: class descriptions must be a mapping or a list, got {type(table).__name__}"
        )
    out: dict[int, str] = {}
    for key, text in items:
        if isinstance(key, str) and key in by_name:
            idx = by_name[key]
        elif (isinstance(key, int) and not isinstance(key, bool)) or (
            isinstance(key, str) and key.lstrip("-").isdigit()
        ):
            idx = int(key)
            if idx not in names:
                raise ValueError(
                    f"{where}: a description for class index {idx}, which the labels do not have"
                )
        else:
            raise ValueError(
                f"{where}: a description for class {key!r}, which the labels ({sorted(by_name)}) do not have"
            )
        if not isinstance(text, str):
            raise ValueError(f"{where}: the description of class {key!r} must be a string")
        out[idx] = text.strip()
    return out


def classes_from_names(names: dict[int, str], descriptions: dict[int, str] | None = None) -> list[ClassInfo]:
    """A class table from {index: name}, sorted by index, with the dataset's own descriptions where it
    gives them and none otherwise: a class is then its name alone ("background" is plain "background").
    No other dataset's text is ever filled in by name.

    Raises ValueError unless the indices are 0..K-1 (label maps index classes densely).
    """
    indices = sorted(names)
    if indices != list(range(len(indices))):
        raise ValueError(f"class indices must be 0..K-1 without gaps, got {indices}")
    descriptions = descriptions or {}
    return [ClassInfo(i, names[i], descriptions.get(i, "")) for i in indices]


def classes_to_json(classes: list[ClassInfo]) -> list[dict]:
    return [{"index": c.index, "name": c.name, "description": c.description} for c in classes]


def classes_from_json(items: list[dict]) -> list[ClassInfo]:
    return [ClassInfo(int(d["index"]), str(d["name"]), str(d.get("description", ""))) for d in items]
