"""Chat templates: ``tokenizer_config.json``'s ``chat_template`` renders, and tokenises, exactly as
transformers' ``apply_chat_template`` does, for several templates and conversations (system
prompts, several turns, the generation prompt on and off); ``--chat-template FILE`` overrides it;
Mixtral folders keep the Mistral formats; the sandbox holds."""

from __future__ import annotations

import json

import pytest
from family_fixtures import CHATML, DEEPSEEK, TULU, write_tokenizer

from mixtral_lite import UserError, load_tokenizer
from mixtral_lite.generation.chat_template import ChatTemplate

TEMPLATES = {"chatml": CHATML, "deepseek": DEEPSEEK, "tulu": TULU}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is a mixture of experts?"}],
    "system-user": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Why route tokens?"},
    ],
    "three-turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a router."},
        {"role": "assistant", "content": "Top-k softmax."},
        {"role": "user", "content": "Another one, with <|im_end|> in the text?"},
    ],
}


def _hf_tokenizer(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(path, TEMPLATES[request.param], bos_token="<|endoftext|>")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return path


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_ids_and_text_equal_apply_chat_template(folder, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = load_tokenizer(folder)
    hf = _hf_tokenizer(folder)
    assert ours.chat_template is not None
    text = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)
    assert ours.chat_template.render(messages, generation_prompt) == text
    assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == list(ids)


def test_special_tokens_in_the_template_are_single_ids(folder):
    ours = load_tokenizer(folder)
    ids = ours.encode_chat(CONVERSATIONS["user"])
    if "<|im_start|>" in ours.chat_template.source:
        assert ours.control_id("<|im_start|>") in ids  # one id, not its characters
    # a user's own text is text: its "<|im_end|>" is not the special token
    user_ids = ours.encode("<|im_end|>", bos=False)
    assert ours.control_id("<|im_end|>") not in user_ids


def test_chat_template_file_overrides(folder, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    ours = load_tokenizer(folder, chat_template=path)
    assert ours.chat_template.render(CONVERSATIONS["user"]) == "[user] What is a mixture of experts?\n"
    config_file = tmp_path / "other_tokenizer_config.json"
    config_file.write_text(json.dumps({"chat_template": TULU}))
    assert load_tokenizer(folder, chat_template=config_file).chat_template.source == TULU


def test_mixtral_folders_keep_the_mistral_formats(tmp_path):
    write_tokenizer(tmp_path, CHATML)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert load_tokenizer(tmp_path).chat_template is None


def test_templates_are_sandboxed_and_errors_are_user_errors(tmp_path):
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(UserError, match="evil"):
        evil.render(CONVERSATIONS["user"])
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}", "strict")
    with pytest.raises(UserError, match="roles must alternate"):
        raising.render(CONVERSATIONS["user"])
    with pytest.raises(UserError, match="not a valid jinja"):
        ChatTemplate("{% for %}", "broken")
    missing = tmp_path / "none.jinja"
    with pytest.raises(UserError, match="cannot read"):
        ChatTemplate.from_file(missing)


@pytest.mark.parametrize("post", ["byte-level", "bos-template"])
def test_plain_prompts_encode_as_tokenizers_does(tmp_path, post):
    """A tokenizer.json with a post-processor (Qwen's byte-level one adds nothing; DeepSeek's
    template adds bos): prompts encode to transformers' ids, special tokens included."""
    from tokenizers import Tokenizer, processors

    write_tokenizer(tmp_path, CHATML, bos_token="<|endoftext|>")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    if post == "byte-level":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))]
        )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    text = "Experts route tokens; a latent holds the keys."
    expected = _hf_tokenizer(tmp_path)(text)["input_ids"]
    assert load_tokenizer(tmp_path).encode(text) == expected
    assert (expected[0] == 0) == (post == "bos-template")
