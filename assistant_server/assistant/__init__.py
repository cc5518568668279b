"""The assistant: one inference entry point, used by the replicas, the dispatcher, tests and benchmarks.

- `core.Assistant`: slices → label maps and confidences (encoder once per slice, batched decoder)
- `prompted`: prompt-to-mask for one image and class (the user's points, box or mask)
- `volumes`: a volume as one piece (neighbour-blended refinement, volume templates, 3D cleaning)
- `bank_state`: the bank's keys and label grids on the device, per bank version
- `answer_cache`: remembered templates-only answers
- `types`: SliceInput, SliceOutput and the errors a caller can fix; `options`: InferenceOptions
"""

from assistant_server.assistant.core import Assistant, default_encode_batch
from assistant_server.assistant.options import InferenceOptions
from assistant_server.assistant.types import AssistantInputError, BankVersionError, SliceInput, SliceOutput

__all__ = [
    "Assistant",
    "AssistantInputError",
    "BankVersionError",
    "InferenceOptions",
    "SliceInput",
    "SliceOutput",
    "default_encode_batch",
]
