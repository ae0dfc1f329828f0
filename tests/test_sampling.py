import pytest

from mbs.data.sampling import (CountsSampler, MonolingualSampler, ProportionalSampler, UniformSampler,
                               absolute_shares, allocate)

PAPER = {"en": 87, "zh-Hans": 47, "fr": 37, "es": 31, "pt": 14, "ar": 13, "vi": 7, "hi": 4, "id": 3, "bn": 3,
         "ta": 1, "te": 1, "ur": 1, "ne": 1, "mr": 1, "gu": 1, "zh-Hant": 1, "sw": 1, "yo": 1, "ig": 1}


def test_exact_total_and_proportions():
    counts = allocate({"a": 3.0, "b": 1.0}, 100)
    assert counts == {"a": 75, "b": 25}
    for total in range(3, 60):
        counts = allocate({"a": 0.6, "b": 0.3, "c": 0.1}, total)
        assert sum(counts.values()) == total
        assert min(counts.values()) >= 1


def test_floor_pins_small_languages_and_redistributes():
    counts = allocate({"big": 1000.0, "tiny1": 0.001, "tiny2": 0.001}, 10)
    assert counts == {"big": 8, "tiny1": 1, "tiny2": 1}
    assert allocate({"big": 1000.0, "tiny": 0.001}, 10, min_per_language=0) == {"big": 10, "tiny": 0}
    assert allocate({"a": 1.0, "b": 0.0}, 10) == {"a": 9, "b": 1}


def test_largest_remainder_and_tie_break_by_order():
    assert allocate({"a": 1.0, "b": 1.0, "c": 1.0}, 4) == {"a": 2, "b": 1, "c": 1}
    assert allocate({"c": 1.0, "b": 1.0, "a": 1.0}, 4) == {"c": 2, "b": 1, "a": 1}
    assert allocate({"a": 0.46, "b": 0.34, "c": 0.2}, 10, 0) == {"a": 5, "b": 3, "c": 2}


def test_deterministic():
    weights = {k: float(v) for k, v in PAPER.items()}
    assert allocate(weights, 100) == allocate(dict(weights), 100)


def test_mbs_paper_counts_reproduced_exactly():
    sampler = CountsSampler(segments=256, per_language=dict(PAPER))
    assert sampler.counts({}) == PAPER
    # The same counts, taken as weights by the allocation rule, come back unchanged.
    assert allocate({k: float(v) for k, v in PAPER.items()}, 256) == PAPER


def test_samplers():
    dist = {"en": 30.0, "fr": 10.0, "sw": 0.02}
    assert ProportionalSampler(40, 1, ["en", "fr", "sw"]).counts(dist) == {"en": 29, "fr": 10, "sw": 1}
    assert UniformSampler(9, 1, ["en", "fr", "sw"]).counts(dist) == {"en": 3, "fr": 3, "sw": 3}
    assert MonolingualSampler(7, 1, "sw").counts(dist) == {"sw": 7}
    shares = absolute_shares(dist)  # of the whole distribution, whatever is evaluated
    assert shares["en"] == pytest.approx(30 / 40.02) and shares["sw"] == pytest.approx(0.02 / 40.02)


@pytest.mark.parametrize("call, message", [
    (lambda: allocate({"a": 0.0, "b": 0.0}, 10), "sum to zero"),
    (lambda: allocate({"a": 1.0, "b": 1.0, "c": 1.0}, 2), "cannot give 3 languages at least 1"),
    (lambda: allocate({"a": -1.0}, 2), ">= 0"),
    (lambda: ProportionalSampler(10, 1, ["en", "xx"]).counts({"en": 1.0}), "unknown language code 'xx'"),
    (lambda: ProportionalSampler(10, 1, ["en", "sw"]).counts({"en": 1.0}), "no share for sw"),
    (lambda: UniformSampler(10, 1, ["en", "en"]).counts({}), "repeats en"),
    (lambda: CountsSampler(10, 1, {"en": 3}).counts({}), "sums to 3"),
    (lambda: CountsSampler(0, 1, {"en": 0}).counts({}), "positive sum"),
    (lambda: MonolingualSampler(10, 1, "klingon").counts({}), "unknown language code 'klingon'"),
])
def test_bad_input_one_line(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)
