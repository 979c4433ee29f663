import pytest

from rbee_p2p.api.schemas import Limits, parse_chat, parse_completion, parse_embeddings, parse_json
from rbee_p2p.errors import InvalidRequest

L = Limits(max_tokens=100, default_max_tokens=10)
MSG = [{"role": "user", "content": "hi"}]


def chat(**body):
    return parse_chat({"model": "m", "messages": MSG, **body}, L)


def test_chat_defaults_and_fields():
    call = chat(max_tokens=5, temperature=0.2, top_p=0.9, seed=3, stop="x",
                presence_penalty=1, frequency_penalty=-1, stream=True,
                stream_options={"include_usage": True}, user="u")
    r = call.request.text
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop) == (5, 0.2, 0.9, 3, ("x",))
    assert (r.presence_penalty, r.frequency_penalty) == (1.0, -1.0)
    assert call.stream and call.include_usage
    assert chat().request.text.max_tokens == 10 and chat().request.text.temperature == 1.0


def test_max_completion_tokens_wins_and_roles_map():
    call = chat(max_completion_tokens=7, max_tokens=9,
                messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": None}, *MSG])
    assert call.request.text.max_tokens == 7
    assert call.request.text.messages[0] == {"role": "system", "content": "ab"}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ({"model": 3}, "model"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 101}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"n": 2}, "n"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"tools": []}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_chat_rejections_name_the_parameter(body, param):
    with pytest.raises(InvalidRequest) as info:
        parse_chat({"model": "m", "messages": MSG, **body}, L)
    assert info.value.param == param


def test_completion_prompt_forms():
    assert parse_completion({"model": "m", "prompt": "a"}, L).request.text.prompt == "a"
    assert parse_completion({"model": "m", "prompt": ["a"]}, L).request.text.prompt == "a"
    assert parse_completion({"model": "m", "prompt": "a"}, L).request.text.max_tokens == 16
    for bad in (["a", "b"], [1, 2], None):
        with pytest.raises(InvalidRequest):
            parse_completion({"model": "m", "prompt": bad}, L)


def test_embeddings_inputs():
    assert parse_embeddings({"model": "m", "input": "a"}, L).request.inputs == ("a",)
    call = parse_embeddings({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}, L)
    assert call.request.inputs == ("a", "b") and call.base64
    for bad in ({"input": []}, {"input": [1]}, {"input": [""]}, {"encoding_format": "hex"},
                {"dimensions": 8}, {"input": ["x"] * 300}):
        with pytest.raises(InvalidRequest):
            parse_embeddings({"model": "m", "input": "a", **bad}, L)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b"\xff", b'"x"'])
def test_bad_json(raw):
    with pytest.raises(InvalidRequest):
        parse_json(raw)
