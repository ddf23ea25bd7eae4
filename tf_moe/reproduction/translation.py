"""The translation experiment: the MoE seq2seq model against its dense baseline, with BLEU."""

import functools
import os

import keras
import tensorflow as tf

from tf_moe import data
from tf_moe.models import Seq2SeqDecoder, seq2seq
from tf_moe.reproduction import corpora, runs
from tf_moe.reproduction.progress import BARS


def _mt_data(config):
    train_pairs = runs.subset(corpora.load_translation_pairs(config.corpus, "train"), config.train_size)
    valid_pairs = runs.subset(corpora.load_translation_pairs(config.corpus, "valid"), config.valid_size)
    test_pairs = runs.subset(corpora.load_translation_pairs(config.corpus, "test"), config.bleu_sentences)
    tokenizer = data.WordpieceTokenizer.from_translation_pairs(train_pairs, config.vocab_size, progress=BARS)
    make_train = functools.partial(
        data.translation_dataset, train_pairs, tokenizer, config.seq_len, config.batch_size, seed=config.seed,
        fixed_length=True,
    )
    valid = data.translation_dataset(valid_pairs, tokenizer, config.seq_len, config.batch_size, shuffle=False, fixed_length=True)
    return tokenizer, make_train, valid, test_pairs


def translate(decoder, tokenizer, sources, batch_size=64, beam_size=4):
    """Translates a list of strings with a `Seq2SeqDecoder`; returns normalised text."""
    outputs = []
    for start in range(0, len(sources), batch_size):
        batch = [[data.START_ID, *ids[: decoder.max_length - 2], data.END_ID]
                 for ids in tokenizer.tokenize(sources[start : start + batch_size]).to_list()]
        source = tf.ragged.constant(batch, dtype=tf.int32).to_tensor()
        if beam_size > 1:
            ids = decoder.beam_search(source, beam_size=beam_size, length_penalty=0.6)
        else:
            ids = decoder.greedy(source)
        outputs += [text.decode("utf-8") for text in tokenizer.detokenize(ids).numpy()]
    return outputs


def bleu(hypotheses, references, tokenizer):
    """Corpus BLEU (sacrebleu) against references normalised as the tokenizer does."""
    import sacrebleu

    references = [text.decode("utf-8") for text in tokenizer.normalize(references).numpy()]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def train_mt(config, save=True):
    """Trains the MoE seq2seq model and its dense baseline on En->Es; returns rows with BLEU."""
    keras.utils.set_random_seed(config.seed)
    tokenizer, make_train, valid, test_pairs = _mt_data(config)
    sources = [source for source, _ in test_pairs]
    references = [target for _, target in test_pairs]
    rows, run_names = [], []
    for use_moe in (True, False):
        keras.utils.set_random_seed(config.seed)
        model = seq2seq(
            tokenizer.vocabulary_size,
            use_moe=use_moe,
            name="mt_moe" if use_moe else "mt_dense",
            **runs.model_settings(config),
        )
        run_names.append(model.name)
        row = runs.fit(model, config, make_train, valid, runs.run_dir(config, model.name))
        decoder = Seq2SeqDecoder(model, data.START_ID, data.END_ID, max_length=config.seq_len)
        hypotheses = translate(decoder, tokenizer, sources, beam_size=config.beam_size)
        row["test_bleu"] = bleu(hypotheses, references, tokenizer)
        row["example"] = f"{sources[0]} => {hypotheses[0]}"
        rows.append(row)
        if save:
            model.save(os.path.join(config.output, f"{model.name}.keras"))
    if save:
        tokenizer.save_vocabulary(os.path.join(config.output, "mt_vocab.txt"))
        runs.write_json(os.path.join(config.output, "mt_results.json"), config, rows)
    runs.delete_backups(config, run_names)
    return rows
