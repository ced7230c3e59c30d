"""The density-aware dispatch of fastsae/dispatch.py: where crossovers come from (table, environment, overrides)
and how a backend's Density turns the previous step's entries into the next step's choice."""
import gc

import pytest
import torch

from fastsae.dispatch import (CROSSOVERS, DEFAULT_CROSSOVER, Density, device_kind, get_crossover, override_crossover,
                              set_crossover)


def test_table_then_default():
    assert device_kind("cpu") == "cpu"
    for arch, value in CROSSOVERS[("cpp", "cpu")].items():
        assert get_crossover("cpp", "cpu", arch) == value
    assert get_crossover("cpp", "cpu", "no-such-arch") == DEFAULT_CROSSOVER
    assert get_crossover("other-backend", "cpu", "jumprelu") == DEFAULT_CROSSOVER


def test_overrides_narrowest_first_and_restored():
    base = get_crossover("cpp", "cpu", "relu")
    with override_crossover(0.5):
        assert get_crossover("cpp", "cpu", "relu") == 0.5
        with override_crossover("dense", arch="relu", backend="cpp"):
            assert get_crossover("cpp", "cpu", "relu") == 0.0
            assert get_crossover("cpp", "cpu", "gated") == 0.5
        assert get_crossover("cpp", "cpu", "relu") == 0.5
    assert get_crossover("cpp", "cpu", "relu") == base
    set_crossover("sparse", arch="gated")
    try:
        assert get_crossover("triton", "cpu", "gated") == float("inf")
    finally:
        set_crossover(None, arch="gated")
    assert get_crossover("cpp", "cpu", "gated") == CROSSOVERS[("cpp", "cpu")]["gated"]


def test_environment(monkeypatch):
    monkeypatch.setenv("FASTSAE_CROSSOVER", "jumprelu=0.2, 0.03")
    assert get_crossover("cpp", "cpu", "jumprelu") == 0.2
    assert get_crossover("cpp", "cpu", "relu") == 0.03
    with override_crossover(0.7, arch="relu"):  # an override beats the environment
        assert get_crossover("cpp", "cpu", "relu") == 0.7
    monkeypatch.setenv("FASTSAE_CROSSOVER", "sparse")
    assert get_crossover("cpp", "cpu", "topk") == float("inf")
    monkeypatch.setenv("FASTSAE_CROSSOVER", "relu=lots")
    with pytest.raises(ValueError, match="crossover"):
        get_crossover("cpp", "cpu", "relu")


@pytest.mark.parametrize("bad", [-0.1, "often", float("nan")])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="crossover"):
        set_crossover(bad)


def test_density_choice_follows_the_previous_step():
    d = Density("cpp")
    W = torch.zeros(8, 100)
    with override_crossover(0.1, arch="jumprelu"):
        assert not d.sparse("jumprelu", W)  # no history: taken as fully dense
        d.record(W, 9 * 32, 32)  # 9 entries per row <= 0.1 · 100
        assert d.sparse("jumprelu", W) and d.last(W) == 9
        d.record(W, torch.tensor(11 * 32), 32)  # a device-side count, read at the next decision
        assert not d.sparse("jumprelu", W) and d.last(W) == 11
        assert d.sparse_at("jumprelu", W, 10) and not d.sparse_at("jumprelu", W, 10.5)
    with override_crossover("sparse"):
        assert Density("cpp").sparse("jumprelu", W)  # forced sparse even without history


def test_density_state_follows_the_module_weakly():
    d = Density("cpp")
    W = torch.zeros(4, 10)
    d.record(W, 3, 1)
    assert len(d._last) == 1
    del W
    gc.collect()
    assert len(d._last) == 0


def test_density_record_round_trips_as_json_numbers():
    import json

    d, W = Density("cpp"), torch.zeros(8, 100)
    assert d.state(W) is None
    d.record(W, torch.tensor(9 * 32 + 1), 32)  # a device-side count becomes a number
    saved = json.loads(json.dumps(d.state(W)))
    fresh = Density("cpp")
    fresh.load_state(W, saved)
    assert fresh.last(W) == d.last(W) == (9 * 32 + 1) / 32
    with override_crossover(0.1, arch="jumprelu"):
        assert fresh.sparse("jumprelu", W) == d.sparse("jumprelu", W)
    fresh.load_state(W, None)
    assert fresh.last(W) is None


@pytest.mark.parametrize("bad", [[-1, 4], [3, -1], [3, 2.5], ["3", 4], [True, 4], [3, True], [float("nan"), 4], [3], "3,4"])
def test_density_record_refuses_malformed_state(bad):
    with pytest.raises(ValueError, match="density record"):
        Density("cpp").load_state(torch.zeros(2, 3), bad)
