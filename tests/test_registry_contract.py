import mlflow
import pytest

from core.aliases import history, move_alias
from core.errors import RegistryError
from core.registry import PRODUCTION, connect, resolve_version

BOTH_BACKENDS = pytest.mark.parametrize("mlflow_store", ["sqlite", "postgres"], indirect=True)


@BOTH_BACKENDS
def test_version_is_a_real_pyfunc_model_that_generates(make_version):
    ref = make_version()
    model = mlflow.pyfunc.load_model(ref.uri)
    out = model.predict(["Hello there"], params={"max_new_tokens": 5})
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    # the params reach predict: two new tokens decode to at most two tokens of text
    short = model.predict(["Hello there"], params={"max_new_tokens": 2})[0]
    tokenizer = model.unwrap_python_model().tokenizer
    assert 0 < len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 6  # not the default 128


@BOTH_BACKENDS
def test_refs_resolve_by_version_alias_and_run(make_version, mlflow_store):
    v1 = make_version(seed=1)
    v2 = make_version(seed=2)
    client = connect(mlflow_store)
    assert (v1.version, v2.version) == ("1", "2")
    move_alias(client, "tiny-model", PRODUCTION, "2", reason="test")
    assert resolve_version(client, "tiny-model").version == "2"
    assert resolve_version(client, "tiny-model@production").version == "2"
    assert resolve_version(client, "tiny-model/1").version == "1"
    assert resolve_version(client, v1.run_id).version == "1"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "no registered model named 'nope'"),
        ("tiny-model@staging", "has no alias 'staging'"),
        ("tiny-model/9", "has no version 9"),
        ("bad ref!", "is not a model reference"),
        ("tiny-model\n", "is not a model reference"),
        ("tiny-model/\u0661", "is not a model reference"),
        ("0" * 32, "registered no model version"),
    ],
)
def test_bad_refs_are_clear_errors(make_version, mlflow_store, ref, message):
    make_version()
    with pytest.raises(RegistryError, match=message):
        resolve_version(connect(mlflow_store), ref)


@BOTH_BACKENDS
def test_alias_moves_are_recorded_in_order(make_version, mlflow_store):
    make_version(seed=1)
    make_version(seed=2)
    client = connect(mlflow_store)
    move_alias(client, "tiny-model", PRODUCTION, "1", reason="first")
    move_alias(client, "tiny-model", PRODUCTION, "2", reason="second", evaluation_run="abc")
    moves = history(client, "tiny-model")
    assert [(m.version, m.previous, m.reason) for m in moves] == [
        ("1", None, "first"),
        ("2", "1", "second"),
    ]
    assert moves[1].evaluation_run == "abc"
