"""experiments/claims.py: the one registry of the claims. Each claim is one module of this package that holds its
TITLE, run(ctx) -> result, markdown(result) -> [paragraph, ...] and plot(plt, result) -> figure.
"""

from experiments import corollary, figure1, lambdas, methods, premise, table4, verdict
from experiments.markdown import footer

CLAIMS = {"methods": methods, "figure1": figure1, "lambda": lambdas, "table4": table4, "corollary": corollary,
          "premise": premise, "verdict": verdict}
EXPERIMENTS = ("methods", "figure1", "lambda", "table4", "corollary")  # the paper's claims (`all`)
PREMISE = "premise"  # when does self-refinement help? (its own command: many more runs)
VERDICT = "verdict"  # Sr against tuned baselines and prompt controls, with paired intervals (its own command)


def markdown(name, result):
    """The Markdown text of one experiment's result."""
    parts = CLAIMS[name].markdown(result)
    return "\n\n".join([f"### {CLAIMS[name].TITLE}", *parts, footer(result)]) + "\n"
