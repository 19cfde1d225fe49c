"""The GGUF file format as the mesh knows it.

- `_identity`  model ids, the metadata keys we write, checks of a user's GGUF (no numpy).
- `_synth`     synthesized models with random weights, for the demo, tests and benchmarks.

Synthesis needs numpy and gguf (~0.07 s to import on 2 cores): its names load `_synth` when first
asked for, so that a node serving a GGUF, or an engine child, imports neither by importing this room.
"""

from typing import TYPE_CHECKING

from actors._lazy import lazy_names
from actors.gguf._identity import SOURCE_MODEL_ID_KEY, check_draft, check_model, model_id_of

if TYPE_CHECKING:
    from actors.gguf._synth import ARCHS, PRESETS, Shape, shape_for, synthesize

__getattr__ = lazy_names(
    __name__, dict.fromkeys(("ARCHS", "PRESETS", "Shape", "shape_for", "synthesize"), "actors.gguf._synth")
)


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
