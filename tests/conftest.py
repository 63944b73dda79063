"""Helpers shared by the ReNO tests of tests/rewards and tests/pipelines: a CLIP tokenizer
written locally (no hub download) and a tiny transformers CLIP model from a config."""

import pytest


def write_clip_tokenizer(directory):
    """A byte-level CLIP BPE tokenizer with no merges (every byte is a token), saved to ``directory``."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> unicode map
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(directory)
    return tokenizer


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


def tiny_clip_model(seed: int = 0, image_size: int = 32):
    """A random CLIPModel: 32-wide, one-layer towers, 16-d projection, ``image_size`` input."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
