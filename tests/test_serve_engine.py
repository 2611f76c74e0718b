"""The batching engine on the tiny model: one request never fails, delays unduly or changes another.

Requests that must share a batch are queued while the engine thread waits inside a call (`held`), so they
are admitted together whatever the machine's speed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from serve.engine import Engine, Event, Failed, Finished, Job, SamplingParams, TextDelta
from serve.errors import APIError, EngineFailure, InvalidRequest

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random LoRA adapters on the tiny base; 'nan' has NaN weights (a broken fine-tune)."""
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm

    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("a", "b", "c", "nan")):
        torch.manual_seed(seed)
        base = load_causal_lm(tiny_base, CPU, torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, lora)
        if name == "nan":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.fill_(float("nan"))
        model.save_pretrained(root / name)
    return {name: root / name for name in ("a", "b", "c", "nan")}


@pytest.fixture(scope="module")
def engine(one_torch_thread, tiny_base: Path, adapters: dict[str, Path]) -> Iterator[Engine]:
    """Adapters 'a', 'b' and 'nan' loaded (fp32: answers compare exactly across batch shapes)."""
    from core.models import load_causal_lm, load_tokenizer
    from serve.metrics import Metrics

    eng = Engine(max_batch=16, max_queue=32, queue_timeout_s=60, metrics=Metrics())
    eng.start()
    base = load_causal_lm(tiny_base, CPU, torch.float32).eval()
    tokenizer = load_tokenizer(tiny_base)
    eng.call(lambda: eng.load_base(base, tokenizer, CPU)).result(60)
    for name in ("a", "b", "nan"):
        eng.call(lambda n=name: eng.add_adapter(n, adapters[n])).result(60)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def prompts(engine: Engine) -> list[list[int]]:
    texts = ["What is a building permit?", "Once upon a time", "The capital of France is", "Hello"]
    return [list(engine.tokenizer(t)["input_ids"]) for t in texts]


@dataclass(eq=False)
class Outcome:
    """Everything one job's sink received."""

    n: int
    job: Job | None = None
    texts: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    error: APIError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def sink(self, event: Event) -> None:
        if isinstance(event, Failed):
            self.error = event.error
            self.done.set()
        elif isinstance(event, TextDelta | Finished):
            self.texts[event.index] = self.texts.get(event.index, "") + event.text
            if isinstance(event, Finished):
                self.reasons[event.index] = event.reason
                if len(self.reasons) == self.n:
                    self.done.set()

    @property
    def answer(self) -> tuple[str, ...]:
        assert self.error is None, self.error.message
        assert self.reasons == dict.fromkeys(range(self.n), "length")
        return tuple(self.texts[i] for i in range(self.n))


Spec = tuple[str, list[int], SamplingParams]


@contextmanager
def held(engine: Engine) -> Iterator[None]:
    """The engine thread waits inside a call while the body queues work; it all joins at the next step."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    future = engine.call(hold)
    assert entered.wait(30)
    try:
        yield
    finally:
        release.set()
        future.result(30)


def submit(engine: Engine, spec: Spec) -> Outcome:
    adapter, ids, params = spec
    out = Outcome(params.n)
    out.job = Job(adapter, ids, params, frozenset(), out.sink)
    engine.submit(out.job, 1)
    return out


def run(engine: Engine, specs: list[Spec]) -> list[Outcome]:
    """Run the jobs side by side (admitted together) and wait for all of them."""
    with held(engine):
        outs = [submit(engine, spec) for spec in specs]
    for out in outs:
        assert out.done.wait(60)
    return outs


def alone(engine: Engine, spec: Spec) -> tuple[str, ...]:
    return run(engine, [spec])[0].answer


def test_sampling_never_raises_for_extreme_values_and_only_non_finite_rows_are_broken():
    from serve.sampling import BROKEN, make_generator, sample

    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    logits[1, 3] = float("nan")
    logits[4, 0] = float("inf")
    top = logits.argmax(dim=1).tolist()

    def gens() -> list[torch.Generator]:
        return [make_generator(1, CPU) for _ in range(7)]

    temps = [1.0, 0.9, 1e-38, 0.7, 0.7, 5e-6, float("nan")]
    top_ps = [1.0, 1.0, 1.0, 0.0, 0.5, -1.0, 0.5]
    out = sample(logits, temps, top_ps, gens())
    assert out[1] == BROKEN and out[4] == BROKEN  # sampled rows with NaN or inf logits: no exception
    assert [out[i] for i in (2, 3, 5, 6)] == [top[i] for i in (2, 3, 5, 6)]  # tiny/NaN temperature, top_p <= 0
    assert sample(logits, temps, top_ps, gens()) == out  # seeded
    rows = 200
    flat = [make_generator(i, CPU) for i in range(rows)]
    many = sample(logits[[0]].expand(rows, 50), [float("inf")] * rows, [1.0] * rows, flat)
    assert len(set(many)) > 20  # infinite temperature: uniform, not an error

    for seed, same in ((10**30, 10**30 % 2**64), (-1, 2**64 - 1), (2**64 + 5, 5)):
        a, b = make_generator(seed, CPU), make_generator(same, CPU)
        assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert not torch.equal(
        torch.rand(4, generator=make_generator(10**30, CPU)), torch.rand(4, generator=make_generator(10**31, CPU))
    )


def test_extreme_sampling_values_neither_fail_nor_change_the_requests_beside_them(engine, prompts):
    normal: list[Spec] = [
        ("a", prompts[0], GREEDY),
        ("b", prompts[1], SamplingParams(max_tokens=6, temperature=0.7, seed=3)),
    ]
    expected = [alone(engine, spec) for spec in normal]
    extreme = [
        SamplingParams(max_tokens=6, temperature=0.7, seed=10**30),
        SamplingParams(max_tokens=6, temperature=1e-38),
        SamplingParams(max_tokens=6, temperature=0.7, seed=-(2**70), n=2),
        SamplingParams(max_tokens=6, temperature=0.9, top_p=0.0, seed=1),
        SamplingParams(max_tokens=6, temperature=0.9, top_p=float("nan"), seed=2),
        SamplingParams(max_tokens=6, temperature=float("inf"), seed=4),
        SamplingParams(max_tokens=6, temperature=float("nan"), seed=5),
        SamplingParams(max_tokens=6, temperature=1e-44, seed=6),  # the tiny model's logits / 1e-44 overflow
        SamplingParams(max_tokens=6, temperature=5e-324, seed=7),
    ]
    outs = run(engine, normal + [("a", prompts[2], params) for params in extreme])
    assert [o.answer for o in outs[:2]] == expected
    greedy = alone(engine, ("a", prompts[2], GREEDY))
    answers = [o.answer for o in outs[2:]]  # every one succeeded
    assert [answers[i] for i in (1, 3, 6, 7, 8)] == [greedy] * 5  # temperature ~0 or NaN, top_p 0: greedy
    assert alone(engine, ("a", prompts[2], extreme[0])) == answers[0]  # a huge seed repeats


def test_a_nan_adapter_fails_only_its_own_request(engine, prompts):
    healthy: list[Spec] = [
        ("a", prompts[0], GREEDY),
        ("b", prompts[2], SamplingParams(max_tokens=6, temperature=0.7, seed=5)),
    ]
    expected = [alone(engine, spec) for spec in healthy]
    broken = ("nan", prompts[1], SamplingParams(max_tokens=6, temperature=0.8, seed=1, n=2))
    outs = run(engine, [healthy[0], broken, healthy[1], ("nan", prompts[3], GREEDY)])
    for out in (outs[1], outs[3]):
        assert isinstance(out.error, EngineFailure) and "non-finite" in out.error.message
    assert [outs[0].answer, outs[2].answer] == expected

    # A broken request joining a running batch: the running request carries on unchanged.
    long_spec = ("a", prompts[0], SamplingParams(max_tokens=24, temperature=0.0))
    long_alone = alone(engine, long_spec)
    with held(engine):
        running = submit(engine, long_spec)
    with held(engine):  # picked up a step or two later
        assert running.job is not None and running.job.first_token_at is not None and not running.done.is_set()
        joiner = submit(engine, broken)
    assert running.done.wait(60) and joiner.done.wait(60)
    assert running.answer == long_alone and isinstance(joiner.error, EngineFailure)


def test_jobs_that_could_never_run_are_refused_on_submission(engine, prompts):
    ok = ("a", prompts[0], GREEDY)
    expected = alone(engine, ok)
    vocab = engine.vocab_size
    assert vocab is not None
    bad = [
        ("a", [], GREEDY),
        ("a", [1, vocab], GREEDY),
        ("a", [-1, 5], GREEDY),
        ("a", prompts[0], SamplingParams(max_tokens=6, n=0)),
        ("a", prompts[0], SamplingParams(max_tokens=6, n=engine.max_batch + 1)),
        ("a", prompts[0], SamplingParams(max_tokens=0)),
    ]
    with held(engine):
        good = submit(engine, ok)
        for spec in bad:
            with pytest.raises(InvalidRequest):
                submit(engine, spec)
    assert good.done.wait(60) and good.answer == expected


def test_an_unload_queued_beside_a_job_for_that_adapter_waits_for_the_job(engine, adapters, prompts):
    engine.call(lambda: engine.add_adapter("c", adapters["c"])).result(60)
    spec = ("c", prompts[1], GREEDY)
    expected = alone(engine, spec)
    with held(engine):  # the job is queued first, then the unload: both are picked up at the same step
        out = submit(engine, spec)
        removed = engine.call(lambda: engine.remove_adapter("c"))
    assert removed.result(30) is False  # the job was still to run
    assert out.done.wait(60) and out.answer == expected
    assert engine.call(lambda: engine.remove_adapter("c")).result(30) is True  # now nothing uses it


def test_prefill_steps_respect_the_token_budget_and_answers_stay_the_same(engine, prompts, monkeypatch):
    ids = [t for p in prompts for t in p]
    long_ids = (ids * 4)[:30]
    shorts = [(p * 6)[:6] for p in prompts]
    specs: list[Spec] = [("a", shorts[0], GREEDY), ("b", long_ids, GREEDY)] + [("a", s, GREEDY) for s in shorts[1:]]
    expected = [alone(engine, spec) for spec in specs]

    groups: list[list[int]] = []
    prefill = engine._prefill

    def spy(jobs: list[Job]):
        groups.append([len(j.prompt_ids) for j in jobs])
        return prefill(jobs)

    monkeypatch.setattr(engine, "_prefill", spy)
    monkeypatch.setattr(engine, "max_prefill_tokens", 24, raising=False)
    outs = run(engine, specs)
    # In arrival order: the long prompt (over the budget) runs alone; no short one overtakes it.
    assert groups == [[6], [30], [6, 6, 6]]
    assert [o.answer for o in outs] == expected

    groups.clear()
    monkeypatch.setattr(engine, "max_prefill_tokens", 4096)
    assert [o.answer for o in run(engine, specs)] == expected
    assert groups == [[6, 30, 6, 6, 6]]


def test_a_seeded_request_answers_the_same_alone_and_beside_others(engine, prompts):
    seeded = ("a", prompts[0], SamplingParams(max_tokens=8, temperature=0.9, seed=7, n=2))
    expected = alone(engine, seeded)
    assert expected[0] != expected[1]  # each choice has its own generator (seed, seed + 1)
    neighbours: list[Spec] = [
        ("b", prompts[1], GREEDY),
        ("a", prompts[2], SamplingParams(max_tokens=8, temperature=1.0, seed=7)),
        ("b", prompts[0], SamplingParams(max_tokens=8, temperature=0.9, seed=8)),
        ("a", prompts[3], SamplingParams(max_tokens=8, temperature=1.0)),
    ]
    outs = run(engine, [neighbours[0], neighbours[1], seeded, neighbours[2], neighbours[3]])
    assert outs[2].answer == expected
    assert engine.decode_steps_by_adapters[2] > 0


def reference(adapter_path: Path, tiny_base: Path, ids: list[int], tokens: int) -> str:
    """Greedy tokens from peft's own unmerged LoRA, no cache: what every engine path must reproduce."""
    from peft import PeftModel

    from core.models import load_causal_lm, load_tokenizer

    model = PeftModel.from_pretrained(load_causal_lm(tiny_base, CPU, torch.float32), adapter_path).eval()
    seq = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(tokens):
            nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return load_tokenizer(tiny_base).decode(seq[0, len(ids) :].tolist(), skip_special_tokens=True)


def test_answers_equal_peft_whichever_version_is_merged_and_whatever_joins_or_leaves(
    engine, adapters, tiny_base, prompts
):
    """Rows of the merged version and corrected rows of another both give peft's answer, while rows join
    with longer prompts than the batch's column (the live block shifts) and leave (the block compacts)."""
    long_prompt = (prompts[0] * 8)[:40]
    want = {
        ("a", 0): reference(adapters["a"], tiny_base, prompts[0], 12),
        ("b", 1): reference(adapters["b"], tiny_base, prompts[1], 6),
        ("b", 9): reference(adapters["b"], tiny_base, long_prompt, 6),
        ("a", 9): reference(adapters["a"], tiny_base, long_prompt, 6),
    }
    for merged in ("a", "b"):
        engine.call(lambda m=merged: engine.lora.merge(m)).result(30)
        with held(engine):
            first = submit(engine, ("a", prompts[0], SamplingParams(max_tokens=12, temperature=0.0)))
            second = submit(engine, ("b", prompts[1], GREEDY))
        with held(engine):  # a step later: longer prompts join the running rows
            third = submit(engine, ("b", long_prompt, GREEDY))
            fourth = submit(engine, ("a", long_prompt, GREEDY))
        for out in (first, second, third, fourth):
            assert out.done.wait(60)
        assert first.answer == (want[("a", 0)],), merged
        assert second.answer == (want[("b", 1)],), merged
        assert third.answer == (want[("b", 9)],), merged
        assert fourth.answer == (want[("a", 9)],), merged


def test_the_merged_version_follows_the_traffic(engine, prompts):
    lora = engine.lora
    engine.call(lambda: lora.merge("a")).result(30)
    expected = alone(engine, ("b", prompts[2], GREEDY))  # 6 steps: fewer than switch_after, no switch
    assert lora.merged == "a"
    steps = SamplingParams(max_tokens=lora.switch_after + 2, temperature=0.0)
    run(engine, [("b", prompts[2], steps)])
    assert lora.merged == "b"  # b had the batch alone long enough
    assert alone(engine, ("b", prompts[2], GREEDY)) == expected  # merged or corrected: the same answer
    run(engine, [("a", prompts[0], GREEDY), ("b", prompts[1], steps)])  # mixed steps never switch
    assert lora.merged == "b"


def test_adapters_the_engine_cannot_serve_are_refused_by_name(engine, adapters, tmp_path):
    import json
    import shutil

    from core.errors import ModelError

    dora = tmp_path / "dora"
    shutil.copytree(adapters["a"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="use_dora"):
        engine.call(lambda: engine.add_adapter("dora", dora)).result(30)
    assert "dora" not in engine.adapters
