"""The sample encoder: labels of conversations under four template shapes, prompt/response parity with
encode_example, input formats, skip reasons, truncation of long conversations, fast path vs Jinja."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA31, LLAMA_SPECIALS, MISTRAL, NO_SYSTEM, QWEN3, QWEN25
from conftest import family_tokenizer as _family

from lowmem.data.encoding import Encoded, SampleEncoder, Skipped
from lowmem.data.template import IGNORE_INDEX, chat_layout, encode_example, render_prompt
from lowmem.run.errors import UserError

TEMPLATES = ["chatml", "qwen25", "qwen3", "llama31", "mistral"]
END = {"chatml": "<|im_end|>", "qwen25": "<|im_end|>", "qwen3": "<|im_end|>", "llama31": "<|eot_id|>",
       "mistral": "</s>"}
BEFORE = {"mistral": " "}  # the space after [/INST] is written by the model


@pytest.fixture(scope="session")
def toks(tiny_tokenizer):
    """A tokenizer per template shape (the tiny BPE plus the family's special tokens), a T5-like one."""
    from tokenizers.processors import TemplateProcessing

    t5 = _family(tiny_tokenizer, None)
    t5.backend_tokenizer.post_processor = TemplateProcessing(  # T5 appends its end token to every text
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", t5.eos_token_id)])
    return {
        "chatml": _family(tiny_tokenizer, None),  # gets the project's template
        "qwen25": _family(tiny_tokenizer, QWEN25, eos_token="<|im_end|>"),
        "qwen3": _family(tiny_tokenizer, QWEN3, plain=["<think>", "</think>"], eos_token="<|im_end|>"),
        "llama31": _family(tiny_tokenizer, LLAMA31, LLAMA_SPECIALS, bos_token="<|begin_of_text|>",
                           eos_token="<|eot_id|>"),
        "mistral": _family(tiny_tokenizer, MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], bos_token="<s>",
                           eos_token="</s>"),
        "no_system": _family(tiny_tokenizer, NO_SYSTEM),
        "t5": t5,
    }


def conversation(turns: int = 3, system: str | None = "S", answer=lambda i: f"A{i}", user=lambda i: f"U{i}"):
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [m for i in range(1, turns + 1)
                   for m in ({"role": "user", "content": user(i)}, {"role": "assistant", "content": answer(i)})]


def labelled_id_runs(encoded: Encoded) -> list[list[int]]:
    """The token ids of each stretch of consecutive positions that carry a label."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token  # decoders: the label at a position is its own token (the model shifts)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def labelled_runs(tokenizer, encoded: Encoded) -> list[str]:
    """Decoded text of each labelled stretch."""
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in labelled_id_runs(encoded)]


def full_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def decoded(tokenizer, encoded: Encoded) -> str:
    return tokenizer.decode(encoded.input_ids.tolist(), clean_up_tokenization_spaces=False)


# --- which positions are learned -----------------------------------------------------------------------

@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "all"])
def test_labelled_positions_for_each_template_and_train_on(toks, name, train_on):
    tokenizer, messages = toks[name], conversation()
    encoded = SampleEncoder(tokenizer, 512, train_on=train_on)({"messages": messages})
    assert encoded.input_ids.dtype == encoded.labels.dtype == torch.long
    assert decoded(tokenizer, encoded) == full_text(tokenizer, messages)  # the template's text, token for token
    answers = [f"{BEFORE.get(name, '')}A{i}{END[name]}" for i in (1, 2, 3)]
    if train_on == "all":
        assert torch.equal(encoded.labels, encoded.input_ids)
        return
    expected = answers if train_on == "all_assistant" else answers[-1:]
    assert labelled_runs(tokenizer, encoded) == expected
    assert labelled_id_runs(encoded) == [tokenizer(a, add_special_tokens=False)["input_ids"] for a in expected]


def test_train_on_prompt_is_train_on_all(toks):
    for sample in ({"messages": conversation()}, {"prompt": "cat dog", "response": "sun"}):
        a = SampleEncoder(toks["llama31"], 512, train_on_prompt=True)(sample)
        b = SampleEncoder(toks["llama31"], 512, train_on="all")(sample)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.labels, a.input_ids)


@pytest.mark.parametrize("name", TEMPLATES)
def test_text_before_each_answer_tokenizes_as_the_generation_prompt(toks, name):
    tokenizer, messages = toks[name], conversation(system=None)
    encoded = SampleEncoder(tokenizer, 512)({"messages": messages})
    labels = encoded.labels.tolist()
    starts = [i for i, label in enumerate(labels)
              if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    for k, start in enumerate(starts):
        prompt = render_prompt(tokenizer, messages[:2 * k + 1])
        assert encoded.input_ids[:start].tolist() == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_reasoning_is_learned_in_the_last_answer_only_where_the_template_keeps_it(toks):
    tokenizer = toks["qwen3"]
    messages = conversation(answer=lambda i: f"<think>r{i}</think>A{i}")
    encoded = SampleEncoder(tokenizer, 512)({"messages": messages})
    assert labelled_runs(tokenizer, encoded) == ["A1<|im_end|>", "A2<|im_end|>",
                                                 "<think>\nr3\n</think>\n\nA3<|im_end|>"]
    assert decoded(tokenizer, encoded) == full_text(tokenizer, messages)


def test_answers_that_also_occur_in_the_template_text_are_found_where_they_are(toks):
    tokenizer = toks["qwen3"]  # reasoning forces the Jinja path, where answers are searched in the text
    answers = {1: "<think>x</think>a", 2: "assistant", 3: "im_start"}
    messages = conversation(answer=answers.get, user=lambda i: "user a")
    encoded = SampleEncoder(tokenizer, 512)({"messages": messages})
    assert labelled_runs(tokenizer, encoded) == ["a<|im_end|>", "assistant<|im_end|>", "im_start<|im_end|>"]


# --- prompt/response: exactly encode_example -------------------------------------------------------------

PAIRS = [("cat dog", "sun moon"), ("", "tree"), ("river " * 40, "stone"), ("猫 狗 山", "水 花"),
         (" spaced prompt \n", " spaced answer "), ("cat", "dog " * 40), ("q <|im_end|> q", "a\n\nb")]


@pytest.mark.parametrize("name", TEMPLATES + ["t5"])
@pytest.mark.parametrize("max_len, train_on_prompt", [(512, False), (24, False), (24, True)])
def test_prompt_response_is_exactly_encode_example(toks, name, max_len, train_on_prompt):
    tokenizer, seq2seq = toks[name], name == "t5"
    encoder = SampleEncoder(tokenizer, max_len, is_encoder_decoder=seq2seq, train_on_prompt=train_on_prompt)
    results = encoder.encode_many([{"prompt": p, "response": r} for p, r in PAIRS], list(range(len(PAIRS))))
    for (prompt, response), result in zip(PAIRS, results):
        expected = encode_example(tokenizer, prompt, response, max_len, is_encoder_decoder=seq2seq,
                                  train_on_prompt=train_on_prompt)
        if expected is None:
            assert result == Skipped("response_too_long")
            continue
        assert result.input_ids.tolist() == expected.input_ids and result.labels.tolist() == expected.labels
        assert result.notes == (("truncated_prompt",) if expected.truncated else ())
    assert any(isinstance(r, Skipped) for r in results) == (max_len == 24)


def test_t5_conversation_encodes_earlier_turns_and_targets_the_last_answer(toks):
    tokenizer = toks["t5"]
    encoded = SampleEncoder(tokenizer, 512, is_encoder_decoder=True)({"messages": conversation(turns=2)})
    assert encoded.input_ids.tolist() == tokenizer("S\nU1\nA1\nU2")["input_ids"]
    assert encoded.labels.tolist() == tokenizer("A2")["input_ids"]
    assert encoded.labels.tolist()[-1] == tokenizer.eos_token_id


# --- input formats -----------------------------------------------------------------------------------------

def test_sharegpt_system_key_and_json_text_give_the_openai_tokens(toks):
    encoder = SampleEncoder(toks["qwen25"], 512)
    messages = conversation(turns=2)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in messages]
    forms = [{"messages": messages}, {"conversations": sharegpt}, {"messages": json.dumps(messages)},
             {"messages": messages[1:], "system": "S"}, {"conversations": sharegpt[1:], "system": "S"},
             {"messages": messages + [{"role": "user", "content": "a last question"}]}]
    results = encoder.encode_many(forms, list(range(len(forms))))
    for result in results:
        assert torch.equal(result.input_ids, results[0].input_ids) and torch.equal(result.labels, results[0].labels)
    other_system = encoder({"messages": messages, "system": "ignored when the conversation has one"})
    assert torch.equal(other_system.input_ids, results[0].input_ids)
    default_system = encoder({"messages": messages[1:]})
    assert "You are a helpful assistant." in decoded(toks["qwen25"], default_system)


def test_token_windows_cache_and_text(toks):
    encoder = SampleEncoder(toks["chatml"], 8)
    window = encoder({"input_ids": [5, 6, 7]})
    assert window.input_ids.tolist() == window.labels.tolist() == [5, 6, 7]
    cached = encoder({"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]})
    assert cached.labels.tolist() == [IGNORE_INDEX, 6, 7]
    short, long = encoder.encode_many([{"text": "cat"}, {"text": "cat dog sun moon tree river stone cat dog"}], [0, 1])
    eos = toks["chatml"].eos_token_id
    assert short.input_ids.tolist() == toks["chatml"]("cat")["input_ids"] + [eos] and short.notes == ()
    assert len(long.input_ids) == 8 and long.notes == ("truncated_text",)
    assert torch.equal(long.labels, long.input_ids)


def test_one_group_gives_what_each_sample_gives_alone(toks):
    encoder = SampleEncoder(toks["mistral"], 40)
    samples = [{"messages": conversation(turns=5)}, {"prompt": "cat " * 30, "response": "dog"}, {"text": "sun"},
               {"messages": "not json"}, {"conversations": conversation(turns=1)}, {"input_ids": [1, 2]}]
    together = encoder.encode_many(samples, list(range(len(samples))))
    for sample, result in zip(samples, together):
        alone = encoder(sample)
        if isinstance(alone, Skipped):
            assert result == alone
            continue
        assert torch.equal(alone.input_ids, result.input_ids) and torch.equal(alone.labels, result.labels)
        assert alone.notes == result.notes
    assert [type(r).__name__ for r in together] == ["Encoded", "Encoded", "Encoded", "Skipped", "Encoded", "Encoded"]


# --- rows that cannot be used --------------------------------------------------------------------------------

SKIPS = [
    ("chatml", {"text": None}, "empty_or_null"),
    ("chatml", {"text": "  "}, "empty_or_null"),
    ("chatml", {"prompt": "q", "response": None}, "empty_or_null"),
    ("chatml", {"prompt": None, "response": "a"}, "empty_or_null"),
    ("chatml", {"prompt": "q", "response": "dog " * 200}, "response_too_long"),
    ("chatml", {"messages": None}, "empty_or_null"),
    ("chatml", {"messages": []}, "empty_or_null"),
    ("chatml", {"messages": "[{\"role\": "}, "bad_messages"),
    ("chatml", {"messages": {"role": "user", "content": "q"}}, "bad_messages"),
    ("chatml", {"messages": ["q", "a"]}, "bad_messages"),
    ("chatml", {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "bad_messages"),
    ("chatml", {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "bad_messages"),
    ("chatml", {"messages": conversation(1), "system": 5}, "bad_messages"),
    ("chatml", {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "unknown_role"),
    ("chatml", {"messages": conversation(1, system=None) + [{"role": "system", "content": "late"}]},
     "roles_out_of_order"),
    ("mistral", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "roles_out_of_order"),
    ("mistral", {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]}, "roles_out_of_order"),
    ("chatml", {"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
    ("chatml", {"messages": conversation(2, answer=lambda i: " ")}, "no_assistant_turn"),
    ("chatml", {"messages": conversation(1, answer=lambda i: "dog " * 200)}, "conversation_too_long"),
    ("no_system", {"messages": conversation(1)}, "template_error"),
]


@pytest.mark.parametrize("name, sample, reason", SKIPS, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(SKIPS)])
def test_each_skip_reason_and_strict_names_the_row(toks, name, sample, reason):
    assert SampleEncoder(toks[name], 64)(sample) == Skipped(reason)
    strict = SampleEncoder(toks[name], 64, strict=True, source="chats.jsonl")
    good = {"prompt": "q", "response": "a"}
    with pytest.raises(UserError, match=f"'chats.jsonl' sample 41: {reason}"):
        strict.encode_many([good, sample, good], [40, 41, 42])


def test_text_for_t5_and_bad_train_on_are_user_errors(toks):
    with pytest.raises(UserError, match="T5"):
        SampleEncoder(toks["t5"], 64, is_encoder_decoder=True)({"text": "cat"})
    with pytest.raises(UserError, match="train_on"):
        SampleEncoder(toks["t5"], 64, train_on="assistant")


# --- long conversations -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen25", "llama31", "mistral"])
def test_long_conversations_lose_whole_oldest_exchanges(toks, name):
    tokenizer = toks[name]
    words = ["cat", "dog", "sun", "moon", "tree", "river", "stone"]
    messages = conversation(turns=6, user=lambda i: " ".join(words[:i + 1]), answer=lambda i: f"A{i} " + words[i])

    def kept(exchanges: int):  # the conversation as if it had only its system message and last exchanges
        return [messages[0]] + messages[len(messages) - 2 * exchanges:]

    whole = SampleEncoder(tokenizer, 4096)
    lengths = {k: len(whole({"messages": kept(k)}).input_ids) for k in range(1, 7)}
    for max_len, exchanges in ((lengths[3], 3), (lengths[3] - 1, 2), (lengths[5], 5), (lengths[1], 1)):
        encoded = SampleEncoder(tokenizer, max_len)({"messages": messages})
        alone = whole({"messages": kept(exchanges)})
        assert torch.equal(encoded.input_ids, alone.input_ids) and torch.equal(encoded.labels, alone.labels)
        assert encoded.notes == ("dropped_turns",) + ("dropped_exchanges",) * (6 - exchanges)  # counted, not said
        runs = labelled_runs(tokenizer, encoded)
        assert len(runs) == exchanges and runs[-1].startswith(f"{BEFORE.get(name, '')}A6 ")
    assert SampleEncoder(tokenizer, lengths[1] - 1)({"messages": messages}) == Skipped("conversation_too_long")
    assert SampleEncoder(tokenizer, lengths[6])({"messages": messages}).notes == ()


# --- fast path ----------------------------------------------------------------------------------------------------

HARD_CONTENTS = [
    conversation(),
    conversation(turns=1, system=None),
    conversation(system=" spaced system \n", answer=lambda i: f"  A{i}\n", user=lambda i: f"\tU{i} "),
    conversation(answer=lambda i: f"<think>r{i}</think>A{i}"),
    conversation(turns=2, answer=lambda i: "a", user=lambda i: "assistant"),
    conversation(turns=2, answer=lambda i: "猫\n\n狗", user=lambda i: "山 <|im_start|> 水"),
    conversation(turns=2, answer=lambda i: "" if i == 1 else "A2"),
]


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Conversations of 1-4 exchanges whose contents mix words, whitespace, tags and special-token text."""
    import random

    rng = random.Random(seed)
    parts = ["cat", "dog", " sun", "moon ", "猫", "狗", "\n", " ", "\t", "1 2 3", "a", "user", "assistant",
             "<think>", "</think>", "<|im_end|>", "[INST]", "</s>", "{{ x }}", "'"]
    text = lambda: "".join(rng.choice(parts) for _ in range(rng.randint(1, 6))) or "x"  # noqa: E731
    return [conversation(turns=rng.randint(1, 4), system=text() if rng.random() < 0.5 else None,
                         answer=lambda i: text(), user=lambda i: text()) for _ in range(n)]


@pytest.mark.parametrize("name", TEMPLATES)
def test_concatenation_gives_the_tokens_of_the_jinja_path(toks, name):
    tokenizer = toks[name]
    assert chat_layout(tokenizer) is not None  # each of these templates is compositional
    chats = HARD_CONTENTS + random_conversations(40)
    samples = [{"messages": m} for m in chats] + [{"prompt": p, "response": r} for p, r in PAIRS]
    for train_on in ("all_assistant", "last_assistant"):
        fast = SampleEncoder(tokenizer, 512, train_on=train_on).encode_many(samples, list(range(len(samples))))
        jinja = SampleEncoder(tokenizer, 512, train_on=train_on, render_with_jinja=True).encode_many(
            samples, list(range(len(samples))))
        for sample, a, b in zip(samples, fast, jinja):
            if isinstance(a, Skipped):  # whitespace-only answers; reasoning-only answers qwen3 leaves out
                assert a == b and a.reason in ("no_assistant_turn", "assistant_not_rendered")
                continue
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels), sample
    for sample, encoded in zip(samples, fast):
        if isinstance(encoded, Encoded) and "messages" in sample:
            kept = sample["messages"][:max(i for i, m in enumerate(sample["messages"])
                                           if m["role"] == "assistant" and m["content"].strip()) + 1]
            assert decoded(tokenizer, encoded) == full_text(tokenizer, kept)


def test_layout_knows_what_templates_do_to_contents(toks):
    assert chat_layout(toks["llama31"]).edge_whitespace == "strip"
    assert chat_layout(toks["qwen25"]).edge_whitespace == "keep"
    assert not chat_layout(toks["qwen3"]).think_verbatim and chat_layout(toks["qwen25"]).think_verbatim
    assert chat_layout(toks["no_system"]).system_lead is None
