"""Test helpers: tiny random Hugging Face model directories, built locally (never downloaded).

Each builder writes what `model.save_pretrained` and `tokenizer.save_pretrained` write for a
2-layer model with hidden size 32 and a tokenizer made with the `tokenizers` library from a
small vocabulary, so tests exercise the real transformers loaders in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

WORDS = [
    *[
        "the",
        "a",
        "an",
        "of",
        "to",
        "in",
        "and",
        "is",
        "was",
        "on",
        "for",
        "with",
        "as",
        "by",
        "at",
        "from",
        "it",
        "this",
        "that",
        "be",
        "are",
        "were",
    ],
    *[
        "alice",
        "bob",
        "carol",
        "paris",
        "london",
        "berlin",
        "went",
        "visited",
        "met",
        "lives",
        "works",
        "good",
        "bad",
        "great",
    ],
    *[
        "awful",
        "model",
        "kiln",
        "queue",
        "job",
        "text",
        "token",
        "label",
        "score",
        "happy",
        "sad",
        "day",
        "night",
        "city",
        "river",
    ],
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SENTIMENT = {0: "negative", 1: "positive"}
CORPUS = [
    "alice went to paris and met bob",
    "the queue was good and the model was great",
    "bob lives in london by the river",
    "carol works in berlin at night",
    "it was a bad day for the city",
] * 20


def _bert_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*SPECIAL, *WORDS, *letters, *(f"##{c}" for c in letters)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    core.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def _bert_config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        **extra,
    )


def bert_directory(directory: Path, task: str = "embedding", seed: int = 0) -> Path:
    """A tiny BERT for `embedding`, `text-classification` or `token-classification`."""
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(directory)
    torch.manual_seed(seed)
    if task == "text-classification":
        config = _bert_config(len(tokenizer), id2label=SENTIMENT)
        model = BertForSequenceClassification(config)
    elif task == "token-classification":
        config = _bert_config(len(tokenizer), id2label=NER_LABELS)
        model = BertForTokenClassification(config)
    else:
        model = BertModel(_bert_config(len(tokenizer)))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def gpt2_directory(directory: Path, seed: int = 0) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer trained on CORPUS."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=64,
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    return directory
