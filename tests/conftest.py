"""Shared fixtures: tiny, randomly initialised causal LMs with real tokenizers, built offline.

Two tokenizer families, because span mapping must hold on both:
  - byte-level BPE (GPT-2 / SmolLM / Llama-3 style), trained here on a small corpus;
  - SentencePiece-style Unigram with the Metaspace pre-tokenizer (Llama-2 / Mistral style).
Each model directory is a normal `save_pretrained` directory with a chat template, so stage code
loads it exactly as it loads the real default model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "She sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 10. Therefore \\boxed{10}. Step 1: add. Step 2: multiply.",
    "def f(x):\n    return x ** 2  # square\nprint(f(3))",
    "Unicode: café, naïve, 東京, €5.50, Δx ≈ 0.1, emoji 🙂, $\\frac{1}{2}$ and \\sum_{i=1}^n i.",
]


def _special_tokens() -> list[str]:
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE fast tokenizer (offsets supported), trained on TRAINING_TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_sentencepiece_tokenizer(vocab_size: int = 300):
    """A SentencePiece-style Unigram fast tokenizer with Metaspace (▁) pre-tokenization."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=_special_tokens() + ["<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model_dir(path: Path, tokenizer, *, seed: int = 0, hidden: int = 32, layers: int = 2,
                         tie_embeddings: bool = False, max_positions: int = 512) -> Path:
    """Save a randomly initialised Llama-architecture causal LM plus its tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "model_info.json").write_text(
        json.dumps({"identity": f"tiny-llama-seed{seed}-h{hidden}-l{layers}", "source": "test"}) + "\n"
    )
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return build_sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    """A tiny byte-level-BPE Llama model directory, shared by the whole session (read-only)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_bpe_model"), bpe_tokenizer)


@pytest.fixture(scope="session")
def tiny_sp_model_dir(tmp_path_factory, sentencepiece_tokenizer) -> Path:
    """A tiny SentencePiece-style Llama model directory with tied embeddings."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("tiny_sp_model"), sentencepiece_tokenizer, seed=1, tie_embeddings=True
    )


GSM_ROWS = [
    {
        "id": "gsm-a",
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "id": "gsm-b",
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                    "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
                  "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "id": "gsm-c",
        "question": "A café sells croissants for €2.50 each. Léa buys 4. How much does she pay?",
        "answer": "Each croissant costs €2.50.\nFour cost 4 × 2.50 = €<<4*2.5=10>>10.\n"
                  "So she pays $\\frac{20}{2}$ = 10 euros.\n#### 10",
    },
]


@pytest.fixture
def gsm_rows() -> list[dict]:
    """Three clean GSM8K-format records, one with unicode and LaTeX."""
    return [dict(row) for row in GSM_ROWS]


@pytest.fixture
def tasks_log():
    """Records of the `tasks` loggers, each once, caught on the `tasks` logger itself.

    caplog listens at the root, where an earlier test in the same process (a Prefect flow run
    reconfigures logging) can make a record arrive twice; a handler on `tasks` sees each once.
    """
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("tasks")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
