"""POST /api/chat: a conversation rendered with the model's chat template, answered line by line."""
from __future__ import annotations

from . import parsing
from .runner import Run, expire, load_only, require_text_model, respond


class ChatResource:
    def __init__(self, engine):
        self.engine = engine

    def on_post(self, req, resp):
        body = parsing.read_body(req)
        name = parsing.model_name(body)
        stream = parsing.flag(body, "stream", True)
        keep_alive = parsing.keep_alive(body)
        settings = parsing.options(body)
        parsing.format_unsupported(body)
        messages = parsing.messages(body, name)
        tools = parsing.tools(body)
        think = body.get("think")
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
        params, num_ctx = model.make_params(**settings)
        extra = {"enable_thinking": bool(think)} if think is not None else {}
        conversation = [dict(m) for m in entry.messages or []] + messages     # Modelfile MESSAGEs come first
        prompt = model.render_chat(conversation, add_generation_prompt=True, tools=tools, **extra)
        events = run.submit(model.tokenize(prompt), params, num_ctx)

        def piece(text):
            return {"message": {"role": "assistant", "content": text}}

        def final(text, event, token_ids):
            return {"message": {"role": "assistant", "content": text},
                    "done_reason": event.finish_reason if event else "stop", **run.metrics(event)}

        respond(resp, run, events, stream, piece, final)
