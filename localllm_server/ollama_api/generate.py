"""POST /api/generate: a completion of ``prompt`` (through the chat template unless ``raw``).

``template`` is a jinja2 template for this request only; it sees what chat templates
see (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``) plus
``prompt``, ``system`` and ``suffix``. ``context`` (the ids of an earlier answer's
final line) is put before the new prompt, and the final line's ``context`` is
prompt ids + generated ids, so passing it back continues the conversation.
``suffix`` asks for fill-in-the-middle and needs a model with FIM tokens.
``think`` works as on /api/chat (the thought in ``thinking``) for prompts rendered with the
model's own template; ``raw`` prompts and a request ``template`` are sent as they are.

A prompt (``context`` + the new prompt) longer than the context window is cut in its middle,
as Ollama's runner cuts it: its first ``options.num_keep`` tokens (default 4, after BOS; -1 keeps
the start) and its newest tokens are kept, leaving the answer ``num_predict`` tokens or half the
window (``localllm.context_window``). The final line's ``truncated_prompt_tokens`` and the
``X-Localllm-Prompt-Truncated`` header say how many tokens were left out, and its ``context`` holds
the ids actually run. A prompt that fits is sent whole; ``truncate: false`` turns the cut off (a
too-long prompt is a 400), and a fill-in-the-middle (``suffix``) prompt is never cut.
``shift: true`` lets the answer go past the window by shifting it (``num_keep`` leading tokens
kept, half of the rest dropped, as Ollama); then only the prompt must fit.

``images`` (base64) go before the prompt in its user turn (before the raw prompt with ``raw``), for
models with a vision projector; a 400 names the model otherwise. The final line's ``context`` holds
the text tokens only (an image's positions are left out: send the image again to keep it).
"""
from __future__ import annotations

from ..errors import APIError
from ..images import chat_images
from . import parsing, responses
from .base import Resource
from .runner import Output, Run, context_settings, expire, load_only, require_text_model, respond

class GenerateResource(Resource):
    def on_post(self, req, resp):
        from localllm.context_window import fit_prompt_ids
        from localllm.vision.prompt import with_images_of

        body = self.body(req)
        name = parsing.model_name(body)
        stream = parsing.flag(body, "stream", True)
        raw = parsing.flag(body, "raw", False)
        keep_alive = parsing.keep_alive(body)
        settings = {**parsing.options(body), **parsing.logprob_settings(body)}
        constraint = parsing.constraint(body)
        prompt = parsing.optional_string(body, "prompt") or ""
        suffix = parsing.optional_string(body, "suffix")
        system = parsing.optional_string(body, "system")
        template = parsing.optional_string(body, "template")
        context = parsing.token_ids(body, "context")
        think = parsing.think(body)
        truncate, shift, num_keep = context_settings(body)
        images = parsing.images(body.get("images"), "images")
        entry = self.engine.store.get(name)
        require_text_model(entry, name, "generate")

        if not prompt:
            if keep_alive == 0:
                expire(self.engine, entry)
                return load_only(resp, name, "unload", {"response": ""})
            Run(self.engine, entry, keep_alive, name)
            return load_only(resp, name, "load", {"response": ""})

        run = Run(self.engine, entry, keep_alive, name)
        model = run.model
        params, num_ctx = model.make_params(**settings, constraint=constraint)
        params.context_shift, params.num_keep = shift, num_keep
        prompt_ids = list(context or [])
        if any(not 0 <= t < model.config.vocab_size for t in prompt_ids):
            raise APIError(400, f"context token ids must be in [0, {model.config.vocab_size})", param="context")
        if images and suffix:
            raise APIError(400, "images cannot be combined with suffix (fill-in-the-middle)", param="images")
        # the images go before the prompt, in the user turn (Ollama's place for them): the prompt becomes
        # text parts, the images' markers first
        [user], embeddings = chat_images(model, name, [{"role": "user", "content": prompt, "images": images}],
                                         self.settings)
        if embeddings:
            prompt = user["content"]
        if suffix:
            new_ids = fill_in_the_middle(model, name, prompt, suffix, add_bos=not prompt_ids)
        elif raw or template is not None or not getattr(model, "has_chat_template", True):
            if raw and embeddings:
                prompt = "".join(part["text"] for part in prompt)
            text = prompt if raw else render(model, entry, prompt, system, template, suffix, with_history=not context)
            new_ids = (model.tokenize(text, add_bos=False if prompt_ids else None, images=embeddings) if embeddings
                       else model.tokenize(text, add_bos=False if prompt_ids else None))
        else:
            thinking = parsing.thinking(model, think, name)
            text = render(model, entry, prompt, system, None, suffix, with_history=not context,
                          template_extra=thinking.template_extra)
            text, params.reasoning = thinking.finish(text)
            new_ids = (model.tokenize(text, add_bos=False if prompt_ids else None, images=embeddings) if embeddings
                       else model.tokenize(text, add_bos=False if prompt_ids else None))
        prompt_ids = with_images_of(prompt_ids + list(new_ids), new_ids)
        if truncate and not suffix:
            fitted, dropped = fit_prompt_ids(prompt_ids, num_ctx, params.max_tokens, num_keep,
                                             model.tokenizer.bos_id, context_shift=shift)
            prompt_ids = with_images_of(fitted, prompt_ids)
            run.truncated(dropped)
        events = run.submit(prompt_ids, params, num_ctx, timeout=req.context.request_timeout)
        respond(req, resp, run, events, stream, GenerateOutput(run, prompt_ids), "api_generate")


class GenerateOutput(Output):
    """``response`` lines; the final one adds ``context`` (prompt ids + generated ids)."""

    def __init__(self, run: Run, prompt_ids: list[int]):
        self.run = run
        self.prompt_ids = prompt_ids

    def piece(self, event) -> list[dict]:
        thinking = getattr(event, "thinking", "")
        if not event.text and not thinking and not event.logprobs:
            return []
        return [self._fields(event.text, event.logprobs, thinking)]

    def end(self, text, event, token_ids, records, thinking: str = "") -> list[dict]:
        final = self._fields(text, records, thinking)
        context = [t for t in self.prompt_ids if t >= 0] + token_ids     # an image's positions are not tokens
        final.update(done_reason=event.finish_reason if event else "stop", context=context,
                     **self.run.metrics(event))
        return [final]

    @staticmethod
    def _fields(text: str, records, thinking: str = "") -> dict:
        fields = {"response": text, **({"thinking": thinking} if thinking else {})}
        if records:
            fields["logprobs"] = responses.logprobs(records)
        return fields


def render(model, entry, prompt: str, system: str | None, template: str | None, suffix: str | None,
           with_history: bool, template_extra: dict | None = None) -> str:
    """The prompt text: system + the Modelfile's MESSAGEs + the prompt as a user turn, through a chat template.
    ``prompt`` may be text parts (an image's marker, then the text) when images came with it."""
    from localllm.chat_template import ChatTemplate

    system = system if system is not None else model.system
    messages = [{"role": "system", "content": system}] if system else []
    if with_history:
        messages += [dict(m) for m in entry.messages or []]
    messages.append({"role": "user", "content": prompt})
    if not isinstance(prompt, str):
        prompt = "".join(part["text"] for part in prompt)
    if template is None and not getattr(model, "has_chat_template", True):
        return f"{system}\n\n{prompt}" if system else prompt   # Ollama's default template: the prompt itself
    if template is None:
        return model.render_chat(messages, add_generation_prompt=True, **(template_extra or {}))
    tokenizer = model.tokenizer
    return ChatTemplate(template, tokenizer.bos_token, tokenizer.eos_token).render(
        messages, add_generation_prompt=True, prompt=prompt, system=system or "", suffix=suffix or "")


def fill_in_the_middle(model, name: str, prompt: str, suffix: str, add_bos: bool) -> list[int]:
    """``[BOS] <fim_pre> prompt <fim_suf> suffix <fim_mid>`` token ids (llama.cpp's layout, as /v1/completions),
    or 400 for models without fill-in-the-middle tokens."""
    from ..openai_api.completions import fim_token_ids

    fim = fim_token_ids(model)
    if fim is None:
        raise APIError(400, f"model '{name}' does not support insert (suffix): it has no fill-in-the-middle tokens",
                       param="suffix")
    tokenizer = model.tokenizer
    bos = [tokenizer.bos_id] if add_bos and tokenizer.add_bos and tokenizer.bos_id is not None else []
    return (bos + [fim["fim_pre"]] + model.tokenize(prompt, add_bos=False) + [fim["fim_suf"]]
            + model.tokenize(suffix, add_bos=False) + [fim["fim_mid"]])
