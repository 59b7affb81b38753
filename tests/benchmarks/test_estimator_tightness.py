"""Estimator tightness: input hold / actual input tokens on a mixed prompt corpus.

Prints numbers and asserts none. Run with
``uv run pytest tests/benchmarks --benchmarks -s -k estimator_tightness``.

The corpus (tests/corpus.py) mixes English prose, wide JSON tool schemas, CJK and other
non-Latin text with emoji, pasted base64 and multi-turn chat histories with tool calls.
"Actual" is what OpenAI bills for the prompt, counted with o200k_base (``reference_tokens``).
The adaptive estimator is trained on the first half and measured on the second half, the
part every estimator is measured on.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from allotment import Call, Usage
from allotment._estimate import AdaptiveEstimator, SoundEstimator, load_encoding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from corpus import KINDS, Prompt, make_corpus, reference_tokens

SEED = 20_240_601
PROMPTS = 600
MODEL = "gpt-4o"
PUBLISHED = "published token-budgets Rust crate: median 3.92x static, 2.11x adaptive"


def counter() -> tuple[Callable[[str], int] | None, str]:
    """o200k_base without the network, or None and why not."""
    try:
        import tiktoken  # noqa: F401  (only to tell a missing package from missing files)
    except ImportError:
        return None, "tiktoken is not installed"
    enc = load_encoding("o200k_base")
    if enc is None:
        return None, (
            "o200k_base is not on disk (set TIKTOKEN_CACHE_DIR to a directory with tiktoken's "
            "cached file, or install llama-index-core, which ships one); nothing is downloaded"
        )
    return (lambda text: len(enc.encode_ordinary(text))), "o200k_base"


def words(text: str) -> int:
    """A stand-in 'tokenizer' when tiktoken is unavailable (never more tokens than bytes)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def as_call(prompt: Prompt) -> Call:
    return Call(model=MODEL, messages=prompt.messages, tools=prompt.tools, max_output_tokens=512)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def row(label: str, holds: list[int], actual: list[int]) -> str:
    ratios = [h / a for h, a in zip(holds, actual, strict=True)]
    under = sum(h < a for h, a in zip(holds, actual, strict=True))
    return (
        f"{label:<40} {len(ratios):>4} {statistics.median(ratios):>7.2f}x {p95(ratios):>7.2f}x "
        f"{min(ratios):>7.2f}x {under:>6}"
    )


def test_estimator_tightness_on_a_mixed_corpus() -> None:
    """Prints median and p95 of hold/actual input tokens and the count of under-estimates
    for the sound byte bound, exact tiktoken counting and the adaptive estimator, overall
    and per prompt kind."""
    count, how = counter()
    exact_note = ""
    if count is None:
        exact_note = f"exact: unavailable, {how}"
        count, how = words, f"word-and-punctuation stand-in ({exact_note})"
    corpus = make_corpus(SEED, n=PROMPTS)
    train, test = corpus[: PROMPTS // 2], corpus[PROMPTS // 2 :]
    actual = [reference_tokens(p, count) for p in test]

    sound = SoundEstimator(exact=False)
    exact = SoundEstimator(exact=True)
    frozen = AdaptiveEstimator(SoundEstimator(exact=False), window=len(train))
    online = AdaptiveEstimator(SoundEstimator(exact=False), window=len(train))
    p99 = AdaptiveEstimator(SoundEstimator(exact=False), window=len(train), quantile=0.99)
    # One more, for comparison: an estimator per prompt kind, as if statistics were kept
    # per kind of traffic rather than per model.
    per_kind = {k: AdaptiveEstimator(SoundEstimator(exact=False), window=len(train)) for k in KINDS}
    for prompt in train:
        used = Usage(input_tokens=reference_tokens(prompt, count), output_tokens=1, llm_calls=1)
        for adaptive in (frozen, online, p99, per_kind[prompt.kind]):
            adaptive.observe(as_call(prompt), used)

    def holds(estimate: Callable[[Call], int], prompts: list[Prompt]) -> list[int]:
        return [estimate(as_call(p)) for p in prompts]

    def adaptive_hold(adaptive: AdaptiveEstimator) -> Callable[[Call], int]:
        def hold(call: Call) -> int:
            est = adaptive.estimate(call)
            assert est is not None  # trained past min_samples
            return est.usage.input_tokens

        return hold

    online_holds = []
    for prompt, used in zip(test, actual, strict=True):
        call = as_call(prompt)
        online_holds.append(adaptive_hold(online)(call))
        online.observe(call, Usage(input_tokens=used, output_tokens=1, llm_calls=1))

    results: list[tuple[str, str, list[int]]] = [
        ("sound byte bound", "sound", holds(lambda c: sound.estimate(c).usage.input_tokens, test))
    ]
    exact_holds = [exact.estimate(as_call(p)) for p in test]
    if all(e.exact_input for e in exact_holds):
        label = "exact (tiktoken o200k_base + framing)"
        results.append((label, "exact", [e.usage.input_tokens for e in exact_holds]))
    elif not exact_note:
        exact_note = f"exact: unavailable, the estimator did not count {MODEL} exactly"
    results += [
        ("adaptive (trained, then frozen)", "frozen", holds(adaptive_hold(frozen), test)),
        ("adaptive (trained, still learning)", "online", online_holds),
        ("adaptive, quantile 0.99 (frozen)", "q0.99", holds(adaptive_hold(p99), test)),
        (
            "adaptive, one per prompt kind (frozen)",
            "per kind",
            [adaptive_hold(per_kind[p.kind])(as_call(p)) for p in test],
        ),
    ]

    print()
    print(
        f"{len(corpus)} prompts ({', '.join(KINDS)}); adaptive trained on {len(train)}, "
        f"all measured on {len(test)}; actual input tokens by {how}"
    )
    if exact_note:
        print(exact_note)
    header = f"{'estimator':<40} {'n':>4} {'median':>8} {'p95':>8} {'min':>8} {'under':>6}"
    print(header)
    print("-" * len(header))
    for label, _, h in results:
        print(row(label, h, actual))

    print()
    print("per kind: median hold/actual (under-estimates)")
    print(f"{'kind':<14}" + "".join(f"{short:>16}" for _, short, _ in results))
    for kind in KINDS:
        idx = [i for i, p in enumerate(test) if p.kind == kind]
        cells = []
        for _, _, h in results:
            ratios = [h[i] / actual[i] for i in idx]
            under = sum(h[i] < actual[i] for i in idx)
            cells.append(f"{statistics.median(ratios):>10.2f}x ({under})")
        print(f"{kind:<14}" + "".join(f"{c:>16}" for c in cells))
    print()
    print(f"for comparison, {PUBLISHED}")
