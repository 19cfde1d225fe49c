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
from dataclasses import dataclass
from pathlib import Path

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


def read_layout(path: str | Path) -> Layout:
    """Read a GGUF's layout (raises ValueError for a file that is not a dense layered GGUF)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError, KeyError, struct errors... on bad files
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError(f"{path} has no general.architecture")
    arch = str(arch_field.contents())

    def number(key: str, default: int | None = None) -> int:
        field = reader.get_field(f"{arch}.{key}")
        if field is None:
            if default is None:
                raise ValueError(f"{path} has no {arch}.{key}")
            return default
        value = field.contents()
        return int(value[0] if isinstance(value, list) else value)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    n_head_kv = number("attention.head_count_kv", n_head)
    head_dim = number("attention.key_length", n_embd // max(n_head, 1))
    tensors = tuple(TensorSpan(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors)
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
        start = int(reader.data_offset)
        digest.update(f.read(start))
        step = max(1, (size - start) // _SAMPLES)
        for offset in range(start, size, step):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    source = reader.get_field(SOURCE_MODEL_ID_KEY)
    return Layout(
        path=str(path),
        model_id=str(source.contents()) if source is not None else model_id_of(path),
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
