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
Empty texts, empty batches and rows of padding get the answers that
docs/serving.md lists; inputs of the wrong shape and out-of-range token ids
are refused with an error naming the input.

`load_model` reads the `.keras` file training saved. The reproduction's
command line (`tf_moe.reproduction.cli`) calls these functions:

    tf-moe export lm saved_models/lm_moe.keras \\
        --vocab saved_models/lm_vocab.txt --name lm
    tf-moe export mt saved_models/mt_moe.keras \\
        --vocab saved_models/mt_vocab.txt --name translate
    tf-moe export keras model.keras --name numeric

See docs/serving.md for serving the result and the REST request bodies.
"""

import os
import shutil
import tempfile
import zipfile

import keras
import tensorflow as tf

# Importing these registers tf_moe's serializable classes for `load_model`.
import tf_moe.distribute  # noqa: F401
import tf_moe.models  # noqa: F401
from tf_moe.data.tokenizer import END_ID, PAD_ID, START_ID, WordpieceTokenizer
from tf_moe.data.vocabulary import WordVocabulary
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


def _write_out(archive, export_dir, overwrite, verbose):
    """Writes the SavedModel beside `export_dir`, then renames it into place.

    TF Serving loads a version directory as soon as it appears, so it must
    appear whole; and an existing export is replaced only when asked.
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    if _listdir(export_dir) and not overwrite:
        raise FileExistsError(
            f"{export_dir} already exists and is not empty: pass `overwrite=True` to replace it, "
            "or export to a new directory (e.g. `version_dir(...)`)."
        )
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    # Names starting with "." are not versions, so TF Serving ignores them.
    partial = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        archive.write_out(partial, verbose=verbose)
        if os.path.exists(export_dir):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.rename(export_dir, os.path.join(old, "export"))
            os.rename(partial, export_dir)
            shutil.rmtree(old)
        else:
            os.rename(partial, export_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


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


def _check_tokenizer(tokenizer, model, kinds=(WordpieceTokenizer,)):
    if not isinstance(tokenizer, kinds):
        names = " or ".join(f"tf_moe.data.{kind.__name__}" for kind in kinds)
        raise TypeError(f"`tokenizer` must be a {names}, got {type(tokenizer).__name__}.")
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
        token_ids: [batch, time] int ids; `PAD_ID` (0) is padding, which a
            masked model skips wherever it is.

    Returns:
        [batch, vocab] float32 probabilities at each row's last non-padding
        position. Padding is never predicted (its probability is 0), as in
        `Seq2SeqDecoder`. A row of padding only gets the distribution at
        position 0.
    """
    positions = tf.range(tf.shape(token_ids)[1])
    last = tf.reduce_max(tf.where(tf.not_equal(token_ids, PAD_ID), positions, 0), axis=1)
    last_logits = tf.gather(tf.cast(logits, tf.float32), last, batch_dims=1)
    not_pad = tf.not_equal(tf.range(tf.shape(last_logits)[-1]), PAD_ID)
    return tf.nn.softmax(tf.where(not_pad, last_logits, float("-inf")))


def frame_token_ids(ragged_ids, max_tokens=None, end=False, start_id=START_ID):
    """`[START] ids [END]?` per row, as the training pipelines build them, padded with 0.

    Every row gets its `[START]` (and `[END]`), an empty one too, and the
    result has at least one column, an empty batch too.

    Args:
        ragged_ids: int32 `RaggedTensor` [batch, (tokens)], e.g. from
            `WordpieceTokenizer.tokenize`.
        max_tokens: optional int >= 0, most tokens kept per row.
        end: append `[END]`.
        start_id: the id of the start (`<eos>` for a `WordVocabulary`).

    Returns:
        int32 [batch, length] ids.
    """
    if max_tokens is not None:
        ragged_ids = ragged_ids[:, :max_tokens]
    rows = ragged_ids.nrows(out_type=tf.int32)

    def column(token):
        return tf.fill([rows, 1], tf.constant(token, ragged_ids.dtype))

    parts = [column(start_id), ragged_ids] + ([column(END_ID)] if end else [])
    return _at_least_one_column(tf.concat(parts, axis=1).to_tensor(PAD_ID))


def _at_least_one_column(ids):
    # An empty batch or a zero-length one; the models need a time step.
    return tf.pad(ids, [[0, 0], [0, tf.maximum(1 - tf.shape(ids)[1], 0)]])


def _checked_text(text):
    """`text` if it is 1-D: a signature does not check the shape it is given."""
    return tf.ensure_shape(text, [None])


def _checked_ids(token_ids, vocabulary_size):
    """`token_ids` if it is [batch, time] with ids in the vocabulary."""
    token_ids = tf.ensure_shape(token_ids, [None, None])
    message = f"`token_ids` must be ids in [0, {vocabulary_size}) (0 is padding)"
    checks = [
        tf.debugging.assert_non_negative(token_ids, message=message),
        tf.debugging.assert_less(token_ids, tf.constant(vocabulary_size, token_ids.dtype), message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(token_ids)


def export_language_model(model, tokenizer, export_dir, top_k=5, overwrite=False, verbose=False):
    """Exports a language model (e.g. `lstm_lm`) with in-graph tokenisation.

    Signatures:

    * `serving_default(text: string [batch])`: each text is tokenised as in
      training (the start token then its wordpieces, no `[END]`; or, with a
      `WordVocabulary`, `<eos>` then its words, unknown ones `<unk>`) and
      the model predicts the token that follows it; an empty or
      whitespace-only text is predicted from the start token alone (the
      likely first tokens of a text);
    * `next_token_ids(token_ids: int32 [batch, time])`: the same from token
      ids right-padded with 0 (include the start token yourself: `[START]`
      id 2, or the `<eos>` id of a `WordVocabulary`); a row of padding only
      is an empty text, predicted from the start token alone. Ids outside
      `[0, vocabulary size)` are an error.

    Both return `token_ids` (int32 [batch, top_k]), `tokens` (string
    [batch, top_k], as in the vocabulary: `##` marks a wordpiece suffix)
    and `probabilities` (float32 [batch, top_k]), most likely first.

    Args:
        model: a Keras model mapping int32 ids [batch, time] to logits
            [batch, time, vocab] whose last layer is named `logits`.
        tokenizer: the `WordpieceTokenizer` or `WordVocabulary` the model
            was trained with (`tf_moe.data.load_vocabulary` reads either).
        export_dir: directory to write (e.g. `version_dir(...)`).
        top_k: int, how many next tokens to return.
        overwrite: replace `export_dir` if it holds anything (else an error).
        verbose: print the signatures.

    Returns:
        `export_dir`.

    Example:

    >>> export_language_model(model, tokenizer, version_dir("saved_models", "lm"))
    ... # doctest: +SKIP
    """
    _check_tokenizer(tokenizer, model, (WordpieceTokenizer, WordVocabulary))
    _check_top_k(top_k, tokenizer.vocabulary_size)
    archive = _archive(model, tokenizer)
    start_id = tokenizer.start_id

    def predict(token_ids):
        probabilities = next_token_distribution(model(token_ids, training=False), token_ids)
        probabilities, ids = tf.math.top_k(probabilities, top_k)
        return {"token_ids": ids, "tokens": tf.gather(tokenizer.vocab, ids), "probabilities": probabilities}

    def next_tokens(token_ids):
        token_ids = _at_least_one_column(_checked_ids(token_ids, tokenizer.vocabulary_size))
        # A row of padding only is an empty text: the start token alone.
        empty = tf.reduce_all(tf.equal(token_ids, PAD_ID), axis=1, keepdims=True)
        first = tf.equal(tf.range(tf.shape(token_ids)[1]), 0)
        return predict(tf.where(empty & first, start_id, token_ids))

    def from_text(text):
        return predict(frame_token_ids(tokenizer.tokenize(_checked_text(text)), start_id=start_id))

    archive.add_endpoint("serving_default", from_text, [tf.TensorSpec([None], tf.string, name="text")])
    archive.add_endpoint("next_token_ids", next_tokens, [tf.TensorSpec([None, None], tf.int32, name="token_ids")])
    _write_out(archive, export_dir, overwrite, verbose)
    return export_dir


def export_translation_model(
    model, tokenizer, export_dir, max_length=64, beam_size=4, length_penalty=0.6, overwrite=False,
    verbose=False,
):
    """Exports a `seq2seq` model that translates raw strings in-graph.

    Sources are tokenised as in training (`[START] pieces [END]`, cut to
    `max_length` ids) and decoded by `Seq2SeqDecoder` inside the graph. An
    empty or whitespace-only text is not translated: its `translation` is
    `""` and its `token_ids` are all 0.

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
        max_length: int >= 3, most source ids read (`[START]`, at least one
            piece, `[END]`) and target ids generated.
        beam_size: int, beam width of the `beam_search` signature (1: none).
        length_penalty: float, GNMT's length-penalty exponent for beams.
        overwrite: replace `export_dir` if it holds anything (else an error).
        verbose: print the signatures.

    Returns:
        `export_dir`.
    """
    _check_tokenizer(tokenizer, model)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"`beam_size` must be a positive int, got {beam_size!r}.")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise ValueError(
            "`max_length` must be an int >= 3 (a source is `[START]`, at least one piece and "
            f"`[END]`), got {max_length!r}."
        )
    decoder = Seq2SeqDecoder(model, START_ID, END_ID, max_length=max_length)
    archive = _archive(model, tokenizer)

    def translate(text, decode):
        pieces = tokenizer.tokenize(_checked_text(text))
        ids = decode(frame_token_ids(pieces, max_length - 2, end=True))
        ids = tf.where(pieces.row_lengths()[:, None] > 0, ids, PAD_ID)
        return {"translation": tokenizer.detokenize(ids), "token_ids": ids}

    def greedy(text):
        return translate(text, decoder.greedy)

    def beam(text):
        return translate(text, lambda source: decoder.beam_search(source, beam_size, length_penalty))

    text_spec = [tf.TensorSpec([None], tf.string, name="text")]
    archive.add_endpoint("serving_default", greedy, text_spec)
    if beam_size > 1:
        archive.add_endpoint("beam_search", beam, text_spec)
    _write_out(archive, export_dir, overwrite, verbose)
    return export_dir


def export_keras_model(model, export_dir, input_signature=None, overwrite=False, verbose=False):
    """Exports any Keras model or layer with one numeric signature.

    Like `model.export(path)`: the signature is `serve`, also registered as
    `serving_default`, and calls the model with `training=False`. Each
    model input is a named argument of the signature (the `keras.Input`
    names), so TF Serving accepts `{"inputs": {"<name>": ...}}`; a model's
    outputs are named after their layers (a layer's output is `output_0`).
    An input whose shape does not fit its `TensorSpec` is an error naming it.

    Args:
        model: a built Keras model with known `inputs`, or a built layer (for
            instance a bare `MoE`) with `input_signature`.
        export_dir: directory to write.
        input_signature: list of `tf.TensorSpec`, one per input; by default
            taken from `model.inputs`.
        overwrite: replace `export_dir` if it holds anything (else an error).
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
        args = [tf.ensure_shape(arg, spec.shape) for arg, spec in zip(args, input_signature)]
        outputs = model(args if multiple else args[0], training=False)
        if not output_names:
            return outputs
        # Outputs named after their layers, not `output_0`, `output_1`, ...
        return dict(zip(output_names, tf.nest.flatten(outputs)))

    input_signature = list(input_signature)
    archive = _archive(model)
    archive.add_endpoint("serve", serve, input_signature)
    _write_out(archive, export_dir, overwrite, verbose)
    return export_dir


def load_model(path):
    """Loads a `.keras` model that tf_moe trained, with a clear error for a missing or damaged file.

    Args:
        path: the `.keras` file (e.g. `saved_models/lm_moe.keras`).

    Returns:
        The Keras model, with tf_moe's layers, models and optimizers.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not a `.keras` archive (e.g. cut short by an
            interrupted save).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file {path}: pass the .keras file that training saved.")
    if str(path).endswith(".keras") and not zipfile.is_zipfile(path):
        # Keras would report "File not found" for it.
        raise ValueError(
            f"{path} is not a .keras model (a zip archive): it is damaged, e.g. cut short by an "
            "interrupted save. Save or train the model again."
        )
    return keras.models.load_model(path)
