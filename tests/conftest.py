import os
import sys
from pathlib import Path

# Never touch a model hub or the wandb servers from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_FIXTURES = SHARED / "fixtures" / "real"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def real_fixtures():
    """The real annotation excerpts in ../shared/fixtures/real; skip cleanly when absent."""
    if not REAL_FIXTURES.is_dir():
        pytest.skip(f"{REAL_FIXTURES} not present")
    return REAL_FIXTURES


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A WordPiece tokenizer over the test shards' vocabulary (loader_shards.WORDS), built offline once."""
    from loader_shards import WORDS
    from shards.text import build_vocab_tokenizer
    return build_vocab_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))


def pytest_terminal_summary(terminalreporter):
    """The bad-input corpus's tally (tests/test_bad_inputs.py), when it ran."""
    mod = sys.modules.get("badcorpus")
    if mod is not None and getattr(mod, "TALLY", None):
        terminalreporter.write_line(mod.summary())
