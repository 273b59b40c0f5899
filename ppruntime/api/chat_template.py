"""A checkpoint's chat template (`tokenizer_config.json`), rendered with jinja2 as
transformers renders it: a sandboxed environment, `trim_blocks` and `lstrip_blocks`,
`raise_exception` for templates that refuse a conversation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template refused the conversation."""


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"the chat template refused the conversation: {message}")

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            self._template = environment.from_string(source)
        except TemplateError as error:
            raise ChatTemplateError(f"the model's chat template does not parse: {error}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as error:
            raise ChatTemplateError(f"the chat template failed: {error}") from None


def load_chat_template(model: str) -> ChatTemplate | None:
    """The chat template of checkpoint directory `model` (None: presets, or none given)."""
    path = Path(model) / "tokenizer_config.json"
    if not path.is_file():
        return None
    settings = json.loads(path.read_text(encoding="utf-8"))
    source = settings.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in source}
        source = named.get("default")
    if not source:
        return None
    return ChatTemplate(
        source, _token_text(settings.get("bos_token")), _token_text(settings.get("eos_token"))
    )
