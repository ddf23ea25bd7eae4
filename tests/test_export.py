"""Tests of the SavedModel export: signatures served without tf_moe.

Every export is loaded in a fresh Python process that imports only
TensorFlow and TensorFlow Text, called there, and compared with the
in-memory model. The models are trained a few steps first: their
zero-initialised noisy top-k gates would otherwise route every token to
the same experts, and an export that lost the gates' weights would still
pass. `.keras` round trips of the models themselves are tested beside
them (tests/test_models_lstm_lm.py and tests/test_models_seq2seq.py,
`test_keras_round_trip_gives_identical_outputs`, loaded with
`safe_mode=True`; tests/layer_test_case.py for every layer); here only the
safe-mode guarantee and a batchwise-gate model are added.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tests.layer_test_case import randomise_weights
from tf_moe import MoE
from tf_moe import export
from tf_moe.data import END_ID, RESERVED_TOKENS, START_ID, WordpieceTokenizer, WordVocabulary
from tf_moe.models import Seq2SeqDecoder, lstm_lm, seq2seq, transformer_lm
from tf_moe.reproduction import cli

VOCAB = list(RESERVED_TOKENS) + (
    "in the beginning god created heavens and earth was light said let there be , . "
    "en el principio dios creo los cielos y la tierra luz dijo sea ##s ##ed"
).split()
TOP_K = 3
MAX_LENGTH = 7
TEXTS = ["In the beginning God created the heavens.", "God said", "light, unknownword"]
IDS = np.array([[START_ID, 4, 5, 6, 0], [START_ID, 7, 0, 0, 0], [START_ID, 10, 9, 12, 13]], "int32")

# Runs in a fresh interpreter: TensorFlow and TensorFlow Text only.
_SERVE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the ops of the tokenizer)

    requests = json.load(open(sys.argv[1]))
    results = {"tf_moe_imported": any(m.split(".")[0] == "tf_moe" for m in sys.modules), "calls": {}}
    loaded = {}
    for key, (path, signature, inputs) in requests.items():
        if path not in loaded:
            loaded[path] = tf.saved_model.load(path)
        served = loaded[path]
        results.setdefault("signatures", {})[path] = sorted(served.signatures)
        fn = served.signatures[signature]
        # Each input: [value, dtype] or [value, dtype, shape].
        args = {name: tf.reshape(tf.constant(value, spec[0]), spec[1]) if len(spec) > 1 else
                tf.constant(value, spec[0]) for name, (value, *spec) in inputs.items()}
        try:
            first, second = fn(**args), fn(**args)
        except Exception as error:  # the contract's refusals
            results["calls"][key] = {"error": type(error).__name__ + ": " + str(error)}
            continue
        out = {}
        for name, tensor in first.items():
            value = tensor.numpy()
            out[name] = {"value": value.astype(str).tolist() if value.dtype == object else value.tolist(),
                         "shape": list(value.shape),
                         "repeatable": bool((value == second[name].numpy()).all())}
        results["calls"][key] = out
    results["tf_moe_imported"] |= any(m.split(".")[0] == "tf_moe" for m in sys.modules)
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top_k_next(model, rows):
    """In-memory reference: each row alone, unpadded; padding never predicted."""
    ids, probs = [], []
    for row in rows:
        logits = np.asarray(model(np.array([row], "int32"), training=False))[0, -1].astype("float64")
        logits[0] = -np.inf
        p = _softmax(logits)
        order = np.argsort(-p, kind="stable")[:TOP_K]
        ids.append(order)
        probs.append(p[order])
    return np.array(ids), np.array(probs)


def _trained(model, inputs, targets, loss=None):
    """`model` after a few Adam steps, checked to route tokens to different experts."""
    # Eagerly: four steps of these small models cost less than tracing them.
    model.compile(keras.optimizers.Adam(0.05), loss, run_eagerly=True)
    model.fit(inputs, targets, batch_size=16, epochs=2, verbose=0)
    moes = [layer for layer in model.layers if isinstance(layer, tf_moe.MoELayer)]
    assert moes
    for moe in moes:
        hidden = np.random.default_rng(0).normal(size=(64, moe.router.w_gate.shape[0])).astype("float32")
        first_choices = np.asarray(moe.router(hidden, training=False).expert_id)[:64]
        assert len(set(first_choices.tolist())) > 1, f"{moe.name} routes every token to one expert"
    return model


def _token_rows(rng, rows, length):
    ids = rng.integers(4, len(VOCAB), (rows, length)).astype("int32")
    ids[:, 0] = START_ID
    return ids


@pytest.fixture(scope="module")
def tokenizer():
    return WordpieceTokenizer(VOCAB)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """Exports every kind of model once; returns their in-memory references and serving requests."""
    base = str(tmp_path_factory.mktemp("saved_models"))
    keras.utils.set_random_seed(0)
    cases, requests = {}, {}

    # Language model, through the command line (.keras file + vocabulary).
    rng = np.random.default_rng(0)
    lm = lstm_lm(len(VOCAB), units=16, num_experts=4, k=2, expert_hidden_units=16, dropout=0.5)
    rows = _token_rows(rng, 32, 6)
    _trained(lm, rows[:, :-1], rows[:, 1:])
    lm.save(os.path.join(base, "lm.keras"))
    tokenizer.save_vocabulary(os.path.join(base, "vocab.txt"))
    cli.main(["export", "lm", os.path.join(base, "lm.keras"), "--vocab", os.path.join(base, "vocab.txt"),
              "--name", "lm", "--output", base, "--top-k", str(TOP_K)])
    lm_dir = os.path.join(base, "lm", "1")
    text_rows = [[START_ID, *ids] for ids in tokenizer.tokenize(TEXTS).to_list()]
    cases["lm_text"] = _top_k_next(lm, text_rows)
    requests["lm_text"] = (lm_dir, "serving_default", {"text": (TEXTS, "string")})
    cases["lm_ids"] = _top_k_next(lm, [[i for i in row if i] for row in IDS])
    requests["lm_ids"] = (lm_dir, "next_token_ids", {"token_ids": (IDS.tolist(), "int32")})
    # The contract of docs/serving.md: an empty text is `[START]` alone...
    cases["lm_empty_texts"] = _top_k_next(lm, [[START_ID], [START_ID], text_rows[1]])
    requests["lm_empty_texts"] = (lm_dir, "serving_default", {"text": (["", " \t ", TEXTS[1]], "string")})
    # ...so is a row of padding; zeros inside a row are skipped.
    odd_ids = [[0, 0, 0, 0], [START_ID, 4, 0, 5], [START_ID, 7, 0, 0]]
    cases["lm_padding_rows"] = _top_k_next(lm, [[START_ID], [START_ID, 4, 5], [START_ID, 7]])
    requests["lm_padding_rows"] = (lm_dir, "next_token_ids", {"token_ids": (odd_ids, "int32")})
    cases["lm_no_time_steps"] = _top_k_next(lm, [[START_ID], [START_ID]])
    requests["lm_no_time_steps"] = (lm_dir, "next_token_ids", {"token_ids": ([], "int32", [2, 0])})
    requests["lm_no_texts"] = (lm_dir, "serving_default", {"text": ([], "string")})
    requests["lm_no_rows"] = (lm_dir, "next_token_ids", {"token_ids": ([], "int32", [0, 4])})
    # A word-level language model (WordVocabulary, JSON file): texts start
    # after `<eos>`, unknown words are `<unk>`, text is normalised in-graph.
    words = WordVocabulary.from_texts(["In the beginning God created the heavens.", "God said, let there be light."],
                                      normalize=True)
    word_lm = lstm_lm(words.vocabulary_size, units=16, num_experts=4, k=2, expert_hidden_units=16)
    word_lm.save(os.path.join(base, "word_lm.keras"))
    words.save_vocabulary(os.path.join(base, "word_vocab.json"))
    cli.main(["export", "lm", os.path.join(base, "word_lm.keras"), "--vocab", os.path.join(base, "word_vocab.json"),
              "--name", "word_lm", "--output", base, "--top-k", str(TOP_K)])
    word_texts = ["God SAID, let", "", "zebra light."]
    cases["word_lm_text"] = _top_k_next(word_lm, [[words.eos_id, *words.encode([t]).tolist()[:-1]] for t in word_texts])
    cases["word_lm_text"] += ([[words.get_vocabulary()[i] for i in row] for row in cases["word_lm_text"][0]],)
    requests["word_lm_text"] = (os.path.join(base, "word_lm", "1"), "serving_default",
                                {"text": (word_texts, "string")})
    # A Transformer LM reads at most its max_length positions: a longer text
    # is predicted from its last ones.
    transformer = transformer_lm(words.vocabulary_size, units=16, num_layers=1, num_heads=2, num_experts=4, k=2,
                                 expert_hidden_units=8, max_length=4)
    randomise_weights(transformer, seed=7)
    transformer.save(os.path.join(base, "transformer.keras"))
    cli.main(["export", "lm", os.path.join(base, "transformer.keras"), "--vocab",
              os.path.join(base, "word_vocab.json"), "--name", "transformer", "--output", base, "--top-k", str(TOP_K)])
    long_texts = ["God said, let there be light in the heavens.", "let"]
    cases["transformer_text"] = _top_k_next(
        transformer, [[words.eos_id, *words.encode([t]).tolist()[:-1]][-4:] for t in long_texts]
    )
    requests["transformer_text"] = (os.path.join(base, "transformer", "1"), "serving_default",
                                    {"text": (long_texts, "string")})
    # The same model as a numeric export: its own logits for a row of padding.
    lm_numeric_dir = export.export_keras_model(lm, export.version_dir(base, "lm_numeric"))
    cases["lm_numeric"] = np.asarray(lm(np.array(odd_ids, "int32"), training=False))
    requests["lm_numeric"] = (lm_numeric_dir, "serving_default", {"tokens": (odd_ids, "int32")})
    for key, signature, inputs in (
        ("lm_text_matrix", "serving_default", {"text": ([TEXTS[:2]], "string")}),
        ("lm_text_scalar", "serving_default", {"text": (TEXTS[0], "string")}),
        ("lm_ids_vector", "next_token_ids", {"token_ids": ([START_ID, 4], "int32")}),
        ("lm_ids_negative", "next_token_ids", {"token_ids": ([[START_ID, -1]], "int32")}),
        ("lm_ids_too_large", "next_token_ids", {"token_ids": ([[START_ID, len(VOCAB)]], "int32")}),
        ("lm_ids_int64", "next_token_ids", {"token_ids": ([[START_ID, 4]], "int64")}),
    ):
        requests[key] = (lm_dir, signature, inputs)

    # Translation model, greedy and beam.
    mt = seq2seq(len(VOCAB), units=16, num_experts=4, k=2, expert_hidden_units=16, attention_heads=2)
    source_rows, target_rows = _token_rows(rng, 32, 5), _token_rows(rng, 32, 6)
    _trained(mt, {"source": source_rows, "decoder_input": target_rows[:, :-1]}, target_rows[:, 1:])
    mt_dir = export.export_translation_model(
        mt, tokenizer, export.version_dir(base, "mt"), max_length=MAX_LENGTH, beam_size=2
    )
    decoder = Seq2SeqDecoder(mt, START_ID, END_ID, max_length=MAX_LENGTH)
    source = tf.ragged.constant(
        [[START_ID, *ids[: MAX_LENGTH - 2], END_ID] for ids in tokenizer.tokenize(TEXTS).to_list()]
    ).to_tensor()
    for key, ids in (("mt_greedy", decoder.greedy(source)),
                     ("mt_beam", decoder.beam_search(source, beam_size=2, length_penalty=0.6))):
        cases[key] = (np.asarray(ids), tokenizer.detokenize(ids).numpy().astype(str))
    requests["mt_greedy"] = (mt_dir, "serving_default", {"text": (TEXTS, "string")})
    requests["mt_beam"] = (mt_dir, "beam_search", {"text": (TEXTS, "string")})
    # Empty texts are not translated: "" and no ids, whatever the model
    # makes of `[START] [END]`.
    mixed = ["", TEXTS[1], "   "]
    source = np.zeros((3, 1 + len(text_rows[1])), "int32")
    source[:, :2] = [START_ID, END_ID]
    source[1] = [START_ID, *text_rows[1][1:], END_ID]
    for signature, ids in (("serving_default", decoder.greedy(source)),
                           ("beam_search", decoder.beam_search(source, beam_size=2, length_penalty=0.6))):
        ids = np.asarray(ids) * np.array([[0], [1], [0]])
        cases[f"mt_{signature}_empty_texts"] = (ids, tokenizer.detokenize(ids).numpy().astype(str))
        requests[f"mt_{signature}_empty_texts"] = (mt_dir, signature, {"text": (mixed, "string")})
        requests[f"mt_{signature}_no_texts"] = (mt_dir, signature, {"text": ([], "string")})
        requests[f"mt_{signature}_text_matrix"] = (mt_dir, signature, {"text": ([TEXTS[:2]], "string")})

    # A two-input functional model with a noisy-gated MoE, through `tf-moe export`.
    a, b = keras.Input((6,), name="features"), keras.Input((6,), name="context")
    h = MoE(4, 2, 8, name="moe")(keras.layers.Concatenate()([a, b]))
    numeric = keras.Model([a, b], keras.layers.Dense(3, name="scores")(keras.layers.Dropout(0.5)(h)))
    features = rng.normal(size=(2, 32, 6)).astype("float32")
    _trained(numeric, [features[0], features[1]], rng.normal(size=(32, 3)).astype("float32"), loss="mse")
    numeric.save(os.path.join(base, "numeric.keras"))
    cli.main(["export", "keras", os.path.join(base, "numeric.keras"), "--name", "numeric", "--output", base])
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    cases["numeric"] = np.asarray(numeric([x[0], x[1]], training=False))
    numeric_dir = os.path.join(base, "numeric", "1")
    requests["numeric"] = (numeric_dir, "serving_default",
                           {"features": (x[0].tolist(), "float32"), "context": (x[1].tolist(), "float32")})
    requests["numeric_no_rows"] = (numeric_dir, "serving_default",
                                   {"features": ([], "float32", [0, 6]), "context": ([], "float32", [0, 6])})
    requests["numeric_wrong_width"] = (numeric_dir, "serving_default",
                                       {"features": (x[0, :, :5].tolist(), "float32"), "context": (x[1].tolist(), "float32")})
    requests["numeric_float64"] = (numeric_dir, "serving_default",
                                   {"features": (x[0].tolist(), "float64"), "context": (x[1].tolist(), "float32")})

    # A bare batchwise-gated MoE layer with learned (here: set) thresholds.
    moe = MoE(4, 2, 8, gate="batchwise", name="batchwise_moe")
    moe.build((None, 6))
    moe.gate.w_gate.assign(np.random.default_rng(2).normal(size=(6, 4)).astype("float32"))
    moe.gate.thresholds.assign([0.3, 0.1, 0.4, 0.2])
    tokens = np.random.default_rng(3).normal(size=(12, 6)).astype("float32")
    export.export_keras_model(moe, export.version_dir(base, "moe"), [tf.TensorSpec([None, 6], tf.float32, name="x")])
    cases["moe"] = np.asarray(moe(tokens, training=False))
    moe.gate.thresholds.assign(tf.zeros(4))
    cases["moe_without_thresholds"] = np.asarray(moe(tokens, training=False))
    requests["moe"] = (os.path.join(base, "moe", "1"), "serving_default", {"x": (tokens.tolist(), "float32")})
    requests["moe_no_tokens"] = (os.path.join(base, "moe", "1"), "serving_default", {"x": ([], "float32", [0, 6])})

    # The routers beyond the paper's, chained in one model (static capacity
    # with its eval factor, shared experts) with the hash router's token ids
    # as a second input.
    hidden, ids_in = keras.Input((5, 6), name="hidden"), keras.Input((5,), dtype="int32", name="ids")
    h = hidden
    for router in (tf_moe.SwitchRouter(4), tf_moe.TopKRouter(4, 2, normalize=True), tf_moe.ExpertChoiceRouter(4),
                   tf_moe.LossFreeRouter(4, 2)):
        h = tf_moe.MoELayer(hidden_units=8, router=router, capacity_factor=0.5, eval_capacity_factor=1.0,
                            num_shared_experts=1)(h)
        randomise_weights(router, seed=4, scale=1.0)
    h = tf_moe.MoELayer(4, 1, 8, router="hash", name="hashed")(h, token_ids=ids_in)
    routed = keras.Model([hidden, ids_in], h)
    export.export_keras_model(routed, export.version_dir(base, "routers"))
    x = np.random.default_rng(5).normal(size=(3, 5, 6)).astype("float32")
    ids = np.random.default_rng(6).integers(0, 1000, (3, 5)).astype("int32")
    cases["routers"] = np.asarray(routed([x, ids], training=False))
    requests["routers"] = (os.path.join(base, "routers", "1"), "serving_default",
                           {"hidden": (x.tolist(), "float32"), "ids": (ids.tolist(), "int32")})
    return base, cases, requests


@pytest.fixture(scope="module")
def served(exports):
    """What a fresh process without tf_moe gets from every signature."""
    base, _, requests = exports
    request_file, result_file = os.path.join(base, "requests.json"), os.path.join(base, "results.json")
    with open(request_file, "w") as f:
        json.dump(requests, f)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", _SERVE_SCRIPT, request_file, result_file],
                   check=True, cwd=base, env=env, timeout=300)
    with open(result_file) as f:
        return json.load(f)


def test_fresh_process_serves_without_tf_moe(served, exports):
    assert served["tf_moe_imported"] is False
    signatures = {os.path.relpath(path, exports[0]): names for path, names in served["signatures"].items()}
    assert signatures == {
        os.path.join("lm", "1"): ["next_token_ids", "serving_default"],
        os.path.join("word_lm", "1"): ["next_token_ids", "serving_default"],
        os.path.join("mt", "1"): ["beam_search", "serving_default"],
        os.path.join("numeric", "1"): ["serve", "serving_default"],
        os.path.join("lm_numeric", "1"): ["serve", "serving_default"],
        os.path.join("moe", "1"): ["serve", "serving_default"],
        os.path.join("routers", "1"): ["serve", "serving_default"],
        os.path.join("transformer", "1"): ["next_token_ids", "serving_default"],
    }


def test_inference_is_deterministic(served):
    # No gating noise or dropout: the same request gives the same answer.
    for key, outputs in served["calls"].items():
        for name, output in outputs.items():
            assert name == "error" or output["repeatable"], (key, name)


@pytest.mark.parametrize(
    "key", ("lm_text", "lm_ids", "lm_empty_texts", "lm_padding_rows", "lm_no_time_steps")
)
def test_language_model_returns_the_models_top_k_next_tokens(key, served, exports):
    ids, probabilities = exports[1][key]
    out = served["calls"][key]
    np.testing.assert_array_equal(out["token_ids"]["value"], ids)
    np.testing.assert_allclose(out["probabilities"]["value"], probabilities, rtol=1e-4, atol=1e-6)
    assert out["tokens"]["value"] == [[VOCAB[i] for i in row] for row in ids]


@pytest.mark.parametrize(
    ("key", "message"),
    (
        ("lm_text_matrix", "Shape of tensor text [1,2] is not compatible with expected shape [?]"),
        ("lm_text_scalar", "Shape of tensor text [] is not compatible"),
        ("lm_ids_vector", "Shape of tensor token_ids [2] is not compatible with expected shape [?,?]"),
        ("lm_ids_negative", f"`token_ids` must be ids in [0, {len(VOCAB)})"),
        ("lm_ids_too_large", f"`token_ids` must be ids in [0, {len(VOCAB)})"),
        ("lm_ids_int64", "expected to be a int32 tensor but is a int64 tensor"),
        ("mt_serving_default_text_matrix", "Shape of tensor text [1,2]"),
        ("mt_beam_search_text_matrix", "Shape of tensor text [1,2]"),
        ("numeric_wrong_width", "Shape of tensor features [5,5] is not compatible with expected shape [?,6]"),
        ("numeric_float64", "expected to be a float tensor but is a double tensor"),
    ),
)
def test_bad_requests_are_refused_with_a_clear_error(key, message, served):
    assert message in served["calls"][key]["error"]


def test_empty_batches_give_empty_answers(served):
    calls = served["calls"]
    for key in ("lm_no_texts", "lm_no_rows"):
        assert [calls[key][name]["shape"] for name in ("token_ids", "tokens", "probabilities")] == [[0, TOP_K]] * 3
    for signature in ("serving_default", "beam_search"):
        out = calls[f"mt_{signature}_no_texts"]
        assert out["translation"]["shape"] == [0] and out["token_ids"]["shape"] == [0, MAX_LENGTH]
    assert calls["numeric_no_rows"]["scores"]["shape"] == [0, 3]
    assert calls["moe_no_tokens"]["output_0"]["shape"] == [0, 6]  # as wide as its input


@pytest.mark.parametrize("key", ("mt_greedy", "mt_beam", "mt_serving_default_empty_texts", "mt_beam_search_empty_texts"))
def test_translation_decodes_raw_strings_like_the_decoder(key, served, exports):
    ids, texts = exports[1][key]
    out = served["calls"][key]
    np.testing.assert_array_equal(out["token_ids"]["value"], ids)
    assert out["translation"]["value"] == texts.tolist()
    assert np.asarray(out["token_ids"]["value"]).shape == (len(TEXTS), MAX_LENGTH)


def test_numeric_signature_answers_rows_of_padding_like_the_model(served, exports):
    (out,) = served["calls"]["lm_numeric"].values()
    np.testing.assert_allclose(out["value"], exports[1]["lm_numeric"], rtol=1e-5, atol=1e-6)
    assert np.isfinite(out["value"]).all()


def test_numeric_signature_takes_named_inputs(served, exports):
    out = served["calls"]["numeric"]
    assert list(out) == ["scores"]
    np.testing.assert_allclose(out["scores"]["value"], exports[1]["numeric"], rtol=1e-5, atol=1e-6)


def test_batchwise_moe_serves_with_its_thresholds(served, exports):
    (out,) = served["calls"]["moe"].values()
    cases = exports[1]
    np.testing.assert_allclose(out["value"], cases["moe"], rtol=1e-5, atol=1e-6)
    # The thresholds changed the routing, so they are in the export.
    assert not np.allclose(cases["moe"], cases["moe_without_thresholds"])


def test_every_router_serves_like_the_model(served, exports):
    """Switch, top-k, expert choice, loss-free (its biases) and hash (the ids input) routing."""
    out = served["calls"]["routers"]
    assert list(out) == ["hashed"]
    np.testing.assert_allclose(out["hashed"]["value"], exports[1]["routers"], rtol=1e-5, atol=1e-6)


SHOWN = {
    "lm": ["signature_def['next_token_ids']", "signature_def['serving_default']",
           "inputs['text'] tensor_info:\n        dtype: DT_STRING", "outputs['tokens']",
           "outputs['probabilities']", "inputs['token_ids'] tensor_info:\n        dtype: DT_INT32"],
    "mt": ["signature_def['beam_search']", "signature_def['serving_default']",
           "inputs['text'] tensor_info:\n        dtype: DT_STRING", "outputs['translation']"],
}


def test_saved_model_cli_lists_the_signatures(exports):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    # Both at once: each is a TensorFlow start-up.
    shows = {
        name: subprocess.Popen(
            ["saved_model_cli", "show", "--all", "--dir", os.path.join(exports[0], name, "1")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        for name in SHOWN
    }
    for name, process in shows.items():
        shown, _ = process.communicate(timeout=300)
        assert process.returncode == 0, name
        for line in SHOWN[name]:
            assert line in shown, (name, line)


def test_version_dir_follows_the_serving_layout(tmp_path):
    base = str(tmp_path)
    assert export.version_dir(base, "lm") == os.path.join(base, "lm", "1")
    os.makedirs(os.path.join(base, "lm", "3", "variables"))
    os.makedirs(os.path.join(base, "lm", "notes"))
    assert export.version_dir(base, "lm") == os.path.join(base, "lm", "4")
    with pytest.raises(FileExistsError, match="version"):
        export.version_dir(base, "lm", 3)
    with pytest.raises(ValueError, match="`version`"):
        export.version_dir(base, "lm", 0)
    with pytest.raises(ValueError, match="`name`"):
        export.version_dir(base, os.path.join("a", "b"))


def test_bad_arguments_are_named(tokenizer, tmp_path):
    lm = lstm_lm(len(VOCAB), units=8, num_experts=2, k=1, expert_hidden_units=8)
    with pytest.raises(ValueError, match="`top_k`"):
        export.export_language_model(lm, tokenizer, str(tmp_path), top_k=len(VOCAB))
    small = lstm_lm(len(VOCAB) - 1, units=8, num_experts=2, k=1, expert_hidden_units=8)
    with pytest.raises(ValueError, match="`tokenizer`"):
        export.export_language_model(small, tokenizer, str(tmp_path))
    with pytest.raises(ValueError, match="`input_signature`"):
        layer = MoE(2, 1, 4)
        layer.build((None, 3))
        export.export_keras_model(layer, str(tmp_path))


def test_framing_gives_every_row_its_start_and_end():
    ragged = tf.ragged.constant([[5, 6, 7], [], [8]], dtype=tf.int32)
    np.testing.assert_array_equal(export.frame_token_ids(ragged), [[2, 5, 6, 7], [2, 0, 0, 0], [2, 8, 0, 0]])
    np.testing.assert_array_equal(
        export.frame_token_ids(ragged, max_tokens=1, end=True), [[2, 5, 3], [2, 3, 0], [2, 8, 3]]
    )
    np.testing.assert_array_equal(export.frame_token_ids(ragged, max_tokens=0, end=True), [[2, 3]] * 3)
    empty = tf.ragged.constant([], dtype=tf.int32, ragged_rank=1)
    assert export.frame_token_ids(empty, end=True).shape == (0, 1)


def test_translation_export_needs_room_for_a_source(tokenizer, tmp_path):
    mt = seq2seq(len(VOCAB), units=8, num_experts=2, k=1, expert_hidden_units=8, attention_heads=2)
    for max_length in (0, 1, 2):
        with pytest.raises(ValueError, match="`max_length` must be an int >= 3"):
            export.export_translation_model(mt, tokenizer, str(tmp_path / "mt"), max_length=max_length)


def test_an_export_never_overwrites_silently(tmp_path):
    layer = MoE(2, 1, 4)
    layer.build((None, 3))
    spec = [tf.TensorSpec([None, 3], tf.float32, name="x")]
    target = tmp_path / "moe" / "1"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_keras_model(layer, str(target), spec)
    assert os.listdir(target) == ["notes.txt"]
    export.export_keras_model(layer, str(target), spec, overwrite=True)
    assert "saved_model.pb" in os.listdir(target) and "notes.txt" not in os.listdir(target)
    # Written beside the target and renamed into place: nothing left over.
    assert os.listdir(tmp_path / "moe") == ["1"]


def test_a_damaged_keras_file_is_named(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.save(tmp_path / "model.keras")
    data = (tmp_path / "model.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.keras is not a \.keras model .*cut short"):
        export.load_model(str(tmp_path / "cut.keras"))
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        export.load_model(str(tmp_path / "missing.keras"))


def test_keras_files_load_in_safe_mode(tmp_path):
    # Safe mode stays on: arbitrary code (a Lambda) is refused...
    inputs = keras.Input((4,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: 2 * x)(inputs))
    unsafe.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        keras.models.load_model(tmp_path / "lambda.keras")
    # ...while tf_moe's layers load with the default, including the batchwise
    # gate's learned thresholds.
    moe = MoE(4, 2, 8, gate="batchwise", name="moe")
    model = keras.Model(inputs, moe(inputs))
    moe.gate.w_gate.assign(np.random.default_rng(0).normal(size=(4, 4)).astype("float32"))
    moe.gate.thresholds.assign([0.3, 0.1, 0.4, 0.2])
    model.save(tmp_path / "moe.keras")
    loaded = keras.models.load_model(tmp_path / "moe.keras")
    x = np.random.default_rng(1).normal(size=(10, 4)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)))


def test_word_level_language_model_serves_words(served, exports):
    ids, probabilities, tokens = exports[1]["word_lm_text"]
    out = served["calls"]["word_lm_text"]
    np.testing.assert_array_equal(out["token_ids"]["value"], ids)
    np.testing.assert_allclose(out["probabilities"]["value"], probabilities, rtol=1e-4, atol=1e-6)
    assert out["tokens"]["value"] == tokens


def test_transformer_language_model_predicts_from_its_last_positions(served, exports):
    ids, probabilities = exports[1]["transformer_text"]
    out = served["calls"]["transformer_text"]
    np.testing.assert_array_equal(out["token_ids"]["value"], ids)
    np.testing.assert_allclose(out["probabilities"]["value"], probabilities, rtol=1e-4, atol=1e-6)


def test_last_tokens_keeps_each_rows_end():
    ids = tf.constant([[5, 6, 7, 8, 9], [5, 6, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(export.last_tokens(ids, 3), [[7, 8, 9], [5, 6, 0], [0, 0, 0]])
    np.testing.assert_array_equal(export.last_tokens(ids, 9), ids)
