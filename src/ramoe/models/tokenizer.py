"""Tokenizers built offline with the ``tokenizers`` library and saved as Hugging Face tokenizers.

Two kinds: ``word`` (one token per whitespace-separated word of a closed vocabulary, for the
synthetic world, where every answer is one token) and ``byte`` (byte-level BPE trained on the
pretraining text, for real multilingual data, so that every script can be encoded).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    # Left padding: batched greedy generation appends new tokens on the right of every row.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )


def build_word_tokenizer(vocabulary: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over a closed vocabulary. Special tokens take ids 0-3."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    log.info("word-level tokenizer: %d tokens", len(vocab))
    return _wrap(tokenizer)


def build_byte_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``. ``vocab_size`` includes the 256 bytes."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    log.info("byte-level BPE tokenizer: %d tokens", tokenizer.get_vocab_size())
    return _wrap(tokenizer)
