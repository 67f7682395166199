"""A DeepSeek-V3-architecture model (MLA, shared + routed experts) served end to end.

The model is the tiny random-weight GGUF from `tests.models.tiny_deepseek`, written once per
module; requests go through the official `openai` SDK to a live aicc.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from aicc.api.app import create_app
from aicc.config import load_settings
from tests.conftest import ADMIN_KEY, LiveServer
from tests.models.tiny_deepseek import BOS, write_tiny_deepseek

MODEL = "tiny-deepseek-v3"
PROMPTS = [
    "Tell me about rivers.",
    "x",
    "A much longer prompt, so that this sequence prefills in more than one engine step: "
    "the quick brown fox jumps over the lazy dog, again and again and again.",
    "Count: 1 2 3",
    "Zebra",
    "What is MLA?",
]
NUM_TOKENS = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_deepseek(tmp_path_factory.mktemp("deepseek") / f"{MODEL}.gguf")


def _start(model_path: Path, *, batch_invariant: bool) -> LiveServer:
    settings = load_settings(
        model=str(model_path),
        model_dir=model_path.parent,
        port=0,
        max_batch_size=8,
        ctx_size=4096,
        batch_invariant=batch_invariant,
        admin_key=ADMIN_KEY,
        state_dir=Path(tempfile.mkdtemp(dir=model_path.parent, prefix="state-")),
    )
    return LiveServer(create_app(settings)).start()


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LiveServer]:
    live = _start(model_path, batch_invariant=False)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def invariant_server(model_path: Path) -> Iterator[LiveServer]:
    live = _start(model_path, batch_invariant=True)
    yield live
    live.stop()


def test_generator_is_deterministic(model_path: Path, tmp_path: Path) -> None:
    again = write_tiny_deepseek(tmp_path / "again.gguf")
    assert again.read_bytes() == model_path.read_bytes()
    other = write_tiny_deepseek(tmp_path / "other.gguf", seed=1)
    assert other.read_bytes() != model_path.read_bytes()


def test_chat_uses_the_deepseek_v3_template(server: LiveServer) -> None:
    info = server.engine.model_info
    assert (info.architecture, info.general_name) == ("deepseek2", "Tiny DeepSeek V3")
    renderer = server.app.state.chat.renderer
    assert renderer.template_name == "deepseek-v3"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = renderer.render(messages)
    assert prompt == f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>"
    token_ids = server.engine.tokenize(prompt, add_special=False)
    # BOS, 9 bytes of "Be brief.", <｜User｜>, "Hi" (2), <｜Assistant｜>: specials are one token.
    assert len(token_ids) == 1 + 9 + 1 + 2 + 1
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as client:
        response = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert response.model == MODEL
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(token_ids)
    assert response.usage.completion_tokens == 8


def test_completion(server: LiveServer) -> None:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as client:
        response = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        stream = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert response.usage is not None
    assert response.usage.completion_tokens == 16
    assert response.choices[0].finish_reason == "length"
    assert streamed == response.choices[0].text


async def _complete(client: openai.AsyncOpenAI, prompt: str) -> str:
    response = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=NUM_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.usage is not None
    assert response.usage.completion_tokens == NUM_TOKENS
    return response.choices[0].text


async def _alone_then_together(server: LiveServer) -> tuple[list[str], list[str], list[str]]:
    """Each prompt alone (twice), then all at once with two other prompts in the batch."""
    async with openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as client:
        alone = [await _complete(client, prompt) for prompt in PROMPTS]
        again = [await _complete(client, prompt) for prompt in PROMPTS]
        noise = ["Unrelated noise " * 5, "More noise"]
        together = await asyncio.gather(*(_complete(client, p) for p in [*PROMPTS, *noise]))
    return alone, again, list(together[: len(PROMPTS)])


class _PeakRunning:
    """Samples `num_running` in a thread: the most sequences seen in the batch at once."""

    def __init__(self, server: LiveServer) -> None:
        self.peak = 0
        self._server = server
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _PeakRunning:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self._server.engine.stats().num_running)


async def _concurrently(server: LiveServer, num_requests: int) -> list[str]:
    async with openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as client:
        prompts = [f"Request number {i}:" for i in range(num_requests)]
        return list(await asyncio.gather(*(_complete(client, p) for p in prompts)))


@pytest.mark.parametrize("mode", ["default", "batch_invariant"])
def test_concurrent_requests_share_engine_steps(
    mode: str, server: LiveServer, invariant_server: LiveServer
) -> None:
    live = server if mode == "default" else invariant_server
    live.wait_until_idle()
    num_requests = 6
    steps_before = live.engine.stats().num_steps
    with _PeakRunning(live) as running:
        texts = asyncio.run(_concurrently(live, num_requests))
    num_steps = live.engine.stats().num_steps - steps_before
    assert len(set(texts)) == num_requests, "each request has its own output"
    assert running.peak >= 4, "at least four sequences were in the batch at once"
    # One at a time would take >= 6 * 64 steps; overlapping requests share them.
    assert num_steps < num_requests * NUM_TOKENS * 0.6
    live.wait_until_idle()


def test_batch_invariant_mode_gives_the_same_tokens_alone_or_in_a_busy_batch(
    invariant_server: LiveServer,
) -> None:
    alone, again, together = asyncio.run(_alone_then_together(invariant_server))
    assert again == alone, "repeats at temperature 0 are identical"
    assert together == alone, "a busy batch of other prompts changes nothing"
    assert len(set(alone)) == len(PROMPTS)
    # Not asserted for the default mode: there even two solo runs of one prompt can differ
    # (seen here: 1 of 6 prompts over 64 tokens), because flash attention with an F16 KV
    # cache rounds differently by batch shape and cache layout, and greedy picks flip at
    # near-ties. Needs flash attention off and an F32 KV cache, which the engine does not
    # expose yet.


@pytest.fixture(scope="module")
def r1_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The same architecture named as R1: the built-in R1 template opens `<think>`."""
    path = write_tiny_deepseek(
        tmp_path_factory.mktemp("r1") / "tiny-deepseek-r1.gguf", general_name="Tiny DeepSeek R1"
    )
    live = _start(path, batch_invariant=False)
    yield live
    live.stop()


def test_r1_reasoning_goes_to_reasoning_content(r1_server: LiveServer) -> None:
    """The prompt ends inside `<think>`; a random model never closes it, so everything it
    writes is reasoning — streamed and not streamed alike — and `content` stays empty."""
    chat = r1_server.app.state.chat
    assert chat.renderer.template_name == "deepseek-r1"
    assert chat.reasoning
    assert chat.renderer.starts_in_reasoning
    with openai.OpenAI(
        base_url=r1_server.base_url + "/v1", api_key=r1_server.api_key, max_retries=0
    ) as client:
        common: dict[str, object] = {
            "model": "tiny-deepseek-r1",
            "messages": [{"role": "user", "content": "Think first."}],
            "max_tokens": 12,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        response = client.chat.completions.create(**common)  # type: ignore[call-overload]
        message = response.choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning
        assert not message.content
        stream = client.chat.completions.create(stream=True, **common)  # type: ignore[call-overload]
        streamed = "".join(
            (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            for chunk in stream
            if chunk.choices
        )
        assert streamed == reasoning
