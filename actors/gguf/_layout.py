"""A GGUF's shape as a split needs it: a cheap content identity, the bytes of each layer, and the
llama.cpp RPC cache files a stage builds from its own copy.

The identity hashes the header and tensor table (names, types, shapes, offsets: every byte
before the tensor data), the file's size, and 64 samples of 4 KiB spread over the tensor data (so
that two fine-tunes of one architecture, whose headers can be byte-identical, differ). It reads a
few megabytes even of a 40 GB file, so it is computed at every start rather than cached; the
tensor bytes themselves are hashed only by a stage, for the layers it serves, when it builds its
RPC cache files.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.gguf._identity import SOURCE_MODEL_ID_KEY, model_id_of

RPC_HASH_MIN_BYTES = 10 * 1024 * 1024  # llama.cpp's RPC client hashes weight tensors larger than this
_LAYER = re.compile(r"^blk\.(\d+)\.")
_OUTPUT = ("output.weight", "output_norm.weight", "output.bias", "output_norm.bias")
_SAMPLES, _SAMPLE_BYTES = 64, 4096


@dataclass(frozen=True, slots=True)
class TensorSpan:
    name: str
    offset: int  # from the start of the file
    size: int


@dataclass(frozen=True, slots=True)
class Layout:
    """What planning needs to know of a dense model."""

    path: str
    model_id: str  # as `actors.gguf.check_model` names it
    identity: str  # sha256 of (header + tensor table, file size), 32 hex digits
    size: int  # the file's bytes
    n_layer: int
    layer_bytes: tuple[int, ...]  # weights of each repeating layer
    input_bytes: int  # token embeddings: always on the head
    output_bytes: int  # output norm and matrix: on the head where it fits
    kv_bytes_per_token: int  # KV cache per token per layer (f16 K and V)
    tensors: tuple[TensorSpan, ...]

    def layer_tensors(self, first: int, last: int) -> list[TensorSpan]:
        """The tensors of layers first..last (inclusive)."""
        return [t for t in self.tensors if (m := _LAYER.match(t.name)) and first <= int(m.group(1)) <= last]


# GGUF value types: struct formats of the scalars (8 is a string, 9 an array)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_SMALL_ARRAY = 4096  # numeric arrays up to this long are kept (per-layer head counts); longer ones skipped


def read_header(path: Path) -> tuple[dict[str, object], list[TensorSpan], int]:
    """A GGUF's metadata (scalars, strings and short numeric arrays; the vocabulary and other long
    arrays are skipped, not parsed), its tensors and where their data starts. gguf's GGUFReader
    parses every field into numpy views, 0.8 s for a 32k-token vocabulary: this is on every
    node's start-up path."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_header(data)


def _parse_header(data: Any) -> tuple[dict[str, object], list[TensorSpan], int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    at = 0
    size = len(data)

    def take(fmt: str) -> Any:
        nonlocal at
        n = struct.calcsize(fmt)
        if at + n > size:
            raise ValueError("truncated header")
        (value,) = struct.unpack_from(fmt, data, at)
        at += n
        return value

    def string() -> str:
        nonlocal at
        n = take("<Q")
        if at + n > size:
            raise ValueError("a string runs past the end of the file")
        at += n
        return data[at - n : at].decode("utf-8", errors="replace")

    def value(kind: int) -> object:
        nonlocal at
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == 8:
            return string()
        if kind != 9:
            raise ValueError(f"unknown value type {kind}")
        item, count = take("<I"), take("<Q")
        if item in _SCALARS and count <= _SMALL_ARRAY:
            return [take(_SCALARS[item]) for _ in range(count)]
        if item in _SCALARS:  # skipped whole
            at += count * struct.calcsize(_SCALARS[item])
            if at > size:
                raise ValueError("an array runs past the end of the file")
            return None
        if item == 8:  # strings: each one's length says where the next starts
            if count > size:
                raise ValueError("an array longer than the file")
            for _ in range(count):
                n = take("<Q")
                at += n
            if at > size:
                raise ValueError("an array runs past the end of the file")
            return None
        raise ValueError(f"unsupported array of type {item}")

    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    at = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version < 2 or n_tensors > size or n_kv > size:
        raise ValueError(f"unsupported GGUF header (version {version})")
    fields: dict[str, object] = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= take("<Q")
        kind, offset = take("<I"), take("<Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError) as err:
            raise ValueError(f"tensor {name} has unknown type {kind}") from err
        infos.append((name, offset, elements // block * type_size))
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"bad general.alignment {alignment!r}")
    start = (at + alignment - 1) // alignment * alignment
    tensors = [TensorSpan(name, start + offset, n) for name, offset, n in infos]
    if any(t.offset + t.size > size for t in tensors):
        raise ValueError("a tensor runs past the end of the file")
    return fields, tensors, start


def read_layout(path: str | Path) -> Layout:
    """Read a GGUF's layout (raises ValueError for a file that is not a dense layered GGUF)."""
    path = Path(path)
    try:
        fields, spans, data_offset = read_header(path)
    except (OSError, ValueError, struct.error) as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path} has no general.architecture")

    def number(key: str, default: int | None = None) -> int:
        value = fields.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise ValueError(f"{path} has no {arch}.{key}")
            return default
        if isinstance(value, list):
            value = value[0] if value else default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{path}: {arch}.{key} is not a number")
        return int(value)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    n_head_kv = number("attention.head_count_kv", n_head)
    head_dim = number("attention.key_length", n_embd // max(n_head, 1))
    tensors = tuple(spans)
    layers = [0] * n_layer
    input_bytes = output_bytes = 0
    for t in tensors:
        if m := _LAYER.match(t.name):
            index = int(m.group(1))
            if index >= n_layer:
                raise ValueError(f"{path}: tensor {t.name} is past block_count {n_layer}")
            layers[index] += t.size
        elif t.name in _OUTPUT:
            output_bytes += t.size
        else:
            input_bytes += t.size
    if "output.weight" not in {t.name for t in tensors}:
        output_bytes += next((t.size for t in tensors if t.name == "token_embd.weight"), 0)  # tied
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        start = data_offset
        digest.update(f.read(start))
        step = max(1, (size - start) // _SAMPLES)
        for offset in range(start, size, step):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    source = fields.get(SOURCE_MODEL_ID_KEY)
    return Layout(
        path=str(path),
        model_id=str(source) if source is not None else model_id_of(path),
        identity=digest.hexdigest()[:32],
        size=size,
        n_layer=n_layer,
        layer_bytes=tuple(layers),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        kv_bytes_per_token=2 * n_head_kv * head_dim * 2,
        tensors=tensors,
    )


def fnv1a64(buffer: memoryview | bytes) -> int:
    """FNV-1a 64 of `buffer` (llama.cpp's RPC cache key), in native code (fnv-c), no copy."""
    from fnv_c.ext._fnv import ffi, lib  # type: ignore[import-untyped]

    return int(lib.fnv1a_64(ffi.from_buffer(buffer), len(buffer)))


def build_rpc_cache(
    layout: Layout, first: int, last: int, cache_dir: Path, threads: int = 0
) -> tuple[int, int]:
    """Write llama.cpp RPC cache files (`cache_dir/%016x`, named by the FNV-1a 64 of the bytes) for
    the tensors of layers first..last over the RPC hash threshold, from our own copy of the model,
    so that the host's SET_TENSOR_HASH finds them and sends no bytes. Tensors are hashed on
    `threads` threads (default: every core; the hash runs without the GIL) and copied in the
    kernel (copy_file_range: a reflink where the file system can). Returns (files, bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = [t for t in layout.layer_tensors(first, last) if t.size > RPC_HASH_MIN_BYTES]
    with open(layout.path, "rb") as src, mmap.mmap(src.fileno(), 0, prot=mmap.PROT_READ) as data:
        for t in tensors:
            if t.offset + t.size > len(data):
                raise ValueError(f"{layout.path}: tensor {t.name} runs past the end of the file")

        def write(t: TensorSpan) -> int:
            with memoryview(data)[t.offset : t.offset + t.size] as view:
                name = cache_dir / f"{fnv1a64(view):016x}"
            tmp = cache_dir / f"{t.name}.part"
            with open(tmp, "wb") as dst:
                _copy_range(src.fileno(), dst.fileno(), t.offset, t.size)
            os.replace(tmp, name)  # two tensors with the same bytes: one file
            return t.size

        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
            sizes = list(pool.map(write, tensors))
    return len(sizes), sum(sizes)


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    done = 0
    while done < size:
        n = os.copy_file_range(src, dst, size - done, offset + done)
        if n <= 0:
            raise OSError(f"copy_file_range stopped after {done} of {size} bytes")
        done += n
