"""Streaming generation (lowbit.runtime.generate), the thread chooser, and ``lowbit generate``."""

from __future__ import annotations

import pytest
import torch

from lowbit import QuantPlan, Rule, quantize
from lowbit.cli import main
from lowbit.errors import InputError
from lowbit import native
from lowbit.kernels import use_kernels
from lowbit.models.tiny import tiny_gpt2, tiny_llama
from lowbit.runtime.generate import Generator, IdleMeter, ThreadChooser

needs_native = pytest.mark.skipif(native.why_unavailable() is not None, reason="lowbit's C++ kernels are unavailable")


def _int4_llama():
    model = tiny_llama()
    quantize(model, QuantPlan((Rule("*", "int4-g64-asym"),), skip=("type:Embedding",)), None, progress=False)
    use_kernels(model)
    return model


PROMPT = torch.tensor([1, 72, 101, 108, 108, 111, 44, 32])


@needs_native
def test_greedy_tokens_of_the_exact_engine_equal_the_eager_ones():
    model = _int4_llama()
    native_gen = Generator(model, engine="native", exact=True, threads=2)
    eager_gen = Generator(model, engine="eager")
    a = list(native_gen.tokens(PROMPT, 64))
    b = list(eager_gen.tokens(PROMPT, 64))
    assert a == b and len(a) == 64
    assert native_gen.engine == "native" and eager_gen.engine == "eager"
    assert native_gen.stats.new_tokens == 64 and native_gen.stats.threads == {2: 63}


def test_auto_falls_back_to_eager_with_the_reason(caplog):
    gen = Generator(tiny_gpt2(), engine="auto")
    assert gen.engine == "eager"
    assert len(list(gen.tokens(PROMPT, 5))) == 5
    if native.why_unavailable() is None:
        assert any("model type 'gpt2'" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="cannot run this model"):
        Generator(tiny_gpt2(), engine="native")


@needs_native
def test_sampling_is_reproducible_with_a_seed_and_stops_at_a_stop_token():
    model = _int4_llama()
    gen = Generator(model)
    a = list(gen.tokens(PROMPT, 32, temperature=1.0, top_k=50, top_p=0.9, seed=7))
    b = list(gen.tokens(PROMPT, 32, temperature=1.0, top_k=50, top_p=0.9, seed=7))
    assert a == b
    stop = a[5]
    c = list(gen.tokens(PROMPT, 32, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop=(stop,)))
    assert c == a[:a.index(stop) + 1]


def test_top_k_one_is_greedy():
    model = tiny_llama()
    gen = Generator(model, engine="eager")
    assert list(gen.tokens(PROMPT, 16, temperature=0.8, top_k=1, seed=0)) == list(gen.tokens(PROMPT, 16))


@pytest.mark.parametrize("kwargs,match", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                          ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_settings_are_refused(kwargs, match):
    gen = Generator(tiny_llama(), engine="eager")
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InputError, match=match):
        list(gen.tokens(PROMPT, **args))
    with pytest.raises(InputError, match="no tokens"):
        list(gen.tokens(torch.tensor([], dtype=torch.long), 4))
    with pytest.raises(InputError, match="threads"):
        Generator(tiny_llama(), threads=0)


class TestThreadChooser:
    def run(self, chooser, cost, steps):
        used = []
        for _ in range(steps):
            t = chooser.next()
            chooser.record(t, cost(t))
            used.append(t)
        return used

    def test_keeps_the_faster_count_and_probes_the_other_now_and_then(self):
        c = ThreadChooser(2, idle=lambda: None)  # no CPU counters: the times alone decide
        used = self.run(c, lambda t: 1.0 / t, 200)  # 2 threads twice as fast
        assert used[:2] == [1, 2]
        assert c.best == 2 and 3 <= used.count(1) <= 8  # probes after 16, 32, 64, 128 steps (each lost)

    def test_a_busy_core_moves_it_to_one_thread_and_probes_back_off(self):
        c = ThreadChooser(2, idle=lambda: None)
        self.run(c, lambda t: 1.0 / t, 50)
        used = self.run(c, lambda t: 1.0 if t == 1 else 20.0, 600)  # another process now holds a core
        assert c.best == 1
        late = used[100:]
        assert late.count(2) <= 3  # probes of 2 threads every 16, 32, ... then 256 steps
        used = self.run(c, lambda t: 1.0 / t, 600)  # the load is gone again
        assert c.best == 2 and used[-50:].count(2) >= 45

    def test_no_idle_core_means_no_probe_of_more_threads(self):
        idle = {"cores": 1.0}
        c = ThreadChooser(2, idle=lambda: idle["cores"])
        self.run(c, lambda t: 1.0 / t, 50)
        assert c.best == 2
        idle["cores"] = 0.0  # the other core is now busy, and a 2-thread step costs 20x
        used = self.run(c, lambda t: 1.0 if t == 1 else 20.0, 600)
        assert c.best == 1 and used[50:].count(2) == 0 and c.skipped >= 30
        idle["cores"] = 0.9  # free again: the next check finds it
        used = self.run(c, lambda t: 1.0 / t, 40)
        assert c.best == 2 and used[-20:].count(2) >= 18

    def test_idle_meter_reads_proc_stat(self, tmp_path):
        stat = tmp_path / "stat"
        stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
        meter = IdleMeter(str(stat))
        meter.cores = 2
        stat.write_text("cpu  150 0 100 850 0 0 0 0 0 0\n")  # 100 ticks, half of them idle
        assert meter() == pytest.approx(1.0)
        stat.write_text("cpu  151 0 100 850 0 0 0 0 0 0\n")  # 1 tick: too short to say
        assert meter() is None
        assert IdleMeter(str(tmp_path / "missing"))() is None

    def test_one_thread_has_nothing_to_choose(self):
        c = ThreadChooser(1)
        assert set(self.run(c, lambda t: 1.0, 40)) == {1}


@needs_native
def test_cli_generate_streams_text_and_reports_speed(tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", "tiny-llama", "--scheme", "int4-g64-asym", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "Hello", "--max-new-tokens", "12", "--ignore-eos",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "native: prompt" in captured.err and "11 step(s) on 1 thread(s)" in captured.err
    assert captured.out.endswith("\n")


def test_cli_generate_refuses_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert main(["generate", "tiny-llama", "--prompt-file", str(empty)]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["generate", "tiny-llama", "--prompt-file", str(latin)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["generate", "tiny-cnn", "--prompt", "x"]) == 2
    assert "causal LM" in capsys.readouterr().err
    assert main(["generate", "tiny-llama", "--prompt", "x", "--threads", "two"]) == 2
    assert "--threads" in capsys.readouterr().err
