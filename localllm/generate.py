"""Generation: sequences, one batched step, and the single-request drivers.

``Sequence`` holds everything one completion needs (its KV slot, token
history, sampler, detokenizer, stop matcher, logprobs). ``step`` advances a
list of live sequences by one forward call over a flat batch: prompts are
prefilled in chunks, sequences that are decoding contribute one token each.
``stream_generate`` drives ``step`` for one request (n choices) in the
caller's thread; ``engine.Engine`` drives the same ``step`` from a worker
thread over every live request, which is continuous batching.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence as Seq

import numpy as np

from .kv_cache import ContextLengthExceeded, KVCache
from .models.decoder import ImageRows
from .reasoning import ReasoningStreamParser, constraint_processor
from .sampling import SampledToken, SamplingParams, TokenSampler, top_logprobs as best_logprobs
from .stopping import StopStringMatcher

PREFILL_CHUNK = 512
DEFAULT_NUM_KEEP = 4             # Ollama's default num_keep
SHIFT_PREDICT_WINDOWS = 10       # with context_shift and no max_tokens: stop after 10 windows (Ollama's limit)
MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationParams:
    """What a request says about how text is generated (sampling is its own dataclass)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None          # None: until a stop or the context window is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0                  # 0..20 alternatives per token
    echo: bool = False                     # include the prompt (text and, with logprobs, its logprobs)
    n: int = 1                             # independent choices sharing the prompt's KV prefix
    constraint: object | None = None       # constrain.Constraint: grammar masks (JSON mode, schema, tool calls)
    reasoning: object | None = None        # reasoning.ReasoningFormat: split the thought from the answer; the
                                           # constraint then applies after the thought
    context_shift: bool = False            # a full window drops older tokens and goes on (Ollama's native API)
    num_keep: int = DEFAULT_NUM_KEEP       # with context_shift: leading tokens always kept (Ollama's num_keep)

    def validate(self) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise ValueError("max_tokens must be a non-negative integer")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError("n must be a positive integer")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        if isinstance(self.num_keep, bool) or not isinstance(self.num_keep, int) or self.num_keep < -1:
            raise ValueError("num_keep must be an integer >= -1 (-1: keep the whole prompt)")


@dataclass
class TokenLogprob:
    """One token with its log-probability and the best alternatives (see sampling.SampledToken)."""

    token_id: int
    text: str
    bytes: bytes
    logprob: float | None                  # None for the first prompt token (nothing predicts it)
    top: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose K/V came from the cache (not prefilled again)
    reasoning_tokens: int | None = None   # of the completion tokens, those of the thought (None: not parsed)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationEvent:
    """A piece of one choice's output: new text, the tokens behind it, and, at the end, why it stopped."""

    index: int                                   # choice index (0 .. n-1)
    text: str = ""                               # the answer (the thought is in ``thinking``)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None             # "stop" | "length" | None (more to come)
    usage: Usage | None = None                   # on the final event of a choice
    timings: dict | None = None                  # on the final event: prompt/decode seconds and counts
    thinking: str = ""                           # new thought text (reasoning models; see reasoning.py)


@dataclass
class Choice:
    """A finished completion."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list | None = None         # tools.ToolCall list when the request had tools (Model.chat)
    thinking: str = ""                     # the thought before the answer (reasoning models)


@dataclass
class GenerationResult:
    choices: list[Choice]
    usage: Usage
    timings: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def thinking(self) -> str:
        return self.choices[0].thinking

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids


class Sequence:
    """One completion in flight: its slot in the KV cache and all per-sequence state."""

    def __init__(self, index: int, prompt: list[int], params: GenerationParams, tokenizer, slot: int,
                 max_new_tokens: int, sampler: TokenSampler, extra_stop_ids: Seq[int] = (),
                 prefill_from: "Sequence | None" = None, cached_prefix: int = 0, want_prompt_logprobs=False,
                 n_ctx: int | None = None):
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.slot = slot
        self.prompt = list(prompt)
        self.tokens = list(prompt)             # prompt + generated
        self.n_prompt = len(prompt)
        self.n_prefill = len(prompt)           # tokens to compute before sampling: the prompt, or after a shift the window
        self.prompt_end = len(prompt)          # where the generated tokens start in ``tokens`` (moves on a shift)
        self.n_ctx = n_ctx                     # the window; with params.context_shift a full one is shifted
        self.shifted_tokens = 0                # tokens dropped by context shifts
        self.n_computed = cached_prefix        # tokens whose K/V are in the cache
        self.cached_prefix = cached_prefix     # of them, reused from an earlier request
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.stop_ids = frozenset(tokenizer.eog_ids) | frozenset(params.stop_token_ids) | frozenset(extra_stop_ids)
        self.detokenizer = tokenizer.detokenizer()
        self.stop_matcher = StopStringMatcher(params.stop)
        self.reasoning = ReasoningStreamParser(params.reasoning) if params.reasoning is not None else None
        self.thinking = ""
        self.reasoning_tokens = 0
        self.prefill_from = prefill_from       # n > 1: wait for the leader's prefill, then copy its KV prefix
        self.want_prompt_logprobs = want_prompt_logprobs
        self.prompt_logprobs: list[TokenLogprob] = []
        self.generated: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.last_logits: np.ndarray | None = None   # logits that predict the next token
        self.prompt_last_logits: np.ndarray | None = None
        self.logprob_records: list[TokenLogprob] = []
        self.started = time.perf_counter()
        self.prompt_seconds = 0.0
        self.cancelled = False
        self.echo_sent = False
        self.request_sequences: list[Sequence] = [self]   # every choice of the same request (make_sequences)
        # a prompt with images (vision.prompt.PromptTokens): digest -> embeddings its negative image ids read
        self.images: dict[int, np.ndarray] = getattr(prompt, "images", {})
        self.bidirectional_images = bool(getattr(prompt, "bidirectional", False))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.n_computed < self.n_prefill

    def needs_shift(self) -> bool:
        """The next token to decode would not fit the window (only asked with params.context_shift)."""
        return (self.params.context_shift and self.n_ctx is not None and not self.prefilling
                and self.last_logits is None and len(self.tokens) > self.n_ctx)

    def shift_context(self, cache: KVCache) -> None:
        """Drop older tokens as Ollama does: keep ``num_keep`` leading ones, discard half of the rest.

        The kept tokens move to new positions, so their K/V are recomputed (the next steps prefill
        them): exact, where llama.cpp re-rotates the cached keys. The slot's leading tokens that
        are still valid (at least the kept ones, unless a sliding-window ring overwrote them) stay.
        """
        keep = self.n_prompt if self.params.num_keep == -1 else self.params.num_keep
        keep = min(keep, self.n_prompt, self.n_ctx - 2)
        discard = (self.n_ctx - keep) // 2
        self.tokens = self.tokens[:keep] + self.tokens[keep + discard:]
        if self.prompt_end > keep:
            self.prompt_end = keep + max(0, self.prompt_end - keep - discard)
        self.n_prefill = len(self.tokens)
        self.n_computed = cache.usable_prefix(self.slot, self.tokens, limit=len(self.tokens) - 1)
        self.want_prompt_logprobs = False
        self.shifted_tokens += discard

    def describe_token(self, token_id: int, logprob: float | None) -> TokenLogprob:
        if token_id < 0:                           # an image position (vision.prompt): no text, no probability
            return TokenLogprob(token_id, "", b"", None)
        return TokenLogprob(token_id, self.tokenizer.token_text(token_id), self.tokenizer.token_bytes(token_id),
                            logprob)

    def prefill_images(self, start: int, stop: int) -> list[tuple[int, np.ndarray, int]]:
        """(position, embedding, last position it sees) of the image positions in [start, stop)."""
        from .vision.prompt import image_positions
        return image_positions(self.tokens, self.images, self.bidirectional_images, start, stop)

    def whole_images(self, start: int, stop: int) -> int:
        """``stop``, or later so that a prefill chunk [start, stop) does not cut an image whose positions see
        each other (they must be computed in one batch)."""
        if not self.bidirectional_images or stop >= self.n_prefill or self.tokens[stop - 1] >= 0:
            return stop
        from .vision.prompt import image_runs
        for first, end in image_runs(self.tokens[:self.n_prefill], stop - 1):
            return max(stop, end) if first <= stop - 1 else stop
        return stop

    def logprob_record(self, sampled: SampledToken) -> TokenLogprob:
        record = self.describe_token(sampled.token_id, float(sampled.logprob))
        if self.params.top_logprobs:
            record.top = [self.describe_token(i, lp) for i, lp in
                          best_logprobs(sampled.logprobs, self.params.top_logprobs)]
        return record

    def echo_event(self) -> GenerationEvent:
        """The prompt itself, as the first output of an ``echo`` request (with its logprobs if asked)."""
        self.echo_sent = True
        records = None
        if self.params.logprobs:
            records = [self.describe_token(self.prompt[0], None)] + list(self.prompt_logprobs)
        text = self.tokenizer.decode([t for t in self.prompt if t >= 0])        # images have no text
        self.text += text
        return GenerationEvent(self.index, text, list(self.prompt), records)

    def accept(self, sampled: SampledToken) -> GenerationEvent:
        """Take one sampled token: detokenize, check stops, and say what to emit."""
        token = sampled.token_id
        record = self.logprob_record(sampled) if self.params.logprobs else None
        if token in self.stop_ids:
            self.finish_reason = "stop"
            tail = self.stop_matcher.push(self.detokenizer.flush())[0] + self.stop_matcher.flush()
            thinking, tail = self._split(tail, final=True)
            return GenerationEvent(self.index, tail, [], None, "stop", thinking=thinking)
        self.tokens.append(token)
        self.generated.append(token)
        piece = self.detokenizer.push(token)
        safe, stopped = self.stop_matcher.push(piece)
        if record is not None:
            self.logprob_records.append(record)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
            safe += self.stop_matcher.push(self.detokenizer.flush())[0] + self.stop_matcher.flush()
        state_before = self.reasoning.state if self.reasoning is not None else None
        thinking, safe = self._split(safe, final=self.finished)
        if not self.finished and self.reasoning is not None and self.reasoning.state == "done":
            self.finish_reason = "stop"         # the answer's end tag (Harmony's <|end|>): nothing more is kept
        if "thinking" in (state_before, self.reasoning and self.reasoning.state):
            self.reasoning_tokens += 1          # a token of the thought (its tags included)
        return GenerationEvent(self.index, safe, [token], [record] if record else None, self.finish_reason,
                               thinking=thinking)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        """(thought, answer) pieces of new text, recorded in ``thinking`` / ``text``."""
        if self.reasoning is None:
            thinking = ""
        else:
            thinking, text = self.reasoning.push(text)
            if final:
                more_thinking, more_text = self.reasoning.finish()
                thinking, text = thinking + more_thinking, text + more_text
        self.thinking += thinking
        self.text += text
        return thinking, text

    def finish_event(self, event: GenerationEvent) -> GenerationEvent:
        now = time.perf_counter()
        event.usage = Usage(self.n_prompt, len(self.generated), self.cached_prefix,
                            self.reasoning_tokens if self.reasoning is not None else None)
        event.timings = {"prompt_seconds": self.prompt_seconds,
                         "decode_seconds": max(0.0, now - self.started - self.prompt_seconds),
                         "prompt_tokens": self.n_prompt, "completion_tokens": len(self.generated),
                         "prompt_cached_tokens": self.cached_prefix}
        return event


def plan_context(n_prompt: int, max_tokens: int | None, n_ctx: int, context_shift: bool = False) -> int:
    """How many tokens may be generated; raises ContextLengthExceeded before any work if it cannot fit.

    With ``context_shift`` only the prompt must fit: generation goes past the window by shifting
    it, up to ``max_tokens`` or, without one, ten windows (as Ollama).
    """
    if n_prompt == 0:
        raise ValueError("the prompt is empty: nothing to condition on")
    if context_shift:
        if n_prompt >= n_ctx:
            raise ContextLengthExceeded(n_prompt, n_ctx, "prompt")
        return SHIFT_PREDICT_WINDOWS * n_ctx if max_tokens is None else max_tokens
    if max_tokens is None:
        if n_prompt >= n_ctx:
            raise ContextLengthExceeded(n_prompt, n_ctx, "prompt")
        return n_ctx - n_prompt
    if n_prompt + max_tokens > n_ctx:
        raise ContextLengthExceeded(n_prompt + max_tokens, n_ctx,
                                    f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens})")
    return max_tokens


def step(model, cache: KVCache, sequences: list[Sequence],
         prefill_chunk: int = PREFILL_CHUNK) -> list[tuple[Sequence, GenerationEvent | Exception]]:
    """One forward call over every live sequence; returns (sequence, event) for the events it produced.

    Decoding sequences contribute their last sampled token; prefilling ones up
    to ``prefill_chunk`` prompt tokens (the budget is shared). Followers of an
    n > 1 group copy their leader's KV prefix once the leader's prefill is done.

    A sequence whose own logits processing, sampling or grammar fails (extreme
    sampling values, a grammar with no way on) gives ``(sequence, exception)``
    in place of an event, and it and the other choices of its request end with
    finish_reason ``"error"``: the other requests in the batch go on untouched.
    """
    events: list[tuple[Sequence, GenerationEvent | Exception]] = []
    tokens, positions, slots, logit_rows, owners = [], [], [], [], []
    image_rows, image_vectors, image_until = [], [], []        # batch rows that are an image's soft tokens
    budget = prefill_chunk
    for seq in sequences:
        if seq.finished:
            continue
        if seq.needs_shift():
            seq.shift_context(cache)
        if seq.prefill_from is not None:
            leader = seq.prefill_from
            if leader.prefilling:
                continue
            cache.copy_prefix(leader.slot, seq.slot, leader.n_prompt)
            seq.n_computed = seq.n_prompt
            seq.last_logits = leader.prompt_last_logits
            seq.prompt_seconds = leader.prompt_seconds
            seq.prompt_logprobs = leader.prompt_logprobs
            seq.prefill_from = None
            continue
        if seq.prefilling:
            take = min(budget, seq.n_prefill - seq.n_computed) if budget > 0 else 0
            if take == 0:
                continue
            start = seq.n_computed
            if seq.images:
                take = seq.whole_images(start, start + take) - start
                for pos, vector, until in seq.prefill_images(start, start + take):
                    image_rows.append(len(tokens) + pos - start); image_vectors.append(vector)
                    image_until.append(until)
            budget -= take
            wanted = range(start, start + take) if seq.want_prompt_logprobs else [start + take - 1]
            for pos in range(start, start + take):
                tokens.append(seq.tokens[pos]); positions.append(pos); slots.append(seq.slot)
            base = len(tokens) - take
            for pos in wanted:
                logit_rows.append(base + pos - start); owners.append((seq, pos))
        elif seq.last_logits is None:
            pos = len(seq.tokens) - 1
            tokens.append(seq.tokens[pos]); positions.append(pos); slots.append(seq.slot)
            logit_rows.append(len(tokens) - 1); owners.append((seq, pos))

    if tokens:
        images = None
        if image_rows:
            rows = np.array(image_rows, dtype=np.int64)
            until = np.array(image_until, dtype=np.int64)
            images = ImageRows(rows, np.stack(image_vectors).astype(np.float32),
                               until if (until != np.array(positions)[rows]).any() else None)
        logits = model.forward(np.array(tokens), np.array(positions), np.array(slots), cache,
                               logits_for=np.array(logit_rows), images=images)
        for row, (seq, pos) in enumerate(owners):
            seq.n_computed = max(seq.n_computed, pos + 1)
            if pos + 1 < seq.n_prefill:         # a prompt position: only its logprob of the next prompt token
                seq.prompt_logprobs.append(_prompt_logprob(seq, logits[row], pos + 1))
                continue
            seq.last_logits = logits[row]
            if pos + 1 == seq.n_prompt and not seq.shifted_tokens:
                seq.prompt_last_logits = logits[row]
                seq.prompt_seconds = time.perf_counter() - seq.started
        for seq in sequences:
            cache.lengths[seq.slot] = seq.n_computed
            cache.tokens[seq.slot] = seq.tokens[:seq.n_computed]

    for seq in sequences:
        if seq.finished or seq.last_logits is None or seq.prefilling or seq.cancelled:
            continue
        if seq.params.echo and not seq.echo_sent:
            events.append((seq, seq.echo_event()))
        if seq.max_new_tokens == 0:                 # max_tokens=0: only the prompt (echo / scoring)
            seq.finish_reason = "length"
            events.append((seq, seq.finish_event(GenerationEvent(seq.index, finish_reason="length"))))
            continue
        try:
            sampled = seq.sampler(seq.last_logits, seq.tokens, seq.prompt_end)
            seq.last_logits = None
            event = seq.accept(sampled)
        except Exception as exc:                    # its processors, sampler or grammar failed: that request alone ends
            seq.last_logits = None
            for choice in seq.request_sequences:
                choice.finish_reason = choice.finish_reason or "error"
            events.append((seq, exc))
            continue
        if seq.finished:
            event = seq.finish_event(event)
        if event.text or event.thinking or event.finish_reason or event.token_ids or event.logprobs:
            events.append((seq, event))
    return events


def _prompt_logprob(seq: Sequence, logits: np.ndarray, target_pos: int) -> TokenLogprob:
    from .sampling import log_softmax
    token = seq.tokens[target_pos]
    if token < 0:                               # an image position: nothing predicts it
        return seq.describe_token(token, None)
    logprobs = log_softmax(logits.astype(np.float64))
    record = seq.describe_token(token, float(logprobs[token]))
    if seq.params.top_logprobs:
        record.top = [seq.describe_token(i, lp) for i, lp in best_logprobs(logprobs, seq.params.top_logprobs)]
    return record


def make_sequences(prompt: list[int], params: GenerationParams, tokenizer, cache: KVCache, n_ctx: int,
                   extra_processors_factory: Callable[[], Seq] | None = None,
                   reuse_prefix: bool = True) -> list[Sequence]:
    """Allocate slots and build the n sequences of one request (raises before any work if it cannot fit)."""
    params.validate()
    _check_image_ids(prompt)
    max_new = plan_context(len(prompt), params.max_tokens, n_ctx, params.context_shift)
    want_prompt_logprobs = params.echo and params.logprobs
    sequences: list[Sequence] = []
    leader = None
    try:
        for index in range(params.n):
            slot, cached = _take_slot(cache, prompt, reuse_prefix and not want_prompt_logprobs)
            sampling = params.sampling
            if params.n > 1 and sampling.seed is not None:
                sampling = replace(sampling, seed=(sampling.seed + index) % 2**64)   # distinct, reproducible choices
            extra = list(extra_processors_factory()) if extra_processors_factory else []
            if params.constraint is not None:       # a fresh grammar state per choice (after the thought, if any)
                extra.append(constraint_processor(params.reasoning, params.constraint, tokenizer, max_new))
            seq = Sequence(index, prompt, params, tokenizer, slot, max_new, TokenSampler(sampling, extra),
                           prefill_from=leader, cached_prefix=cached if leader is None else 0,
                           want_prompt_logprobs=want_prompt_logprobs and leader is None, n_ctx=n_ctx)
            leader = leader or seq
            sequences.append(seq)
    except BaseException:
        release(cache, sequences)
        raise
    for seq in sequences:
        seq.request_sequences = sequences
    return sequences


def _check_image_ids(prompt) -> None:
    """ValueError unless every negative id of the prompt names an image whose embeddings it carries."""
    if not any(t < 0 for t in prompt):
        return
    from .vision.prompt import split_image_id
    images = getattr(prompt, "images", {})
    for t in prompt:
        if t < 0:
            digest, row = split_image_id(t)
            if digest not in images or row >= images[digest].shape[0]:
                raise ValueError(f"prompt token id {t} is an image position without its image's embeddings "
                                 "(token ids must be >= 0; images come through vision.prompt)")


def _take_slot(cache: KVCache, prompt: list[int], reuse: bool) -> tuple[int, int]:
    """A free slot, preferring the one whose cached tokens share the longest usable prefix with the prompt."""
    slot = cache.allocate_best(prompt) if reuse else cache.allocate()
    # always recompute the last prompt token (its logits)
    cached = cache.usable_prefix(slot, prompt, limit=len(prompt) - 1) if reuse else 0
    return slot, cached


def release(cache: KVCache, sequences: list[Sequence]) -> None:
    for seq in sequences:
        cache.release(seq.slot)


def stream_generate(model, cache: KVCache, tokenizer, prompt: list[int], params: GenerationParams,
                    n_ctx: int, extra_processors_factory=None) -> Iterator[GenerationEvent]:
    """Generate for one request in the caller's thread, yielding events as they come."""
    sequences = make_sequences(prompt, params, tokenizer, cache, n_ctx, extra_processors_factory)
    try:
        while not all(seq.finished for seq in sequences):
            for _, event in step(model, cache, sequences):
                if isinstance(event, Exception):
                    raise event
                yield event
    finally:
        release(cache, sequences)


def generate(model, cache: KVCache, tokenizer, prompt: list[int], params: GenerationParams, n_ctx: int,
             extra_processors_factory=None) -> GenerationResult:
    """Run one request to the end and collect its choices."""
    texts = {i: [] for i in range(params.n)}
    thoughts = {i: [] for i in range(params.n)}
    tokens = {i: [] for i in range(params.n)}
    records: dict[int, list] = {i: [] for i in range(params.n)}
    finish: dict[int, str] = {}
    timings: dict = {}
    completion_tokens = cached_tokens = 0
    reasoning_tokens = None
    for event in stream_generate(model, cache, tokenizer, prompt, params, n_ctx, extra_processors_factory):
        texts[event.index].append(event.text)
        thoughts[event.index].append(event.thinking)
        tokens[event.index].extend(event.token_ids)
        if event.logprobs:
            records[event.index].extend(event.logprobs)
        if event.finish_reason:
            finish[event.index] = event.finish_reason
            completion_tokens += event.usage.completion_tokens
            cached_tokens = max(cached_tokens, event.usage.cached_tokens)
            if event.usage.reasoning_tokens is not None:
                reasoning_tokens = (reasoning_tokens or 0) + event.usage.reasoning_tokens
            timings = event.timings
    choices = [Choice(i, "".join(texts[i]), tokens[i], finish[i], records[i] if params.logprobs else None,
                      thinking="".join(thoughts[i]))
               for i in range(params.n)]
    return GenerationResult(choices, Usage(len(prompt), completion_tokens, cached_tokens, reasoning_tokens), timings)
