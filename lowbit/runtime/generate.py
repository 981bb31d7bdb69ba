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
follows a load that comes and goes. It tries more threads only where the kernel's CPU counters (``/proc/stat``)
show an idle core since it last looked, so a busy machine does not pay for probes that would lose. A
:class:`Generator` keeps its chooser from one call to the next.
"""

from __future__ import annotations

import collections
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from lowbit.errors import InputError

log = logging.getLogger(__name__)

ENGINES = ("auto", "native", "eager")


class IdleMeter:
    """Idle CPU cores, on average, since the previous call (Linux ``/proc/stat``; None where it cannot say)."""

    MIN_TICKS = 4  # a shorter interval (in the kernel's clock ticks, summed over CPUs) says nothing

    def __init__(self, path: str = "/proc/stat") -> None:
        self.path = path
        self.cores = os.cpu_count() or 1
        self.last = self._read()

    def _read(self) -> tuple[int, int] | None:
        try:
            with open(self.path) as f:
                fields = f.readline().split()
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        if not fields or fields[0] != "cpu" or len(values) < 5:
            return None
        return values[3] + values[4], sum(values)

    def __call__(self) -> float | None:
        now = self._read()
        if now is None or self.last is None:
            self.last = now
            return None
        idle, total = now[0] - self.last[0], now[1] - self.last[1]
        if total < self.MIN_TICKS:
            return None
        self.last = now
        return self.cores * idle / total


class ThreadChooser:
    """Picks the thread count of each step from the measured times of recent steps (see the module docstring).

    A step with more threads than the current best is tried only where ``idle()`` (idle cores since the last
    check, :class:`IdleMeter`) says a core was free for the extra thread, or cannot say: on a machine whose other
    cores are busy such a step costs tens of milliseconds, and it would lose anyway."""

    def __init__(self, max_threads: int, probe_every: int = 16, max_probe_every: int = 256, window: int = 8,
                 idle=None):
        self.candidates = sorted({1, max(1, int(max_threads))})
        self.times = {t: collections.deque(maxlen=window) for t in self.candidates}
        self.best = self.candidates[-1]
        self.probe_every, self.base_every, self.max_every = probe_every, probe_every, max_probe_every
        self.since_probe = 0
        self.used: collections.Counter = collections.Counter()
        self.idle = idle if idle is not None else IdleMeter()
        self.skipped = 0  # probes of more threads not made: no idle core

    def next(self) -> int:
        """The thread count for the next step."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        low, high = self.candidates
        if not self.times[low]:
            return low
        due = self.since_probe >= self.probe_every
        if self.best == low and (due or not self.times[high]):
            idle = self.idle()
            if idle is not None and idle < 0.5 * (high - low):
                self.since_probe, self.skipped = 0, self.skipped + 1  # look again after probe_every steps
                return low
            return high
        if self.best == high and due:
            return low
        return self.best

    def record(self, threads: int, seconds: float) -> None:
        """The time a step with ``threads`` took."""
        self.used[threads] += 1
        probed = threads != self.best
        if probed:  # a probe stands for the present: the count's older times may be from another load
            self.times[threads].clear()
            self.since_probe = 0
        else:
            self.since_probe += 1
        self.times[threads].append(seconds)
        best = min((t for t in self.candidates if self.times[t]), key=lambda t: statistics.median(self.times[t]))
        if best != self.best:  # the load changed (or a probe won): look at the other count at the base rate again
            self.probe_every = self.base_every
        elif probed and all(len(self.times[t]) for t in self.candidates):
            self.probe_every = min(2 * self.probe_every, self.max_every)  # a probe that lost waits twice as long
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
        try:
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
        finally:  # also when the caller stops reading early
            if chooser:
                st.threads = {t: n - before.get(t, 0) for t, n in chooser.used.items() if n > before.get(t, 0)}


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
