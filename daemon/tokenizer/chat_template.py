"""Chat-template rendering: turns a conversation into the prompt string a model expects.

This module owns compiling a model's Jinja chat template (as shipped in GGUF's
``tokenizer.chat_template`` or a tokenizer_config.json) and rendering conversations with
it exactly as transformers' ``tokenizer.apply_chat_template(..., tokenize=False)`` does:
same sandboxed Jinja environment and options, same ``tojson`` filter and globals, and the
same preparation of the inputs (``None`` fields dropped, reasoning fields aliased, every
value rebuilt from plain JSON-like types). Templates are untrusted code, so they run in
jinja2's immutable sandbox, and every failure surfaces as :class:`ChatTemplateError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError"]

# Jinja names frames of templates compiled from strings after this pseudo file.
_TEMPLATE_FILENAME = "<template>"
# Names a message's reasoning can arrive under; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or its inputs were malformed."""


class _TemplateRaised(jinja2.TemplateError):
    """Raised by ``raise_exception`` so its message can be told apart from Jinja's own."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter, not Jinja's: Jinja's escapes HTML characters, which would
    # change what tool schemas look like to the model.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# `format` shadows the builtin but is the keyword name templates may call it with.
def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates, without the class itself (and its attributes) in reach."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` minus dunder/underscore attributes, which lead to internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # No named `self` (Namespace's own trick): `namespace(self=...)` must still work.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` block, which only marks
    assistant text for training masks: rendered as its body, in its own scope as there."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


# One environment for all templates: it is never mutated after this point.
_ENVIRONMENT = _make_environment()


def _plain(value: Any) -> Any:
    # Rebuild inputs from plain JSON-like types: the sandbox only knows the methods of
    # builtins are harmless, and subclasses or arbitrary objects could expose more. Other
    # objects become an inert "<TypeName>" placeholder, as in transformers.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{i}] needs a string 'role', got {type(role).__name__}")
        # APIs send `"content": null` etc.; templates handle a missing key but would
        # render a present None as the text "None".
        plain = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
        if reasoning is not None:
            # Templates read `reasoning_content` (gpt-oss ones read `thinking`) whichever
            # name the client used.
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def _prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}")
    return [_plain(tool) for tool in tools]


def _template_line(exc: BaseException) -> int | None:
    # Jinja rewrites tracebacks so template code shows up as frames of the pseudo file,
    # numbered by template line; the innermost one is where rendering failed.
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A compiled chat template. Compile once per model; ``render`` is reentrant."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template source must be a str, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from exc

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (dicts with a string ``role``) into a prompt string.

        ``extra`` becomes template variables (e.g. ``documents``, ``enable_thinking``,
        ``date_string``) and may override ``bos_token``/``eos_token``.
        """
        # Unset special tokens stay undefined (render as ""), as with a tokenizer that
        # lacks them, instead of rendering as "None".
        context: dict[str, Any] = {}
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(extra)
        context = _plain(context)
        context.setdefault("documents", None)
        context["messages"] = _prepare_messages(messages)
        context["tools"] = _prepare_tools(tools)
        context["add_generation_prompt"] = add_generation_prompt

        try:
            return self._template.render(**context)
        except _TemplateRaised as exc:
            raise ChatTemplateError(exc.message or "raise_exception called") from exc
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template attempted an unsafe operation{self._where(exc)}: {exc}") from exc
        except Exception as exc:
            # Templates are arbitrary code: any exception (UndefinedError, TypeError,
            # ZeroDivisionError, ...) is a rendering failure of this template.
            raise ChatTemplateError(
                f"chat template failed to render{self._where(exc)}: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _where(exc: BaseException) -> str:
        line = _template_line(exc)
        return "" if line is None else f" at line {line}"
