"""Test configuration: no test may reach the network or a model hub."""
import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def nan_at_step(monkeypatch):
    """nan_at_step(k): make the preference loss of step k NaN (steps count from 1; one micro-batch a step)."""
    def make(k):
        import train

        calls, terms = [], train.preference_terms

        def faulty(*args):
            losses, stats = terms(*args)
            calls.append(1)
            return (losses * float("nan") if len(calls) == k else losses), stats

        monkeypatch.setattr(train, "preference_terms", faulty)

    return make
