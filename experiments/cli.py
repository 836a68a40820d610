"""experiments/cli.py: the command line, ``python -m experiments CLAIM|all|premise|render`` (experiments/__init__.py).

Owns: the flags, running one claim into NAME.json / NAME.md / NAME.png with its time and runs, `all`.
Does not own: the claims (claims.py), the runs (context.py), the files people read (render.py).
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

from base import common
from experiments import ROOT, ExperimentError, provenance, sizes
from experiments.claims import CLAIMS, EXPERIMENTS, PREMISE, VERDICT, markdown
from experiments.context import Context, write_json
from experiments.render import README, RESULTS, render, write_readme, write_summary, write_views

DESCRIPTION = "The paper's claims rerun in miniature, one subcommand per claim."


def run_experiment(name, ctx, smoke=False):
    """Run one experiment; write NAME.json, NAME.md (and NAME.png); return the result document."""
    ctx.log(f"{name}: {CLAIMS[name].TITLE}")
    t0, cpu0, ctx.runs = time.time(), cpu_seconds(), {}
    made = provenance.record()  # the tree and libraries as the experiment starts, and its command

    def document(result):
        size = result.get("size") or dataclasses.asdict(ctx.size)  # a claim run in its own regime says so
        result = {k: v for k, v in result.items() if k != "size"}
        return dict(result, experiment=name, seconds=time.time() - t0, cpu_seconds=cpu_seconds() - cpu0,
                    runs_trained=sum(v == "trained" for v in ctx.runs.values()),
                    runs_reused=sum(v == "reused" for v in ctx.runs.values()),
                    provenance=made,
                    config={**size, "smoke": smoke, "seeds": result.get("seeds", ctx.seeds),
                            "test_prompts": len(ctx.questions)})

    base = os.path.join(ctx.out, name)

    def interim(result):  # a long experiment's results so far, rewritten as it goes
        write_json(base + ".json", document(result))
        ctx.log(f"{name}: results so far in {base}.json, " + write_views(name, document(result), ctx.out))

    ctx.interim = interim
    result = document(CLAIMS[name].run(ctx))
    common.emit(result, markdown(name, result), base + ".json")
    ctx.log(f"{name}: wrote {base}.json, " + write_views(name, result, ctx.out))
    return result


def cpu_seconds():
    """CPU time of this process and of its finished worker processes (user and system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _count(text):
    """An argparse type: an integer >= 0 (0: the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 (0: the default)")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m experiments", description=DESCRIPTION)
    parser.add_argument("experiment", choices=EXPERIMENTS + ("all", PREMISE, VERDICT, "render"),
                        help="a claim, all of them, or render: rewrite the .md and .png files of --out "
                             "from its .json files (after installing matplotlib, say), and experiments/README.md")
    parser.add_argument("--size", choices=sorted(sizes.SIZES), default="default")
    parser.add_argument("--smoke", action="store_true", help="the smallest size: a few steps, for tests")
    parser.add_argument("--seeds", type=_count, default=0, help="seeds (default: the size's)")
    parser.add_argument("--work", help="training runs (default: runs/experiments/SIZE[-smoke])")
    parser.add_argument("--out", help="tables and plots (default: experiments/results/SIZE[-smoke])")
    parser.add_argument("--cache", help="where SmolLM2 is converted to (default: $SRPO_CACHE or ~/.cache/srpo)")
    parser.add_argument("--fresh", action="store_true", help="retrain every run instead of reusing it")
    parser.add_argument("--finished", action="store_true",
                        help="verdict: report from the runs trained so far (each comparison over the seeds that have "
                             "both of its runs), training nothing")
    parser.add_argument("--threads", type=_count, default=0,
                        help="torch CPU threads (default: 1 for the tiny model, whose small matrices gain "
                             "nothing from more; torch's default for smollm2)")
    parser.add_argument("--jobs", type=_count, default=0,
                        help="premise, verdict: (q, seed) chains trained at once, in worker processes (default: 2 "
                             "for the tiny model where the machine has 2 cores, else 1)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tag = args.size + ("-smoke" if args.smoke else "")
    out = args.out or os.path.join(ROOT, "experiments", "results", tag)
    if args.experiment == "render":
        try:
            render(out)
            if os.path.dirname(os.path.abspath(out)) == RESULTS:
                write_readme()
                print(f"wrote {README}", flush=True)
        except ExperimentError as err:
            print(f"python -m experiments: error: {err}", file=sys.stderr)
            return 2
        return 0
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.size == "default" else threads_before))
    try:
        size = sizes.size_for(args.size, args.smoke, args.seeds, args.cache)
        if size.seeds < 2:
            print(f"--seeds {size.seeds}: no t-test across seeds (it needs at least 2)", flush=True)
        jobs = args.jobs or (min(2, os.cpu_count() or 1) if args.size == "default" else 1)
        ctx = Context(size, args.work or os.path.join(ROOT, "runs", "experiments", tag), out, args.fresh, jobs=jobs)
        ctx.train_nothing = args.finished
        names = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
        results = {name: run_experiment(name, ctx, args.smoke) for name in names}
        if args.experiment == "all":
            write_summary(ctx.out, names, results)
    except common.SrpoError as err:
        print(f"python -m experiments: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    return 0
