"""SavedModel export for TensorFlow Serving.

Writes trained models as SavedModels in TF Serving's layout,
`<base_dir>/<name>/<version>/`, with signatures that need only TensorFlow
and TensorFlow Text to run (no tf_moe, no Python model code):

* `export_language_model`: `serving_default` takes raw strings, tokenises
  them in-graph and returns the top-k next tokens (strings, ids and
  probabilities); `next_token_ids` does the same from padded token ids.
* `export_translation_model`: `serving_default` translates raw strings with
  in-graph greedy decoding (a `tf.while_loop`); `beam_search` uses beam
  search.
* `export_keras_model`: any Keras model or layer (a bare `MoE` included),
  one numeric signature like `model.export`'s `serve`.

Every signature runs the model with `training=False`: no dropout, no gating
noise, and `MoE(gate="batchwise")` routes with its learned thresholds.
The MoE layers still update their load-balance metric variables when
called, so served requests change those counters, never the outputs.

Command line (`tf_moe.cli`; `python -m tf_moe.export ...` is the same):

    tf-moe export lm saved_models/lm_moe.keras \\
        --vocab saved_models/lm_vocab.txt --name lm
    tf-moe export mt saved_models/mt_moe.keras \\
        --vocab saved_models/mt_vocab.txt --name translate
    tf-moe export keras model.keras --name numeric

See docs/serving.md for serving the result and the REST request bodies.
"""

import os
import sys

import keras
import tensorflow as tf

from tf_moe.data.tokenizer import END_ID, PAD_ID, START_ID, WordpieceTokenizer
from tf_moe.models.seq2seq import Seq2SeqDecoder

DEFAULT_BASE_DIR = "saved_models"


def version_dir(base_dir, name, version=None):
    """The directory `<base_dir>/<name>/<version>` that TF Serving expects.

    Args:
        base_dir: root of the model repository (TF Serving's `--model_base_path`
            is `<base_dir>/<name>`).
        name: model name (TF Serving's `MODEL_NAME`).
        version: positive int; None for one more than the largest version
            already there (1 for a new model).

    Returns:
        The path of the version directory (not created).

    Raises:
        ValueError: `name` or `version` is not usable.
        FileExistsError: that version already exists and is not empty.
    """
    if not name or os.sep in name or name in (".", ".."):
        raise ValueError(f"`name` must be a plain directory name, got {name!r}.")
    model_dir = os.path.join(base_dir, name)
    if version is None:
        existing = [int(d) for d in _listdir(model_dir) if d.isdigit()]
        version = max(existing, default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"`version` must be a positive int (TF Serving's version), got {version!r}.")
    path = os.path.join(model_dir, str(version))
    if _listdir(path):
        raise FileExistsError(
            f"{path} already exists: pass another `version` (TF Serving serves the largest)."
        )
    return path


def _listdir(path):
    return os.listdir(path) if os.path.isdir(path) else []


def _archive(*resources):
    archive = keras.export.ExportArchive()
    for resource in resources:
        # The tokenizer's lookup table is a resource that `add_endpoint` does
        # not find by itself in the variables the endpoints use.
        archive.track(resource)
    return archive


def _check_top_k(top_k, vocabulary_size):
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k < vocabulary_size:
        raise ValueError(
            f"`top_k` must be an int in [1, {vocabulary_size - 1}] (the vocabulary "
            f"without padding), got {top_k!r}."
        )


def _check_tokenizer(tokenizer, model):
    if not isinstance(tokenizer, WordpieceTokenizer):
        raise TypeError(f"`tokenizer` must be a tf_moe.data.WordpieceTokenizer, got {type(tokenizer).__name__}.")
    vocab = model.get_layer("logits").units
    if tokenizer.vocabulary_size != vocab:
        raise ValueError(
            f"`tokenizer` has {tokenizer.vocabulary_size} tokens but the model predicts "
            f"{vocab}: export the vocabulary the model was trained with."
        )


def next_token_distribution(logits, token_ids):
    """Next-token probabilities after the last real token of each row.

    Args:
        logits: [batch, time, vocab] language-model logits.
        token_ids: [batch, time] int ids, right-padded with `PAD_ID` (0).

    Returns:
        [batch, vocab] float32 probabilities. Padding is never predicted (its
        probability is 0), as in `Seq2SeqDecoder`. A row of padding only
        gets the distribution at position 0.
    """
    lengths = tf.reduce_sum(tf.cast(tf.not_equal(token_ids, PAD_ID), tf.int32), axis=1)
    last = tf.gather(tf.cast(logits, tf.float32), tf.maximum(lengths - 1, 0), batch_dims=1)
    not_pad = tf.not_equal(tf.range(tf.shape(last)[-1]), PAD_ID)
    return tf.nn.softmax(tf.where(not_pad, last, float("-inf")))


def _with_start_and_end(ragged_ids, max_tokens=None, end=False):
    """`[START] ids [END]?` per row, as the training pipelines build them, padded with 0."""
    if max_tokens is not None:
        ragged_ids = ragged_ids[:, :max_tokens]
    column = tf.ones_like(ragged_ids[:, :1])
    parts = [column * START_ID, ragged_ids] + ([column * END_ID] if end else [])
    return tf.concat(parts, axis=1).to_tensor(PAD_ID)


def export_language_model(model, tokenizer, export_dir, top_k=5, verbose=False):
    """Exports a language model (e.g. `lstm_lm`) with in-graph tokenisation.

    Signatures:

    * `serving_default(text: string [batch])`: each text is tokenised as in
      training (`[START]` then its wordpieces; no `[END]`) and the model
      predicts the token that follows it;
    * `next_token_ids(token_ids: int32 [batch, time])`: the same from token
      ids right-padded with 0 (include the `[START]` id 2 yourself).

    Both return `token_ids` (int32 [batch, top_k]), `tokens` (string
    [batch, top_k], wordpieces as in the vocabulary, `##` marking a suffix)
    and `probabilities` (float32 [batch, top_k]), most likely first.

    Args:
        model: a Keras model mapping int32 ids [batch, time] to logits
            [batch, time, vocab] whose last layer is named `logits`.
        tokenizer: the `WordpieceTokenizer` the model was trained with.
        export_dir: directory to write (e.g. `version_dir(...)`).
        top_k: int, how many next tokens to return.
        verbose: print the signatures.

    Returns:
        `export_dir`.

    Example:

    >>> export_language_model(model, tokenizer, version_dir("saved_models", "lm"))
    ... # doctest: +SKIP
    """
    _check_tokenizer(tokenizer, model)
    _check_top_k(top_k, tokenizer.vocabulary_size)
    archive = _archive(model, tokenizer)

    def next_tokens(token_ids):
        token_ids = tf.cast(token_ids, tf.int32)
        probabilities = next_token_distribution(model(token_ids, training=False), token_ids)
        probabilities, ids = tf.math.top_k(probabilities, top_k)
        return {"token_ids": ids, "tokens": tf.gather(tokenizer.vocab, ids), "probabilities": probabilities}

    def from_text(text):
        return next_tokens(_with_start_and_end(tokenizer.tokenize(text)))

    archive.add_endpoint("serving_default", from_text, [tf.TensorSpec([None], tf.string, name="text")])
    archive.add_endpoint("next_token_ids", next_tokens, [tf.TensorSpec([None, None], tf.int32, name="token_ids")])
    archive.write_out(export_dir, verbose=verbose)
    return export_dir


def export_translation_model(
    model, tokenizer, export_dir, max_length=64, beam_size=4, length_penalty=0.6, verbose=False
):
    """Exports a `seq2seq` model that translates raw strings in-graph.

    Sources are tokenised as in training (`[START] pieces [END]`, cut to
    `max_length` ids) and decoded by `Seq2SeqDecoder` inside the graph.

    Signatures (input `text`: string [batch]):

    * `serving_default`: greedy decoding;
    * `beam_search`: beam search of width `beam_size` with GNMT's length
      penalty (only when `beam_size > 1`).

    Both return `translation` (string [batch]: normalised text, words and
    punctuation separated by spaces) and `token_ids` (int32
    [batch, max_length], the output ids, 0 after the end token).

    Args:
        model: a model built by `tf_moe.models.seq2seq`.
        tokenizer: the shared `WordpieceTokenizer` it was trained with.
        export_dir: directory to write.
        max_length: int, most source ids read and target ids generated.
        beam_size: int, beam width of the `beam_search` signature (1: none).
        length_penalty: float, GNMT's length-penalty exponent for beams.
        verbose: print the signatures.

    Returns:
        `export_dir`.
    """
    _check_tokenizer(tokenizer, model)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"`beam_size` must be a positive int, got {beam_size!r}.")
    decoder = Seq2SeqDecoder(model, START_ID, END_ID, max_length=max_length)
    archive = _archive(model, tokenizer)

    def encode(text):
        return _with_start_and_end(tokenizer.tokenize(text), max_length - 2, end=True)

    def outputs(ids):
        return {"translation": tokenizer.detokenize(ids), "token_ids": ids}

    def greedy(text):
        return outputs(decoder.greedy(encode(text)))

    def beam(text):
        return outputs(decoder.beam_search(encode(text), beam_size=beam_size, length_penalty=length_penalty))

    text_spec = [tf.TensorSpec([None], tf.string, name="text")]
    archive.add_endpoint("serving_default", greedy, text_spec)
    if beam_size > 1:
        archive.add_endpoint("beam_search", beam, text_spec)
    archive.write_out(export_dir, verbose=verbose)
    return export_dir


def export_keras_model(model, export_dir, input_signature=None, verbose=False):
    """Exports any Keras model or layer with one numeric signature.

    Like `model.export(path)`: the signature is `serve`, also registered as
    `serving_default`, and calls the model with `training=False`. Each
    model input is a named argument of the signature (the `keras.Input`
    names), so TF Serving accepts `{"inputs": {"<name>": ...}}`; a model's
    outputs are named after their layers (a layer's output is `output_0`).

    Args:
        model: a built Keras model with known `inputs`, or a built layer (for
            instance a bare `MoE`) with `input_signature`.
        export_dir: directory to write.
        input_signature: list of `tf.TensorSpec`, one per input; by default
            taken from `model.inputs`.
        verbose: print the signature.

    Returns:
        `export_dir`.

    Example:

    >>> moe = MoE(num_experts=4, k=2, hidden_units=16)
    >>> moe.build((None, 8))
    >>> export_keras_model(moe, "saved_models/moe/1",
    ...                    [tf.TensorSpec([None, 8], tf.float32, name="x")])
    ... # doctest: +SKIP
    """
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(f"`model` must be a built Keras model or layer, got {model!r}.")
    if input_signature is None:
        inputs = getattr(model, "inputs", None) if isinstance(model, keras.Model) else None
        if not inputs:
            raise ValueError(
                "`input_signature` is needed for a layer or a model without `inputs` "
                "(a subclassed model): a list of tf.TensorSpec, one per input."
            )
        input_signature = [
            tf.TensorSpec(x.shape, x.dtype, name=x.name.split(":")[0]) for x in inputs
        ]
    multiple = isinstance(model, keras.Model) and len(getattr(model, "inputs", None) or []) > 1

    output_names = getattr(model, "output_names", None) if isinstance(model, keras.Model) else None

    def serve(*args):
        outputs = model(list(args) if multiple else args[0], training=False)
        if not output_names:
            return outputs
        # Outputs named after their layers, not `output_0`, `output_1`, ...
        return dict(zip(output_names, tf.nest.flatten(outputs)))

    archive = _archive(model)
    archive.add_endpoint("serve", serve, list(input_signature))
    archive.write_out(export_dir, verbose=verbose)
    return export_dir


def _load_keras(path):
    # Importing these registers tf_moe's serializable classes for load_model.
    import tf_moe.distribute  # noqa: F401
    import tf_moe.models  # noqa: F401

    return keras.models.load_model(path)


def main(argv=None):
    """`python -m tf_moe.export ARGS`: the same as `tf-moe export ARGS`."""
    from tf_moe import cli

    return cli.main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
