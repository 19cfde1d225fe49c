"""The one leaf module of raw llama.cpp calls shared by the engine, the drafter and a split's RPC
stage: contexts, batches, vocabulary checks, and ggml's devices (the CPU, RPC servers). Imports
nothing of ours; llama.cpp itself is passed in (`lib`, `llama_cpp`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def open_context(lib: Any, model: Any, *, n_ctx: int, slots: int, n_batch: int, n_threads: int) -> Any:
    """A llama.cpp context with `slots` sequences of `n_ctx` tokens each; (ctx, memory, batch)."""
    params = lib.llama_context_default_params()
    params.n_ctx = n_ctx * slots
    params.n_seq_max = slots
    params.kv_unified = False  # each sequence gets a full n_ctx of its own
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} x {slots} tokens")
    return ctx, lib.llama_get_memory(ctx), lib.llama_batch_init(n_batch, 0, 1)


def logits_reader(llama_cpp: Any, n_vocab: int) -> Callable[[Any, int], Any]:
    """`read(ctx, i)`: the logits llama.cpp output for the batch's token `i` (negative: counted
    back from the last output), as a numpy view (no copy) of its buffer, valid until the next
    decode. llama-cpp-python's binding returns a ctypes pointer that numpy wraps in a new array
    type on every call; this reads an address from a function object of our own into one array
    type made once. Measured after real decodes (100M model, ~5 ms a token): a greedy token's
    argmax took 44 us that way, 25 this one."""
    import ctypes

    import numpy as np

    lib = ctypes.CDLL(_library(llama_cpp, "libllama.so"))
    get = lib["llama_get_logits_ith"]  # a fresh function object (lib.name would be shared): ours to type
    get.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    get.restype = ctypes.c_void_p
    row = ctypes.c_float * n_vocab

    def read(ctx: Any, i: int) -> Any:
        address = get(ctx, i)
        if not address:
            raise RuntimeError(f"llama.cpp output no logits for batch token {i}")
        return np.frombuffer(memoryview(row.from_address(address)), dtype=np.float32)

    return read


def add_token(batch: Any, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Append one token of one sequence to a llama.cpp batch."""
    i = batch.n_tokens
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits
    batch.n_tokens = i + 1


def vocabulary_mismatch(target: Any, draft: Any) -> str:
    """Why a draft model's tokens cannot stand for the target's ("" if they can)."""
    n_target, n_draft = target.n_vocab(), draft.n_vocab()
    if n_target != n_draft:
        return f"its vocabulary has {n_draft} tokens, the target's {n_target}"
    for token in range(n_target):
        a = target.detokenize([token], special=True)
        b = draft.detokenize([token], special=True)
        if a != b:
            return f"token {token} is {b!r} in the draft model but {a!r} in the target"
    return ""


def _library(llama_cpp: Any, name: str) -> str:
    """The path of one of the shared libraries llama-cpp-python loaded (dlopen of the same path
    hands back the very copy it uses)."""
    import os

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib", name)


def ggml_libraries(llama_cpp: Any) -> tuple[Any, Any]:
    """ggml and its RPC backend, the very copies llama.cpp uses (the `.so.0` names: the
    unversioned ones would load a second ggml whose devices llama.cpp never sees)."""
    import ctypes

    ggml = ctypes.CDLL(_library(llama_cpp, "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(_library(llama_cpp, "libggml-rpc.so.0"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
    ]  # fmt: skip
    rpc.ggml_backend_rpc_start_server.restype = None
    if hasattr(
        rpc, "ggml_backend_rpc_server_add_file"
    ):  # the project's patch (patches/): file-backed tensors
        rpc.ggml_backend_rpc_server_add_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        rpc.ggml_backend_rpc_server_add_file.restype = ctypes.c_bool
        rpc.ggml_backend_rpc_set_file_source.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        rpc.ggml_backend_rpc_set_file_source.restype = None
        rpc.ggml_backend_rpc_file_stats.argtypes = [ctypes.c_char_p] + [ctypes.POINTER(ctypes.c_uint64)] * 4
        rpc.ggml_backend_rpc_file_stats.restype = None
    return ggml, rpc


FILE_TENSORS_SYMBOL = b"ggml_backend_rpc_server_add_file"


@functools.cache
def has_file_tensors() -> bool:
    """Whether the llama.cpp this process would load carries the project's RPC patch (a stage can
    read tensors from its own GGUF). Read from the library's symbol table, without loading it: the
    node's own process never loads llama.cpp."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return False
    return library_has_file_tensors(os.path.join(os.path.dirname(spec.origin), "lib"))


def library_has_file_tensors(lib_dir: str) -> bool:
    """Whether the RPC backend in a llama_cpp `lib` directory carries the project's patch."""
    import os

    try:
        with open(os.path.join(lib_dir, "libggml-rpc.so.0"), "rb") as f:
            return FILE_TENSORS_SYMBOL + b"\0" in f.read()
    except OSError:
        return False


def rpc_load_stats(llama_cpp: Any, endpoint: str) -> tuple[int, int, int, int]:
    """For weights loaded onto the RPC server at `endpoint`: (tensors, bytes) the server read from its
    own file, (tensors, bytes) sent to it. Zeros without the patch."""
    import ctypes

    _, rpc = ggml_libraries(llama_cpp)
    if not hasattr(rpc, "ggml_backend_rpc_file_stats"):
        return 0, 0, 0, 0
    out = [ctypes.c_uint64() for _ in range(4)]
    rpc.ggml_backend_rpc_file_stats(endpoint.encode(), *(ctypes.byref(v) for v in out))
    return out[0].value, out[1].value, out[2].value, out[3].value


def cpu_device(ggml: Any) -> int:
    device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not device:
        raise RuntimeError("llama.cpp has no CPU device")
    return int(device)


def split_devices(llama_cpp: Any, devices: list[str], files: list[str] | None = None) -> list[int]:
    """The ggml devices for a split's members in layer order: "cpu" is this process, anything else
    an RPC server endpoint (HOST:PORT), registered with ggml here (it connects to ask its memory).
    `files[i]`, when given and not "", is the identity under which the server at `devices[i]` holds
    the model's GGUF: it then loads its tensors from that file (the patch's file-backed loading)."""
    ggml, rpc = ggml_libraries(llama_cpp)
    out = []
    for i, endpoint in enumerate(devices):
        if endpoint == "cpu":
            out.append(cpu_device(ggml))
            continue
        file_id = files[i] if files and i < len(files) else ""
        if file_id:
            if not hasattr(rpc, "ggml_backend_rpc_set_file_source"):
                raise RuntimeError("file-backed split loading needs the patched llama.cpp (make install)")
            rpc.ggml_backend_rpc_set_file_source(endpoint.encode(), file_id.encode())
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg or ggml.ggml_backend_reg_dev_count(reg) < 1:
            raise RuntimeError(f"the RPC server at {endpoint} did not answer")
        ggml.ggml_backend_register(reg)
        out.append(int(ggml.ggml_backend_reg_dev_get(reg, 0)))
    return out


class model_devices:
    """While in effect, models llama-cpp-python loads use exactly `devices` (llama.cpp's
    `llama_model_params.devices`, which its `Llama` class has no argument for)."""

    def __init__(self, llama_cpp: Any, devices: list[int]) -> None:
        import ctypes

        self._module = llama_cpp.llama_cpp
        self._array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
        self._original = self._module.llama_model_default_params

    def __enter__(self) -> None:
        import ctypes

        def params() -> Any:
            p = self._original()
            p.devices = ctypes.cast(self._array, ctypes.c_void_p)
            return p

        self._module.llama_model_default_params = params

    def __exit__(self, *exc: object) -> None:
        self._module.llama_model_default_params = self._original
