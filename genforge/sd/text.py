"""Local text conditioning for small text-to-image runs: a word-level tokenizer and a small CLIP text encoder.

No tokenizer or text encoder can be downloaded, so a run builds its own: a ``tokenizers``
word-level model over the words of its prompts, wrapped as a transformers
``PreTrainedTokenizerFast`` (what a diffusers ``StableDiffusionPipeline`` calls with
``padding="max_length"``), and a ``CLIPTextModel`` from a small ``CLIPTextConfig``. Both save
with ``save_pretrained`` inside the run's pipeline. On digits the prompts are class names:
"a handwritten digit three".
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

__all__ = ["DIGIT_NAMES", "digit_prompt", "word_tokenizer", "small_text_encoder", "encode_prompts"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"


def digit_prompt(label: int) -> str:
    """The class-name prompt of a digit: ``a handwritten digit three``."""
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def word_tokenizer(prompts: list[str], max_length: int = 8) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-splitting word-level tokenizer over the words of ``prompts``;
    sequences are ``<|startoftext|> words <|endoftext|>`` padded to ``max_length``."""
    words = sorted({word for prompt in prompts for word in prompt.lower().split()})
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=max_length)


def small_text_encoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                       seed: int = 0) -> CLIPTextModel:
    """A seeded, randomly initialised ``CLIPTextModel`` sized for ``tokenizer``."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(N, max_length, hidden) embeddings, tokenized as a StableDiffusionPipeline does."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]
