"""Tokenizer training, saving, loading, and its agreement with the model config."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from data.vocab import save_tokenizer, train_tokenizer, word_start_table
from model.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    check_compatible,
    load_tokenizer,
    special_ids,
)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_train_save_load_round_trip(tmp_path, texts, kind):
    tok = train_tokenizer(texts[:300], kind=kind, vocab_size=500)
    assert len(tok) <= 500
    assert [tok.convert_ids_to_tokens(i) for i in range(6)] == list(SPECIAL_TOKENS.values())
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    sample = "Return the absolute value of a number."
    assert again(sample)["input_ids"] == tok(sample)["input_ids"]
    assert special_ids(again) == special_ids(tok)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto(sample)["input_ids"] == tok(sample)["input_ids"]
    assert auto.mask_token == "[MASK]" and auto.pad_token == "[PAD]"


def test_mask_token_absorbs_the_space_before_it(tokenizer):
    ids = tokenizer("Return the [MASK] value", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "[MASK]" in tokens
    assert tokens[tokens.index("[MASK]") + 1].startswith("Ġ")  # the next word keeps its space
    assert tokens[tokens.index("[MASK]") - 1] == "Ġthe"  # no stray space token before the mask


def test_special_tokens_frame_single_texts(tokenizer):
    ids = tokenizer("hello")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_word_start_table_marks_word_pieces(tokenizer):
    table = word_start_table(tokenizer)
    ids = tokenizer(" unsubscribable identifiers", add_special_tokens=False)["input_ids"]
    starts = [bool(table[i]) for i in ids]
    assert starts[0] and starts.count(True) == 2 and len(ids) > 2


def test_vocabulary_smaller_than_special_tokens_is_refused(texts):
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(texts[:10], vocab_size=5)


def test_unknown_kind_is_refused(texts):
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        train_tokenizer(texts[:10], kind="sentencepiece")


def test_loading_garbage_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_foreign_tokenizer_gains_missing_special_tokens(tmp_path, texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(
        texts[:100],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        ),
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.mask_token == "<mask>" and tok.cls_token == "<s>" and tok.sep_token == "</s>"
    assert tok.sentence_mask_token == "[MASK_SENT]"
    assert special_ids(tok).sentence_mask == 400  # appended after the trained vocabulary


def test_config_and_tokenizer_mismatch_is_named(tokenizer, tiny_config):
    check_compatible(tokenizer, tiny_config)
    tiny_config.mask_token_id = 9
    with pytest.raises(TokenizerError, match="mask_token_id=9"):
        check_compatible(tokenizer, tiny_config)
    tiny_config.mask_token_id = special_ids(tokenizer).mask
    tiny_config.vocab_size = 64
    with pytest.raises(TokenizerError, match="embedding has only 64 rows"):
        check_compatible(tokenizer, tiny_config)


def test_saved_config_names_special_tokens(tmp_path, tokenizer):
    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "[MASK]" and config["sentence_mask_token"] == "[MASK_SENT]"
