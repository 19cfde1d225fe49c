"""The GGUF file format as the mesh knows it.

- `_identity`  model ids, the metadata keys we write, checks of a user's GGUF (no numpy).
- `_synth`     synthesized models with random weights, for the demo, tests and benchmarks.

Importing this package imports numpy and gguf (synthesis); `actors.gguf._identity` alone does not.
"""

from actors.gguf._identity import SOURCE_MODEL_ID_KEY, check_draft, check_model, model_id_of
from actors.gguf._synth import ARCHS, PRESETS, Shape, shape_for, synthesize

__all__ = [
    "ARCHS",
    "PRESETS",
    "SOURCE_MODEL_ID_KEY",
    "Shape",
    "check_draft",
    "check_model",
    "model_id_of",
    "shape_for",
    "synthesize",
]
