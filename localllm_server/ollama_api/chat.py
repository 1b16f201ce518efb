"""POST /api/chat: a conversation rendered with the model's chat template, answered line by line.

``tools`` are rendered by the model's template when it knows them, else in the Hermes
format (``localllm.tools``); calls the model writes come back as ``message.tool_calls``
(``{"function": {"name", "arguments": {...}}}``), sent whole, after the text.
``format`` ("json" or a JSON schema) constrains the output with a grammar.
``think`` (true/false, "low"/"medium"/"high"; absent: the model's default) switches a reasoning
model's thought; the thought comes apart from the answer in ``message.thinking`` (streamed in
lines of its own), and ``format`` / tool calls apply to the answer after it.
"""
from __future__ import annotations

from . import parsing, responses
from .base import Resource
from .runner import Output, Run, expire, load_only, require_text_model, respond


class ChatResource(Resource):
    def on_post(self, req, resp):
        from localllm import tools as tooling

        body = self.body(req)
        name = parsing.model_name(body)
        stream = parsing.flag(body, "stream", True)
        keep_alive = parsing.keep_alive(body)
        settings = {**parsing.options(body), **parsing.logprob_settings(body)}
        messages = parsing.messages(body, name)
        constraint = parsing.constraint(body)
        tools = tooling.validate_tools(parsing.tools(body))          # ValueError: 400 naming the bad entry
        think = parsing.think(body)
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
        thinking = parsing.thinking(model, think, name)
        extra = thinking.template_extra
        conversation = [dict(m) for m in entry.messages or []] + messages     # Modelfile MESSAGEs come first
        if tools:
            prompt = tooling.render_tools_prompt(model, conversation, tools, "auto", **extra)
        else:
            prompt = model.render_chat(conversation, add_generation_prompt=True, **extra)
        prompt, params.reasoning = thinking.finish(prompt)
        events = run.submit(model.tokenize(prompt), params, num_ctx)
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
