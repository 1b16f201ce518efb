"""POST /api/chat: a conversation rendered with the model's chat template, answered line by line.

``tools`` are rendered by the model's template when it knows them, else in the Hermes
format (``localllm.tools``); calls the model writes come back as ``message.tool_calls``
(``{"function": {"name", "arguments": {...}}}``), sent whole, after the text.
``format`` ("json" or a JSON schema) constrains the output with a grammar.
``think`` (true/false, "low"/"medium"/"high"; absent: the model's default) switches a reasoning
model's thought; the thought comes apart from the answer in ``message.thinking`` (streamed in
lines of its own), and ``format`` / tool calls apply to the answer after it.

A conversation longer than the context window keeps going, as on Ollama: its oldest non-system
messages are left out, whole turns up to a user message (a tool call goes with its results; the
system messages, the tools and the newest message always stay), until the prompt leaves the answer
``num_predict`` tokens, or half the window when ``num_predict`` is unset
(``localllm.context_window``). The final line then says how much was left out:
``truncated_prompt_tokens`` (prompt tokens of the whole conversation not sent to the model) and
``truncated_messages``; the ``X-Localllm-Prompt-Truncated`` header carries the token count. A
conversation that fits is sent whole. ``truncate: false`` turns this off (a too-long conversation
is a 400), and a newest message too long to fit with the system prompt and tools is a 400 either way.
``shift: true`` lets the answer go past the window by shifting it (``options.num_keep`` leading
tokens kept, half of the rest dropped, as Ollama); then only the prompt must fit.

A message's ``images`` (base64) go before its text, as Ollama places them, for models with a vision
projector (a 400 naming the model otherwise, or naming ``messages[i].images[j]`` for one that cannot be
decoded); the same image sent again with the next turn is not encoded again.
"""
from __future__ import annotations

from ..images import chat_images, tokenize
from . import parsing, responses
from .base import Resource
from .runner import Output, Run, context_settings, expire, load_only, require_text_model, respond


class ChatResource(Resource):
    def on_post(self, req, resp):
        from localllm import tools as tooling
        from localllm.context_window import fit_conversation

        body = self.body(req)
        name = parsing.model_name(body)
        stream = parsing.flag(body, "stream", True)
        keep_alive = parsing.keep_alive(body)
        settings = {**parsing.options(body), **parsing.logprob_settings(body)}
        messages = parsing.messages(body, name)
        constraint = parsing.constraint(body)
        tools = tooling.validate_tools(parsing.tools(body))          # ValueError: 400 naming the bad entry
        think = parsing.think(body)
        truncate, shift, num_keep = context_settings(body)
        entry = self.engine.store.get(name)
        require_text_model(entry, name, "chat")

        if not messages:
            if keep_alive == 0:
                expire(self.engine, entry)
                return load_only(resp, name, "unload", {"message": {"role": "assistant", "content": ""}})
            Run(self.engine, entry, keep_alive, name)
            return load_only(resp, name, "load", {"message": {"role": "assistant", "content": ""}})

        run = Run(self.engine, entry, keep_alive, name)
        model = run.model
        params, num_ctx = model.make_params(**settings, constraint=constraint)
        params.context_shift, params.num_keep = shift, num_keep
        thinking = parsing.thinking(model, think, name)
        extra = thinking.template_extra
        conversation = [dict(m) for m in entry.messages or []] + messages     # Modelfile MESSAGEs come first
        conversation, images = chat_images(model, name, conversation, self.settings)    # 400: no vision, bad image

        def prompt_text(kept: list[dict], tools) -> tuple:
            """(the prompt text of ``kept`` messages, the thought parser's format)."""
            if tools:
                return thinking.finish(tooling.render_tools_prompt(model, kept, tools, "auto", **extra))
            return thinking.finish(model.render_chat(kept, add_generation_prompt=True, **extra))

        def render(kept: list[dict], tools) -> list[int]:
            return tokenize(model, prompt_text(kept, tools)[0], images)

        if truncate:
            fitted = fit_conversation(conversation, tools, render, num_ctx, params.max_tokens, shift)  # 400: too long
            conversation, prompt_ids = fitted.messages, fitted.prompt_ids
            run.truncated(fitted.dropped_tokens, fitted.dropped_messages)
        else:
            prompt_ids = render(conversation, tools)
        params.reasoning = prompt_text(conversation, tools)[1]
        events = run.submit(prompt_ids, params, num_ctx, timeout=req.context.request_timeout)
        respond(req, resp, run, events, stream, ChatOutput(run, tools, stream), "api_chat")


class ChatOutput(Output):
    """``message`` lines; with tools, text goes through the tool-call parser and calls come whole at the end."""

    def __init__(self, run: Run, tools: list[dict], stream: bool):
        from localllm.tools import ToolCallStreamParser

        self.run = run
        self.stream = stream
        self.tools = tools
        self.parser = ToolCallStreamParser(tools) if tools else None

    def piece(self, event) -> list[dict]:
        text = event.text
        if self.parser is not None and text:
            text = "".join(d for d in self.parser.push(text) if isinstance(d, str))
        thinking = getattr(event, "thinking", "")
        if not text and not thinking and not event.logprobs:
            return []
        return [self._fields(text, event.logprobs, thinking)]

    def end(self, text, event, token_ids, records, thinking: str = "") -> list[dict]:
        lines, calls = [], []
        if self.parser is not None:
            if text:                                   # not streamed: the whole output at once
                self.parser.push(text)
            leftover = "".join(d for d in self.parser.finish() if isinstance(d, str))
            calls = [call.to_ollama() for call in self.parser.calls]
            if self.stream:
                lines += [self._fields(leftover, None)] if leftover else []
                lines += [{"message": {"role": "assistant", "content": "", "tool_calls": calls}}] if calls else []
            else:
                text = self.parser.content
        final = self._fields(text, records, thinking)
        if calls and not self.stream:
            final["message"]["tool_calls"] = calls
        final.update(done_reason=event.finish_reason if event else "stop", **self.run.metrics(event))
        return lines + [final]

    @staticmethod
    def _fields(text: str, records, thinking: str = "") -> dict:
        fields = {"message": {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}}
        if records:
            fields["logprobs"] = responses.logprobs(records)
        return fields
