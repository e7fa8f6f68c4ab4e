"""The model's own chat template, rendered by transformers' `apply_chat_template` (Jinja2 in
its sandbox): the web turns chat messages into the prompt text, replicas get its token ids.

The template comes from the model's tokenizer files (`chat_template.jinja`, `tokenizer_config.json`
or `chat_template.json`), read by transformers' `PreTrainedTokenizerFast`, which loads without
torch; transformers is imported on the first chat request only, so the web still starts in about
a second. No template, or a template that fails (`raise_exception(msg)` included): 422
`template_error`, as TGI answers.
"""
from __future__ import annotations

import threading

from common.settings import Settings
from web.errors import ApiError
from web.tokenizer import TokenizerUnavailable, tokenizer_file

TEMPLATE_NOT_FOUND = "template not found"


class TemplateError(ApiError):
    status, error_type, prefix = 422, "template_error", "Template error: "


class ChatTemplate:
    """Loaded on first use (a replica may still be preparing the tokenizer files), then kept."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._tokenizer = None  # transformers.PreTrainedTokenizerFast
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    # Here, not at the top: importing transformers costs a second and ~100 MB,
                    # which a web serving no chat request never pays.
                    from transformers import PreTrainedTokenizerFast

                    try:
                        directory = tokenizer_file(self._settings).parent
                        self._tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
                    except Exception as error:  # files missing or unreadable: as for the token counter
                        raise TokenizerUnavailable(str(error)) from error
        return self._tokenizer

    @property
    def accepts_tools(self) -> bool:
        """Whether the template renders the `tools` it is given (TGI's test: it names them)."""
        return "tools" in self._source

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the template renders an assistant message's `tool_calls` (it names them)."""
        return "tool_calls" in self._source

    @property
    def _source(self) -> str:
        template = self.tokenizer.chat_template
        return template if isinstance(template, str) else str(template or "")

    def render(self, messages: list[dict], tools: list[dict] | None = None, *, add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """The prompt text, generation prompt included unless told otherwise."""
        tokenizer = self.tokenizer
        if not tokenizer.chat_template:
            raise TemplateError(TEMPLATE_NOT_FOUND)
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message, tokenize=False)
        except Exception as error:  # jinja2's TemplateError (raise_exception), or a template's TypeError
            raise TemplateError(str(error) or type(error).__name__) from error
        if not isinstance(text, str):  # a template that renders no text at all
            raise TemplateError("the template did not render text")
        return text
