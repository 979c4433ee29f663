"""The llama-cpp-python engine in-process on the real SmolLM2 model."""

from contextlib import aclosing

import pytest

from rbee_p2p.config import default_model_path
from rbee_p2p.engines.base import Completion, TextRequest
from rbee_p2p.engines.llama import BATCH_TOKENS, LlamaEngine, LlamaSettings
from rbee_p2p.errors import InvalidRequest

pytestmark = pytest.mark.e2e
STORY = [{"role": "user", "content": "Tell me a very long story about bees."}]


@pytest.fixture
async def engine():
    engine = await LlamaEngine.load("smollm2", default_model_path(), bytes(32),
                                    LlamaSettings(context=1024))
    yield engine
    await engine.aclose()


async def test_cancel_stops_generation_within_one_token(engine):
    prepared = engine.prepare(TextRequest(max_tokens=500, messages=STORY))
    completion = Completion()
    batches = 0
    async with aclosing(engine.stream(prepared, completion)) as stream:
        async for _ in stream:
            batches += 1
            if batches == 3:
                break
    # aclose() returned: the model thread has stopped
    assert completion.finish_reason == "cancelled"
    assert completion.tokens_at_cancel is not None
    assert completion.completion_tokens - completion.tokens_at_cancel <= 1
    assert completion.completion_tokens < 100


async def test_first_piece_alone_then_batches(engine):
    prepared = engine.prepare(TextRequest(max_tokens=40, temperature=0, messages=STORY))
    completion = Completion()
    sizes = [len(b) async for b in engine.stream(prepared, completion)]
    # the first piece goes alone; then up to BATCH_TOKENS per hand-over (fewer when tokens
    # come slower than BATCH_SECONDS, e.g. on a loaded machine)
    assert sizes[0] == 1 and max(sizes) <= BATCH_TOKENS
    assert completion.completion_tokens == 40 and completion.finish_reason == "length"


async def test_stop_strings_are_cut_and_not_emitted(engine):
    request = TextRequest(max_tokens=40, temperature=0, prompt="1, 2, 3, 4, 5, 6,", stop=(" 9",))
    completion = Completion()
    text = "".join([p async for b in engine.stream(engine.prepare(request), completion)
                    for p in b])
    assert " 9" not in text and "8" in text and completion.finish_reason == "stop"


async def test_context_overflow_is_refused_before_running(engine):
    with pytest.raises(InvalidRequest, match="maximum context length is 1024"):
        engine.prepare(TextRequest(max_tokens=1000, messages=STORY))


async def test_engine_keeps_serving_after_a_cancel(engine):
    prepared = engine.prepare(TextRequest(max_tokens=200, messages=STORY))
    async with aclosing(engine.stream(prepared, Completion())) as stream:
        async for _ in stream:
            break
    completion = Completion()
    async for _ in engine.stream(engine.prepare(TextRequest(max_tokens=5, prompt="Hi")),
                                 completion):
        pass
    assert completion.completion_tokens == 5
