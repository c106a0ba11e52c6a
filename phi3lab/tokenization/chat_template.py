"""Chat templates: a checkpoint's Jinja template rendered in a sandbox, as transformers does.

A template comes from the checkpoint (`chat_template.jinja`, else tokenizer_config.json's
`chat_template`); `PHI3_CHAT_TEMPLATE` is used only when it has none. Templates run in
`jinja2.sandbox.ImmutableSandboxedEnvironment` with transformers' settings (`trim_blocks`,
`lstrip_blocks`, loop controls, `raise_exception`, `tojson`, `strftime_now`). Whatever reaches
outside the sandbox is refused with a `ChatTemplateError` naming the problem: private and
dunder attributes (`''.__class__`), mutating the inputs (`messages.append(...)`), loading
other templates or files (`include`, `import`, `extends`).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from phi3lab.errors import bad_argument

# Phi-3-mini-4k-instruct's template.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n'"
    " + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant")  # the roles Phi-3's built-in template knows
_LOADING_NODES = (jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport, jinja2.nodes.Extends)


class ChatTemplateError(ValueError):
    """A chat template that is invalid, reaches outside its sandbox, or raised an error."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, but an unsafe attribute is an error where it is reached
    (Jinja's default renders it as an empty string until it is used)."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str):
    raise ChatTemplateError(f"The chat template refused the messages: {message}")


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox, refusing templates that load other templates.

    Args:
        source: the Jinja source.

    Raises:
        ChatTemplateError: a syntax error, or an `include` / `import` / `extends`.

    Example:
    >>> compile_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    <Template memory:...>
    """
    if not isinstance(source, str):
        raise ChatTemplateError(f"A chat template must be a str; received {type(source).__name__}.")
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        tree = env.parse(source)
    except TemplateError as error:
        raise ChatTemplateError(
            f"The chat template is not valid Jinja (line {getattr(error, 'lineno', '?')}): {error}"
        ) from None
    loading = next(tree.find_all(_LOADING_NODES), None)
    if loading is not None:
        raise ChatTemplateError(
            f"The chat template uses `{type(loading).__name__.lower()}` (line {loading.lineno}): "
            "a chat template may not load other templates or files."
        )
    return env.from_string(tree)


def check_messages(messages, roles: Sequence[str] | None) -> None:
    """Check chat messages: a non-empty list of dicts with a str "content"
    and a str "role" (one of `roles` unless it is None)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or (not messages):
        raise bad_argument("messages", messages, 'a non-empty list of {"role", "content"} dicts')
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise bad_argument(f"messages[{index}]", message, 'a dict with a str "content"')
        role = message.get("role")
        if not isinstance(role, str) or (roles is not None and role not in roles):
            raise bad_argument(f"messages[{index}]['role']", role, "a str" if roles is None else f"one of {roles}")


def render_chat_template(
    source: str, messages: Sequence[Mapping], add_generation_prompt: bool, variables: Mapping[str, object]
) -> str:
    """Render a chat template in the sandbox.

    Args:
        source: the Jinja source.
        messages: the chat messages (dicts).
        add_generation_prompt: end by opening the assistant's turn.
        variables: the other names the template sees (special-token strings such as
            `eos_token`, `tools`, ...).

    Raises:
        ChatTemplateError: the template is invalid, reaches outside the sandbox or raised.

    Example:
    >>> render_chat_template(PHI3_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], True, {})
    '<|user|>\\nHi<|end|>\\n<|assistant|>\\n'
    """
    template = compile_chat_template(source)
    try:
        return template.render(**variables, messages=messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError:
        raise
    except SecurityError as error:
        raise ChatTemplateError(f"The chat template reached outside its sandbox and was refused: {error}.") from None
    except (
        TemplateError,
        TypeError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        ArithmeticError,
    ) as error:
        raise ChatTemplateError(
            f"The chat template failed on these messages: {type(error).__name__}: {error}"
        ) from None
