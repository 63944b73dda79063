"""Session fixtures of the ReNO tests: the tiny CLIP tokenizer (builders in tiny_reno_models.py)."""

import pytest

from tiny_reno_models import write_clip_tokenizer


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """Directory of the tiny CLIP tokenizer (vocabulary of 514 byte tokens)."""
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def clip_tokenizer(clip_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(clip_tokenizer_dir, local_files_only=True)
