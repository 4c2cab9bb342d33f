"""The `cl` command line: run, sweep, pretrain, list, show, runs, import, leaderboard.

Bad input exits with code 2 and one line on stderr. A run that fails or diverges is
stored with its status and the invocation goes on; `cl run` then exits with code 1
after a summary of the runs that did not complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from cl import threads
from cl.errors import RunError, UserError
from cl.store import DEFAULT_STORE

LISTABLE = ("strategies", "scenarios", "datasets", "models", "training", "transforms")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other bad input, and an
    option given twice is refused (argparse would keep the last silently) unless it is declared
    `action="append"` (`--set`, `--strategy`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, StoreOnce)
        self.register("action", "store", StoreOnce)
        self.register("action", "store_true", StoreTrueOnce)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """The message with line breaks and other unprintable characters (from user input) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _first_time(action: argparse.Action, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                option_string: str | None) -> None:
    given = namespace.__dict__.setdefault("_options_given", set())
    if option_string is not None and action.dest in given:
        parser.error(f"{option_string} is given twice; give it once (only --set and --strategy repeat)")
    given.add(action.dest)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


class StoreOnce(argparse._StoreAction):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _first_time(self, parser, namespace, option_string)
        super().__call__(parser, namespace, values, option_string)


class StoreTrueOnce(argparse._StoreTrueAction):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _first_time(self, parser, namespace, option_string)
        super().__call__(parser, namespace, values, option_string)


class PrintVersion(argparse.Action):
    """`cl --version`: the code version that runs record (imported only when asked: it loads torch)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args) -> None:
        from cl.provenance import code_version
        print(code_version())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="cl", description="Continual-learning benchmark runner.")
    parser.add_argument("--version", action=PrintVersion, help="print the package version and git commit, and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    run = sub.add_parser("run", help="run experiment files and store their results")
    run.add_argument("files", nargs="+", metavar="FILE",
                     help="experiment TOML files, e.g. experiments/quickstart.toml or experiments/leaderboard/*.toml "
                          "(every file is validated before the first run trains)")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds to run (overrides the file)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value (repeatable), e.g. training.lr=0.05 or strategies.er.buffer_size=200")
    run.add_argument("--strategy", dest="strategies", action="append", metavar="NAME",
                     help="run only this strategy of the file (repeatable)")
    run.add_argument("--store", default=DEFAULT_STORE, help=f"SQLAlchemy URL of the result store ({DEFAULT_STORE})")
    run.add_argument("--busy-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="how long SQLite waits for a lock another program holds before a finished run is "
                          "kept in a file for `cl import` instead (default 60)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    run.add_argument("--data-dir", help="folder holding the dataset files (overrides dataset.data_dir)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--resume", action="store_true",
                     help="skip runs already stored, continue unfinished ones from their last checkpoint")
    run.add_argument("--no-stack", action="store_true",
                     help="train every run on its own (default: the seeds of a stackable strategy that share "
                          "every shape train as one stacked model; the results are the same)")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="CUDA: record each experience's train steps as CUDA graphs and replay them (strategies "
                          "whose step is draw + objective without adjust_gradients; experimental: see README)")
    run.add_argument("--threads", type=positive_int, metavar="N",
                     help="compute threads for this process (default: the cores shared among the cl processes "
                          "running on this machine, re-checked at every experience)")

    sweep = sub.add_parser("sweep", help="tune a strategy's hyperparameters with Optuna on the validation split")
    sweep.add_argument("file", metavar="FILE", help="experiment TOML file with a search space, e.g. "
                                                    "lr = {low = 1e-3, high = 0.3, log = true} (see README)")
    sweep.add_argument("--trials", type=positive_int, metavar="N",
                       help="finish the study with N trials (complete, pruned or stopped), counting earlier ones")
    sweep.add_argument("--workers", type=positive_int, default=1, metavar="K",
                       help="worker processes on this machine, each with its share of the cores (default 1)")
    sweep.add_argument("--storage", metavar="URL", help="Optuna storage: an SQLAlchemy URL (default: sweeps.db "
                       "beside an SQLite --store; postgresql+psycopg://user@host/db for many machines)")
    sweep.add_argument("--study", metavar="NAME", help="study name (default EXPERIMENT.STRATEGY)")
    sweep.add_argument("--metric", default="acc", help="objective on the validation split: acc, avg_inc_acc, "
                       "task_il_acc, bwt (maximised) or forgetting (minimised); default acc")
    sweep.add_argument("--timeout", type=float, metavar="S", help="ask for no new trial after S seconds")
    sweep.add_argument("--strategy", metavar="LABEL", help="the strategy to tune, when several have a search space")
    sweep.add_argument("--seed", type=int, help="the seed of every trial (default: the file's first seed)")
    sweep.add_argument("--stack", type=positive_int, default=4, metavar="K",
                       help="ask Optuna for up to K trials at a time and train those that differ only in float "
                            "values as one stacked model (default 4; 1 = one trial at a time)")
    sweep.add_argument("--pruner", default="median", choices=("median", "halving", "none"),
                       help="stop hopeless trials on their validation accuracy after each experience (default median)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the file, e.g. validation.fraction=0.2")
    sweep.add_argument("--best", action="store_true",
                       help="write the best trial's values into a new experiment file (--out FILE), for cl run")
    sweep.add_argument("--report", action="store_true",
                       help="plot the optimisation history and the parameter importances (PNG files in --out)")
    sweep.add_argument("--out", metavar="PATH", help="--best: the experiment file to write; --report: the folder "
                                                     "(default results/sweeps/STUDY)")
    sweep.add_argument("--store", default=DEFAULT_STORE, help=f"result store for the trials' runs ({DEFAULT_STORE})")
    sweep.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    sweep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sweep.add_argument("--threads", type=positive_int, metavar="N", help="compute threads per worker (default: "
                       "the cores shared among the cl processes running on this machine)")
    sweep.add_argument("--heartbeat", type=positive_int, default=10, metavar="S",
                       help="seconds between a worker's heartbeats; a trial silent for 3x this is failed and "
                            "retried once by another worker (default 10)")
    sweep.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set for the workers of --workers K

    pre = sub.add_parser("pretrain", help="train a backbone on a source dataset and save it as a checkpoint")
    pre.add_argument("file", help="pretraining TOML file, e.g. experiments/pretrain/vit_mnist5k.toml")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value, e.g. training.epochs=5")
    pre.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    pre.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pre.add_argument("--threads", type=positive_int, metavar="N",
                     help="compute threads for this process (default: the cores shared among cl processes)")

    lst = sub.add_parser("list", help="list registered strategies, scenarios, datasets, models, "
                                      "or the training and transforms options")
    lst.add_argument("what", choices=LISTABLE)

    show = sub.add_parser("show", help="print one stored run: accuracy matrix and metrics")
    show.add_argument("run_id", type=int)
    show.add_argument("--json", action="store_true", help="print the whole record as JSON")
    show.add_argument("--store", default=DEFAULT_STORE)

    runs = sub.add_parser("runs", help="list stored runs")
    runs.add_argument("--experiment", help="only runs of this experiment")
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--store", default=DEFAULT_STORE)
    imp = sub.add_parser("import", help="store runs that `cl run` kept in files when the store refused them")
    imp.add_argument("files", nargs="+", help="JSON files, e.g. results/unsaved/run-*.json")
    imp.add_argument("--store", default=DEFAULT_STORE)
    board = sub.add_parser("leaderboard", help="regenerate the leaderboard (markdown, CSV, HTML, plots) from the store")
    board.add_argument("--store", default=DEFAULT_STORE)
    board.add_argument("--out", default="leaderboard", help="output folder (default leaderboard/)")
    board.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    return parser


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from cl.leaderboard import generate
    from cl.store import ResultStore

    paths = generate(ResultStore(args.store, must_exist=True), args.out, plots=not args.no_plots)
    print(f"leaderboard written: {', '.join(str(p) for p in paths)}")
    return 0


def select_in_files(configs: list, names: list[str]) -> list:
    """The experiments of several files cut to the strategies `--strategy` names (cl.config.select_strategies);
    files with none of them are left out, saying so, and a name no file has is refused."""
    import dataclasses

    from cl.config import select_strategies

    missing = [n for n in names if not any(select_strategies(c.strategies, [n]) for c in configs)]
    if missing:
        raise UserError(f"--strategy {missing[0]!r} is in none of the {len(configs)} files (as a label or a "
                        f"registered strategy name); check the files' [[strategies]]")
    kept = []
    for config in configs:
        chosen = select_strategies(config.strategies, names)
        if chosen:
            kept.append(dataclasses.replace(config, strategies=chosen))
        else:
            print(f"{config.source}: has none of --strategy {' '.join(names)}; left out", flush=True)
    return kept


def cmd_run(args: argparse.Namespace) -> int:
    from cl.config import load_experiment
    from cl.report import format_comparison
    from cl.runner import check_experiment, describe_run, resolve_device, run_experiment
    from cl.store import ResultStore

    several = len(args.files) > 1  # then --strategy picks from every file that has it (select_in_files)
    configs = [load_experiment(f, args.overrides, seeds=args.seeds, data_dir=args.data_dir,
                               only_strategies=None if several else args.strategies) for f in args.files]
    if several and args.strategies:
        configs = select_in_files(configs, args.strategies)
    names = [c.name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"experiment name {repeated[0]!r} appears in two of the files; give each file its own name")
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device, but the runs would go to {device.type}; "
                        f"add --device cuda or leave --cuda-graphs out")
    threads.claim(args.threads)
    loaded = {}  # each dataset read once, though several files use it
    datasets = [check_experiment(config, device, loaded) for config in configs]  # before the store is created
    store = ResultStore(args.store, busy_timeout=args.busy_timeout)
    store.check_writable()  # before anything trains
    records = []
    for config, data in zip(configs, datasets):
        print(f"experiment {config.name}: {len(config.strategies)} strategies x {len(config.seeds)} seeds "
              f"on {device}, results -> {args.store}", flush=True)
        records += run_experiment(config, data, store, device, progress=not args.no_progress, resume=args.resume,
                                  stack=not args.no_stack, graphs=args.cuda_graphs)
    for config in configs:
        completed = [r for r in records if r.status == "completed" and r.experiment == config.name]
        if completed:
            print(f"\n{config.name}:" if len(configs) > 1 else "")
            print(format_comparison([r.headline() for r in completed], completed[0].setting))
    stopped = [r for r in records if r.status != "completed"]
    if stopped:
        print(f"cl: {len(stopped)} of {len(records)} runs did not complete (stored with their status; "
              f"`cl show ID` gives the details):", file=sys.stderr)
        for record in stopped:
            print(f"  {describe_run(record)}", file=sys.stderr)
    unsaved = [r for r in records if r.id is None]
    if unsaved:
        print(f"cl: {len(unsaved)} finished runs could not be written to {args.store} and were kept in "
              f"{store.spill_dir}/; store them with `cl import {store.spill_dir}/run-*.json --store {args.store}`",
              file=sys.stderr)
    return 1 if stopped or unsaved else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    import tomli_w

    from cl import sweep as sweeps
    from cl.runner import check_experiment, resolve_device
    from cl.store import ResultStore

    sweep = sweeps.prepare_sweep(args.file, args.overrides, args.strategy, args.metric, args.seed, args.storage,
                                 args.study, args.store)
    if args.best or args.report:
        if args.best and args.report:
            raise UserError("--best and --report: give one at a time")
        study = sweeps.open_study(sweep, args.pruner, args.heartbeat, create=False)
        if args.best:
            if not args.out:
                raise UserError("--best needs --out FILE, the experiment file to write")
            out = Path(args.out)
            text = tomli_w.dumps(sweeps.best_experiment(sweep, study))
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text)
            except OSError as exc:
                raise UserError(f"--best --out {out}: cannot write that file ({exc.strerror or exc}); give the "
                                f"path of a file to write, in a folder you can write to") from None
            print(f"{sweeps.summary(sweep, study)}\nwritten {out}: run it on the test stream with `cl run {out}`")
        else:
            out = Path(args.out or Path("results") / "sweeps" / sweep.study_name)
            try:
                paths = sweeps.write_report(study, out)
            except OSError as exc:
                raise UserError(f"--report --out {out}: cannot write the plots there ({exc.strerror or exc}); "
                                f"give a folder you can write to") from None
            print(f"report written: {', '.join(str(p) for p in paths)}")
        return 0
    if args.trials is None:
        raise UserError("cl sweep needs --trials N (or --best / --report on an existing study)")
    device = resolve_device(args.device)
    datasets = check_experiment(sweep.first_config(), device)  # before the store and the study are created
    sweeps.check_metric(sweep, datasets)
    store = ResultStore(args.store)
    store.check_writable()
    worker = args.worker_index is not None
    study = sweeps.open_study(sweep, args.pruner, args.heartbeat)
    if not worker:
        print(f"sweep {sweep.study_name}: {args.trials} trials of {sweep.label} in "
              f"{', '.join(d.describe() for d in sweep.dimensions)}; objective: validation {sweep.metric} "
              f"({sweep.direction}); study in {sweep.storage}, runs -> {args.store}", flush=True)
    if args.workers > 1:
        children = [subprocess.Popen([sys.executable, "-m", "cl.cli", *worker_argv(args, k)])
                    for k in range(args.workers)]
        codes = [child.wait() for child in children]
        print(sweeps.summary(sweep, study))
        return max(codes)
    threads.claim(args.threads)  # only the processes that train
    sweeps.work(sweep, study, datasets, args.trials, store, device, stack=args.stack, timeout=args.timeout,
                progress=not args.no_progress, log=lambda line: print(line, flush=True))
    if not worker:
        print(sweeps.summary(sweep, study))
    return 0


def worker_argv(args: argparse.Namespace, index: int) -> list[str]:
    """The `cl sweep` command line of worker `index` of --workers K: the same sweep, one worker."""
    argv = ["sweep", args.file, "--trials", str(args.trials), "--storage", sweeps_storage(args),
            "--metric", args.metric, "--stack", str(args.stack), "--pruner", args.pruner, "--store", args.store,
            "--device", args.device, "--heartbeat", str(args.heartbeat), "--worker-index", str(index),
            "--no-progress"]
    for option, value in (("--study", args.study), ("--timeout", args.timeout), ("--strategy", args.strategy),
                          ("--seed", args.seed), ("--threads", args.threads)):
        if value is not None:
            argv += [option, str(value)]
    for assignment in args.overrides:
        argv += ["--set", assignment]
    return argv


def sweeps_storage(args: argparse.Namespace) -> str:
    from cl.sweep import default_storage

    return args.storage or default_storage(args.store)


def cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cl.store import ResultStore

    store = ResultStore(args.store)
    for name in args.files:
        run_id = store.import_file(Path(name))
        Path(name).unlink()
        print(f"{name} -> run {run_id}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cl.pretrain import load_pretraining, pretrain
    from cl.runner import resolve_device

    config, output = load_pretraining(args.file, args.overrides)
    device = resolve_device(args.device)
    threads.claim(args.threads)
    info = pretrain(config, output, device, progress=not args.no_progress)
    print(f"pretrained {config.model.name} on {', '.join(d['name'] for d in info['dataset'])} in {info['seconds']:.1f}s: "
          f"test accuracy {info['test_accuracy']:.3f} -> {output} (data sha256 {info['data_sha256'][:12]})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cl.params import describe_params
    from cl.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES
    from cl.training import TrainingParams
    from cl.transforms import TransformParams

    if args.what == "training":
        entries = [("[training]", "How each experience is trained (the [training] table).", TrainingParams, None)]
    elif args.what == "transforms":
        entries = [("[transforms]", "The input pipeline, applied on the device to stream and buffer samples "
                                    "(the [transforms] table).", TransformParams, None)]
    else:
        registry = {"strategies": STRATEGIES, "scenarios": SCENARIOS, "datasets": DATASETS, "models": MODELS}[args.what]
        entries = [(e.name, e.doc, e.params, e.obj) for e in registry.entries()]
    for name, doc, params, obj in entries:
        print(f"{name}: {doc}")
        if args.what == "strategies":
            print(f"    settings: {', '.join(obj.supported_settings)}; models: {obj.models_description()}")
        for p in describe_params(params):
            default = "required" if p["required"] else f"default {p['default']!r}"
            kind = f"{p['type']} {p['range']}" if p["range"] else p["type"]
            print(f"    {p['name']} ({kind}, {default}): {p['doc']}")
    return 0


def _format_matrix(matrix: list[list[float | None]]) -> str:
    T = len(matrix[0])
    lines = ["after \\ on " + " ".join(f"{'exp ' + str(j + 1):>7}" for j in range(T))]
    for i, row in enumerate(matrix):
        label = "init" if i == 0 else f"exp {i}"
        lines.append(f"{label:<11} " + " ".join(f"{'-' if v is None else f'{v:.3f}':>7}" for v in row))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    import dataclasses

    from cl.store import ResultStore

    run = ResultStore(args.store, must_exist=True).get(args.run_id)
    if args.json:
        print(json.dumps({"id": run.id, **run.to_json()}, indent=2, default=str))
        return 0
    print(f"run {run.id}: {run.experiment} / {run.strategy} / seed {run.seed} ({run.status})")
    if run.failure is not None:
        print(run.stopped())
    print(f"params: {json.dumps(run.params)}")
    cfg = run.config
    print(f"setup: datasets {[d['name'] for d in cfg['datasets']]}, scenario {json.dumps(cfg['scenario'])}, "
          f"model {json.dumps(cfg['model'])}, training {json.dumps(cfg['training'])}")
    print(f"\naccuracy matrix ({run.setting}):")
    print(_format_matrix(run.matrix))
    if run.task_il_matrix:
        print("\ntask-IL accuracy matrix:")
        print(_format_matrix(run.task_il_matrix))
    print("\nmetrics:" + ("" if run.task_il_metrics is None else "                 (task-IL)"))
    task_il = dataclasses.asdict(run.task_il_metrics) if run.task_il_metrics is not None else {}
    for key, value in dataclasses.asdict(run.metrics).items():
        extra = f"  {_number(task_il[key]):>10}" if task_il else ""
        print(f"  {key:<12} {_number(value):>10}{extra}")
    if run.logs:
        print("\nlogged by the strategy (mean per experience):")
        width = max(12, *map(len, run.logs))
        for name, values in run.logs.items():
            print(f"  {name:<{width}} " + " ".join(f"{_number(v):>9}" for v in values))
    b = run.budgets
    wall = f"wall {b.wall_seconds:.1f}s" if b.stacked_runs == 1 else \
        f"wall {b.wall_seconds / b.stacked_runs:.1f}s (its share of {b.wall_seconds:.1f}s for {b.stacked_runs} runs " \
        f"trained stacked)"
    print(f"\nbudgets: {wall}, eval {b.eval_seconds:.1f}s, "
          f"memory {b.memory_bytes} B, model {b.model_bytes} B, scenario data {b.scenario_bytes} B, "
          f"forward {b.forward_samples} / backward {b.backward_samples} / eval {b.eval_forward_samples} samples")
    if run.model_stats:
        print("model: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in run.model_stats.items()))
    p = run.provenance
    package = p["strategy_package"]
    print(f"code: {p['code_version']}; strategy from "
          f"{'an unpackaged module' if package is None else package['name'] + ' ' + package['version']}")
    print(f"device: {p['device']}")
    return 0


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_runs(args: argparse.Namespace) -> int:
    from cl.store import HEADLINE, ResultStore

    rows = ResultStore(args.store, must_exist=True).list_runs(args.experiment)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no runs in {args.store}")
        return 0
    table = [["id", "experiment", "strategy", "seed", "status", *HEADLINE]]
    table += [[str(r["id"]), r["experiment"], r["strategy"], str(r["seed"]),
               r["status"] if r["evaluated_on"] == "test" else f"{r['status']} (validation)",
               *("-" if r[h] is None else format(r[h], ".3f") for h in HEADLINE)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    left = {1, 2, 4}  # names and status; numbers right-aligned
    for row in table:  # columns as wide as their longest entry: long names keep the table aligned
        print("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return 0


#: What Ctrl-C leaves behind, and how to go on, per command.
INTERRUPTED = {
    "run": "finished runs are stored, the current one has a checkpoint after its last finished experience: "
           "continue with the same command and --resume",
    "sweep": "finished trials are in the study and their runs in the store: run the same command again to "
             "continue the study (the trial cut short is retried once its heartbeat is stale, after 3 x --heartbeat s)",
    "pretrain": "no backbone checkpoint was written (it is written once, at the end): run the same command again",
}

COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "pretrain": cmd_pretrain, "list": cmd_list, "show": cmd_show, "runs": cmd_runs,
            "import": cmd_import, "leaderboard": cmd_leaderboard}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"cl: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"cl: run failed: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `cl runs | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        what = INTERRUPTED.get(args.command)
        print(f"cl: interrupted{'; ' + what if what else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
