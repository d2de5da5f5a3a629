"""Chat templates rendered with jinja2 alone, the way transformers renders them.

For backends that must not import transformers (llama.cpp, serving engines).
The environment mirrors `transformers.utils.chat_template_utils`: a sandbox
with `trim_blocks`, `lstrip_blocks`, loop controls, a `tojson` that does not
escape HTML, `raise_exception` and `strftime_now`, and the special-token
strings as variables. tests/test_llamacpp.py checks that both render the same
text for several templates.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class JinjaTemplater:
    """Duck-types the one tokenizer method `engines.chat.render_messages` calls."""

    def __init__(self, special_tokens: dict[str, str]):
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def apply_chat_template(self, messages, chat_template: str, tokenize=False, add_generation_prompt=True):
        assert not tokenize, "JinjaTemplater renders text; the engine tokenizes"
        return _compile(chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **self.special_tokens,
        )
