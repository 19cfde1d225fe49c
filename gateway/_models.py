"""Finding the model a node serves: a user's GGUF, or the built-in default synthesized once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from actors import model_id_of, shape_for, synthesize

log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "mesh-llm-demo-random"  # says what it is: a demo with random weights
_GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesh-llm"


def default_model() -> Path:
    """The built-in default model, synthesized on first use and cached."""
    path = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}.gguf"
    if not path.exists():
        log.warning(
            "synthesizing the built-in default model at %s (RANDOM WEIGHTS: its text is gibberish)", path
        )
        synthesize("llama", path, shape_for("llama", "small"), dtype="f16", seed=0)
    return path


def check_model(path: Path) -> str:
    """The model id of a GGUF file; raises ValueError with a user-facing reason if unusable."""
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
    return _source_model_id(path) or model_id_of(path)


def check_draft(target: Path, draft: Path) -> None:
    """Raise ValueError unless `draft` is a GGUF whose vocabulary is the target's, token for token
    (a drafted token id must mean the same text to both models)."""
    from gguf import GGUFReader

    check_model(draft)

    def tokens(path: Path) -> list[str]:
        field = GGUFReader(str(path)).get_field("tokenizer.ggml.tokens")
        return [str(t) for t in field.contents()] if field is not None else []

    mine, theirs = tokens(target), tokens(draft)
    if not theirs or len(mine) != len(theirs):
        raise ValueError(
            f"the draft model {draft} has a vocabulary of {len(theirs)} tokens, the target {target} "
            f"of {len(mine)}: a draft model must share the target's tokenizer"
        )
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a != b:
            raise ValueError(
                f"the draft model {draft} has a different vocabulary from {target} "
                f"(token {i} is {b!r} there, {a!r} here): a draft model must share the target's tokenizer"
            )


def _source_model_id(path: Path) -> str | None:
    """An MoE shard carries the id of the model it was split from."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field("mesh_llm.source_model_id")
    return str(field.contents()) if field is not None else None
