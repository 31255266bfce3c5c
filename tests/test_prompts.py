"""Prompt diversification (P4): pairwise covering arrays, weighted prompts, the BPE tokenizer, LLM options."""
import itertools

import pytest
import torch

from edgedistill.data.prompts import (
    PromptPlan,
    covering_array,
    encode_weighted,
    llm_options,
    parse_options,
    parse_weighted,
    plain_text,
    uncovered_pairs,
    weighted_tokens,
)


def test_covering_array_holds_every_pair_in_far_fewer_rows_than_the_product():
    sizes = [15, 15, 15, 15]  # P4: four dimensions of 15 options, 265 prompts per class instead of 50,625
    rows = covering_array(sizes, seed=0)
    assert uncovered_pairs(rows, sizes) == []
    assert 225 <= len(rows) <= 280  # 15 * 15 is the lower bound
    assert rows == covering_array(sizes, seed=0)  # every shard computes the same array


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2, 2, 2, 2], [3, 5, 2, 4], [6, 1, 3]])
def test_covering_array_mixed_sizes(sizes):
    rows = covering_array(sizes, seed=3)
    assert uncovered_pairs(rows, sizes) == []
    assert all(0 <= v < n for r in rows for v, n in zip(r, sizes))
    assert len(rows) <= len(list(itertools.product(*map(range, sizes))))


def test_uncovered_pairs_notices_a_missing_pair():
    assert uncovered_pairs([(0, 0), (1, 1)], [2, 2]) == [((0, 0), (1, 1)), ((0, 1), (1, 0))]
    rows = [r for r in covering_array([3, 3, 3]) if r[:2] != (0, 0)]
    assert ((0, 0), (1, 0)) in uncovered_pairs(rows, [3, 3, 3])


def test_prompt_plan_covers_every_pair_of_option_values():
    dims = {"place": ["a sofa", "a garden", "a beach"], "time": ["10:00 AM", "at night"],
            "angle": ["from above", "close-up", "side view"]}
    templates = ["a photo of a {c} ({superclass})", "a picture of a {c}"]
    plan = PromptPlan(templates, dims, {"class": 1.5, "superclass": 1.2}, superclass="pet")
    prompts = [plan.prompt("keeshond", i) for i in range(len(plan))]
    assert len(plan) < len(templates) * 3 * 2 * 3
    terms = {"template": ["a photo of a (keeshond:1.5) ((pet:1.2))", "a picture of a (keeshond:1.5)"], **dims}
    for (d1, opts1), (d2, opts2) in itertools.combinations(terms.items(), 2):
        for a, b in itertools.product(opts1, opts2):
            assert any(a in p and b in p for p in prompts), f"no prompt holds {d1}={a!r} with {d2}={b!r}"
    assert prompts[0].startswith(("a photo of a (keeshond:1.5) ((pet:1.2)), ", "a picture of a (keeshond:1.5), "))
    assert plan.prompt("keeshond", len(plan)) == prompts[0]  # more images than rows: the array repeats


def test_parse_weighted_keeps_ordinary_brackets_as_text():
    parts = parse_weighted("a photo of a (keeshond:1.5) ((dog:1.2)), (sitting)")
    assert parts == [("a photo of a ", 1.0), ("keeshond", 1.5), (" (", 1.0), ("dog", 1.2), ("), (sitting)", 1.0)]
    assert plain_text("a (cat:1.5) on (a mat:0.8)") == "a cat on a mat"


@pytest.fixture(scope="module")
def tiny_pipe():
    pytest.importorskip("diffusers")
    from edgedistill.data import tiny_sd

    return tiny_sd.text_pipeline()


def test_tokenizer_from_open_clip_vocab_matches_open_clip(tiny_pipe):
    import open_clip

    text = "A photo of a keeshond (Dog, pet), a cozy living room, 10:00 AM"
    ids = tiny_pipe.tokenizer(text).input_ids
    assert ids == open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()[:len(ids)]  # SD pads with EOS, not 0
    assert ids[-1] == 49407 and len(ids) > 20
    assert tiny_pipe.tokenizer.model_max_length == 77


def test_weighted_tokens_equal_plain_tokenization(tiny_pipe):
    tok = tiny_pipe.tokenizer
    ids, w = weighted_tokens(tok, "a photo of a (keeshond:1.5), (dog:1.2), on a sofa")
    plain = tok("a photo of a keeshond, dog, on a sofa", padding="max_length", max_length=77).input_ids
    assert ids == plain and len(w) == 77
    assert [w[i] for i in range(len(w)) if w[i] != 1.0] == [1.5] * 3 + [1.2]  # keeshond is three BPE tokens


def test_encode_weighted_matches_the_pipeline_and_weights_only_their_tokens(tiny_pipe):
    prompts = ["a photo of a cat on a sofa", "a photo of a (cat:1.5) on a sofa"]
    z, pooled = encode_weighted(tiny_pipe.tokenizer, tiny_pipe.text_encoder, prompts)
    ref, _ = tiny_pipe.encode_prompt(prompts[:1], "cpu", 1, False)
    assert pooled is None and z.shape == (2, 77, 32)
    torch.testing.assert_close(z[0], ref[0], atol=1e-5, rtol=1e-5)
    changed = (z[1] - z[0]).abs().amax(dim=-1) > 1e-5
    assert changed.nonzero().flatten().tolist() == [5]  # BOS a photo of a [cat]: only the weighted token moves


CHATTY_ANSWERS = {
    "numbered and bulleted, with a preamble": (
        "Here you go:\n1. A cozy living room\n2) a garden\n- A beach.\n* a garden\n\n3. a kitchen",
        ["A cozy living room", "a garden", "A beach", "a kitchen"]),
    "quoted items between a preamble and an epilogue": (
        "Sure! Here are 10 options:\n\n1. \"a sunny beach\"\n2. **a snowy mountain**\n3. 'a city street at night'.\n"
        "(4) \u201ca forest\u201d,\n\nLet me know if you need more.",
        ["a sunny beach", "a snowy mountain", "a city street at night", "a forest"]),
    "plain lines, as the prompt asks, but with chat around them": (
        "Sure! Here are some options:\na sofa\n\"a garden\"\nunder a tree\n10:00 AM\nI hope this helps!\n"
        "Let me know if you need more.",
        ["a sofa", "a garden", "under a tree", "10:00 AM"]),
}


@pytest.mark.parametrize("case", CHATTY_ANSWERS)
def test_llm_answer_parses_to_exactly_its_options(case):
    answer, options = CHATTY_ANSWERS[case]
    assert parse_options(answer, 10) == options
    assert llm_options(lambda prompt: answer, "place", "pet", 3) == options[:3]


def test_llm_answer_without_two_options_is_refused():
    with pytest.raises(ValueError, match="synthetic.dimensions"):
        llm_options(lambda prompt: "no", "place", "pet", 15)
    with pytest.raises(ValueError, match="synthetic.dimensions"):  # chat alone is no option
        llm_options(lambda prompt: "Sure! Here are 15 options:\nLet me know if you need more.", "place", "pet", 15)


def test_empty_dimensions_are_filled_once_by_the_llm(tmp_path):
    from edgedistill.data.generation import resolve_dimensions
    from edgedistill.recipe import SynthCfg

    asked = []

    def fake_llm(prompt):
        asked.append(prompt)
        return "\n".join(f"{len(asked)}-{k}" for k in range(5))

    cfg = SynthCfg(dimensions={"place": [], "time": ["noon", "night"]}, llm="some-local-llm", llm_options=4)
    dims = resolve_dimensions(cfg, "pet", tmp_path, fake_llm)
    assert dims == {"place": ["1-0", "1-1", "1-2", "1-3"], "time": ["noon", "night"]}
    assert "place" in asked[0] and "pet" in asked[0]
    assert resolve_dimensions(cfg, "pet", tmp_path, fake_llm) == dims and len(asked) == 1  # read from options.json


def test_sdxl_conditioning_matches_the_pipeline_encoding():
    from edgedistill.data import tiny_sd
    from edgedistill.data.generation import Job
    from edgedistill.data.generators import GENERATORS, condition, resolve_settings
    from edgedistill.recipe import SynthCfg

    pipe = tiny_sd.sdxl_pipeline()
    settings = resolve_settings(SynthCfg(generator="tiny-sdxl"))
    jobs = [Job("cat", 0, 0, 0, "a photo of a cat on a sofa")]
    kw = condition(pipe, GENERATORS.get("tiny-sdxl"), settings, jobs)
    ref, _, pooled, _ = pipe.encode_prompt(jobs[0].prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(kw["prompt_embeds"], ref, atol=1e-5, rtol=1e-5)  # both encoders' penultimate layers
    torch.testing.assert_close(kw["pooled_prompt_embeds"], pooled, atol=1e-5, rtol=1e-5)
