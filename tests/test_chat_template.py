"""inflightd.tokenizer.chat_template against transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import jinja2
import pytest

from inflightd.tokenizer.chat_template import ChatTemplate, ChatTemplateError

# A Llama-3.1-style template: bos_token, system extraction, date default, tools rendered
# with tojson(indent=4), single tool calls, ipython/tool results, raise_exception.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- The system message goes into the system header, after the dates. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "These functions are available to you:\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- if tools_in_user_message and tools is not none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content'] | trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Tools go in the first user message, but there is none!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Answer with a JSON function call using one of these functions.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
            + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or (message.content is iterable and message.content is not string) %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# A Qwen2-style ChatML template: default system prompt, <tools> block with tojson,
# <tool_call> rendering of assistant calls (content may be absent), grouped tool results.
QWEN2_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call functions to help with the query. Their signatures:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nWrap each call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
           or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The rest of the surface templates use: namespace, loop controls, reasoning fields,
# strftime_now, dict, tojson options, {% generation %}, undefined special tokens and extras.
FEATURES_TEMPLATE = r"""{%- set ns = namespace(turns=0, last_user=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {%- set ns.turns = ns.turns + 1 %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{{- '[' ~ bos_token ~ '|' ~ unk_token ~ '] turns=' ~ ns.turns ~ ' last=' ~ ns.last_user }}
{{- ' year=' ~ strftime_now('%Y') ~ '\n' }}
{%- for m in messages %}
    {%- if m.role == 'skip' %}{% continue %}{% endif %}
    {%- if m.role == 'stop' %}{% break %}{% endif %}
    {%- if m.role == 'assistant' %}
        {%- generation %}{{ m.role }}: {{ m.content if m.content is defined else '(no content)' }}{% endgeneration %}
    {%- else %}
        {{- m.role }}: {{ m.content }}
    {%- endif %}
    {%- if m.reasoning_content is defined %} <think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}
    {{- '\n' }}
{%- endfor %}
{{- dict(b=[1, 2], a='é"<>') | tojson(sort_keys=true) }}
{{- '\n' ~ {'x': 1, 'y': [true, none]} | tojson(indent=2, separators=[',', ': ']) }}
{{- '\n' ~ (enable_thinking | default('unset')) ~ ' ' ~ (documents is none) }}
{%- if add_generation_prompt %}{{ '\nASSISTANT:' }}{% endif %}
"""

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single": [{"role": "user", "content": "Hello!"}],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And times three?  \n"},
    ],
    "with_system": [
        {"role": "system", "content": "You are terse. Réponds en français ✓."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut."},
        {"role": "user", "content": "Line one\nline two {{ not jinja }}"},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Current weather for a city, e.g. "Paris" <fast>',
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Paris and Köln?"},
    {
        "role": "assistant",
        "content": None,  # as OpenAI clients send it: must be dropped, not rendered
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 17}'},
    {"role": "assistant", "content": "21°C and 17°C."},
    {"role": "user", "content": "Thanks"},
]


# ---- references ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf: Path) -> Any:
    # A test dependency: missing, it is an error here, not a skip.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def gguf_template(default_gguf: Path) -> ChatTemplate:
    """The default model's template and special tokens, read straight from its GGUF."""
    reader = gguf.GGUFReader(default_gguf)

    def field_str(name: str) -> str:
        field = reader.fields[name]
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    def token(id_field: str) -> str:
        token_id = int(reader.fields[id_field].parts[-1][0])
        tokens = reader.fields["tokenizer.ggml.tokens"]
        return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8")

    return ChatTemplate(
        field_str("tokenizer.chat_template"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
    )


def _hf_render(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    out = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(out, str)
    return out


# ---- parity with transformers ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_default_model_template_matches_transformers(
    hf_tokenizer: Any, gguf_template: ChatTemplate, conversation: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    want = _hf_render(hf_tokenizer, messages, add_generation_prompt=add_generation_prompt)
    got = gguf_template.render(messages, add_generation_prompt=add_generation_prompt)
    assert got == want


@pytest.mark.slow
def test_gguf_template_and_tokens_are_the_tokenizers(hf_tokenizer: Any, gguf_template: ChatTemplate) -> None:
    assert gguf_template.source == hf_tokenizer.chat_template
    assert gguf_template.bos_token == hf_tokenizer.bos_token
    assert gguf_template.eos_token == hf_tokenizer.eos_token


PARITY_CASES: list[tuple[str, str, list[dict[str, Any]], dict[str, Any]]] = [
    *[(f"llama3-{name}", LLAMA3_TEMPLATE, conv, {}) for name, conv in CONVERSATIONS.items()],
    ("llama3-date", LLAMA3_TEMPLATE, CONVERSATIONS["with_system"], {"date_string": "1 Jan 2025"}),
    ("llama3-tools", LLAMA3_TEMPLATE, TOOL_CONVERSATION[1:], {"tools": [WEATHER_TOOL]}),
    (
        "llama3-tools-in-system",
        LLAMA3_TEMPLATE,
        TOOL_CONVERSATION,
        {"tools": [WEATHER_TOOL], "tools_in_user_message": False},
    ),
    *[(f"qwen2-{name}", QWEN2_TEMPLATE, conv, {}) for name, conv in CONVERSATIONS.items()],
    ("qwen2-tools", QWEN2_TEMPLATE, TOOL_CONVERSATION, {"tools": [WEATHER_TOOL]}),
    ("qwen2-tools-no-system", QWEN2_TEMPLATE, TOOL_CONVERSATION[1:], {"tools": [WEATHER_TOOL]}),
    (
        "features",
        FEATURES_TEMPLATE,
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q1"},
            {"role": "skip", "content": "hidden"},
            {"role": "assistant", "content": "a1", "reasoning": "because"},
            {"role": "assistant", "content": None, "thinking": "hmm"},
            {"role": "user", "content": "q2"},
            {"role": "stop", "content": "end"},
            {"role": "user", "content": "never shown"},
        ],
        {"enable_thinking": False},
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(
    ("source", "messages", "kwargs"),
    [case[1:] for case in PARITY_CASES],
    ids=[case[0] for case in PARITY_CASES],
)
def test_template_matches_transformers(
    hf_tokenizer: Any,
    source: str,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    add_generation_prompt: bool,
) -> None:
    want = _hf_render(
        hf_tokenizer,
        messages,
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    # transformers passes its whole special_tokens_map; ours takes bos/eos, the rest as extras.
    template = ChatTemplate(source, bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token)
    got = template.render(
        messages,
        add_generation_prompt=add_generation_prompt,
        unk_token=hf_tokenizer.unk_token,
        **kwargs,
    )
    assert got == want


@pytest.mark.slow
def test_raise_exception_message_matches_transformers(hf_tokenizer: Any) -> None:
    tool_calls = {"function": {"name": "f", "arguments": {}}}
    messages = [{"role": "assistant", "tool_calls": [tool_calls, tool_calls]}]
    with pytest.raises(jinja2.TemplateError) as hf_exc:
        _hf_render(hf_tokenizer, messages, chat_template=LLAMA3_TEMPLATE)
    with pytest.raises(ChatTemplateError) as our_exc:
        ChatTemplate(LLAMA3_TEMPLATE).render(messages)
    assert str(our_exc.value) == str(hf_exc.value)
    assert str(our_exc.value) == "This model only supports single tool-calls at once!"


# ---- behaviour without a reference -----------------------------------------------------


def test_raise_exception_surfaces_message() -> None:
    source = (
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    template = ChatTemplate(source)
    assert template.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ChatTemplateError, match=r"^Conversation roles must alternate user/assistant$"):
        template.render([{"role": "assistant", "content": "x"}])


def test_syntax_error_names_the_line() -> None:
    source = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="syntax error at line 3"):
        ChatTemplate(source)
    with pytest.raises(ChatTemplateError, match=r"line \d+.*endfor"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }}\n")


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "hi\n{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ messages.append(1) }}",  # the sandbox is immutable: no mutating inputs
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
    ],
)
def test_sandbox_violations_raise(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "source", ["{{ raise_exception.__globals__ }}", "{{ dict.__class__ }}{{ messages.__class__ }}"]
)
def test_unused_unsafe_attribute_is_just_undefined(source: str) -> None:
    # Jinja (and so transformers) only raises once an unsafe attribute is used; printing
    # it prints an empty undefined, never the object.
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]) == ""


def test_render_error_says_what_failed_and_where() -> None:
    template = ChatTemplate("ok\n{{ messages[0].content.missing.deeper }}")
    with pytest.raises(ChatTemplateError, match=r"failed to render at line 2: UndefinedError"):
        template.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        ([], "must not be empty"),
        ([{"role": "user", "content": "x"}, "oops"], r"messages\[1\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] needs a string 'role'"),
        ([{"role": 3, "content": "x"}], r"messages\[0\] needs a string 'role', got int"),
    ],
)
def test_invalid_messages_are_rejected(messages: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate("{{ messages }}").render(messages)


def test_invalid_tools_are_rejected() -> None:
    with pytest.raises(ChatTemplateError, match=r"tools\[0\] must be a JSON-schema dict"):
        ChatTemplate("x").render([{"role": "user", "content": "x"}], tools=[len])


def test_special_tokens_and_inputs() -> None:
    source = "[{{ bos_token }}|{{ eos_token }}]{% for m in messages %}{{ m | tojson }}{% endfor %}"
    messages = [{"role": "user", "content": "<b>&</b>", "name": None, "reasoning": "r"}]
    original = [dict(m) for m in messages]
    # Unset tokens are undefined (render empty), not the string "None".
    assert ChatTemplate(source).render(messages) == (
        '[|]{"thinking": "r", "role": "user", "content": "<b>&</b>", "reasoning": "r", "reasoning_content": "r"}'
    )
    assert ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(messages).startswith("[<s>|</s>]")
    # extras override the template's own tokens, as kwargs do in transformers.
    assert ChatTemplate(source, bos_token="<s>").render(messages, bos_token="B").startswith("[B|")
    assert messages == original  # the caller's messages are never modified


def test_template_is_reusable_and_generation_prompt_defaults_on() -> None:
    template = ChatTemplate("{{ messages | length }}{% if add_generation_prompt %}+{% endif %}")
    assert template.render([{"role": "user", "content": "a"}]) == "1+"
    assert template.render([{"role": "user", "content": "a"}] * 3, add_generation_prompt=False) == "3"
