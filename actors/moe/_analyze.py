"""Mixture-of-Experts tooling: expert importance, split plans and expert-sharded GGUFs.

A shard holds every non-expert tensor, the shared experts (`*_shexp`), the hot experts (the top
`replicate` fraction by importance, on every node) and a share of the cold ones (each on two
nodes when there are three or more), with the router (`ffn_gate_inp`) sliced to match. Shards
are written one tensor at a time from a memory map, quantized tensors as raw bytes: peak memory
is the largest tensor's, whatever the model's size. GGUF tooling sits with the shard-worker that
loads its output. Blocking calls, any thread.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.gguf._identity import SOURCE_MODEL_ID_KEY, model_id_of

SUPPORTED_ARCHS = ("llama", "qwen2moe")  # llama: Mixtral-style experts
CALIBRATION_PROMPTS = (
    "The history of the city begins with a small settlement on the river, where traders met.",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n",
    "Q: What is the boiling point of water at sea level? A: It is 100 degrees Celsius, because",
    "Dear team, the quarterly report shows that revenue grew while costs stayed flat, so we",
    "SELECT name, count(*) FROM orders JOIN customers ON orders.customer_id = customers.id GROUP BY",
    "In the beginning the universe was hot and dense; as it expanded it cooled, and the first atoms",
    "Translate to French: The cat sleeps on the warm windowsill in the afternoon sun.",
    "Step 1: preheat the oven to 180 degrees. Step 2: mix the flour, sugar and eggs. Step 3:",
)


_PROBS = re.compile(r"ffn_moe_probs-(\d+)")  # llama.cpp's name for a layer's router probabilities


class UnsupportedModel(ValueError):
    """The GGUF is not an MoE model this tooling can split."""


@dataclass(frozen=True, slots=True)
class MoeInfo:
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    model_id: str


def moe_info(path: str | Path, reader: Any = None) -> MoeInfo:
    """What an MoE GGUF is; raises `UnsupportedModel` for a dense or unknown architecture.
    Pass the `GGUFReader` already open on `path`, if any: parsing the header is not free."""
    from gguf import GGUFReader

    reader = reader or GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    n_expert = _field(reader, f"{arch}.expert_count", 0)
    if not n_expert:
        raise UnsupportedModel(f"{path} is not a Mixture-of-Experts model ({arch}, no experts)")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(
            f"splitting {arch} MoE models is not supported yet (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    source = _field(reader, SOURCE_MODEL_ID_KEY, None)
    return MoeInfo(
        arch=arch,
        n_layer=int(_field(reader, f"{arch}.block_count")),
        n_expert=int(n_expert),
        n_expert_used=int(_field(reader, f"{arch}.expert_used_count")),
        model_id=str(source or model_id_of(path)),
    )


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise UnsupportedModel(f"the GGUF has no {key}")
        return default
    return field.contents()


# -- importance ---------------------------------------------------------------------------------


def weight_importance(path: str | Path) -> np.ndarray:
    """A fallback when no activations can be measured: each expert's router row norm times its
    down-projection's norm, normalized per layer. Shape [n_layer, n_expert]."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    info = moe_info(path, reader)
    tensors = {t.name: t for t in reader.tensors}
    out = np.zeros((info.n_layer, info.n_expert))
    for layer in range(info.n_layer):
        router = np.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data, dtype=np.float64)
        out[layer] = np.linalg.norm(router, axis=1)
        down = tensors.get(f"blk.{layer}.ffn_down_exps.weight")
        if down is not None and down.tensor_type.name in ("F32", "F16"):
            flat = np.asarray(down.data, dtype=np.float64).reshape(info.n_expert, -1)
            out[layer] *= np.linalg.norm(flat, axis=1)
    return out / out.sum(axis=1, keepdims=True)


def activation_importance(
    path: str | Path, prompts: Sequence[str] = CALIBRATION_PROMPTS, *, n_threads: int = 2
) -> np.ndarray:
    """Router probability mass per expert, summed over every token of `prompts` as llama.cpp
    evaluates them (read from its eval callback), normalized per layer. Shape [n_layer, n_expert]."""
    import llama_cpp

    info = moe_info(path)
    mass = np.zeros((info.n_layer, info.n_expert))
    ggml = _ggml()

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor: int, ask: bool, _user: int) -> bool:
        """Runs on llama.cpp's compute thread: keep the router probabilities of each layer."""
        match = _PROBS.fullmatch((ggml.ggml_get_name(tensor) or b"").decode(errors="replace"))
        if ask:  # whether we want to see this tensor once it is computed
            return match is not None and int(match[1]) < info.n_layer
        if match is None:
            return True  # (returning False here would cancel the computation)
        n = ggml.ggml_nelements(tensor)
        if ggml.ggml_nbytes(tensor) == 4 * n and n % info.n_expert == 0:
            buf = np.empty(n, dtype=np.float32)
            ggml.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, 4 * n)
            mass[int(match[1])] += buf.reshape(-1, info.n_expert).sum(axis=0)
        return True

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=n_threads, n_gpu_layers=0, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = n_threads
    params.cb_eval = observe
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context to analyze the model")
    try:
        memory = llama_cpp.llama_get_memory(ctx)
        for prompt in prompts:
            tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)[:512]
            llama_cpp.llama_memory_clear(memory, True)
            ids = (llama_cpp.llama_token * len(tokens))(*tokens)  # kept alive through the decode
            status = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, len(tokens)))
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status}) while analyzing the model")
    finally:
        llama_cpp.llama_free(ctx)
    if not mass.any():
        raise RuntimeError("llama.cpp reported no router probabilities (ffn_moe_probs) for this model")
    return mass / mass.sum(axis=1, keepdims=True)


def _ggml() -> Any:
    """libggml as llama.cpp loaded it (the `.so.0` name: another name loads a second copy)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    return lib


# -- plan -----------------------------------------------------------------------------------------


def plan_split(importance: np.ndarray, n_nodes: int, replicate: float) -> list[list[list[int]]]:
    """Which experts each node holds, per layer: `[node][layer] -> sorted expert ids`, the same
    number on every node and layer. Hot experts (top `replicate` of each layer) go everywhere;
    cold ones round-robin, twice each when `n_nodes >= 3`; every expert is held somewhere."""
    n_layer, n_expert = importance.shape
    if n_nodes < 2:
        raise ValueError("a split needs at least 2 nodes")
    if not 0 <= replicate < 1:
        raise ValueError("--replicate must be at least 0 and below 1")
    n_hot = math.floor(replicate * n_expert + 1e-9)
    copies = 2 if n_nodes >= 3 else 1
    per_node = n_hot + math.ceil((n_expert - n_hot) * copies / n_nodes)
    plan: list[list[list[int]]] = [[] for _ in range(n_nodes)]
    for layer in range(n_layer):
        order = [int(e) for e in np.argsort(-importance[layer], kind="stable")]
        hot, cold = order[:n_hot], order[n_hot:]
        held = [set(hot) for _ in range(n_nodes)]
        for j, expert in enumerate(cold):
            for c in range(copies):
                held[(j * copies + c) % n_nodes].add(expert)
        for node in range(n_nodes):  # top up to the common count with the most important missing
            for expert in order:
                if len(held[node]) >= per_node:
                    break
                held[node].add(expert)
            plan[node].append(sorted(held[node]))
    return plan
