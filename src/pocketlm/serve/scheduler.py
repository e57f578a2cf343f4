"""Continuous batching: many requests share one model, one KV cache and one decode step.

A background thread owns the model. The cache has `max_batch` rows; the requests being
generated sit in rows 0..k-1 (kept contiguous, so a decode step is one forward over the
first k rows, each at its own position). Between steps the loop admits waiting requests
(each prefilled alone, B=1, into the next free row through a one-row view of the cache;
a long prompt in chunks, one per step, so the others keep streaming; a prefix that an
earlier request computed comes from the prefix cache, serve/prefix_cache.py),
and drops finished, cancelled and timed-out ones at once: the last row moves into the
hole. Rows may run with different LoRA adapters over the same weights: each forward is
told which row runs with which (generate/multilora.py). The scheduler owns batching only:
each request turns its logits into tokens and text with the engine's own `Sampler` and
`TextStream` (pocketlm.generate.request), exactly as `lm.generate` does, so a seeded or
greedy request gives the same tokens whether it runs through the Python API, alone on the
server or in a crowd. A constrained request's row has its own grammar state (in its
Sampler); the next masks of those rows are computed on a worker thread while the forward
pass runs (llguidance releases the GIL).

Results leave through a per-request `emit(Event)` callback, called on the scheduler thread.
Knows nothing of HTTP or the wire format. (vLLM's scheduler and Orca, Yu et al. 2022,
"iteration-level scheduling"; gpt-fast for the prefill/decode split.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from pocketlm.generate.multilora import MultiLoRA
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.request import Sampler, TextStream
from pocketlm.models import make_cache
from pocketlm.serve.prefix_cache import DEFAULT_BUDGET, make_prefix_cache
from pocketlm.tokenizer import Tokenizer

log = logging.getLogger("pocketlm.serve")


# finish reason -> the counter it adds to
_COUNTER = {
    "stop": "finished",
    "length": "finished",
    "cancelled": "cancelled",
    "timeout": "timed_out",
    "error": "errors",
}


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass
class Event:
    """One generated token (with its text), or the end of a request."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    # "stop" (EOS or a stop string), "length", "cancelled", "timeout" or "error"
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # on the last event: tokens sampled in all
    prompt_logprobs: list[float | None] | None = None  # on the first event, when asked
    stop_sequence: str | None = None  # on the last event: the stop string that ended it


@dataclass(eq=False)
class Request:
    """What to generate; filled in by the caller, read by the scheduler thread."""

    prompt_ids: list[int]
    params: GenerationParams  # checked by the caller
    emit: Callable[[Event], None]
    prompt_logprobs: bool = False
    timeout: float | None = None  # seconds from submission
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from any thread; the loop frees the row at its next turn
    # The requests behind one HTTP request share a group (None: the request is its own);
    # a free row goes to the group holding the fewest rows, so no group starves another.
    group: object = None
    adapter: str | None = None  # the LoRA adapter to run with (Scheduler's `adapters`), by name


class _Active:
    """A request that holds a cache row: its sampler and text stream (the engine's own,
    pocketlm.generate.request) and where it stands."""

    def __init__(
        self, request: Request, *, vocab_size: int, tokenizer: Tokenizer, device: torch.device
    ) -> None:
        self.request = request
        self.adapter = 0  # index in the scheduler's adapters (0: the base model alone)
        self.sampler = Sampler(
            request.params,
            request.prompt_ids,
            vocab_size=vocab_size,
            device=device,
            tokenizer=tokenizer,
        )
        self.text = TextStream(tokenizer, request.params.stop)
        self.position = 0  # tokens in the cache row
        # log p of each prompt token given the ones before (echo + logprobs); None for the first
        self.prompt_logprobs: list[float | None] | None = (
            [None] if request.prompt_logprobs else None
        )
        self.last_token = -1
        self.generated = 0
        self.done = False
        self.finish_reason: str | None = None
        self.ids = list(request.prompt_ids)  # the prompt and the tokens taken so far


class Scheduler:
    """Runs requests in a background thread with continuous batching."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        cache_ram: int = DEFAULT_BUDGET,
        adapters: MultiLoRA | None = None,
    ) -> None:
        if getattr(model, "make_cache", None) is not None and max_batch != 1:
            # transformers' own cache holds one sequence (weights/fallback.py)
            raise ValueError("a model running through transformers is served with max_batch=1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_size = model.config.vocab_size
        # LoRA adapters attached to `model` (generate.multilora): each forward is told
        # which one each of its rows runs with. None: the base alone, no wrapped layer.
        self.adapters = adapters
        self.cache = make_cache(model, batch_size=max_batch, max_seq_len=max_seq_len)
        self.device = self.cache.device
        self.rows: list[_Active] = []  # rows[i] is in cache row i
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.counters = dict.fromkeys(
            (
                "requests",
                "finished",
                "cancelled",
                "timed_out",
                "rejected",
                "errors",
                "prompt_tokens",
                "generation_tokens",
                "steps",
            ),
            0,
        )
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        # id(prompt ids) -> (prompt ids, row, last logits, prompt logprobs) of this round
        self._shared: dict[int, tuple] = {}
        self._filling: _Active | None = None  # a request being prefilled, in row len(rows)
        self.prefill_chunk = prefill_chunk
        # LongRoPE (Phi-3): past this many tokens a row rotates with the long factors, so
        # a row that crosses it is recomputed from its first token (as generate.sequence).
        self._switch: int | None = getattr(model.config, "rope_switch_length", None)
        # Prompt prefixes shared across requests, within `cache_ram` bytes (0: none).
        self.prefix = make_prefix_cache(self.cache, budget=cache_ram, switch=self._switch)
        # Constrained rows' masks: computed beside the forward pass (False: after it).
        self.overlap_masks = True
        self._mask_worker: ThreadPoolExecutor | None = None

    # -- the caller's side (any thread) --

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="pocketlm-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._mask_worker is not None:
            self._mask_worker.shutdown(wait=False)

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none); QueueFull when they would pass the bound."""
        with self._wake:
            if len(self._waiting) + len(requests) > self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.extend(requests)
            self.counters["requests"] += len(requests)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def cancel_all(self) -> None:
        """Cancel every request, running or waiting (a server draining at shutdown): each
        ends with a "cancelled" event at the loop's next turn."""
        with self._wake:
            held = [*self.rows, *([self._filling] if self._filling else [])]
            for request in [*(a.request for a in held), *self._waiting]:
                request.cancelled = True
            self._wake.notify()

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges for /metrics."""
        with self._wake:
            now = time.monotonic()
            while self._recent and now - self._recent[0][0] > 10:
                self._recent.popleft()
            window = sum(n for _, n in self._recent)
            span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
            return {
                **self.counters,
                "queue_depth": len(self._waiting),
                "active": len(self.rows),
                "max_batch": self.max_batch,
                "kv_cache_bytes": self.cache.nbytes,
                "tokens_per_second": window / span if span else 0.0,
                **(self.prefix.stats() if self.prefix is not None else {}),
            }

    # -- the scheduler thread --

    def _loop(self) -> None:
        # Everything on this thread is inference: the cache (grown, moved, copied between
        # rows) and the requests' counts are inference tensors, touched only here.
        with torch.inference_mode():
            while self._turn():
                pass
        for active in [*self.rows, *([self._filling] if self._filling else [])]:
            self._finish(active, "cancelled")
        for request in self._waiting:
            request.emit(Event("", finish_reason="cancelled"))

    def _turn(self) -> bool:
        """One turn of the loop: wait for work, admit, take a decode step; False to stop."""
        with self._wake:
            while self._running and not self._waiting and not self._busy():
                self._wake.wait()
            if not self._running:
                return False
        self._retire()
        self._admit()
        if self.rows:
            try:
                self._decode()
            except Exception:  # a failed step fails its rows, never the server
                log.exception("decode step failed")
                for active in self.rows:
                    self._finish(active, "error")
            self._retire()
        self._fit_cache()
        return True

    def _fit_cache(self) -> None:
        """Give back the KV memory the requests no longer need -- all of it when none is
        left -- once the cache holds more than twice the rows or slots they use (it grows
        again on demand; the slack keeps a batch that shrinks and grows by a request or a
        few tokens from copying the cache back and forth)."""
        held = [*self.rows, *([self._filling] if self._filling is not None else [])]
        rows = len(held)
        slots = max((a.position for a in held), default=-1) + 1
        if self.cache.rows > 2 * rows or self.cache.slots > 2 * slots:
            self.cache.trim(rows, slots)

    def _busy(self) -> bool:
        return bool(self.rows) or self._filling is not None

    def _admit(self) -> None:
        """Prefill waiting requests into free rows. A long prompt goes in chunks, one per
        turn of the loop, so the rows already decoding keep streaming meanwhile."""
        self._shared = {}  # rows move between rounds: share a prefill within one only
        while len(self.rows) < self.max_batch:
            if self._filling is None:
                self._filling = self._next_request()
                if self._filling is None:
                    return
            active = self._filling
            try:
                done = self._prefill(active, row=len(self.rows))
            except Exception as error:  # one bad request must not stop the server
                log.exception("prefill failed")
                self.counters["errors"] += 1
                self._filling = None
                active.request.emit(Event(f"prefill failed: {error}", finish_reason="error"))
                continue
            if not done:
                if active.position < len(active.request.prompt_ids) - 1:
                    return  # more chunks: the next turn, after a decode step
                continue  # only the last token is left (_prefill computes it alone): now
            self._filling = None
            if not active.done:  # it may have finished on its first token
                self.rows.append(active)

    def _next_request(self) -> _Active | None:
        while True:
            with self._wake:
                if not self._waiting:
                    return None
                request = self._pop_fairly()
            if request.cancelled:
                self.counters["cancelled"] += 1
                request.emit(Event("", finish_reason="cancelled"))
            elif self._expired(request):
                self.counters["timed_out"] += 1
                request.emit(Event("", finish_reason="timeout"))
            elif (adapter := self._adapter_index(request.adapter)) is None:
                self.counters["errors"] += 1
                message = f"no LoRA adapter named '{request.adapter}' is loaded"
                request.emit(Event(message, finish_reason="error"))
            else:
                active = _Active(
                    request,
                    vocab_size=self.vocab_size,
                    tokenizer=self.tokenizer,
                    device=self.device,
                )
                active.adapter = adapter
                return active

    def _adapter_index(self, name: str | None) -> int | None:
        """The index of adapter `name` (0: none asked for, the base alone); None when no
        adapter of that name is loaded."""
        if name is None:
            return 0
        return self.adapters.names.get(name) if self.adapters is not None else None

    def _pop_fairly(self) -> Request:
        """The first waiting request of the group that holds the fewest rows now: a
        request with many rows (8 prompts x n=8) then shares the batch with a one-token
        request sent after it instead of making it wait for all of its rows."""
        held: dict[object, int] = {}
        for active in [*self.rows, *([self._filling] if self._filling else [])]:
            key = _group(active.request)
            held[key] = held.get(key, 0) + 1
        best = min(
            range(len(self._waiting)), key=lambda i: (held.get(_group(self._waiting[i]), 0), i)
        )
        request = self._waiting[best]
        del self._waiting[best]
        return request

    def _prefill(self, active: _Active, *, row: int) -> bool:
        """Compute the next chunk of the prompt into cache row `row` (or copy the whole
        prompt from the row just prefilled with it: the n choices of one request share a
        prefill). True when the prompt is in and its first token taken."""
        ids = active.request.prompt_ids
        shared = self._shared.get((id(ids), active.adapter))
        if active.position == 0 and shared is not None and shared[0] is ids:
            _, source, last, active.prompt_logprobs = shared
            self.cache.copy_row(source, row, len(ids))
            active.position = len(ids)
        else:
            # What the prefix cache holds of the prompt is copied, not computed (but prompt
            # logprobs need every position's logits: such a prompt is computed whole).
            split = self.prefix is not None and not active.request.prompt_logprobs
            if active.position == 0 and split:
                active.position = self.prefix.load(ids, self.cache, row, adapter=active.adapter)
            # With the prefix cache on, the prompt's last token is computed in a forward of
            # its own, after the rest (in chunks), whether the rest was loaded or computed:
            # its logits then come from the same kind of call cold and warm, so a request
            # sent again gets the very same logits (a quantized model's kernels round
            # differently with the number of rows; docs/prefix_cache.md).
            start, stop = active.position, len(ids) - 1 if split else len(ids)
            end = min(stop, start + self.prefill_chunk) if start < stop else len(ids)
            if self._switch is not None and 0 < start <= self._switch < end:
                start = 0  # the chunks before were rotated with LongRoPE's short factors
                active.prompt_logprobs = [None] if active.request.prompt_logprobs else None
            tokens = torch.tensor([ids[start:end]], device=self.device)  # (1, T)
            positions = torch.arange(start, end, device=self.device)[None]  # (1, T)
            # Prompt logprobs need every position's logits; otherwise the last will do.
            keep = 0 if active.request.prompt_logprobs else 1
            self._select([active])
            logits = self.model(tokens, positions, self.cache.row(row), logits_to_keep=keep)[0]
            logits = logits.float()
            self.counters["prompt_tokens"] += end - start
            active.position = end
            if active.request.prompt_logprobs:
                targets = torch.tensor(ids[start + 1 : end + 1], device=self.device)  # next ids
                lp = torch.log_softmax(logits[: len(targets)], dim=-1)  # (T or T-1, V)
                active.prompt_logprobs += lp.gather(1, targets[:, None])[:, 0].tolist()
            if end < len(ids):
                return False
            if self.prefix is not None:
                self.prefix.store(ids, self.cache, row, adapter=active.adapter)
            last = logits[-1]
            self._shared[(id(ids), active.adapter)] = (ids, row, last, active.prompt_logprobs)
        self._take(active, last, prompt_logprobs=active.prompt_logprobs)
        return True

    def _decode(self) -> None:
        tokens = torch.tensor([[a.last_token] for a in self.rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[a.position] for a in self.rows], device=self.device)  # (B, 1)
        masks = self._masks_ahead()
        self._select(self.rows)
        logits = self.model(tokens, positions, self.cache)[:, -1].float()  # (B, V)
        if masks is not None:
            masks.result()  # raises what a row's grammar raised: the step fails its rows
        self.counters["steps"] += 1
        if self._switch is not None:  # LongRoPE only: not a loop per step for every model
            for i, active in enumerate(self.rows):
                if active.position == self._switch:  # this step passes the switch length
                    logits[i] = self._recompute(active, row=i)
        for i, active in enumerate(self.rows):
            active.position += 1
            if not active.done:
                self._take_or_fail(active, logits[i])

    def _take_or_fail(self, active: _Active, logits: torch.Tensor) -> None:
        """`_take` for one row of a batch: a failure there (its sampler, its text) ends
        that row alone, with an error event; the other rows carry on."""
        try:
            self._take(active, logits)
        except Exception as error:
            log.exception("a request failed in a decode step")
            self._finish(active, "error", last=Event(f"generation failed: {error}"))

    def _masks_ahead(self) -> Future | None:
        """Start computing the constrained rows' next masks on the worker thread."""
        states = [a.sampler.grammar for a in self.rows if a.sampler.grammar is not None]
        if not states or not self.overlap_masks:
            return None  # (not overlapped: each row's mask is computed when it samples)
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="pocketlm-masks")
        return self._mask_worker.submit(lambda: [state.mask() for state in states])

    def _select(self, rows: list[_Active]) -> None:
        """Tell the adapters' layers which adapter each row of the next forward runs with."""
        if self.adapters is not None:
            self.adapters.select([active.adapter for active in rows])

    def _recompute(self, active: _Active, *, row: int) -> torch.Tensor:
        """Compute cache row `row` afresh for `active`'s tokens (from position 0); the last
        logits (V,)."""
        ids = active.ids
        self._select([active])
        tokens = torch.tensor([ids], device=self.device)  # (1, T)
        positions = torch.arange(len(ids), device=self.device)[None]  # (1, T)
        return self.model(tokens, positions, self.cache.row(row), logits_to_keep=1)[0, -1].float()

    def _take(
        self, active: _Active, logits: torch.Tensor, *, prompt_logprobs: list | None = None
    ) -> None:
        """Sample the next token from `logits` (V,) with the request's sampler, and emit it."""
        step = active.sampler.step(logits)
        active.generated += 1
        active.last_token = step.token
        active.ids.append(step.token)
        with self._wake:
            self.counters["generation_tokens"] += 1
            self._recent.append((time.monotonic(), 1))
        last = active.generated >= active.request.params.max_tokens
        chunk = active.text.feed(step, last=last)
        event = Event(chunk.text, chunk.token, chunk.logprob, chunk.top_logprobs,
                      prompt_logprobs=prompt_logprobs)  # fmt: skip
        if chunk.finish_reason is not None:
            self._finish(active, chunk.finish_reason, last=event)
        else:
            active.request.emit(event)

    def _finish(self, active: _Active, reason: str, *, last: Event | None = None) -> None:
        """Emit the final event (`last`, the one that ended the request, or an empty one)
        and mark the row free."""
        event = last if last is not None else Event("")
        event.finish_reason = reason
        event.prompt_tokens = len(active.request.prompt_ids)
        event.completion_tokens = active.generated
        event.stop_sequence = active.text.matcher.matched
        active.done, active.finish_reason = True, reason
        self.counters[_COUNTER[reason]] += 1
        active.request.emit(event)

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows; keep rows contiguous, with a
        request still being prefilled right after them."""
        filling_row = len(self.rows)
        for i in range(len(self.rows) - 1, -1, -1):
            active = self.rows[i]
            if not active.done and active.request.cancelled:
                self._finish(active, "cancelled")
            elif not active.done and self._expired(active.request):
                self._finish(active, "timeout")
            if active.done:
                self._keep(active, row=i)
                self._free(i)
        filling = self._filling
        if filling is not None and filling.request.cancelled:
            self._finish(filling, "cancelled")
            self._filling = None
        elif filling is not None and self._expired(filling.request):
            self._finish(filling, "timeout")
            self._filling = None
        elif filling is not None and filling_row != len(self.rows):
            self._move(filling_row, len(self.rows), filling.position)

    def _keep(self, active: _Active, *, row: int) -> None:
        """Hand a finished row's tokens to the prefix cache: a chat's next turn resends this
        prompt and answer. Not a row whose step failed (its cache may be half written)."""
        if self.prefix is not None and active.finish_reason != "error":
            self.prefix.store(
                active.ids[: active.position], self.cache, row, adapter=active.adapter
            )

    def _free(self, row: int) -> None:
        last = len(self.rows) - 1
        if row != last:  # move the last row into the hole
            self._move(last, row, self.rows[last].position)
            self.rows[row] = self.rows[last]
        self.rows.pop()

    def _move(self, source: int, target: int, n: int) -> None:
        """Copy a cache row's first n slots (the ones it has filled) to another row."""
        self.cache.copy_row(source, target, n)

    @staticmethod
    def _expired(request: Request) -> bool:
        return (
            request.timeout is not None and time.monotonic() - request.submitted > request.timeout
        )


def _group(request: Request) -> object:
    return request if request.group is None else request.group
