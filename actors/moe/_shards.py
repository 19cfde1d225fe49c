"""Expert-sharded GGUFs: writing a node's shard, measuring its fidelity against the full model,
and the whole `mesh-ctl moe split` (plan, write, gate, manifest).

Shards are written one tensor at a time from a memory map, quantized tensors as raw bytes: peak
memory is the largest tensor's, whatever the model's size. Blocking calls, any thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.gguf._identity import SOURCE_MODEL_ID_KEY
from actors.moe._analyze import (
    CALIBRATION_PROMPTS,
    activation_importance,
    moe_info,
    plan_split,
    weight_importance,
)

# -- write ----------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(
    source: str | Path,
    out: str | Path,
    experts: list[list[int]],
    *,
    shard: int,
    shards: int,
    source_sha256: str,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write one node's GGUF holding `experts[layer]` of `source`, streaming tensor by tensor."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(source))
    info = moe_info(source, reader)
    out = Path(out)
    tmp = out.with_suffix(".gguf.partial")
    writer = GGUFWriter(str(tmp), info.arch)
    n_held = len(experts[0])
    for key, kv in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", f"{info.arch}.expert_count"):
            continue
        if key == f"{info.arch}.expert_used_count":
            continue
        vtype = kv.types[0]
        sub = kv.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, kv.contents(), vtype, sub)
    writer.add_uint32(f"{info.arch}.expert_count", n_held)
    writer.add_uint32(f"{info.arch}.expert_used_count", min(info.n_expert_used, n_held))
    if reader.get_field(SOURCE_MODEL_ID_KEY) is None:
        writer.add_string(SOURCE_MODEL_ID_KEY, info.model_id)
    writer.add_string("mesh_llm.source_sha256", source_sha256)
    writer.add_uint32("mesh_llm.shard", shard)
    writer.add_uint32("mesh_llm.shards", shards)
    writer.add_uint32("mesh_llm.source_expert_count", info.n_expert)
    writer.add_array("mesh_llm.expert_ids", [e for layer in experts for e in layer])
    plans = []
    for tensor in reader.tensors:
        ids = _expert_rows(tensor.name, experts)
        rows = tensor.data.shape[0] if ids is None else len(ids)  # (shape only: no page is read)
        shape = (rows, *tensor.data.shape[1:])
        nbytes = tensor.n_bytes // tensor.data.shape[0] * rows
        raw = None if tensor.tensor_type.name in ("F32", "F16") else tensor.tensor_type
        writer.add_tensor_info(tensor.name, shape, tensor.data.dtype, nbytes, raw_dtype=raw)
        plans.append((tensor, ids, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with open(source, "rb") as f:
        for tensor, ids, shape in plans:
            # Read with plain file reads, not the memory map: pages of a map stay resident.
            data = np.frombuffer(_read_rows(f, tensor, ids), dtype=tensor.data.dtype).reshape(shape)
            writer.write_tensor_data(data)
            if progress is not None:
                progress(int(data.nbytes))
    writer.close()
    tmp.replace(out)
    return out


def _read_rows(f: Any, tensor: Any, ids: list[int] | None) -> bytes:
    """A tensor's bytes, or only the rows (experts) `ids` of it: one tensor in memory at most."""
    if ids is None:
        return os.pread(f.fileno(), tensor.n_bytes, tensor.data_offset)
    row = tensor.n_bytes // tensor.data.shape[0]
    return b"".join(os.pread(f.fileno(), row, tensor.data_offset + i * row) for i in ids)


def _expert_rows(name: str, experts: list[list[int]]) -> list[int] | None:
    """The rows of tensor `name` a shard keeps, or None to keep it whole."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blk":
        return None
    kind = parts[2]
    if kind.endswith("_exps") or kind == "ffn_gate_inp":  # per-expert tensors and the router
        return experts[int(parts[1])]
    return None  # attention, norms, shared experts (`*_shexp`) and their gate stay whole


# -- fidelity -------------------------------------------------------------------------------------


def next_token_logits(path: str | Path, prompts: Sequence[str], *, n_threads: int = 2) -> list[np.ndarray]:
    """For each prompt, the model's next-token logits at every position ([n_tokens, n_vocab])."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_batch=512, n_threads=n_threads, logits_all=True, verbose=False
    )
    out = []
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)[:512]
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[: len(tokens)], dtype=np.float64))
    llm.close()
    return out


def fidelity(full: list[np.ndarray], shard: list[np.ndarray]) -> dict[str, float]:
    """How closely a shard follows the full model over the same positions: the share of
    positions where their top-1 next tokens agree, and the mean KL(full || shard) in nats."""
    agree = kl = n = 0.0
    for p_logits, q_logits in zip(full, shard, strict=True):
        log_p = _log_softmax(p_logits)
        log_q = _log_softmax(q_logits)
        agree += float((p_logits.argmax(axis=1) == q_logits.argmax(axis=1)).sum())
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        n += len(p_logits)
    return {"top1_agreement": round(agree / n, 4), "mean_kl": round(kl / n, 4), "positions": int(n)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


# -- the whole split ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Gate:
    """The least fidelity a shard must keep (`--min-agreement`, `--max-kl`)."""

    min_agreement: float = 0.6
    max_kl: float = 1.0

    def passes(self, measured: dict[str, float]) -> bool:
        return measured["top1_agreement"] >= self.min_agreement and measured["mean_kl"] <= self.max_kl


@dataclass(slots=True)
class SplitResult:
    manifest: dict[str, Any]
    shards: list[Path] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return bool(self.manifest["accepted"])


def split_model(
    source: str | Path,
    out_dir: str | Path,
    *,
    nodes: int,
    replicate: float,
    gate: Gate,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    weights_only: bool = False,
    force: bool = False,
    n_threads: int = 2,
    progress: Callable[[str], None] | None = None,
) -> SplitResult:
    """Split `source` into `nodes` shards in `out_dir`, measure each against the full model and
    write `manifest.json`. A split any of whose shards fails the gate is removed (kept with
    `force`); the manifest says why either way."""
    say = progress or (lambda _text: None)
    info = moe_info(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    method = "weights (router and expert norms: no activations measured)"
    if weights_only:
        importance = weight_importance(source)
    else:
        try:
            importance = activation_importance(source, prompts, n_threads=n_threads)
            method = f"activations (router probabilities over {len(prompts)} prompts)"
        except RuntimeError as err:
            say(f"activation analysis failed ({err}); falling back to weights")
            importance = weight_importance(source)
    plan = plan_split(importance, nodes, replicate)
    sha = file_sha256(source)
    total = Path(source).stat().st_size * nodes
    done = [0]

    def advance(nbytes: int) -> None:
        done[0] += nbytes
        say(_bar(done[0], total))

    shards = [
        write_shard(
            source,
            out / f"{info.model_id}.shard{i + 1}of{nodes}.gguf",
            experts,
            shard=i,
            shards=nodes,
            source_sha256=sha,
            progress=advance,
        )
        for i, experts in enumerate(plan)
    ]
    split_s = time.monotonic() - started
    say(f"measuring fidelity of {nodes} shards on {len(prompts)} prompts")
    full = next_token_logits(source, prompts, n_threads=n_threads)
    rows = []
    for i, (path, experts) in enumerate(zip(shards, plan, strict=True)):
        measured = fidelity(full, next_token_logits(path, prompts, n_threads=n_threads))
        rows.append(
            {
                "file": path.name,
                "shard": i,
                "experts_per_layer": len(experts[0]),
                "expert_ids": experts,
                "size_bytes": path.stat().st_size,
                **measured,
                "passes": gate.passes(measured),
            }
        )
    accepted = all(r["passes"] for r in rows)
    manifest = {
        "source": str(source),
        "source_model_id": info.model_id,
        "source_sha256": sha,
        "arch": info.arch,
        "n_layer": info.n_layer,
        "n_expert": info.n_expert,
        "n_expert_used": info.n_expert_used,
        "nodes": nodes,
        "replicate": replicate,
        "importance": method,
        "importance_per_layer": np.round(importance, 5).tolist(),
        "gate": {"min_agreement": gate.min_agreement, "max_kl": gate.max_kl},
        "accepted": accepted,
        "forced": force and not accepted,
        "split_seconds": round(split_s, 2),
        "shards": rows,
    }
    if not accepted and not force:
        for path in shards:
            path.unlink()
        shards = []
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return SplitResult(manifest=manifest, shards=shards)


def _bar(done: int, total: int, width: int = 30) -> str:
    share = min(done / total, 1.0) if total else 1.0
    filled = int(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}  {done / 1e6:.1f} / {total / 1e6:.1f} MB"


def stderr_progress(text: str) -> None:
    """Progress on one terminal line (bars overwrite each other), other news on their own."""
    if text.startswith("["):
        print("\r" + text, end="", file=sys.stderr, flush=True)
    else:
        print("\r" + text, file=sys.stderr, flush=True)
