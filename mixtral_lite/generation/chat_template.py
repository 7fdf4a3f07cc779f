"""Chat templates: a model's jinja ``chat_template`` rendered exactly as transformers'
``apply_chat_template`` renders it, in jinja2's sandbox.

Same environment as transformers (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, the loop-control extension, its ``tojson`` / ``raise_exception`` /
``strftime_now`` / ``namespace``), the same variables (``messages``, ``add_generation_prompt``,
``tools`` and ``documents`` as None, and the named special tokens of ``tokenizer_config.json``),
and the rendered text is tokenised without adding special tokens, special tokens in it parsed as
such. Templates are untrusted code from the hub: the sandbox refuses attribute access to Python
internals, and a template error is a ``UserError`` naming the template.

OLMoE, Qwen and DeepSeek folders carry their template in ``tokenizer_config.json``; Mixtral keeps
the built-in Mistral formats (``tokenizer.py``), the ones mistral-common defines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import UserError

# The named special tokens transformers passes to every template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of a ``tokenizer_config.json`` (strings or ``{"content": ...}``)."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = tokenizer_config.get(name)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


class ChatTemplate:
    """A compiled template: ``render(messages, add_generation_prompt)`` -> the prompt text."""

    def __init__(self, source: str, origin: str, tokens: Mapping[str, str] | None = None) -> None:
        import jinja2

        self.source, self.origin = source, origin
        self.tokens = dict(tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise UserError(f"{origin}: not a valid jinja chat template: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path, tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        """A template file (``--chat-template FILE``): the jinja text itself, or a JSON file with a
        ``chat_template`` field (a ``tokenizer_config.json``)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read the chat template: {exc}") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise UserError(f"{path}: invalid JSON: {exc}") from None
            found = _template_of(data, path) if isinstance(data, dict) else None
            if found is None:
                raise UserError(f"{path}: expected a 'chat_template' field (a string or named templates)")
            text = found
        return cls(text, str(path), tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.tokens,
            )
        except jinja2.TemplateError as exc:
            raise UserError(f"{self.origin}: the chat template failed: {exc}") from None


def template_from_tokenizer_config(path: Path) -> ChatTemplate | None:
    """The ``chat_template`` of a ``tokenizer_config.json`` (None when it has none)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        return None
    source = _template_of(data, path)
    if source is None and (path.parent / "chat_template.jinja").is_file():  # transformers 5.x saves it beside
        source = (path.parent / "chat_template.jinja").read_text(encoding="utf-8")
    return None if source is None else ChatTemplate(source, f"{path}: chat_template", special_tokens(data))


def _template_of(data: Mapping[str, Any], path: Path) -> str | None:
    """A string template, or the ``default`` one of named templates ([{name, template}, ...])."""
    value = data.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise UserError(f"{path}: chat_template: expected a string or a list with a 'default' template, got {value!r:.80}")


def _environment():
    """The environment transformers compiles templates in (``_cached_compile_jinja_template``)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise UserError(
            f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes), got {jinja2.__version__}"
        )

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace without underscore-prefixed names (CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class TemplateDict:
        """``dict(...)`` for templates, without the class's attributes."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; the
        text renders as it is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = Namespace
    return env


__all__ = ["ChatTemplate", "special_tokens", "template_from_tokenizer_config"]
