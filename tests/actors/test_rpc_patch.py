"""The project's llama.cpp patch (patches/): it applies to the pinned sdist, the installed build has
it, and its RPC command — a stage loading a tensor from its own GGUF — does exactly that for a
well-formed request and refuses everything else without crashing or reading out of bounds. Spoken
to a real RPC server child over raw TCP, as a hostile process on the stage's machine could."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.engine._llamacpp import has_file_tensors
from actors.gguf._layout import Layout, TensorSpan, read_layout
from tests.support.llama_builds import llama_cpp_version, pinned_sdist
from tests.support.nodes import eventually, free_port_pair, listening

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "llama.cpp-rpc-file-tensors.patch"
PATCHED_FILES = (
    "ggml/include/ggml-rpc.h",
    "ggml/src/ggml-rpc/ggml-rpc.cpp",
    "src/llama-model-loader.cpp",
    "src/llama-model.cpp",
)

# ggml-rpc.cpp's wire format (packed, little-endian)
ALLOC_BUFFER, GET_ALIGNMENT, BUFFER_GET_BASE, GET_TENSOR, HELLO, SET_TENSOR_FILE = 0, 1, 3, 8, 14, 18
GGML_TYPE_I8 = 24
RPC_TENSOR = struct.Struct("<QIQ4I4II16ii10QQQQ64si")  # rpc_tensor: id, type, buffer, ne, nb, ... name
FILE_ID_SIZE = 64
CAP_FILE_TENSORS = 1


def test_the_patch_applies_cleanly_to_the_pinned_source(tmp_path: Path) -> None:
    version = llama_cpp_version()
    with tarfile.open(pinned_sdist()) as tar:
        for name in PATCHED_FILES:
            tar.extract(f"llama_cpp_python-{version}/vendor/llama.cpp/{name}", tmp_path, filter="data")
    src = tmp_path / f"llama_cpp_python-{version}"
    check = subprocess.run(
        ["git", "apply", "--check", "-p1", str(PATCH)], cwd=src, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    # and it is what the installed wheel was built from: the patched files all carry it
    applied = subprocess.run(["git", "apply", "-p1", str(PATCH)], cwd=src, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    for name in PATCHED_FILES:
        assert "mesh-llm patch" in (src / "vendor/llama.cpp" / name).read_text()


# -- a real RPC server child, spoken to in its own protocol ------------------------------------


class Rpc:
    """One client connection to a llama.cpp RPC server."""

    def __init__(self, endpoint: tuple[str, int]) -> None:
        self.sock = socket.create_connection(endpoint, timeout=10)

    def close(self) -> None:
        self.sock.close()

    def send(self, cmd: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)

    def recv(self, size: int) -> bytes:
        (n,) = struct.unpack("<Q", self._exactly(8))
        assert n == size, f"a {n}-byte answer, expected {size}"
        return self._exactly(n)

    def call(self, cmd: int, payload: bytes, size: int) -> bytes:
        self.send(cmd, payload)
        return self.recv(size)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            part = self.sock.recv(n - len(out))
            if not part:
                raise ConnectionError("the server closed the connection")
            out += part
        return out

    def hello(self) -> tuple[int, int, int, int]:
        major, minor, patch, caps = struct.unpack("<4B", self.call(HELLO, bytes(24), 28)[:4])
        return major, minor, patch, caps

    def alloc(self, size: int) -> tuple[int, int]:
        """A buffer on device 0: (remote id, base address)."""
        remote, _ = struct.unpack("<QQ", self.call(ALLOC_BUFFER, struct.pack("<IQ", 0, size), 16))
        (base,) = struct.unpack("<Q", self.call(BUFFER_GET_BASE, struct.pack("<Q", remote), 8))
        return remote, base

    def alignment(self) -> int:
        (value,) = struct.unpack("<Q", self.call(GET_ALIGNMENT, struct.pack("<I", 0), 8))
        return int(value)

    def set_from_file(self, *, buffer: int, data: int, name: str, file_id: str, file_offset: int, size: int,
                      offset: int = 0) -> int:  # fmt: skip
        request = (
            tensor(buffer, data, max(size, 1), name)
            + struct.pack("<Q", offset)
            + file_id.encode().ljust(FILE_ID_SIZE, b"\0")[:FILE_ID_SIZE]
            + struct.pack("<QQ", file_offset, size)
        )
        (result,) = self.call(SET_TENSOR_FILE, request, 1)
        return int(result)

    def get(self, buffer: int, data: int, size: int) -> bytes:
        return self.call(GET_TENSOR, tensor(buffer, data, size, "") + struct.pack("<QQ", 0, size), size)


def tensor(buffer: int, data: int, n: int, name: str) -> bytes:
    """An rpc_tensor: n bytes (type I8) at `data` in `buffer` (shapes are 32-bit: a bigger n, as
    hostile requests have, gets a shape the file command does not look at)."""
    n = min(n, 2**32 - 1)
    return RPC_TENSOR.pack(
        1, GGML_TYPE_I8, buffer, n, 1, 1, 1, 1, n, n, n, 0, *([0] * 16), 0, *([0] * 10), 0, 0, data,
        name.encode()[:63], 0,
    )  # fmt: skip


@dataclass
class Server:
    endpoint: tuple[str, int]
    layout: Layout
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def server(tiny_model: Path, tmp_path: Path) -> Iterator[Server]:
    if not has_file_tensors():
        pytest.fail("the installed llama.cpp lacks the project's RPC patch: run `make install`")
    layout = read_layout(tiny_model)
    port = free_port_pair(1)
    log = open(tmp_path / "stage.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.engine._rpc_stage", "--listen", f"127.0.0.1:{port}",
         "--model", str(tiny_model), "--layers", "0,0", "--cache-dir", str(tmp_path / "cache"),
         "--threads", "1", "--parent-pid", str(os.getpid()), "--load-mode", "file",
         "--file-id", layout.identity],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        eventually(lambda: listening(port) or proc.poll() is not None, timeout_s=30)
        assert proc.poll() is None, (tmp_path / "stage.log").read_text()
        yield Server(("127.0.0.1", port), layout, proc)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no duplicate slice


def biggest(layout: Layout) -> TensorSpan:
    return max(layout.tensors, key=lambda t: t.size)


def test_the_installed_build_serves_tensors_from_its_own_file(server: Server, tiny_model: Path) -> None:
    rpc = Rpc(server.endpoint)
    try:
        major, minor, _, caps = rpc.hello()
        assert (major, minor) == (7, 0) and caps & CAP_FILE_TENSORS  # the capability, in HELLO
        span = biggest(server.layout)
        buffer, base = rpc.alloc(span.size + 4096)
        assert rpc.set_from_file(buffer=buffer, data=base, name=span.name, file_id=server.layout.identity,
                                 file_offset=span.offset, size=span.size) == 1  # fmt: skip
        with open(tiny_model, "rb") as f:
            f.seek(span.offset)
            expected = f.read(span.size)
        assert rpc.get(buffer, base, span.size) == expected  # the bytes of its own copy
        # a part of a tensor, landing anywhere in the buffer
        part = span.size // 3
        ident = server.layout.identity
        assert rpc.set_from_file(buffer=buffer, data=base + 4096, name=span.name, file_id=ident,
                                 file_offset=span.offset + part, size=part) == 1  # fmt: skip
        assert rpc.get(buffer, base + 4096, part) == expected[part : 2 * part]
    finally:
        rpc.close()


def test_hostile_file_commands_are_refused_and_the_server_lives_on(server: Server) -> None:
    layout = server.layout
    span, other = sorted(layout.tensors, key=lambda t: t.size)[-2:]
    rpc = Rpc(server.endpoint)
    try:
        rpc.hello()
        buffer, base = rpc.alloc(other.size + 4096)
        good = dict(buffer=buffer, data=base, name=other.name, file_id=layout.identity,
                    file_offset=other.offset, size=other.size)  # fmt: skip
        end_of_file = max(t.offset + t.size for t in layout.tensors)
        hostile = {
            "a file it does not hold": {"file_id": "0" * 32},
            "an empty file id": {"file_id": ""},
            "a file id without its terminator": {"file_id": "x" * FILE_ID_SIZE},
            "another tensor's name": {"name": span.name},
            "no name": {"name": ""},
            "bytes before the tensor": {"file_offset": other.offset - 1},
            "bytes past the tensor's end": {"size": other.size + 1},
            "the header": {"file_offset": 0, "size": 64},
            "past the end of the file": {"file_offset": end_of_file, "size": 16},
            "an offset that wraps around": {"file_offset": 2**64 - 8, "size": 16},
            "a size that wraps around": {"size": 2**64 - 1},
            "nothing": {"size": 0},
            "a buffer it never allocated": {"buffer": buffer + 8},
            "a null buffer": {"buffer": 0},
            "before the buffer": {"data": base - 8},
            "past the buffer": {"data": base + other.size + 4096},
            "running off the buffer's end": {"data": base + 4097},
            "an address that wraps around": {"data": 2**64 - 8},
            "a tensor offset off the buffer": {"offset": other.size + 4096},
            "a tensor offset that wraps around": {"offset": 2**64 - 1},
        }
        for why, change in hostile.items():
            assert rpc.set_from_file(**{**good, **change}) == 0, why  # type: ignore[arg-type]
            assert server.alive(), why
        # The same connection still works, and so does the good request.
        assert rpc.alignment() > 0
        assert rpc.set_from_file(**good) == 1  # type: ignore[arg-type]
        # Fuzz: random mutations of the good request; every answer a clean 0 or 1, and a 1 only
        # when the bytes asked for really are that tensor's and land inside the buffer.
        rng = random.Random(11)
        fields = list(good)
        for _ in range(300):
            request = dict(good)
            for field in rng.sample(fields, rng.randint(1, 3)):
                request[field] = _mutate(rng, field, request[field])
            result = rpc.set_from_file(**request)  # type: ignore[arg-type]
            assert result in (0, 1)
            if result == 1:
                assert request["file_id"] == layout.identity and request["buffer"] == buffer
                spans = [t for t in layout.tensors if t.name == request["name"]]
                assert spans and spans[0].offset <= request["file_offset"]
                assert request["file_offset"] + request["size"] <= spans[0].offset + spans[0].size
                assert (
                    base <= request["data"] and request["data"] + request["size"] <= base + other.size + 4096
                )
        assert server.alive() and rpc.alignment() > 0
    finally:
        rpc.close()


def _mutate(rng: random.Random, field: str, value: object) -> object:
    if field == "name":
        return rng.choice(["", "x" * 80, "blk.0.attn_q.weight", "output.weight", str(value)[:-1]])
    if field == "file_id":
        return rng.choice(["", "f" * 32, str(value).upper(), str(value) + "0"])
    assert isinstance(value, int)
    return (
        rng.choice([0, 1, 2**64 - 1, 2**63, value + rng.randint(-4096, 4096), value * 2, value // 2]) % 2**64
    )


def test_malformed_frames_close_the_connection_not_the_server(server: Server) -> None:
    for frame in (
        struct.pack("<BQ", SET_TENSOR_FILE, 5) + b"short",  # a request of the wrong size
        struct.pack("<BQ", 200, 0),  # no such command
        struct.pack("<BQ", SET_TENSOR_FILE, 2**62),  # an absurd length
    ):
        rpc = Rpc(server.endpoint)
        try:
            rpc.hello()
            rpc.sock.sendall(frame)
            rpc.sock.settimeout(10)
            try:
                assert rpc.sock.recv(1) == b""  # closed, not answered
            except ConnectionResetError:
                pass  # closed with our bytes unread
        finally:
            rpc.close()
        again = Rpc(server.endpoint)
        try:
            assert again.hello()[3] & CAP_FILE_TENSORS and server.alive()
        finally:
            again.close()
