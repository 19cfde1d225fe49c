"""Synthesis of small GGUF models that llama.cpp loads: random weights, a real tokenizer and a
ChatML chat template. Architectures: `llama` (dense), `llama-moe` (Mixtral-style experts) and
`qwen2moe` (routed plus shared experts). Output is gibberish: the weights are random.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import string
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHS = ("llama", "llama-moe", "qwen2moe")
# ChatML with tools as Qwen 2.5 renders them (Hermes syntax); without tools, plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_UNK, _BOS, _EOS, _IM_END = 0, 1, 2, 4
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6
_WORDS = (
    "the of and to in is was for that on with as by at from it an be this are or his which "
    "not but had they have you one were all their there her been has more we when who will "
    "would can said if no so out what up about into than them some could time only other new "
    "model node mesh token layer expert request stream server client network machine memory "
    "def return class import self none true false print value list dict error while else"
).split()


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """The hyper-parameters of a synthesized model."""

    n_vocab: int = 1024
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 4096
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0


PRESETS: dict[str, Shape] = {
    # unit tests: loads in milliseconds
    "tiny": Shape(),
    # the built-in default: about 9M parameters, quick to make and to run
    "small": Shape(n_vocab=8000, n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=768),
    # benchmarks: about 110M parameters, so that compute dominates
    "100m": Shape(n_vocab=32000, n_embd=768, n_layer=12, n_head=12, n_head_kv=4, n_ff=2048),
    # a few hundred million parameters
    "300m": Shape(n_vocab=32000, n_embd=1024, n_layer=24, n_head=16, n_head_kv=8, n_ff=2816),
}
_MOE_DEFAULTS = {"n_expert": 8, "n_expert_used": 2}


def shape_for(arch: str, preset: str = "tiny", **overrides: int) -> Shape:
    """A preset's shape, given experts for MoE architectures, with overrides applied."""
    shape = PRESETS[preset]
    if arch != "llama":
        moe = {**_MOE_DEFAULTS, "n_ff_exp": shape.n_ff // 2}
        if arch == "qwen2moe":
            moe["n_ff_shexp"] = shape.n_ff
        shape = dataclasses.replace(shape, **moe)
    return dataclasses.replace(shape, **{k: v for k, v in overrides.items() if v is not None})


def synthesize(
    arch: str,
    out: str | Path,
    shape: Shape,
    *,
    dtype: str = "f16",
    seed: int = 0,
    quiet_from: int | None = None,
    quiet_scale: float = 1.0,
    router_skew: float = 0.0,
    add_bos: bool = True,
    chat_template: str = CHATML_TEMPLATE,
) -> Path:
    """Write a loadable GGUF of `arch` and `shape` with random weights to `out`.

    Each tensor's weights depend only on `seed` and its name, so models of one seed share their
    embeddings, output head and first layers. Layers from `quiet_from` on have their output
    projections (`attn_output`, `ffn_down`) scaled by `quiet_scale`: with a small scale, a model
    of `quiet_from` layers and the same seed is a close approximation of this one (a speculative
    draft model that agrees with it strongly). `router_skew` > 0 makes an MoE router favour a few
    experts of each layer, as trained MoEs do: expert rows of `ffn_gate_inp` are scaled by
    exp(skew x a rank from 1 down to 0), in a random order per layer. `add_bos=False` makes a
    tokenizer that adds no BOS token, as the Qwen2 family's does. `chat_template`: the Jinja
    template the GGUF carries (by default ChatML with Qwen 2.5's tools)."""
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    _check(arch, shape)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf_arch = "qwen2moe" if arch == "qwen2moe" else "llama"
    writer = gguf.GGUFWriter(str(out), gguf_arch)
    _write_metadata(writer, arch, shape, out.stem, dtype)
    _write_tokenizer(writer, shape.n_vocab, add_bos=add_bos, chat_template=chat_template)
    for name, dims in _tensor_shapes(arch, shape):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        scale = 1.0
        if quiet_from is not None and name.endswith(("attn_output.weight", "ffn_down.weight")):
            scale = quiet_scale if int(name.split(".")[1]) >= quiet_from else 1.0
        gains = None
        if router_skew and name.endswith("ffn_gate_inp.weight"):
            ranks = np.random.default_rng([seed, zlib.crc32(name.encode()), 1]).permutation(dims[0])
            gains = np.exp(router_skew * (1 - ranks / max(dims[0] - 1, 1))).astype(np.float32)
        _add_tensor(writer, name, dims, rng, dtype, scale, gains)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")  # writers of one path never collide
    writer.path = tmp
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _check(arch: str, s: Shape) -> None:
    if s.n_embd % s.n_head or s.n_head % s.n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    if s.n_vocab < len(_SPECIAL) + 256 + 100:
        raise ValueError(f"n_vocab must be at least {len(_SPECIAL) + 356}")
    if arch != "llama" and not (0 < s.n_expert_used <= s.n_expert and s.n_ff_exp > 0):
        raise ValueError("an MoE model needs 0 < experts-used <= experts and an expert FFN size")
    if arch == "qwen2moe" and s.n_ff_shexp <= 0:
        raise ValueError("qwen2moe needs a shared-expert FFN size")


def _write_metadata(writer: object, arch: str, s: Shape, name: str, dtype: str) -> None:
    w = writer  # gguf is untyped; keep the calls readable
    w.add_name(name)  # type: ignore[attr-defined]
    w.add_description(  # type: ignore[attr-defined]
        f"mesh-llm synthesized {arch} model with RANDOM WEIGHTS: for tests and benchmarks only"
    )
    w.add_context_length(s.n_ctx_train)  # type: ignore[attr-defined]
    w.add_embedding_length(s.n_embd)  # type: ignore[attr-defined]
    w.add_block_count(s.n_layer)  # type: ignore[attr-defined]
    # Mixtral-style llama MoE reads its expert FFN size from feed_forward_length.
    w.add_feed_forward_length(s.n_ff_exp if arch == "llama-moe" else s.n_ff)  # type: ignore[attr-defined]
    w.add_head_count(s.n_head)  # type: ignore[attr-defined]
    w.add_head_count_kv(s.n_head_kv)  # type: ignore[attr-defined]
    w.add_layer_norm_rms_eps(1e-5)  # type: ignore[attr-defined]
    w.add_rope_dimension_count(s.n_embd // s.n_head)  # type: ignore[attr-defined]
    w.add_rope_freq_base(10000.0)  # type: ignore[attr-defined]
    w.add_vocab_size(s.n_vocab)  # type: ignore[attr-defined]
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])  # type: ignore[attr-defined]
    if arch != "llama":
        w.add_expert_count(s.n_expert)  # type: ignore[attr-defined]
        w.add_expert_used_count(s.n_expert_used)  # type: ignore[attr-defined]
    if arch == "qwen2moe":
        w.add_expert_feed_forward_length(s.n_ff_exp)  # type: ignore[attr-defined]
        w.add_expert_shared_feed_forward_length(s.n_ff_shexp)  # type: ignore[attr-defined]
    w.add_string("mesh_llm.synth_arch", arch)  # type: ignore[attr-defined]


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """An SPM vocabulary: specials, 256 byte tokens, characters, words, then filler pieces."""
    tokens = list(_SPECIAL)
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL, _TOKEN_CONTROL, _TOKEN_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_TOKEN_BYTE] * 256
    chars = [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]
    pieces = ["▁", "\n"] + chars + ["▁" + c for c in chars] + ["▁" + w for w in _WORDS] + _WORDS
    seen = set(tokens)
    for piece in itertools.chain(pieces, _filler()):
        if len(tokens) == n_vocab:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(_TOKEN_NORMAL)
    # SPM merges the highest-scoring pair first: longer pieces win, earlier pieces break ties.
    scores = [0.0] * len(_SPECIAL) + [0.0] * 256
    scores += [len(t) * 1000.0 - i for i, t in enumerate(tokens[len(scores) :])]
    return tokens, scores, types


def _filler() -> Iterator[str]:
    """Endless distinct pieces: syllables, then pairs, then triples of them (with and without ▁)."""
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    for size in itertools.count(1):
        for combo in itertools.product(syllables, repeat=size):
            yield "▁" + "".join(combo)
            yield "".join(combo)


def _write_tokenizer(writer: object, n_vocab: int, *, add_bos: bool, chat_template: str) -> None:
    tokens, scores, types = vocabulary(n_vocab)
    w = writer
    w.add_tokenizer_model("llama")  # type: ignore[attr-defined]
    w.add_token_list(tokens)  # type: ignore[attr-defined]
    w.add_token_scores(scores)  # type: ignore[attr-defined]
    w.add_token_types(types)  # type: ignore[attr-defined]
    w.add_unk_token_id(_UNK)  # type: ignore[attr-defined]
    w.add_bos_token_id(_BOS)  # type: ignore[attr-defined]
    w.add_eos_token_id(_EOS)  # type: ignore[attr-defined]
    w.add_eot_token_id(_IM_END)  # type: ignore[attr-defined]
    w.add_add_bos_token(add_bos)  # type: ignore[attr-defined]
    w.add_add_eos_token(False)  # type: ignore[attr-defined]
    w.add_chat_template(chat_template)  # type: ignore[attr-defined]


def _tensor_shapes(arch: str, s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor; numpy shapes are GGUF's dimensions reversed."""
    head_dim = s.n_embd // s.n_head
    kv = s.n_head_kv * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (s.n_vocab, s.n_embd)),
        ("output_norm.weight", (s.n_embd,)),
        ("output.weight", (s.n_vocab, s.n_embd)),
    ]
    for i in range(s.n_layer):
        b = f"blk.{i}"
        out += [
            (f"{b}.attn_norm.weight", (s.n_embd,)),
            (f"{b}.attn_q.weight", (s.n_embd, s.n_embd)),
            (f"{b}.attn_k.weight", (kv, s.n_embd)),
            (f"{b}.attn_v.weight", (kv, s.n_embd)),
            (f"{b}.attn_output.weight", (s.n_embd, s.n_embd)),
            (f"{b}.ffn_norm.weight", (s.n_embd,)),
        ]
        if arch == "qwen2moe":
            out += [
                (f"{b}.attn_q.bias", (s.n_embd,)),
                (f"{b}.attn_k.bias", (kv,)),
                (f"{b}.attn_v.bias", (kv,)),
            ]
        if arch == "llama":
            out += [
                (f"{b}.ffn_gate.weight", (s.n_ff, s.n_embd)),
                (f"{b}.ffn_up.weight", (s.n_ff, s.n_embd)),
                (f"{b}.ffn_down.weight", (s.n_embd, s.n_ff)),
            ]
            continue
        out += [
            (f"{b}.ffn_gate_inp.weight", (s.n_expert, s.n_embd)),
            (f"{b}.ffn_gate_exps.weight", (s.n_expert, s.n_ff_exp, s.n_embd)),
            (f"{b}.ffn_up_exps.weight", (s.n_expert, s.n_ff_exp, s.n_embd)),
            (f"{b}.ffn_down_exps.weight", (s.n_expert, s.n_embd, s.n_ff_exp)),
        ]
        if arch == "qwen2moe":
            out += [
                (f"{b}.ffn_gate_inp_shexp.weight", (s.n_embd,)),
                (f"{b}.ffn_gate_shexp.weight", (s.n_ff_shexp, s.n_embd)),
                (f"{b}.ffn_up_shexp.weight", (s.n_ff_shexp, s.n_embd)),
                (f"{b}.ffn_down_shexp.weight", (s.n_embd, s.n_ff_shexp)),
            ]
    return out


def _add_tensor(
    writer: object,
    name: str,
    dims: tuple[int, ...],
    rng: np.random.Generator,
    dtype: str,
    scale: float = 1.0,
    row_gains: np.ndarray | None = None,
) -> None:
    import gguf

    if len(dims) == 1:  # norms, biases and the shared-expert gate stay f32
        data = np.ones(dims, np.float32) if "norm" in name else rng.normal(0, 0.02, dims).astype(np.float32)
        writer.add_tensor(name, data)  # type: ignore[attr-defined]
        return
    data = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02 * scale)
    if row_gains is not None:
        data *= row_gains[:, None]
    if name == "output.weight":
        # Control tokens get zero logits, far below the best of thousands of random ones: greedy
        # decoding never ends a generation early, so benchmarks and tests run to max_tokens.
        data[: len(_SPECIAL)] = 0.0
    if dtype == "q8_0" and dims[-1] % 32 == 0 and "gate_inp" not in name:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)  # type: ignore[attr-defined]
    elif dtype == "f32" or "gate_inp" in name:
        writer.add_tensor(name, data)  # type: ignore[attr-defined]
    else:
        writer.add_tensor(name, data.astype(np.float16))  # type: ignore[attr-defined]
