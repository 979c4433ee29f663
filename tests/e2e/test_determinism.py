"""A temperature-0 answer does not depend on what the engine ran before: the
same request gives the same text on a fresh node and on a used one, direct and forwarded,
streamed or not.  Real processes, the real SmolLM2 model.

The prompt is one that showed the bug: evaluating a repeated prompt as a cached prefix plus
its last token gave other logits than evaluating it in one batch (engines/llama.py
PREFILL_CHUNK), and "In the realm of winter, ..." became "In the winter, I'm called ..."."""

from __future__ import annotations

import pytest
from nodeproc import NodeProcess, sdk
from test_mesh import knows

pytestmark = pytest.mark.e2e
WINTER = [{"role": "user", "content": "Name some winter and say something about each."}]
MOUNTAINS = [{"role": "user", "content": "Name some mountains and say something about each."}]
LONG = [{"role": "system", "content": "You are a careful assistant. " * 20},
        {"role": "user", "content": "Name some winter and say something about each."}]


@pytest.fixture
def pair(tmp_path):
    """A fresh node B with the model, and A (no model) forwarding to it."""
    b = NodeProcess(tmp_path / "b")
    started = [b]
    try:
        a = NodeProcess(tmp_path / "a", "--no-default-model", "--peer", b.addr)
        started.append(a)
        b.wait_ready()
        a.wait_ready()
        a.wait_for(knows("smollm2", b.peer_id), 30, "B's model at A")
        yield a, b
    finally:
        for node in started:
            node.kill()


def chat(node, messages, stream=False, **sampling):
    """The answer's text (the official client, streamed or not)."""
    client = sdk(node)
    args = dict(model="smollm2", messages=messages, max_tokens=60, **sampling)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **args) if c.choices)
    return client.chat.completions.create(**args).choices[0].message.content


def test_temperature_0_gives_the_same_text_first_or_later_direct_or_forwarded(pair):
    a, b = pair
    first = {name: chat(b, messages, temperature=0)  # B's very first requests
             for name, messages in (("winter", WINTER), ("long", LONG))}
    assert all(first.values())
    for _ in range(2):
        for name, messages in (("winter", WINTER), ("long", LONG)):
            assert chat(b, messages, temperature=0) == first[name]
            assert chat(b, messages, stream=True, temperature=0) == first[name]
            assert chat(a, messages, temperature=0) == first[name]  # forwarded to B
            assert chat(a, messages, stream=True, temperature=0) == first[name]
        chat(b, MOUNTAINS, temperature=0.9)  # other work in between, sharing the template
        chat(b, LONG[:1] + MOUNTAINS, temperature=0.9)  # ... and the long system prompt

