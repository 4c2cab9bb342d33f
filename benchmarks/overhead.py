"""Framework overhead: `cl` against a bare PyTorch loop doing the same arithmetic.

Split Fashion-MNIST (class-incremental, 5 experiences), MLP 784-100-100-10,
SGD lr 0.01, batch 10, one epoch; naive fine-tuning and ER (reservoir buffer
of 500, replay batch 10 drawn without replacement). Both sides keep the images
as uint8 on the device and decode them to float (the bare loop batch by batch,
as one writes it by hand; `cl` its stream batches a chunk of batches at a time,
see `Strategy.batches`), build the same model from the same seed, draw batches and
replay samples from an identically seeded generator and evaluate class-IL and
task-IL accuracy before training and after every experience, so both accuracy
matrices must agree exactly; the script checks that before it reports the
ratio of wall times (median over --repeats runs, the two sides alternating
which goes first).

Stacked rows: the same run for 3 and 9 seeds trained as one stacked model
(`cl.runner.run_stacked`, what `cl run` does by default), timed per run and set
against the bare loop and against separate `cl` runs; their accuracy matrices
must agree with the separate runs of the same seeds to 0.01. On CUDA, graphed
rows (`cl run --cuda-graphs`) do the same for one run and for each stacked size
with every train step replayed as a CUDA graph (cl/graphs.py).

On the CPU the two sides' matrices must be identical; on CUDA they may differ by
one test sample in a thousand (kernels may reassociate sums differently from
one call to the next), and the largest difference is printed.

    python benchmarks/overhead.py [--repeats 5] [--device cpu] [--data-dir DIR] [--strategies naive er] [--hidden 100 100] [--stack 3 9]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cl.config import build_experiment
from cl.registry import MODELS
from cl.runner import build_scenario, load_datasets, resolve_device, run_one, run_stacked
from cl.seeding import RUN_STREAMS, spawn_seeds
from cl.cli import positive_int
from script import run_script  # beside this script


STRATEGIES = {"naive": {"name": "naive"}, "er": {"name": "er", "buffer_size": 500, "replay_batch_size": 10}}


def experiment(strategy: str, dataset: dict, hidden: list[int], lr: float = 0.01):
    """Class-incremental, 5 experiences, MLP, batch 10, one epoch: the run both sides train."""
    return build_experiment({
        "name": "overhead", "dataset": dataset,
        "scenario": {"name": "class_incremental", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": hidden},
        "training": {"epochs": 1, "batch_size": 10, "lr": lr, "eval_batch_size": 2000},
        "strategies": [STRATEGIES[strategy]],
    })


def bare_loop(cfg, scenario, device, seed: int, replay: bool) -> list[list[float]]:
    """The same run written as one plain function: no strategy object, no hooks, no evaluator."""
    init_seed, strategy_seed = spawn_seeds(seed, 2, RUN_STREAMS)  # the run's two streams, as cl derives them
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = MODELS.get("mlp").obj(cfg.model.params, scenario.input_shape, scenario.n_classes, 1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.training.lr)
    gen = torch.Generator(device=device)
    gen.manual_seed(strategy_seed)
    batch_size = cfg.training.batch_size
    capacity, replayed = (cfg.strategies[0].params.buffer_size, cfg.strategies[0].params.replay_batch_size) \
        if replay else (0, 0)
    n_seen = 0
    buf_x = torch.zeros((capacity + 1, *scenario.input_shape), dtype=torch.uint8, device=device)
    buf_y = torch.zeros(capacity + 1, dtype=torch.long, device=device)
    arange = torch.arange(batch_size, device=device)
    seen = torch.zeros(scenario.n_classes, dtype=torch.bool, device=device)
    rows = []

    def evaluate(row: int) -> None:
        model.eval()
        accs = []
        with torch.inference_mode():
            for exp in scenario.test:
                hits = hits_task = 0
                task_mask = torch.zeros_like(seen)
                task_mask[exp.classes] = True
                for s in range(0, len(exp), 2000):
                    logits, y = model(exp.x[s:s + 2000].float().div_(255)), exp.y[s:s + 2000]
                    masked = logits.masked_fill(~seen, float("-inf")) if row > 0 else logits
                    hits = hits + (masked.argmax(1) == y).sum()
                    hits_task = hits_task + (logits.masked_fill(~task_mask, float("-inf")).argmax(1) == y).sum()
                accs.append((hits, hits_task, len(exp)))
        rows.append([float(h) / n for h, _, n in accs] + [float(ht) / n for _, ht, n in accs])
        model.train()

    evaluate(0)
    for exp in scenario.train:
        for idx in torch.randperm(len(exp), generator=gen, device=device).split(batch_size):
            raw, y = exp.x.index_select(0, idx), exp.y.index_select(0, idx)
            x = raw.float().div_(255)
            if replay and n_seen > 0:
                j = torch.randperm(min(n_seen, capacity), generator=gen, device=device)[:replayed]
                x_all = torch.cat([x, buf_x.index_select(0, j).float().div_(255)])
                y_all = torch.cat([y, buf_y.index_select(0, j)])
            else:
                x_all, y_all = x, y
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_all), y_all).backward()
            opt.step()
            if replay:  # reservoir sampling with cl.buffers' draws: one float64 per sample once full
                b = len(y)
                if n_seen + b <= capacity:
                    buf_x[n_seen:n_seen + b], buf_y[n_seen:n_seen + b] = raw, y
                elif device.type == "cpu":  # Algorithm R in Python, writing only the accepted samples
                    draws = torch.rand(b, generator=gen, dtype=torch.float64).tolist()
                    for i, u in enumerate(draws):
                        g = n_seen + i
                        slot = g if g < capacity else int(u * (g + 1))
                        if slot < capacity:
                            buf_x[slot], buf_y[slot] = raw[i], y[i]
                else:  # on a GPU, tensor operations (no host synchronisation), as cl.buffers
                    offsets = arange[:b]
                    g = offsets + n_seen
                    r = (torch.rand(b, generator=gen, device=device, dtype=torch.float64) * (g + 1)).long()
                    slot = torch.where(g < capacity, g, r)
                    ok = slot < capacity
                    later = (slot[None] == slot[:, None]) & (offsets[None] > offsets[:, None]) & ok[None]
                    slot = torch.where(ok & ~later.any(1), slot, capacity)
                    buf_x[slot], buf_y[slot] = raw, y
                n_seen += b
        seen[exp.classes] = True
        evaluate(len(rows))
    return rows


def warm_up(device: torch.device) -> None:
    """Start the math libraries (cuBLAS, oneDNN) before anything is timed: the first run would pay for it."""
    model = torch.nn.Sequential(torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)).to(device)
    for _ in range(3):
        F.cross_entropy(model(torch.rand(10, 784, device=device)), torch.zeros(10, dtype=torch.long,
                                                                               device=device)).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100], help="MLP hidden sizes (default 100 100)")
    parser.add_argument("--stack", type=int, nargs="*", default=[3, 9], metavar="K",
                        help="stacked group sizes to time (default 3 9; none to skip)")
    args = parser.parse_args()
    if any(k < 2 for k in args.stack):
        parser.error(f"--stack sizes are groups of 2 or more runs, got {args.stack}; give --stack alone to skip them")
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    warm_up(device)
    dataset = {"name": "fashion_mnist", **({"data_dir": args.data_dir} if args.data_dir else {})}
    for name in args.strategies:
        cfg = experiment(name, dataset, args.hidden)
        scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0).to(device)
        ours, bare, by_seed = [], [], {}
        graphed_modes = [False, True] if device.type == "cuda" else [False]
        sizes = [(k, graphed) for graphed in graphed_modes for k in ([1] if graphed else []) + args.stack]
        stacked: dict[tuple[int, bool], list[float]] = {size: [] for size in sizes}
        tolerance = 1e-9 if device.type == "cpu" else 1e-3
        worst = 0.0
        if device.type == "cuda":  # untimed: a process's first CUDA run loads its kernels (seconds, whichever side)
            run_one(cfg, cfg.strategies[0], scenario, 0, device, progress=False)
            bare_loop(cfg, scenario, device, 0, replay=name == "er")
        for rep in range(args.repeats):
            # Alternate which side goes first, so neither always runs on a warmer machine.
            for side in (("cl", "bare") if rep % 2 == 0 else ("bare", "cl")):
                t0 = time.perf_counter()
                if side == "cl":
                    record = run_one(cfg, cfg.strategies[0], scenario, rep, device, progress=False)
                    ours.append(time.perf_counter() - t0)
                    by_seed[rep] = record
                else:
                    rows = bare_loop(cfg, scenario, device, rep, replay=name == "er")
                    bare.append(time.perf_counter() - t0)
            ours_rows = [a + b for a, b in zip(record.matrix, record.task_il_matrix)]
            worst = max(worst, max(abs(a - b) for row_ours, row_bare in zip(ours_rows, rows)
                                   for a, b in zip(row_ours, row_bare)))
            if worst > tolerance:
                raise SystemExit(f"{name}: cl and the bare loop disagree by {worst:.2e}; "
                                 f"the comparison is not like for like")
            for k, graphed in sizes:
                t0 = time.perf_counter()
                members = run_stacked(cfg, cfg.strategies[0], [scenario] * k, list(range(k)), device,
                                      progress=False, graphs=graphed, log=lambda _: None)
                stacked[(k, graphed)].append((time.perf_counter() - t0) / k)
                for member in members:
                    if member.seed not in by_seed:  # a seed the timed runs alone did not train: train it, untimed
                        by_seed[member.seed] = run_one(cfg, cfg.strategies[0], scenario, member.seed, device,
                                                       progress=False)
                    alone = by_seed[member.seed]
                    if max(abs(a - b) for ra, rb in zip(member.matrix, alone.matrix) for a, b in zip(ra, rb)) > 0.01:
                        raise SystemExit(f"{name}: {'graphed ' if graphed else ''}x{k} seed {member.seed} "
                                         f"disagrees with its run alone")
        ratio = statistics.median(o / b for o, b in zip(ours, bare))
        print(f"{name:<6} cl median {statistics.median(ours):5.2f}s best {min(ours):5.2f}s | "
              f"bare median {statistics.median(bare):5.2f}s best {min(bare):5.2f}s | "
              f"ratio: median of per-run ratios {ratio:.3f}, best/best {min(ours) / min(bare):.3f} | "
              f"final ACC {record.metrics.acc:.3f}, matrices differ by at most {worst:.1e}", flush=True)
        for (k, graphed), times in stacked.items():
            per_run = statistics.median(times)
            label = f"{'graphed' if graphed else 'stacked'} x{k}"
            print(f"{name:<6} {label:<11}: {per_run:6.3f}s per run | vs bare loop {per_run / statistics.median(bare):.3f} "
                  f"(bare loop / this: {statistics.median(bare) / per_run:.1f}x) | speed-up over separate cl runs "
                  f"{statistics.median(ours) / per_run:.2f}x | matrices within 0.01 of the runs alone", flush=True)

if __name__ == "__main__":
    run_script(main)
