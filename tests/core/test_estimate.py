"""Estimators: the sound byte bound, exact tiktoken counts, image rules, output caps, and
the adaptive estimator, on a deterministic corpus (tests/corpus.py)."""

from __future__ import annotations

import base64
import hashlib
import math
import os
import random
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import pytest
from allotment import _estimate, hookspecs
from allotment._call import Call, Image
from allotment._errors import ConfigurationError
from allotment._estimate import (
    AdaptiveEstimator,
    SoundEstimator,
    encoding_name,
    image_tokens,
    load_encoding,
    max_output_tokens,
)
from allotment._usage import Usage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from corpus import KINDS, Prompt, make_corpus, reference_tokens

SEED = 20_240_601
_O200K_FILE = hashlib.sha1(
    b"https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
).hexdigest()


def _o200k() -> Callable[[str], int]:
    enc = load_encoding("o200k_base")
    if enc is None:
        pytest.skip(
            "o200k_base is not available offline: set TIKTOKEN_CACHE_DIR to a directory "
            "holding tiktoken's cached encoding files, or install llama-index-core"
        )
    return lambda text: len(enc.encode_ordinary(text))


def _words(text: str) -> int:
    """A stand-in tokenizer when tiktoken's files are absent: never more tokens than bytes."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def _call(prompt: Prompt, model: str = "gpt-4o", **kw: Any) -> Call:
    return Call(model=model, messages=prompt.messages, tools=prompt.tools, **kw)


BYTES = SoundEstimator(exact=False)


# -- the byte bound ---------------------------------------------------------------------


def test_corpus_is_deterministic_and_mixed() -> None:
    a, b = make_corpus(SEED, n=60), make_corpus(SEED, n=60)
    assert a == b
    assert {p.kind for p in a} == set(KINDS)
    assert make_corpus(SEED + 1, n=6) != make_corpus(SEED, n=6)


def test_byte_bound_is_above_the_real_o200k_count_on_the_corpus() -> None:
    count = _o200k()
    corpus = make_corpus(SEED, n=240)
    ratios = []
    for prompt in corpus:
        actual = reference_tokens(prompt, count)
        bound = BYTES.estimate(_call(prompt)).usage.input_tokens
        assert bound >= actual, (prompt.kind, bound, actual)
        ratios.append(bound / actual)
    print(
        f"byte bound / o200k tokens over {len(corpus)} prompts: median "
        f"{statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}"
    )


def test_byte_bound_holds_for_adversarial_text() -> None:
    count = _o200k()
    rng = random.Random(SEED)
    for _ in range(50):
        # Random code points across planes, combining marks and isolated emoji modifiers:
        # the worst case for a tokenizer is one token per byte, never more.
        text = "".join(
            chr(
                rng.choice(
                    [
                        rng.randint(0x20, 0x7E),
                        rng.randint(0x300, 0x36F),
                        rng.randint(0x1F3FB, 0x1F3FF),
                        rng.randint(0x10000, 0x10FFF),
                        rng.randint(0xE000, 0xF8FF),
                    ]
                )
            )
            for _ in range(rng.randint(1, 400))
        )
        prompt = Prompt("adversarial", [{"role": "user", "content": text}])
        assert BYTES.estimate(_call(prompt)).usage.input_tokens >= reference_tokens(prompt, count)


def test_byte_bound_counts_every_text_once_plus_framing() -> None:
    call = Call(
        model="mystery-model",
        messages=[
            "plain string",
            {"role": "user", "content": "héllo"},
            {"role": "assistant", "content": [{"type": "text", "text": "abc"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        max_output_tokens=10,
    )
    est = SoundEstimator(exact=False).estimate(call)
    texts = [
        "plain string",
        "user",
        "héllo",
        "assistant",
        "text",
        "abc",
        "assistant",
        "c1",
        "function",
        "f",
        '{"a":1}',
        "tool",
        "c1",
        "ok",
    ]
    expected = sum(len(t.encode()) for t in texts) + 16 + 8 * 5
    assert est.usage.input_tokens == expected
    assert not est.exact_input
    assert est.usage.llm_calls == 1


def test_structured_tool_arguments_count_as_json() -> None:
    count = _o200k()
    args = {f"k{i}": i for i in range(50)}
    call = Call(
        model="claude-sonnet-4-5",
        messages=[
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": args}],
            }
        ],
        max_output_tokens=1,
    )
    dumped = '{"k0":0,' + ",".join(f'"k{i}":{i}' for i in range(1, 50)) + "}"
    assert BYTES.estimate(call).usage.input_tokens >= len(dumped) >= count(dumped)


def test_tool_schemas_cost_their_json_and_a_tool_overhead() -> None:
    tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    dumped = len('{"type":"function","function":{"name":"search","parameters":{"type":"object"}}}')
    base = Call(model="claude-sonnet-4-5", messages=["hi"], max_output_tokens=1)
    with_tool = Call(model="claude-sonnet-4-5", messages=["hi"], tools=[tool], max_output_tokens=1)
    openai = Call(model="gpt-4o", messages=["hi"], tools=[tool], max_output_tokens=1)
    b = BYTES.estimate(base).usage.input_tokens
    assert BYTES.estimate(with_tool).usage.input_tokens == b + dumped + 16 + 600
    assert BYTES.estimate(openai).usage.input_tokens == b + dumped + 16 + 64
    custom = SoundEstimator(exact=False, tools_overhead=0, per_tool=0)
    assert custom.estimate(with_tool).usage.input_tokens == b + dumped


def test_framework_objects_are_flattened() -> None:
    import pydantic

    class Msg(pydantic.BaseModel):
        role: str
        content: str

    class LikeLangChain:
        type = "human"
        content = "from an object"

    @dataclass
    class DC:
        role: str
        content: str

    call = Call(
        model="mystery",
        messages=[Msg(role="user", content="pydantic"), LikeLangChain(), DC("user", "dc"), 42],
        max_output_tokens=0,
    )
    est = BYTES.estimate(call)
    texts = ["user", "pydantic", "human", "from an object", "user", "dc", "42"]
    assert est.usage.input_tokens == sum(map(len, texts)) + 16 + 8 * 4


def test_embeddings_reserve_input_only_and_token_ids_count_as_given() -> None:
    call = Call(kind="embedding", model="mystery-embed", messages=["hello", "wörld", [1, 2, 3]])
    est = BYTES.estimate(call)
    assert est.usage == Usage(input_tokens=5 + 6 + 3 + 2 * 3)
    assert est.usage.llm_calls == 0
    assert est.usage.output_tokens == 0


def test_tool_calls_reserve_one_call_and_no_tokens() -> None:
    est = BYTES.estimate(Call(kind="tool", tool_name="search", messages=["ignored"]))
    assert est.usage == Usage(tool_calls=1, tools=(("search", 1),))
    assert est.notes


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError):
        SoundEstimator(output_ceiling=-1)
    with pytest.raises(ConfigurationError):
        SoundEstimator(per_message=True)
    with pytest.raises(ConfigurationError):
        AdaptiveEstimator(margin=0.5)
    with pytest.raises(ConfigurationError):
        AdaptiveEstimator(quantile=0)
    with pytest.raises(ConfigurationError):
        AdaptiveEstimator(min_samples=10, window=5)


# -- exact counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("openai/gpt-4.1-nano", "o200k_base"),
        ("gpt-5.1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("azure/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", None),
        ("gemini-2.5-pro", None),
        ("gpt-oss-120b", None),
        ("o100", None),
        (None, None),
    ],
)
def test_encoding_is_chosen_for_openai_models_only(model: str | None, encoding: str | None) -> None:
    assert encoding_name(model) == encoding


def test_exact_mode_is_tiktoken_count_plus_framing() -> None:
    count = _o200k()
    exact = SoundEstimator()
    for prompt in make_corpus(SEED, n=60):
        est = exact.estimate(_call(prompt, max_output_tokens=100))
        assert est.exact_input
        pieces: list[str] = []
        for m in prompt.messages:
            sent = _estimate._Sent()
            sent.value(m)
            pieces.extend(sent.texts)
        framing = 16 + 8 * len(prompt.messages)
        if prompt.tools:
            framing += 16 * len(prompt.tools) + 64
        tools = sum(count(_estimate._tool_json(t)) for t in prompt.tools)
        assert est.usage.input_tokens == sum(map(count, pieces)) + tools + framing
        assert est.usage.input_tokens >= reference_tokens(prompt, count)


def test_exact_mode_is_off_for_other_models_and_when_disabled() -> None:
    prompt = make_corpus(SEED, n=1)[0]
    assert not SoundEstimator().estimate(_call(prompt, "claude-sonnet-4-5")).exact_input
    assert not SoundEstimator(exact=False).estimate(_call(prompt, "gpt-4o")).exact_input


# -- tokenizer files: offline only ---------------------------------------------------------


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    tiktoken_load = pytest.importorskip("tiktoken.load")
    registry = pytest.importorskip("tiktoken.registry")

    def refuse(blobpath: str) -> bytes:
        raise AssertionError(f"tried to download {blobpath}")

    monkeypatch.setattr(tiktoken_load, "read_file", refuse)
    monkeypatch.setattr(registry, "ENCODINGS", {})
    monkeypatch.setattr(_estimate, "_encodings", {})


def _real_o200k_file() -> Path | None:
    for directory, _ in _estimate._cache_dirs():
        if (directory / _O200K_FILE).is_file():
            return directory / _O200K_FILE
    return None


@pytest.mark.usefixtures("no_download")
def test_missing_or_corrupt_encoding_files_are_never_downloaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert load_encoding("o200k_base") is None
    (tmp_path / _O200K_FILE).write_bytes(b"not an encoding")
    monkeypatch.setattr(_estimate, "_encodings", {})
    assert load_encoding("o200k_base") is None
    # tiktoken would have deleted the bad file and fetched it again; it was never asked.
    assert (tmp_path / _O200K_FILE).read_bytes() == b"not an encoding"
    assert load_encoding("no_such_encoding") is None
    # With no exact count available the estimate falls back to bytes, silently.
    est = SoundEstimator().estimate(Call(model="gpt-4o", messages=["hi"], max_output_tokens=1))
    assert not est.exact_input


def test_llama_index_copy_is_borrowed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = _real_o200k_file()
    if real is None:
        pytest.skip("no o200k_base cache file on this machine to stage as llama-index's copy")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "empty"))
    static = tmp_path / "site" / "llama_index" / "core" / "_static" / "tiktoken_cache"
    static.mkdir(parents=True)
    (static / _O200K_FILE).write_bytes(real.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    tiktoken_load = pytest.importorskip("tiktoken.load")
    registry = pytest.importorskip("tiktoken.registry")
    monkeypatch.setattr(tiktoken_load, "read_file", lambda p: pytest.fail(f"download {p}"))
    monkeypatch.setattr(registry, "ENCODINGS", {})
    monkeypatch.setattr(_estimate, "_encodings", {})
    enc = load_encoding("o200k_base")
    assert enc is not None
    assert enc.encode_ordinary("hello world") == [24912, 2375]
    assert "TIKTOKEN_CACHE_DIR" not in os.environ


# -- images ----------------------------------------------------------------------------------


def _png(width: int, height: int, padding: int) -> str:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x06\x00\x00\x00"
    raw = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + b"\0" * 4
    return base64.b64encode(raw + random.Random(padding).randbytes(padding)).decode()


def _jpeg(width: int, height: int, exif: int) -> str:
    app1 = b"\xff\xe1" + (exif + 2).to_bytes(2, "big") + b"E" * exif
    sof = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + height.to_bytes(2, "big")
    sof += width.to_bytes(2, "big") + b"\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return base64.b64encode(b"\xff\xd8" + app1 + sof + b"\0" * 100).decode()


def _gif(width: int, height: int) -> str:
    raw = b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\0" * 20
    return base64.b64encode(raw).decode()


def _webp(width: int, height: int) -> str:
    body = b"WEBP" + b"VP8X" + (10).to_bytes(4, "little") + b"\0" * 4
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return base64.b64encode(b"RIFF" + len(body).to_bytes(4, "little") + body).decode()


def _image_message(url: str, detail: str = "high") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": url, "detail": detail}},
        ],
    }


@pytest.mark.parametrize(
    ("model", "width", "height", "detail", "tokens"),
    [
        ("gpt-4o", 1024, 1024, "high", 765),  # OpenAI's worked examples
        ("gpt-4o", 2048, 4096, "high", 1105),
        ("gpt-4o", 4096, 8192, "low", 85),
        ("gpt-4o", 512, 512, "auto", 255),
        ("gpt-4o", 100, 100, "high", 255),  # small images are not scaled up
        ("gpt-4o", None, None, "high", 85 + 170 * 8),
        ("gpt-4o-mini", 1024, 1024, "high", 2833 + 5667 * 4),
        ("gpt-4.1-mini", 1024, 1024, "high", math.ceil(1024 * 1.62)),
        ("gpt-4.1-nano", 4000, 4000, "high", math.ceil(1536 * 2.46)),
        ("o1", 1024, 1024, "high", 75 + 150 * 4),
        ("claude-sonnet-4-5", 1024, 1024, "auto", 1399),
        ("claude-sonnet-4-5", 4000, 3000, "auto", 1600),
        ("claude-3-5-sonnet-20241022", None, None, "auto", 1600),
        ("claude-opus-4-7", None, None, "auto", 4800),
        ("claude-opus-4-7", 2576, 1456, "auto", 4800),  # 92 x 52 patches = 4784
        ("gemini-2.5-flash", 300, 300, "auto", 258),
        ("gemini-2.5-flash", 1000, 1000, "auto", 4 * 258),
        ("gemini-3-pro-preview", 300, 300, "auto", 1120),
        ("mystery-vlm", None, None, "auto", 4800),
    ],
)
def test_image_rules(
    model: str, width: int | None, height: int | None, detail: str, tokens: int
) -> None:
    assert image_tokens(Image(width=width, height=height, detail=detail), model) == tokens


def test_unknown_provider_takes_the_largest_rule() -> None:
    img = Image(width=1024, height=1024)
    assert image_tokens(img, "mystery", None) == max(
        image_tokens(img, "gpt-5"),
        image_tokens(img, "claude-opus-4-7"),
        image_tokens(img, "gemini-3-pro"),
    )
    assert image_tokens(img, "my-deployment", "anthropic") == image_tokens(img, "claude-opus-4-7")


@pytest.mark.parametrize(
    "encoded",
    [_png(1024, 1024, 300_000), _jpeg(1024, 1024, 60_000), _gif(1024, 1024), _webp(1024, 1024)],
)
def test_inline_images_are_sized_from_their_header_not_their_base64(encoded: str) -> None:
    text_only = BYTES.estimate(
        Call(
            model="gpt-4o",
            messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"}]}],
            max_output_tokens=1,
        )
    ).usage.input_tokens
    url = f"data:image/png;base64,{encoded}"
    est = BYTES.estimate(Call(model="gpt-4o", messages=[_image_message(url)], max_output_tokens=1))
    assert est.usage.input_tokens == text_only + 765
    assert any("images by rule" in n for n in est.notes)


def test_image_cost_does_not_grow_with_its_base64() -> None:
    def cost(padding: int) -> int:
        url = f"data:image/png;base64,{_png(800, 600, padding)}"
        call = Call(model="claude-sonnet-4-5", messages=[_image_message(url)], max_output_tokens=1)
        return BYTES.estimate(call).usage.input_tokens

    assert cost(1_000) == cost(500_000) < 1_000


def test_image_parts_of_each_api_shape() -> None:
    png = _png(1024, 1024, 10_000)
    shapes: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": f"data:image/png;base64,{png}"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{png}", "detail": "high"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "image", "base64": png, "mime_type": "image/png"},
        {"inline_data": {"mime_type": "image/png", "data": png}},
    ]
    for part in shapes:
        sent = _estimate._Sent()
        sent.value({"role": "user", "content": [part]})
        assert sent.images == [Image(width=1024, height=1024, detail=sent.images[0].detail)], part
        assert all(len(t) < 100 for t in sent.texts), part
    url = {
        "type": "image_url",
        "image_url": {"url": "https://example.com/cat.png", "detail": "low"},
    }
    sent = _estimate._Sent()
    sent.value(url)
    assert sent.images == [Image(detail="low")]


def test_call_images_are_counted_and_other_media_fall_back_to_their_size() -> None:
    call = Call(
        model="gpt-4o",
        messages=["hi"],
        images=[Image(width=1024, height=1024)],
        max_output_tokens=1,
    )
    assert BYTES.estimate(call).usage.input_tokens == 2 + 16 + 8 + 765
    audio = {"inline_data": {"mime_type": "audio/wav", "data": "A" * 4000}}
    est = BYTES.estimate(
        Call(
            model="gemini-2.5-flash",
            messages=[{"role": "user", "parts": [audio]}],
            max_output_tokens=1,
        )
    )
    assert est.usage.input_tokens >= 4000
    assert any("non-image media" in n for n in est.notes)


def test_pasted_base64_text_is_text() -> None:
    blob = base64.b64encode(random.Random(1).randbytes(3000)).decode()
    est = BYTES.estimate(Call(model="gpt-4o", messages=[blob], max_output_tokens=1))
    assert est.usage.input_tokens == len(blob) + 16 + 8


# -- output bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        ("gpt-4o", 16_384),
        ("gpt-4o-2024-08-06", 16_384),
        ("openai:gpt-4o-mini", 16_384),
        ("openai/gpt-4.1-mini", 32_768),
        ("o3-mini", 100_000),
        ("o4-mini", 100_000),
        ("gpt-5", 128_000),
        ("gpt-5.1-codex", 128_000),
        ("gpt-4", 8_192),
        ("claude-sonnet-4-5-20250929", 64_000),
        ("claude-opus-4-1-20250805", 32_000),
        ("us.anthropic.claude-opus-4-1-20250805-v1:0", 32_000),
        ("claude-opus-4.1", 32_000),
        ("claude-opus-4-20250514", 32_000),
        ("claude-3-5-haiku-latest", 8_192),
        ("models/gemini-2.5-pro", 65_536),
        ("gemini-2.0-flash", 8_192),
        ("mystery", None),
        (None, None),
    ],
)
def test_max_output_table(model: str | None, limit: int | None) -> None:
    assert max_output_tokens(model) == limit


def test_output_bound_precedence() -> None:
    est = SoundEstimator(exact=False, output_ceiling=1_000)
    assert est.estimate(Call(model="gpt-4o", max_output_tokens=123)).usage.output_tokens == 123
    assert est.estimate(Call(model="mystery", max_output_tokens=0)).usage.output_tokens == 0
    assert est.estimate(Call(model="gpt-4o")).usage.output_tokens == 16_384
    assert est.estimate(Call(model="mystery")).usage.output_tokens == 1_000
    assert SoundEstimator().estimate(Call(model=None)).usage.output_tokens == 16_384
    notes = est.estimate(Call(model="mystery")).notes
    assert any("ceiling 1000" in n for n in notes)


# -- adaptive --------------------------------------------------------------------------------


def _actual_counter() -> tuple[Callable[[str], int], str]:
    enc = load_encoding("o200k_base")
    if enc is None:
        return _words, "word-and-punctuation stand-in (tiktoken files not available)"
    return (lambda text: len(enc.encode_ordinary(text))), "o200k_base"


def _settle(prompt: Prompt, actual: int) -> Usage:
    return Usage(input_tokens=actual, output_tokens=50, llm_calls=1)


@pytest.mark.parametrize("kind", ["history", "english", "tools", "multilingual"])
def test_adaptive_gets_tighter_and_rarely_under_estimates(kind: str) -> None:
    count, how = _actual_counter()
    adaptive = AdaptiveEstimator(SoundEstimator(exact=False), min_samples=20, window=200)
    corpus = make_corpus(SEED, n=300, kinds=(kind,))
    sound_ratios, adaptive_ratios, under, adapted = [], [], 0, 0
    for prompt in corpus:
        call = _call(prompt, "claude-sonnet-4-5", max_output_tokens=1_000)
        actual = reference_tokens(prompt, count)
        sound = BYTES.estimate(call)
        est = adaptive.estimate(call)
        if est is not None:
            adapted += 1
            assert est.usage.input_tokens <= sound.usage.input_tokens
            assert est.usage.output_tokens == 1_000
            assert est.usage.llm_calls == 1
            under += est.usage.input_tokens < actual
            adaptive_ratios.append(est.usage.input_tokens / actual)
            sound_ratios.append(sound.usage.input_tokens / actual)
        adaptive.allotment_after_call(call=call, usage=_settle(prompt, actual), estimate=est)
    assert adapted == len(corpus) - 20
    med_sound, med_adaptive = statistics.median(sound_ratios), statistics.median(adaptive_ratios)
    print(
        f"{kind} ({how}): hold/actual median sound {med_sound:.2f}, adaptive "
        f"{med_adaptive:.2f}; {under} of {adapted} adaptive holds below actual"
    )
    assert med_adaptive < med_sound
    assert med_adaptive < 2.0
    assert under <= adapted // 100


def test_adaptive_defers_until_it_has_samples_and_skips_estimated_usage() -> None:
    adaptive = AdaptiveEstimator(min_samples=3, window=10)
    call = Call(model="claude-sonnet-4-5", messages=["x" * 1000], max_output_tokens=10)
    assert adaptive.estimate(call) is None
    for _ in range(5):
        adaptive.observe(call, Usage(input_tokens=100, llm_calls=1, estimated=True))
    assert adaptive.samples("claude-sonnet-4-5") == 0
    for n in (200, 300):
        adaptive.observe(call, Usage(input_tokens=n, llm_calls=1))
    assert adaptive.estimate(call) is None
    adaptive.observe(call, Usage(input_tokens=250, llm_calls=1))
    est = adaptive.estimate(call)
    assert est is not None
    sound = adaptive.base.sound_input(call)
    assert est.usage.input_tokens == math.ceil(sound * (300 / sound) * 1.1)
    assert est.notes[0].startswith("input: adaptive")
    # Learned per model: another model still gets the sound bound.
    assert adaptive.estimate(Call(model="gemini-2.5-pro", messages=["x"])) is None
    # Dated and prefixed names share what was learned.
    learned = adaptive.ratio("claude-sonnet-4-5")
    assert learned is not None
    assert adaptive.ratio("anthropic/claude-sonnet-4-5") == learned
    assert adaptive.ratio("claude-sonnet-4-5-20250929") == learned
    assert adaptive.ratio("us.anthropic.claude-sonnet-4-5-20250929-v1:0") == learned
    assert adaptive.ratio("claude-sonnet-4") is None
    # Tool calls and embeddings are the sound estimator's.
    assert adaptive.estimate(Call(kind="tool", tool_name="t")) is None
    assert adaptive.estimate(Call(kind="embedding", model="claude-sonnet-4-5")) is None


def test_adaptive_quantile_and_window() -> None:
    adaptive = AdaptiveEstimator(min_samples=2, window=4, quantile=0.5, margin=1.0)
    call = Call(model="m", messages=["x" * 1000])
    bound = adaptive.base.sound_input(call)
    for n in (100, 900, 200, 300, 400):  # the window keeps the last four
        adaptive.observe(call, Usage(input_tokens=n, llm_calls=1))
    assert adaptive.ratio("m") == pytest.approx(300 / bound)


def test_adaptive_defers_to_exact_counts() -> None:
    _o200k()
    adaptive = AdaptiveEstimator(min_samples=1)
    call = Call(model="gpt-4o", messages=["hello " * 100])
    adaptive.observe(call, Usage(input_tokens=50, llm_calls=1))
    est = adaptive.estimate(call)
    assert est == SoundEstimator().estimate(call)
    assert est is not None
    assert est.exact_input


def test_hook_order_adaptive_first_sound_last() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sound = SoundEstimator(exact=False)
    adaptive = AdaptiveEstimator(sound, min_samples=1)
    pm.register(sound)
    pm.register(adaptive)
    call = Call(model="claude-sonnet-4-5", messages=["word " * 200], max_output_tokens=5)
    first = pm.hook.allotment_estimate(call=call)
    assert first == sound.estimate(call)
    pm.hook.allotment_after_call(
        budget=None, call=call, usage=Usage(input_tokens=220, llm_calls=1), estimate=first
    )
    second = pm.hook.allotment_estimate(call=call)
    assert second.usage.input_tokens == math.ceil(220 * 1.1)
    assert second.usage.output_tokens == 5
