"""experiments/jobs.py: training many runs at once, in worker processes (the premise's --jobs).

Owns: prepare (every (sft_q, seed)'s SFT model, then its runs, ctx.jobs at a time; one torch thread each).
Does not own: what a run is or where it lives (context.py).
"""

import concurrent.futures
import multiprocessing

import torch

from experiments.context import Context


def prepare(ctx, tasks):
    """Train and answer every run of tasks [(sft_q, seeds, [Run])]: each (sft_q, seed)'s SFT model, then
    each of its runs, every one a job, ctx.jobs jobs at a time in worker processes (one torch thread each;
    a run's job starts once its SFT model is trained); the tables then find them trained. In this process
    when ctx.jobs is 1."""
    chains = {(q, seed): runs for q, seeds, runs in tasks for seed in seeds}
    if ctx.jobs <= 1:
        for (q, seed), runs in chains.items():
            for run in (None, *runs):
                run_job(ctx, q, seed, run)
        return
    with concurrent.futures.ProcessPoolExecutor(ctx.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit(q, seed, run):
            return pool.submit(job_worker, ctx.size, ctx.work, ctx.out, ctx.fresh, ctx.done, q, seed, run)

        pending = {submit(q, seed, None): (q, seed) for q, seed in chains}
        while pending:
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                chain = pending.pop(future)
                for out_dir, how in future.result().items():
                    if ctx.runs.get(out_dir) != "trained":
                        ctx.runs[out_dir] = how
                    ctx.done.add(out_dir)
                if chain is not None:  # an SFT model: now its runs
                    pending.update({submit(*chain, run): None for run in chains[chain]})


def run_job(ctx, q, seed, run):
    """One job of prepare(): the SFT model and its margins (run None), or a run and its answers."""
    variant = ctx.variant(q, [seed])
    if run is None:
        variant.sft_margins(seed)
    else:
        variant.answers(seed, run)
        if run.validate:
            variant.answers(seed, run, split="valid")
    return variant.runs


def job_worker(size, work, out, fresh, done, q, seed, run):
    """run_job in a worker process; returns its {run folder: "trained" or "reused"}."""
    torch.set_num_threads(1)
    ctx = Context(size, work, out, fresh)
    ctx.done = set(done)
    return run_job(ctx, q, seed, run)
