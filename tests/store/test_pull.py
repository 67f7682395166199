"""Pulls against a Hugging Face-compatible endpoint served in this process: resume after a
dropped connection, a corrupted byte caught, multi-part models, parallel ranged chunks."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aicc.db import Database
from aicc.errors import ConflictError, InvalidRequestError, ModelNotFoundError
from aicc.store.crypto import is_encrypted
from aicc.store.download import DownloadOptions, PullProgress, partial_path
from aicc.store.gguf_check import InvalidModelFileError
from aicc.store.hub import HubClient, PullError
from aicc.store.pull import plan_pull, pull_model
from aicc.store.registry import ModelRegistry
from tests.models.tiny_deepseek import write_tiny_deepseek

REPO = "acme/Tiny-GGUF"
KEY = bytes(range(32))
SMALL_CHUNKS = DownloadOptions(parallel_threshold_bytes=1, chunk_bytes=128 << 10, max_connections=4)


@dataclass
class Hub:
    """What the mock endpoint serves, how it misbehaves, and what it saw."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    no_lfs: set[str] = field(default_factory=set)
    drop_after: dict[str, int] = field(default_factory=dict)
    """path -> bytes sent before the connection drops (once)."""
    corrupt: set[str] = field(default_factory=set)
    ranges: list[tuple[str, str | None]] = field(default_factory=list)
    page_size: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/main(\?.*)?", self.path)
            if tree:
                self.send_tree(tree.group(1), tree.group(2) or "")
                return
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", self.path)
            if resolve:  # like the hub: a redirect to the CDN
                self.send_response(302)
                self.send_header("Location", f"/cdn/{resolve.group(1)}/{resolve.group(2)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            cdn = re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", self.path)
            files = hub.repos.get(cdn.group(1), {}) if cdn else {}
            if cdn is None or cdn.group(2) not in files:
                self.send_error(404)
                return
            self.send_file(cdn.group(2), files[cdn.group(2)])

        def send_tree(self, repo: str, query: str) -> None:
            if repo not in hub.repos:
                self.send_error(404)
                return
            start = int(query.rsplit("=", 1)[1]) if "cursor=" in query else 0
            entries = []
            for path, data in sorted(hub.repos[repo].items()):
                entry: dict[str, object] = {"type": "file", "path": path, "size": len(data)}
                if path not in hub.no_lfs:
                    digest = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"oid": digest, "size": len(data), "pointerSize": 130}
                entries.append(entry)
            page = entries[start : start + hub.page_size]
            body = json.dumps([{"type": "directory", "path": "sub"}, *page]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if start + hub.page_size < len(entries):
                next_url = f"/api/models/{repo}/tree/main?cursor={start + hub.page_size}"
                self.send_header("Link", f'<{next_url}>; rel="next"')
            self.end_headers()
            self.wfile.write(body)

        def send_file(self, path: str, data: bytes) -> None:
            if path in hub.corrupt:
                data = data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]
            header = self.headers.get("Range")
            with hub.lock:
                hub.ranges.append((path, header))
                drop = hub.drop_after.pop(path, None)
            start, end = 0, len(data) - 1
            if header:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
                assert match
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else end
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start : end + 1]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if drop is not None:
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.connection.shutdown(2)  # the connection drops mid-file
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "t.gguf").read_bytes()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Hub]]:
    hub = Hub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hub
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub(server: tuple[str, Hub], tiny: bytes) -> Hub:
    state = server[1]
    state.repos.clear()
    state.no_lfs.clear()
    state.drop_after.clear()
    state.corrupt.clear()
    state.ranges.clear()
    state.repos[REPO] = {"tiny-Q4_K_M.gguf": tiny, "README.md": b"# tiny"}
    return state


@pytest.fixture
def client(server: tuple[str, Hub]) -> Iterator[HubClient]:
    with HubClient(server[0]) as hub_client:
        yield hub_client


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    database = Database(f"sqlite:///{tmp_path / 'aicc.db'}")
    database.migrate()
    yield ModelRegistry(database, tmp_path / "models")
    database.close()


def test_pull_verifies_and_registers(
    hub: Hub, client: HubClient, registry: ModelRegistry, tiny: bytes
) -> None:
    plan = plan_pull(client, f"hf:{REPO}")  # the tree spans pages; README is not a candidate
    assert [f.path for f in plan.files] == ["tiny-Q4_K_M.gguf"]
    assert plan.default_ref == "tiny:q4_k_m"
    updates: list[PullProgress] = []
    record = pull_model(registry, client, plan, progress=updates.append)
    assert record.ref == "tiny:q4_k_m"
    assert record.source == f"hf:{REPO}@main"
    assert record.sha256 == (hashlib.sha256(tiny).hexdigest(),)
    assert record.architecture == "deepseek2"
    [path] = record.paths(registry.model_dir)
    assert path.read_bytes() == tiny
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-Q4_K_M.gguf"]
    assert updates[-1].done_bytes == len(tiny)
    assert updates[-1].is_verifying
    with pytest.raises(ConflictError):
        pull_model(registry, client, plan)


def test_a_dropped_connection_resumes_with_a_range_request(
    hub: Hub, client: HubClient, registry: ModelRegistry, tiny: bytes
) -> None:
    hub.drop_after["tiny-Q4_K_M.gguf"] = 300_000
    plan = plan_pull(client, f"hf:{REPO}:tiny-Q4_K_M.gguf")
    with pytest.raises(PullError, match="failed"):
        pull_model(registry, client, plan, ref="tiny")
    partial = partial_path(registry.model_dir / "tiny" / "latest", "tiny-Q4_K_M.gguf")
    assert partial.stat().st_size == 300_000
    assert registry.find("tiny") is None
    record = pull_model(registry, client, plan, ref="tiny")
    assert hub.ranges[-1] == ("tiny-Q4_K_M.gguf", "bytes=300000-")
    assert record.paths(registry.model_dir)[0].read_bytes() == tiny
    assert not partial.exists()


def test_a_corrupted_byte_is_caught_and_nothing_is_kept(
    hub: Hub, client: HubClient, registry: ModelRegistry
) -> None:
    hub.corrupt.add("tiny-Q4_K_M.gguf")
    plan = plan_pull(client, f"hf:{REPO}")
    with pytest.raises(PullError, match=r"failed verification.*sha256"):
        pull_model(registry, client, plan)
    assert registry.list() == []
    assert list((registry.model_dir / "tiny" / "q4_k_m").iterdir()) == []


def test_parallel_chunks_and_their_resume(
    hub: Hub, client: HubClient, registry: ModelRegistry, tiny: bytes
) -> None:
    hub.drop_after["tiny-Q4_K_M.gguf"] = 1000  # the first ranged request breaks off
    plan = plan_pull(client, f"hf:{REPO}")
    with pytest.raises(PullError):
        pull_model(registry, client, plan, options=SMALL_CHUNKS)
    num_chunks = -(-len(tiny) // SMALL_CHUNKS.chunk_bytes)
    assert len(hub.ranges) == num_chunks
    assert all(re.fullmatch(r"bytes=\d+-\d+", r or "") for _, r in hub.ranges)
    hub.ranges.clear()
    record = pull_model(registry, client, plan, options=SMALL_CHUNKS)
    assert len(hub.ranges) == 1  # only the chunk that broke off is fetched again
    assert record.paths(registry.model_dir)[0].read_bytes() == tiny


def test_multi_part_models(
    hub: Hub, client: HubClient, registry: ModelRegistry, tmp_path: Path
) -> None:
    parts = {
        f"Q4_K_M/big-Q4_K_M-0000{i}-of-00002.gguf": write_tiny_deepseek(
            tmp_path / f"p{i}.gguf", seed=i
        ).read_bytes()
        for i in (1, 2)
    }
    hub.repos["acme/Big-GGUF"] = parts
    plan = plan_pull(client, "hf:acme/Big-GGUF")
    assert [f.name for f in plan.files] == [
        "big-Q4_K_M-00001-of-00002.gguf",
        "big-Q4_K_M-00002-of-00002.gguf",
    ]
    record = pull_model(registry, client, plan, ref="big")
    assert record.files == tuple(f.name for f in plan.files)
    assert [p.read_bytes() for p in record.paths(registry.model_dir)] == list(parts.values())
    del parts["Q4_K_M/big-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(PullError, match="missing"):
        plan_pull(client, "hf:acme/Big-GGUF")


def test_catalog_alias_and_encryption(
    hub: Hub, client: HubClient, registry: ModelRegistry, tiny: bytes
) -> None:
    hub.repos["bartowski/Qwen2.5-0.5B-Instruct-GGUF"] = {
        "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf": tiny,
        "Qwen2.5-0.5B-Instruct-Q8_0.gguf": b"unused",
    }
    plan = plan_pull(client, "qwen2.5:0.5b")
    assert plan.default_ref == "qwen2.5:0.5b"
    record = pull_model(registry, client, plan, encrypt_key=KEY)
    assert record.encrypted
    assert record.files == ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf.aicc-enc",)
    assert record.sha256 == (hashlib.sha256(tiny).hexdigest(),)
    assert record.size_bytes == len(tiny)
    assert record.architecture == "deepseek2"
    [path] = record.paths(registry.model_dir)
    assert is_encrypted(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no plaintext left


def test_refusals(hub: Hub, client: HubClient, registry: ModelRegistry, tiny: bytes) -> None:
    hub.repos[REPO]["model.bin"] = b"\x80\x04pickle"
    hub.repos[REPO]["tiny-Q4_K_M-copy.gguf"] = tiny
    hub.repos[REPO]["plain.gguf"] = tiny
    hub.repos[REPO]["bad.gguf"] = b"GGUF" + bytes(60)
    hub.no_lfs.add("plain.gguf")
    with pytest.raises(InvalidModelFileError, match="pickle"):
        plan_pull(client, f"hf:{REPO}:model.bin")
    with pytest.raises(InvalidRequestError, match="2 Q4_K_M GGUF files match"):
        plan_pull(client, f"hf:{REPO}")
    with pytest.raises(InvalidRequestError, match="not in the catalog"):
        plan_pull(client, "no-such-model:1b")
    with pytest.raises(ModelNotFoundError):
        plan_pull(client, "hf:acme/missing")
    with pytest.raises(InvalidRequestError):
        plan_pull(client, "hf:acme/x:../../etc/passwd")
    with pytest.raises(PullError, match="no sha256"):
        pull_model(registry, client, plan_pull(client, f"hf:{REPO}:plain.gguf"), ref="p")
    with pytest.raises(InvalidModelFileError, match=r"bad\.gguf"):
        pull_model(registry, client, plan_pull(client, f"hf:{REPO}:bad.gguf"), ref="bad")
    assert registry.list() == []
    assert not any((registry.model_dir / "bad" / "latest").iterdir())
    with pytest.raises(InvalidRequestError):
        pull_model(registry, client, plan_pull(client, f"hf:{REPO}:plain.gguf"), ref="../x")
    shutil.rmtree(registry.model_dir, ignore_errors=True)


def test_the_cli_pulls_resumes_and_lists(
    hub: Hub, server: tuple[str, Hub], tiny: bytes, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from aicc.cli.main import main

    env = {
        "AICC_MODEL_DIR": str(tmp_path / "models"),
        "AICC_STATE_DIR": str(tmp_path / "state"),
        "AICC_CONFIG": "",
        "AICC_HF_ENDPOINT": server[0],
    }
    hub.drop_after["tiny-Q4_K_M.gguf"] = 200_000
    runner = CliRunner()
    args = ["models", "pull", f"hf:{REPO}", "--name", "tiny:cli"]
    dropped = runner.invoke(main, args, env=env)
    assert dropped.exit_code == 1, dropped.output
    assert "Traceback" not in dropped.output
    resumed = runner.invoke(main, args, env=env)  # the same name: the partial file resumes
    assert resumed.exit_code == 0, resumed.output
    assert "pulled tiny:cli" in resumed.output
    assert any(r is not None and r.startswith("bytes=200000-") for _, r in hub.ranges)
    listed = runner.invoke(main, ["models", "show", "tiny:cli", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert hashlib.sha256(tiny).hexdigest() in listed.output
