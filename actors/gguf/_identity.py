"""What identifies a GGUF model in the mesh: its id (file name, or the model an MoE shard was
split from) and whether a file is a GGUF at all. The metadata keys we write live here too."""

from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"
SOURCE_MODEL_ID_KEY = "mesh_llm.source_model_id"  # an MoE shard serves the model it was split from


def model_id_of(path: str | Path) -> str:
    """A model's id: its GGUF file name without `.gguf`."""
    name = Path(path).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def check_model(path: Path) -> str:
    """The model id of a GGUF file; raises ValueError with a user-facing reason if unusable."""
    check_file(path)
    return _source_model_id(path) or model_id_of(path)


def check_file(path: Path) -> None:
    """Raise ValueError with a user-facing reason unless `path` is a GGUF file (reads 4 bytes)."""
    if not path.is_file():
        raise ValueError(f"model file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")


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

    field = GGUFReader(str(path)).get_field(SOURCE_MODEL_ID_KEY)
    return str(field.contents()) if field is not None else None
