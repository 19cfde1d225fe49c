"""GGUF layouts for dense splits: layer sizes, content identity, llama.cpp's RPC cache files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from actors.gguf import shape_for, synthesize
from actors.gguf._layout import RPC_HASH_MIN_BYTES, build_rpc_cache, fnv1a64, read_layout


def fnv1a64_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@pytest.fixture(scope="module")
def wide_model(models_dir: Path) -> Path:
    """Two layers whose feed-forward matrices (11.5 MB each) are over llama.cpp's hash threshold."""
    shape = shape_for(
        "llama", "tiny", n_vocab=1000, n_embd=2048, n_layer=2, n_head=16, n_head_kv=4, n_ff=2816
    )
    return synthesize("llama", models_dir / "wide.gguf", shape, seed=3)


def test_layout_accounts_for_every_tensor(tiny_model: Path) -> None:
    from gguf import GGUFReader

    layout = read_layout(tiny_model)
    tensors = GGUFReader(str(tiny_model)).tensors
    assert layout.n_layer == len(layout.layer_bytes) == shape_for("llama", "tiny").n_layer
    assert sum(layout.layer_bytes) + layout.input_bytes + layout.output_bytes >= sum(
        int(t.n_bytes) for t in tensors
    )
    assert all(b > 0 for b in layout.layer_bytes)
    assert layout.kv_bytes_per_token > 0


def test_identity_follows_content_not_path(tiny_model: Path, tmp_path: Path, models_dir: Path) -> None:
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(tiny_model, copy)
    assert read_layout(copy).identity == read_layout(tiny_model).identity
    # Same architecture and shapes, other weights: byte-identical headers, another identity.
    other = synthesize("llama", models_dir / "tiny-other.gguf", shape_for("llama", "tiny"), seed=2)
    assert read_layout(other).identity != read_layout(tiny_model).identity


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(100))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_layout(bad)


def test_fnv1a64_is_llama_cpps_hash() -> None:
    data = os.urandom(5000)
    assert fnv1a64(data) == fnv1a64_reference(data)
    assert fnv1a64(memoryview(data)[10:20]) == fnv1a64_reference(data[10:20])
    assert fnv1a64(b"") == 0xCBF29CE484222325


def test_rpc_cache_files_hold_the_big_tensors_of_the_layers_asked(wide_model: Path, tmp_path: Path) -> None:
    layout = read_layout(wide_model)
    files, size = build_rpc_cache(layout, 1, 1, tmp_path / "cache")
    big = [t for t in layout.layer_tensors(1, 1) if t.size > RPC_HASH_MIN_BYTES]
    assert len(big) >= 3 and files == len(big) and size == sum(t.size for t in big)
    assert len(list((tmp_path / "cache").iterdir())) == len({(t.offset, t.size) for t in big})
    data = wide_model.read_bytes()
    for t in big:
        cached = tmp_path / "cache" / f"{fnv1a64(data[t.offset : t.offset + t.size]):016x}"
        assert cached.read_bytes() == data[t.offset : t.offset + t.size]
    assert not list((tmp_path / "cache").glob("*.part"))


@pytest.mark.parametrize(
    ("arch", "dtype"), [("llama", "f16"), ("llama", "q8_0"), ("qwen2moe", "f16"), ("llama-moe", "f32")]
)
def test_our_header_reader_agrees_with_gguf_s_on_every_tensor(tmp_path: Path, arch: str, dtype: str) -> None:
    """read_layout parses the header itself (gguf's reader takes 0.8 s on a 32k vocabulary, on
    every node's start-up): the same tensors, offsets, sizes and data offset as gguf's."""
    from gguf import GGUFReader

    from actors.gguf._layout import read_header

    path = synthesize(arch, tmp_path / "m.gguf", shape_for(arch, "tiny"), dtype=dtype, seed=3)
    fields, spans, start = read_header(path)
    reader = GGUFReader(str(path))
    assert [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors] == [
        (t.name, t.offset, t.size) for t in spans
    ]
    assert start == int(reader.data_offset)
    assert fields["general.architecture"] == reader.get_field("general.architecture").contents()  # type: ignore[union-attr]


def test_broken_headers_are_refused_with_a_reason(tmp_path: Path, tiny_model: Path) -> None:
    good = tiny_model.read_bytes()
    for name, data in {
        "not-gguf": b"GGML" + good[4:],
        "truncated": good[:200],
        "huge-count": good[:8] + (2**62).to_bytes(8, "little") + good[16:],
        "cut-tensors": good[: len(good) // 2],
    }.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="not a readable GGUF"):
            read_layout(bad)
