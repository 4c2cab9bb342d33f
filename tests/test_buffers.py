import io

import pytest
import torch

from cl.buffers import Buffer, ClassBalanced, Herding, Reservoir, RingPerTask, herding_order, water_fill, \
    write_rows
from tests.helpers import DEVICES


def make(capacity, policy=None, device="cpu", seed=0):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return Buffer(capacity, policy if policy is not None else Reservoir(), torch.device(device), gen)


def stream(n, start=0, device="cpu"):
    ids = torch.arange(start, start + n, device=device)
    return {"x": ids.float().unsqueeze(1).repeat(1, 3), "y": ids, "t": torch.zeros_like(ids)}


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


# ---------------------------------------------------------------- reservoir


@pytest.mark.parametrize("device", DEVICES)
def test_fills_in_order_until_full(device):
    buf = make(25, device=device)
    for k in range(2):
        buf.add(**stream(10, 10 * k, device))
    assert len(buf) == 20 and buf.n_seen == 20
    assert buf.fields["y"][:20].tolist() == list(range(20))
    assert torch.equal(buf.fields["x"][:20, 0], torch.arange(20.0, device=device))


def test_batch_update_equals_sequential_algorithm():
    """Whole-batch reservoir update == the per-sample algorithm with the same random draws."""
    buf = make(8, seed=3)
    for k in range(6):  # many batches past capacity, so slots collide within batches
        before = buf.fields["y"][:8].clone() if buf.fields else None
        n_seen = buf.n_seen
        ids = list(range(10 * k, 10 * k + 10))
        expected = None
        if n_seen + 10 > 8:
            state = buf.generator.get_state()
            draws = torch.rand(10, generator=buf.generator, dtype=torch.float64).tolist()
            buf.generator.set_state(state)
            expected = before.tolist() if before is not None else [0] * 8
            for slot, sample in sequential_reservoir(8, n_seen, ids, draws).items():
                expected[slot] = sample
        buf.add(**stream(10, 10 * k))
        if expected is not None:
            assert buf.fields["y"][:8].tolist() == expected


def test_reservoir_slots_on_host_equal_those_on_the_device():
    """The CPU's Python loop and the tensor operations used on accelerators give the same slots, while
    the buffer fills its last free slots and long after, with many collisions within a batch."""
    policy, generator = Reservoir(), torch.Generator().manual_seed(0)
    cases = [(8, 3, 10), (8, 7, 10), (8, 8, 10), (16, 16, 32), (8, 40, 10), (500, 495, 10), (500, 5000, 10),
             (500, 10**6, 3)]
    for capacity, seen, n in cases:
        for _ in range(50):
            draws = torch.rand(n, generator=generator, dtype=torch.float64)
            host = torch.tensor(Reservoir.slots_on_host(draws.tolist(), seen, capacity))
            assert torch.equal(host, policy.slots_on_device(draws, seen, capacity)), (capacity, seen)
            kept = host[host < capacity]
            assert len(kept.unique()) == len(kept)  # each slot written by one sample at most


def test_a_batch_rejected_whole_writes_nothing():
    """Long after the buffer filled, most batches are rejected whole: place() says so (None) on the CPU and
    add() writes nothing, not even the scratch row; a batch with an accepted sample is written as before."""
    buf = make(40)
    for k in range(50):
        buf.add(**stream(10, 10 * k))
    before = {name: value.clone() for name, value in buf.fields.items()}
    rejected = accepted = 0
    for k in range(50, 250):
        n_seen, state = buf.n_seen, buf.generator.get_state()
        draws = torch.rand(10, generator=buf.generator, dtype=torch.float64).tolist()
        buf.generator.set_state(state)
        slots = Reservoir.slots_on_host(draws, n_seen, 40)
        buf.add(**stream(10, 10 * k))
        if min(slots) == 40:
            rejected += 1
            assert all(torch.equal(buf.fields[name], before[name]) for name in before)  # scratch row too
        else:
            accepted += 1
            assert buf.fields["y"][[s for s in slots if s < 40]].tolist() == \
                [10 * k + i for i, s in enumerate(slots) if s < 40]
        before = {name: value.clone() for name, value in buf.fields.items()}
    assert rejected > 50 and accepted > 10


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_write_rows_from_a_list_equals_torchs_indexed_write(dtype):
    """The CPU's numpy write of listed rows (bfloat16: torch's write) gives what torch's indexed write gives,
    repeated rows (the scratch row) included, and bumps the version counter as torch's write does, so
    autograd still refuses a gradient through a saved copy that the write made stale."""
    values = (torch.arange(5 * 6).reshape(5, 2, 3) % 200).to(dtype)
    index = [4, 0, 6, 2, 6]
    expected = torch.zeros(7, 2, 3, dtype=dtype)
    expected[torch.tensor(index)] = values
    target = torch.zeros(7, 2, 3, dtype=dtype)
    write_rows(target, index, values)
    assert torch.equal(target, expected)
    if dtype.is_floating_point:
        weight = torch.ones(3, requires_grad=True)
        memory = torch.zeros(7, 3, dtype=dtype)
        loss = (weight.to(dtype) * memory).sum()  # saves `memory` for the backward pass
        write_rows(memory, [1], torch.ones(1, 3, dtype=dtype))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_every_sample_is_kept_with_equal_probability():
    # 400 samples through a buffer of 40: each sample ends up in the buffer with p = 0.1.
    counts = torch.zeros(400)
    trials = 300
    for seed in range(trials):
        buf = make(40, seed=seed)
        for k in range(40):
            buf.add(**stream(10, 10 * k))
        assert buf.fields["y"][:40].unique().numel() == 40  # no sample twice
        counts[buf.fields["y"][:40]] += 1
    early, late = counts[:200].mean() / trials, counts[200:].mean() / trials
    assert early == pytest.approx(0.1, abs=0.01)
    assert late == pytest.approx(0.1, abs=0.01)


def test_sample_draws_distinct_filled_slots_and_returns_them():
    buf = make(100)
    buf.add(**stream(5, 1000))
    drawn = buf.sample(50)
    assert sorted(drawn["y"].tolist()) == list(range(1000, 1005))  # min(50, 5) rows, each once
    assert drawn["x"].shape == (5, 3)
    assert torch.equal(buf.fields["y"][drawn.index], drawn["y"])
    buf.add(**stream(95, 0))
    for seed in range(20):
        buf.generator.manual_seed(seed)
        assert len(set(buf.sample(30)["y"].tolist())) == 30  # without replacement
    assert len(buf.sample(300, replace=True)) == 300


def test_sampling_is_uniform_over_filled_slots():
    buf = make(10)
    buf.add(**stream(10))
    counts = torch.zeros(10)
    for _ in range(2000):
        counts[buf.sample(3)["y"]] += 1
    assert (counts / 2000).tolist() == pytest.approx([0.3] * 10, abs=0.04)


def test_named_fields_are_fixed_by_the_first_insertion():
    buf = make(4)
    buf.add(x=torch.zeros(2, 3, dtype=torch.uint8), y=torch.ones(2, dtype=torch.long),
            logits=torch.full((2, 5), 0.5))
    assert buf.fields["x"].dtype == torch.uint8 and buf.fields["logits"].shape == (5, 5)
    assert buf.sample(2)["logits"].tolist() == [[0.5] * 5] * 2
    with pytest.raises(ValueError, match="fixed by the first insertion"):
        buf.add(x=torch.zeros(1, 3, dtype=torch.uint8), y=torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match="one length"):
        buf.add(x=torch.zeros(2, 3, dtype=torch.uint8), y=torch.ones(1, dtype=torch.long),
                logits=torch.zeros(2, 5))


def test_memory_bytes_counts_capacity_of_every_field():
    buf = make(100)
    assert buf.memory_bytes() == 0  # nothing allocated yet
    buf.add(**stream(1))
    assert buf.memory_bytes() == 100 * (3 * 4 + 8 + 8)


def test_empty_buffer_refuses_to_sample():
    with pytest.raises(ValueError, match="empty"):
        make(3).sample(1)


def test_state_dict_round_trip_continues_identically():
    a, b = make(6, seed=1), make(6, seed=2)
    for k in range(3):
        a.add(**stream(4, 4 * k))
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b.load_state_dict(torch.load(blob, weights_only=True))
    b.generator.set_state(a.generator.get_state())
    a.add(**stream(4, 100))
    b.add(**stream(4, 100))
    assert torch.equal(a.fields["y"], b.fields["y"]) and a.n_seen == b.n_seen == 16


# ---------------------------------------------------------------- ring per task


def test_ring_per_task_keeps_each_tasks_latest_samples():
    buf = make(6, RingPerTask(per_task=3, n_tasks=2))
    buf.add(task=0, **stream(2, 0))  # task 0: 0, 1
    assert len(buf) == 2 and buf.filled_slots().tolist() == [0, 1]
    buf.add(task=0, **stream(2, 2))  # 2 goes to slot 2, 3 overwrites slot 0 (first in, first out)
    assert buf.fields["y"][:3].tolist() == [3, 1, 2]
    buf.add(task=1, **stream(5, 10))  # a batch longer than the ring: its last 3 samples stay
    assert sorted(buf.fields["y"][3:6].tolist()) == [12, 13, 14]
    assert len(buf) == 6
    assert buf.policy.task_slots(1).tolist() == [3, 4, 5]
    assert set(buf.sample(6)["y"].tolist()) == {1, 2, 3, 12, 13, 14}


def test_ring_samples_only_filled_slots_of_partly_filled_tasks():
    buf = make(6, RingPerTask(per_task=3, n_tasks=2))
    buf.add(task=0, **stream(1, 7))
    buf.add(task=1, **stream(1, 8))
    assert buf.filled_slots().tolist() == [0, 3]
    assert sorted(buf.sample(5)["y"].tolist()) == [7, 8]


def test_ring_checks_capacity_and_task():
    with pytest.raises(ValueError, match="per_task \\* n_tasks"):
        make(5, RingPerTask(per_task=3, n_tasks=2))
    with pytest.raises(ValueError, match="task 2"):
        make(6, RingPerTask(per_task=3, n_tasks=2)).add(task=2, **stream(1))


# ---------------------------------------------------------------- class balanced


def experience(labels, task, start=0):
    y = torch.tensor(labels)
    ids = torch.arange(start, start + len(y))
    return {"x": ids.float().unsqueeze(1), "y": y, "t": torch.full_like(y, task)}


def test_class_balanced_quotas():
    buf = make(10, ClassBalanced())
    buf.update(**experience([0] * 20 + [1] * 20, 0))
    assert sorted(buf.fields["y"][: len(buf)].tolist()) == [0] * 5 + [1] * 5
    buf.update(**experience([2] * 30, 1, start=40))
    kept = buf.fields["y"][: len(buf)].tolist()
    # 10 slots over 3 classes, water-filling fewest-first (5, 5, 30 samples available):
    # class 0 takes 10 // 3 = 3, class 1 takes 7 // 2 = 3, class 2 the remaining 4.
    assert len(kept) == 10
    assert [kept.count(c) for c in (0, 1, 2)] == [3, 3, 4]
    assert (buf.fields["t"][: len(buf)][buf.fields["y"][: len(buf)] == 2] == 1).all()
    with pytest.raises(TypeError, match="use update"):
        buf.add(**experience([0], 0))


def test_class_balanced_lets_recurring_classes_in_at_their_fair_rate():
    """Domain-incremental streams repeat the classes: a later experience's samples must get in.

    Two experiences of 20 samples of each of 2 classes, 10 slots: every one of the 80
    samples should end up in the buffer with probability 5 / 40 = 0.125.
    """
    trials, counts = 400, torch.zeros(80)
    for seed in range(trials):
        buf = make(10, ClassBalanced(), seed=seed)
        buf.update(**experience([0] * 20 + [1] * 20, 0, start=0))
        buf.update(**experience([0] * 20 + [1] * 20, 1, start=40))
        assert len(buf) == 10 and sorted(buf.fields["y"][:10].tolist()) == [0] * 5 + [1] * 5
        counts[buf.fields["x"][:10, 0].long()] += 1
    first, second = counts[:40].mean() / trials, counts[40:].mean() / trials
    assert first == pytest.approx(0.125, abs=0.015)
    assert second == pytest.approx(0.125, abs=0.015)


def test_water_fill_gives_unused_slots_to_other_classes():
    # Class 0 has only 2 samples: its unused slots go to the others, none stays empty.
    assert water_fill({0: 2, 1: 100, 2: 100}, 10) == {0: 2, 1: 4, 2: 4}
    assert water_fill({0: 1, 1: 1}, 10) == {0: 1, 1: 1}  # fewer samples than slots
    assert water_fill({3: 50, 1: 50, 2: 50}, 10) == {1: 3, 2: 3, 3: 4}


# ---------------------------------------------------------------- herding


def test_herding_order_by_hand():
    # Points on a line: mean 1.0. Step 1 takes the point nearest the mean (1.0, index 2);
    # step 2 the remaining point p minimising |1 - (1 + p) / 2|, 0.9 or 1.2:
    # |1 - 0.95| = 0.05 < |1 - 1.1| = 0.1 -> 0.9 (index 1); step 3: |1 - (1.9 + p)/3| -> p = 1.2 (index 3).
    f = torch.tensor([[0.0], [0.9], [1.0], [1.2], [1.9]])
    assert herding_order(f, 3).tolist() == [2, 1, 3]
    assert sorted(herding_order(f, 10).tolist()) == [0, 1, 2, 3, 4]  # never more than n, no repeats


def test_herding_policy_keeps_old_prefixes_and_herds_new_classes():
    feature_calls = []

    def features(x):
        feature_calls.append(len(x))
        return torch.cat([x, torch.ones_like(x)], dim=1)  # 2-D features of the 1-D inputs

    buf = make(6, Herding(features))
    buf.update(x=torch.tensor([[0.1], [0.5], [0.9], [2.0], [3.0]]), y=torch.tensor([0, 0, 0, 1, 1]))
    assert buf.fields["y"][: len(buf)].tolist() == [0, 0, 0, 1, 1]  # 3 slots per class: all fit
    stored_class0 = buf.fields["x"][:3, 0].tolist()
    buf.update(x=torch.tensor([[5.0], [6.0], [7.0]]), y=torch.tensor([2, 2, 2]))
    y = buf.fields["y"][: len(buf)].tolist()
    assert y == [0, 0, 1, 1, 2, 2]  # 6 // 3 = 2 per class
    assert buf.fields["x"][:2, 0].tolist() == stored_class0[:2]  # a prefix of the herding order
    assert feature_calls == [3, 2, 3]  # features only for classes without exemplars
