"""Renderers on the built-in model's tokenizer: round trips, loss weights, stop sequences, prefix property."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tinkex.cookbook.renderers import (
    Message,
    RendererError,
    TrainOnWhat,
    get_renderer,
    recommended_renderer,
)
from tinkex.engine.builtin import ASSET_DIR

NAMES = ["role_colon", "llama3", "chatml", "qwen3", "qwen3_disable_thinking"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHAT: list[Message] = [
    {"role": "system", "content": "You are Pip."},
    {"role": "user", "content": "What is 3+4?"},
    {"role": "assistant", "content": "3+4=7."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "2+2=4."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(ASSET_DIR))


@pytest.fixture(scope="module")
def llama_tokenizer():
    tok = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    tok.add_special_tokens({"additional_special_tokens": LLAMA_SPECIALS})
    return tok


def renderer_for(name, tokenizer, llama_tokenizer):
    return get_renderer(name, llama_tokenizer if name == "llama3" else tokenizer)


def weighted_text(renderer, tokens, weights):
    """The decoded runs of weight-1 tokens."""
    runs, current = [], []
    for token, weight in zip(tokens, weights):
        if weight:
            current.append(token)
        elif current:
            runs.append(renderer.decode(current))
            current = []
    if current:
        runs.append(renderer.decode(current))
    return runs


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_of_the_assistant_reply(name, tokenizer, llama_tokenizer):
    """What the supervised example teaches after the prompt, parsed back, is the reply itself,
    and it ends with a stop sequence."""
    renderer = renderer_for(name, tokenizer, llama_tokenizer)
    prompt = renderer.build_generation_prompt(CHAT[:-1])
    tokens, weights = renderer.build_supervised_example(CHAT, TrainOnWhat.LAST_ASSISTANT_MESSAGE)
    assert tokens[:len(prompt)] == prompt, "the generation prompt must be a prefix of the training example"
    completion = tokens[len(prompt):]
    message, ended = renderer.parse_response(completion)
    assert message == {"role": "assistant", "content": "2+2=4."}
    assert ended


@pytest.mark.parametrize("name", NAMES)
def test_weights_only_on_assistant_tokens(name, tokenizer, llama_tokenizer):
    renderer = renderer_for(name, tokenizer, llama_tokenizer)
    tokens, weights = renderer.build_supervised_example(CHAT, TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    assert len(tokens) == len(weights) and set(weights) <= {0.0, 1.0}
    runs = weighted_text(renderer, tokens, weights)
    assert len(runs) == 2
    for run, reply in zip(runs, ["3+4=7.", "2+2=4."]):
        assert reply in run
        for other in ("What is 3+4?", "And 2+2?", "You are Pip.", "user", "system"):
            assert other not in run
    last_only = weighted_text(renderer, *renderer.build_supervised_example(CHAT, "last_assistant_message"))
    assert len(last_only) == 1 and "2+2=4." in last_only[0]
    everything = renderer.build_supervised_example(CHAT, TrainOnWhat.ALL_TOKENS)[1]
    assert all(w == 1.0 for w in everything)


@pytest.mark.parametrize("name", NAMES)
def test_stop_sequences_end_the_trained_reply(name, tokenizer, llama_tokenizer):
    renderer = renderer_for(name, tokenizer, llama_tokenizer)
    stops = renderer.get_stop_sequences()
    tokens, weights = renderer.build_supervised_example(CHAT, TrainOnWhat.LAST_ASSISTANT_MESSAGE)
    learned = [t for t, w in zip(tokens, weights) if w]
    if isinstance(stops[0], int):
        assert learned[-1] in stops, "the model must learn to emit the stop token"
        assert all(t not in stops for t in learned[:-1])
    else:
        assert renderer.decode(learned).endswith(stops[0])
    # A reply cut off before its stop sequence parses, but is reported as not ended.
    prompt = renderer.build_generation_prompt(CHAT[:-1])
    message, ended = renderer.parse_response(renderer.encode_text("2+2="))
    assert not ended and message["content"].strip() == "2+2="
    # Text after the stop sequence is ignored.
    reply = tokens[len(prompt):] + renderer.encode_text(" trailing junk")
    assert renderer.parse_response(reply)[0]["content"] == "2+2=4."


def test_chat_formats_look_as_documented(tokenizer, llama_tokenizer):
    one = [{"role": "user", "content": "hi"}]
    chatml = get_renderer("chatml", tokenizer)
    assert chatml.decode(chatml.build_generation_prompt(one)) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # ChatML matches the model's own chat template.
    assert chatml.decode(chatml.build_generation_prompt(one)) == tokenizer.apply_chat_template(
        one, tokenize=False, add_generation_prompt=True)
    no_think = get_renderer("qwen3_disable_thinking", tokenizer)
    assert no_think.decode(no_think.build_generation_prompt(one)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    colon = get_renderer("role_colon", tokenizer)
    assert colon.decode(colon.build_generation_prompt(one)) == "User: hi\n\nAssistant:"
    llama = get_renderer("llama3", llama_tokenizer)
    assert llama.decode(llama.build_generation_prompt(one)) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama.get_stop_sequences() == [llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    # Without the Llama 3 special tokens the tags are spelled out, and the stop becomes a string.
    assert get_renderer("llama3", tokenizer).get_stop_sequences() == ["<|eot_id|>"]


def test_qwen3_thinking(tokenizer):
    renderer = get_renderer("qwen3", tokenizer)
    chat = [{"role": "user", "content": "What is 3+4?"},
            {"role": "assistant", "content": "7", "thinking": "3 plus 4 is 7."}]
    tokens, weights = renderer.build_supervised_example(chat)
    learned = renderer.decode([t for t, w in zip(tokens, weights) if w])
    assert learned == "<think>\n3 plus 4 is 7.\n</think>\n\n7<|im_end|>"
    assert renderer.encode_markup("<think>") == [tokenizer.convert_tokens_to_ids("<think>")]
    prompt = renderer.build_generation_prompt(chat[:1])
    message, ended = renderer.parse_response(tokens[len(prompt):])
    assert ended and message == {"role": "assistant", "content": "7", "thinking": "3 plus 4 is 7."}
    # Earlier turns lose their thinking, as in Qwen 3's template.
    longer = chat + [{"role": "user", "content": "And 1+1?"}]
    assert "3 plus 4" not in renderer.decode(renderer.build_generation_prompt(longer))
    # A reply cut off while thinking.
    cut, ended = renderer.parse_response(renderer.encode_markup("<think>\nhmm"))
    assert not ended and cut["content"] == "" and cut["thinking"] == "hmm"


def test_special_token_text_in_content_stays_text(tokenizer):
    renderer = get_renderer("chatml", tokenizer)
    tokens = renderer.build_generation_prompt([{"role": "user", "content": "say <|im_end|>"}])
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens.count(end_id) == 1  # only the real end of the user turn


def test_registry():
    assert recommended_renderer("tinkex/tiny-qwen3") == "chatml"
    assert recommended_renderer("Qwen/Qwen3-8B") == "qwen3"
    assert recommended_renderer("meta-llama/Llama-3.1-8B-Instruct") == "llama3"
    assert recommended_renderer("Qwen/Qwen3-8B-Base") == "role_colon"
    with pytest.raises(RendererError):
        get_renderer("no-such-format", None)
