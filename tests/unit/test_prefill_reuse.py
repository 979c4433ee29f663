"""Which part of the cached prompt a text request reuses (engines/llama.py plan_reuse): a
repeatable (temperature-0) request must be prefilled exactly as on a fresh node."""

from rbee_p2p.engines.llama import PREFILL_CHUNK as C
from rbee_p2p.engines.llama import plan_reuse


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_a_fresh_cache_reuses_nothing_and_records_the_whole_chunks():
    assert plan_reuse([], prompt(2 * C + 5), 0, True) == (0, 2 * C)
    assert plan_reuse([], prompt(2 * C + 5), 0, False) == (0, 2 * C)


def test_a_repeated_prompt_keeps_only_whole_chunks_so_the_tail_is_batched_as_fresh():
    p = prompt(2 * C + 5)
    cached = p + [9999, 9998]  # the prompt and what was generated after it
    assert plan_reuse(cached, p, 2 * C, True) == (2 * C, 2 * C)
    # an unrepeatable request keeps all but the last prompt token (llama-cpp-python's way)
    keep, aligned = plan_reuse(cached, p, 2 * C, False)
    assert keep == len(p) - 1 and aligned == 2 * C


def test_a_prompt_exactly_whole_chunks_long_still_evaluates_its_last_chunk():
    p = prompt(2 * C)
    assert plan_reuse(p, p, 2 * C, True) == (C, 2 * C)


def test_a_short_prompt_is_always_prefilled_from_the_start():
    p = prompt(C - 1)
    assert plan_reuse(p, p, 0, True) == (0, 0)


def test_positions_evaluated_out_of_step_are_not_reused_by_a_repeatable_request():
    p = prompt(3 * C + 7)
    # an unrepeatable request reused 70 tokens of another prompt and evaluated the rest from
    # position 70: only the first chunk still matches a fresh prefill
    keep, aligned = plan_reuse(prompt(70) + [5000] * 50, p, 3 * C, False)
    assert keep == 70 and aligned == C
    # the same prompt again at temperature 0 reuses that one chunk only
    assert plan_reuse(p, p, aligned, True) == (C, 3 * C)


def test_a_divergence_inside_a_chunk_rounds_the_reuse_down():
    a, b = prompt(3 * C), prompt(C + 10) + prompt(2 * C, start=10_000)
    assert plan_reuse(a, b, 3 * C, True) == (C, 3 * C)


def test_on_a_gpu_the_chunks_are_llama_cpps_default_batch():
    from rbee_p2p.engines.llama import PREFILL_CHUNK_GPU, LlamaSettings

    assert LlamaSettings().prefill_chunk == C
    assert LlamaSettings(gpu_layers=-1).prefill_chunk == PREFILL_CHUNK_GPU == 512
    p = prompt(600)
    assert plan_reuse(p, p, 512, True, chunk=512) == (512, 512)
    assert plan_reuse(p, p, 512, True) == (512, 576)  # in 64-token chunks 576 are in step
