import pytest
import torch

from cl.buffers import ClassBalancedBuffer, ReservoirBuffer, water_fill
from tests.helpers import DEVICES


def make(capacity, device="cpu", seed=0, cls=ReservoirBuffer):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return cls(capacity, (3,), torch.device(device), gen)


def stream(n, start=0, device="cpu"):
    ids = torch.arange(start, start + n, device=device)
    return ids.float().unsqueeze(1).repeat(1, 3), ids, torch.zeros_like(ids)


def sequential_reservoir(capacity, n_seen, ids, draws):
    """Vitter's Algorithm R one sample at a time, using the given uniform draws."""
    slots = {}
    for i, (sample, u) in enumerate(zip(ids, draws)):
        g = n_seen + i
        if g < capacity:
            slots[g] = sample
        else:
            r = int(u * (g + 1))
            if r < capacity:
                slots[r] = sample
    return slots


@pytest.mark.parametrize("device", DEVICES)
def test_fills_in_order_until_full(device):
    buf = make(25, device)
    for k in range(2):
        buf.add(*stream(10, 10 * k, device))
    assert len(buf) == 20 and buf.n_seen == 20
    assert buf.y[:20].tolist() == list(range(20))
    assert torch.equal(buf.x[:20, 0], torch.arange(20.0, device=device))


def test_batch_update_equals_sequential_algorithm():
    """Whole-batch reservoir update == the per-sample algorithm with the same random draws."""
    buf = make(8, seed=3)
    for k in range(6):  # many batches past capacity, so slots collide within batches
        before = buf.y[:8].clone()
        n_seen = buf.n_seen
        ids = list(range(10 * k, 10 * k + 10))
        if n_seen + 10 > 8:
            state = buf.generator.get_state()
            draws = torch.rand(10, generator=buf.generator, dtype=torch.float64).tolist()
            buf.generator.set_state(state)
            expected = before.tolist()
            for slot, sample in sequential_reservoir(8, n_seen, ids, draws).items():
                expected[slot] = sample
        else:
            expected = None
        buf.add(*stream(10, 10 * k))
        if expected is not None:
            assert buf.y[:8].tolist() == expected


def test_every_sample_is_kept_with_equal_probability():
    # 400 samples through a buffer of 40: each sample ends up in the buffer with p = 0.1.
    counts = torch.zeros(400)
    trials = 300
    for seed in range(trials):
        buf = make(40, seed=seed)
        for k in range(40):
            buf.add(*stream(10, 10 * k))
        counts[buf.y[:40]] += 1
    early, late = counts[:200].mean() / trials, counts[200:].mean() / trials
    assert early == pytest.approx(0.1, abs=0.01)
    assert late == pytest.approx(0.1, abs=0.01)
    assert counts.sum() == 40 * trials  # no slot lost, no duplicates


def test_sample_draws_only_filled_slots():
    buf = make(100)
    buf.add(*stream(5, 1000))
    x, y, t = buf.sample(50)
    assert set(y.tolist()) <= set(range(1000, 1005))
    assert x.shape == (50, 3)


def test_memory_bytes_counts_capacity():
    buf = make(100)
    assert buf.memory_bytes() == 100 * (3 * 4 + 8 + 8)


def test_class_balanced_quotas():
    buf = make(10, cls=ClassBalancedBuffer)
    y = torch.tensor([0] * 20 + [1] * 20)
    buf.update(y.float().unsqueeze(1).repeat(1, 3), y, torch.zeros_like(y))
    assert sorted(buf.y[: len(buf)].tolist()) == [0] * 5 + [1] * 5
    y2 = torch.tensor([2] * 30)
    buf.update(y2.float().unsqueeze(1).repeat(1, 3), y2, torch.ones_like(y2))
    kept = buf.y[: len(buf)].tolist()
    # 10 slots over 3 classes, water-filling fewest-first (5, 5, 30 samples available):
    # class 0 takes 10 // 3 = 3, class 1 takes 7 // 2 = 3, class 2 the remaining 4.
    assert len(kept) == 10
    assert [kept.count(c) for c in (0, 1, 2)] == [3, 3, 4]
    assert (buf.t[: len(buf)][buf.y[: len(buf)] == 2] == 1).all()
    assert not hasattr(buf, "add")  # filled per experience only


def test_water_fill_gives_unused_slots_to_other_classes():
    # Class 0 has only 2 samples: its unused slots go to the others, none stays empty.
    assert water_fill({0: 2, 1: 100, 2: 100}, 10) == {0: 2, 1: 4, 2: 4}
    assert water_fill({0: 1, 1: 1}, 10) == {0: 1, 1: 1}  # fewer samples than slots
    assert water_fill({3: 50, 1: 50, 2: 50}, 10) == {1: 3, 2: 3, 3: 4}
