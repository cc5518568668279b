"""How the assistant turns its model into a label map: refinement passes, volume context, component cleaning.

These are inference-time choices, not weights: the Stage-1 recipe that trained a checkpoint stores the
ones it was validated with (checkpoint `extra["inference"]`), every replica and `vessa assistant eval`
starts from them, and a caller may override them. None of them names a dataset or a class: what a
class's shape allows is read off the template bank (`largest_component="auto"`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

LCC_MODES = ("off", "auto", "on")


@dataclass(frozen=True)
class InferenceOptions:
    """refine_passes: decoder passes after the first that take the previous pass's probabilities as the
    dense (student) prompt, for slices that came without a student prompt: the assistant corrects its
    own templates-only answer as Stage-1 taught it to correct a noisy student. Decoder only: the
    slice's embedding is reused. The reported confidence is the first pass's (it ranks cases better).

    volume_context: in a volume (`Assistant.predict_volume`), the weight of each neighbouring slice
    (z-1, z+1) in the refinement prompt of slice z (the slice itself keeps 1 - 2·w); 0 prompts each
    slice with its own previous answer only.

    largest_component: keep only the largest connected component of a class (per slice; per volume, in
    3D, for `predict_volume`). "auto" does so for the classes whose exemplars in the template bank are
    single components (`single_component_classes`), "on" for every class, "off" never.

    component_keep_share: with component cleaning, components at least this share of the class's
    largest are kept too (1.0: the largest only).

    num_templates: templates retrieved per query (None: the number the model was trained with).

    position_weight: in a volume, retrieval prefers templates from the same relative position in their
    own case (base … apex): similarity − w·|position difference|. It assumes the volume's slices run in
    the same direction as the bank's cases (true for one dataset's export; 0 turns it off).

    volume_templates: in a volume, after the first pass, its K most confident slices (with their
    pseudo-labels) join the bank as extra templates for the other slices of that volume in the
    refinement passes (one templates-only re-pass when refine_passes is 0): the same patient's anatomy
    and contrast, which no labeled patient has. A slice never retrieves itself. Transductive, label-free:
    only the assistant's own answers are used. 0 turns it off.

    refine_below: refine only the slices whose first-pass confidence (the lowest over the requested
    classes) is below this; the others keep their first answer and cost one decoder pass instead of
    1 + refine_passes (docs/benchmarks.md: the time/Dice trade-off). None refines every slice.
    """

    refine_passes: int = 0
    volume_context: float = 0.0
    largest_component: str = "off"
    component_keep_share: float = 1.0
    num_templates: int | None = None
    position_weight: float = 0.0
    volume_templates: int = 0
    refine_below: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= int(self.refine_passes) <= 4:
            raise ValueError(f"refine_passes must be 0-4, got {self.refine_passes}")
        if not 0.0 <= float(self.volume_context) <= 1 / 3:
            raise ValueError(f"volume_context must be in [0, 1/3], got {self.volume_context}")
        if self.largest_component not in LCC_MODES:
            raise ValueError(f"largest_component must be one of {LCC_MODES}, got {self.largest_component!r}")
        if not 0.0 < float(self.component_keep_share) <= 1.0:
            raise ValueError(f"component_keep_share must be in (0, 1], got {self.component_keep_share}")
        if self.num_templates is not None and not 1 <= int(self.num_templates) <= 32:
            raise ValueError(f"num_templates must be 1-32, got {self.num_templates}")
        if not 0.0 <= float(self.position_weight) <= 2.0:
            raise ValueError(f"position_weight must be in [0, 2], got {self.position_weight}")
        if not 0 <= int(self.volume_templates) <= 64:
            raise ValueError(f"volume_templates must be 0-64, got {self.volume_templates}")
        if self.refine_below is not None and not 0.0 <= float(self.refine_below) <= 1.0:
            raise ValueError(f"refine_below must be in [0, 1] or null, got {self.refine_below}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> InferenceOptions:
        """Known keys only (a checkpoint written by a newer version may carry more)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    def replace(self, **changes) -> InferenceOptions:
        return InferenceOptions.from_dict(
            {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        )
