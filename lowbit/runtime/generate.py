"""Token-by-token generation with streaming, on lowbit's decode engine where it runs, else eagerly in torch.

    gen = Generator(model)                     # a causal LM: lowbit.load(...) or a float Hugging Face model
    for token in gen.tokens(prompt_ids, 128):  # greedy; temperature/top_k/top_p/seed for sampling
        ...
    gen.stats                                  # prefill seconds, decode tokens/s, engine, threads used

Threads (``threads="auto"``, the default for the engine): a decode step is a few hundred short parallel loops,
each ending in a barrier, so when another process keeps a core busy a two-thread step waits on the descheduled
thread at every barrier and runs 10-30x slower than one thread alone. :class:`ThreadChooser` therefore times
every step, runs the faster of 1 thread and torch's thread count (the median of each one's recent steps), and
tries the other one now and then (every 16 steps, backing off to every 256 while it keeps losing), so it
follows a load that comes and goes. A :class:`Generator` keeps its chooser from one call to the next.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from lowbit.errors import InputError

log = logging.getLogger(__name__)

ENGINES = ("auto", "native", "eager")


class ThreadChooser:
    """Picks the thread count of each step from the measured times of recent steps (see the module docstring)."""

    def __init__(self, max_threads: int, probe_every: int = 16, max_probe_every: int = 256, window: int = 8):
        self.candidates = sorted({1, max(1, int(max_threads))})
        self.times = {t: collections.deque(maxlen=window) for t in self.candidates}
        self.best = self.candidates[-1]
        self.probe_every, self.base_every, self.max_every = probe_every, probe_every, max_probe_every
        self.since_probe = 0
        self.used: collections.Counter = collections.Counter()

    def next(self) -> int:
        """The thread count for the next step."""
        untried = [t for t in self.candidates if not self.times[t]]
        if untried:
            return untried[0]
        if len(self.candidates) > 1 and self.since_probe >= self.probe_every:
            return next(t for t in self.candidates if t != self.best)
        return self.best

    def record(self, threads: int, seconds: float) -> None:
        """The time a step with ``threads`` took."""
        self.used[threads] += 1
        probed = threads != self.best
        if probed:  # a probe stands for the present: the count's older times may be from another load
            self.times[threads].clear()
        self.times[threads].append(seconds)
        if not all(self.times.values()):
            return
        best = min(self.candidates, key=lambda t: statistics.median(self.times[t]))
        if probed:
            self.since_probe = 0
            # a probe that lost waits twice as long before the next one; one that won resets the interval
            self.probe_every = self.base_every if best == threads else min(2 * self.probe_every, self.max_every)
        else:
            self.since_probe += 1
        self.best = best


class _EagerLM:
    """The model's own forward pass per token with its dynamic cache (the reference to compare against)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache = model, None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        out = self.model(input_ids=ids.reshape(1, -1), use_cache=True)
        self.cache = out.past_key_values
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def step(self, token: int, pos: int, threads: int | None = None) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([[token]]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[0, -1].float()


@dataclass
class GenerationStats:
    engine: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # the steps after the first new token (the first comes from the prefill)
    threads: dict[int, int] = field(default_factory=dict)  # thread count -> steps run with it

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def describe(self) -> str:
        used = ", ".join(f"{n} step(s) on {t} thread(s)" for t, n in sorted(self.threads.items())) or "-"
        return (f"{self.engine}: prompt {self.prompt_tokens} tokens in {1000 * self.prefill_seconds:.1f} ms, "
                f"{self.new_tokens} new tokens at {self.decode_tokens_per_s:.1f} tok/s ({used})")


class Generator:
    """Generation from a causal LM. ``engine``: ``native`` (lowbit's decode engine, an error where it cannot
    run the model), ``eager`` (the model's forward pass per token), ``auto`` (native where it can, else eager
    with a log line saying why). ``threads``: ``"auto"`` (:class:`ThreadChooser`) or a fixed count (native
    engine only; eager runs on torch's)."""

    def __init__(self, model: nn.Module, *, engine: str = "auto", threads: int | str = "auto",
                 max_len: int = 512, exact: bool = False) -> None:
        from lowbit.runtime import native_lm

        if engine not in ENGINES:
            raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if threads != "auto" and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be 'auto' or a positive count, got {threads!r}")
        self.threads = threads
        why = None if engine == "eager" else native_lm.why_not(model)
        if engine == "native" and why is not None:
            raise InputError(f"the decode engine cannot run this model: {why}")
        if engine == "eager" or why is not None:
            if why is not None:
                log.warning("decoding eagerly in torch, not on the decode engine: %s", why)
            self.engine, self.lm = "eager", _EagerLM(model)
        else:
            self.engine, self.lm = "native", native_lm.NativeLM(model, max_len, exact=exact)
        self.stats = GenerationStats(self.engine)
        # kept across calls: what the last steps measured still holds for the next request
        self._chooser = ThreadChooser(torch.get_num_threads())

    def tokens(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: tuple[int, ...] = ()) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids after ``prompt`` (int64 ``(T,)`` or ``(1, T)``), one as
        soon as it is chosen, stopping after a token in ``stop``. Greedy when ``temperature`` is 0; else
        sampled from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0: all)
        and the smallest set whose probability reaches ``top_p``."""
        prompt = torch.as_tensor(prompt).reshape(-1).long()
        if prompt.numel() == 0:
            raise InputError("the prompt has no tokens")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise InputError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, "
                             f"{top_k})")
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        pick = _Sampler(temperature, top_k, top_p, rng)
        native = self.engine == "native"
        if native:
            self.lm.reserve(prompt.numel() + max_new_tokens)
        chooser = self._chooser if native and self.threads == "auto" else None
        fixed = None if self.threads == "auto" else self.threads
        st = self.stats = GenerationStats(self.engine, prompt_tokens=prompt.numel())
        before = dict(chooser.used) if chooser else {}
        t0 = time.perf_counter()
        logits = self.lm.prefill(prompt, chooser.best if chooser else fixed)
        st.prefill_seconds = time.perf_counter() - t0
        pos = prompt.numel()
        for i in range(max_new_tokens):
            token = pick(logits)
            st.new_tokens += 1
            yield token
            if token in stop or i == max_new_tokens - 1:
                break
            threads = chooser.next() if chooser else fixed
            t0 = time.perf_counter()
            logits = self.lm.step(token, pos, threads)
            dt = time.perf_counter() - t0
            st.decode_seconds += dt
            if chooser:
                chooser.record(threads, dt)
            else:
                used = threads or torch.get_num_threads()
                st.threads[used] = st.threads.get(used, 0) + 1
            pos += 1
        if chooser:
            st.threads = {t: chooser.used[t] - before.get(t, 0) for t in chooser.used if chooser.used[t] > before.get(t, 0)}


class _Sampler:
    def __init__(self, temperature: float, top_k: int, top_p: float, rng: torch.Generator | None) -> None:
        self.temperature, self.top_k, self.top_p, self.rng = temperature, top_k, top_p, rng

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(torch.argmax(logits))
        z = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(z, min(self.top_k, z.numel())).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        p = torch.softmax(z, -1)
        if self.top_p < 1:
            sp, idx = torch.sort(p, descending=True)
            keep = torch.cumsum(sp, 0) - sp < self.top_p  # the tokens before the mass reaches top_p, and that one
            p = torch.zeros_like(p).scatter_(0, idx[keep], sp[keep])
        return int(torch.multinomial(p, 1, generator=self.rng))
