"""POST /v1/feedback over HTTP: ratings land as MLflow feedback on the answer's trace, read back with core.traffic."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from test_serve_support import CHAT, Running, running_gateway, wait_for

from core.traffic import read_traffic
from serve.auth import hash_key

KEY = "sk-carol-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gateway(store) -> Iterator[Running]:
    store.publish("tiny-model", seed=0, alias="production")
    with running_gateway(
        ["tiny-model"],
        api_keys=[hash_key(KEY)],
        api_key_labels={hash_key(KEY): "carol"},
        capture={"feedback_wait_s": 30},
    ) as running:
        yield running


def answer(gateway: Running) -> str:
    return gateway.client(KEY).chat.completions.create(model="tiny-model", messages=CHAT, max_tokens=3).id


def record(uri: str, completion_id: str, with_feedback: int = 0):
    from mlflow import MlflowClient

    def found():
        recs = [r for r in read_traffic(MlflowClient(uri), "tiny-model", None) if r.request_id == completion_id]
        return recs[0] if recs and len(recs[0].feedback) >= with_feedback else None

    return wait_for(found, f"the trace of {completion_id}")


def test_a_good_rating_with_comment_and_correction_lands_on_the_trace(gateway, store):
    from mlflow import MlflowClient

    cid = answer(gateway)
    record(store.uri, cid)
    reply = gateway.post(
        "/v1/feedback",
        headers=AUTH,
        json={
            "completion_id": cid,
            "rating": "good",
            "comment": "fine, write me at carol@example.com",
            "correction": "Yes: call +34 612 345 678 to book the inspection.",
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "feedback" and body["completion_id"] == cid and body["rating"] == 1.0
    rec = record(store.uri, cid, with_feedback=1)
    assert body["trace_id"] == rec.trace_id
    (fb,) = rec.feedback
    assert (fb.rating, fb.raw_rating, fb.source) == (1.0, "good", "carol")
    assert fb.comment == "fine, write me at [EMAIL]"
    assert fb.correction == "Yes: call [PHONE] to book the inspection."
    trace = MlflowClient(store.uri).get_trace(rec.trace_id)
    kinds = {a.name: a for a in trace.info.assessments}
    assert kinds["user_rating"].assessment_id == body["id"] and kinds["user_rating"].source.source_type == "HUMAN"
    assert kinds["expected_response"].value == fb.correction


@pytest.mark.parametrize(("rating", "normalised"), [("bad", 0.0), (1, 0.0), (4, 0.75), (5, 1.0)])
def test_ratings_are_normalised_to_zero_one(gateway, store, rating, normalised):
    cid = answer(gateway)
    reply = gateway.post("/v1/feedback", headers=AUTH, json={"completion_id": cid, "rating": rating})
    assert reply.status_code == 200, reply.text
    (fb,) = record(store.uri, cid, with_feedback=1).feedback
    assert (fb.rating, fb.raw_rating, fb.comment, fb.correction) == (normalised, rating, None, None)


def test_feedback_on_an_answer_whose_trace_is_still_queued_waits_for_it(gateway, store):
    import sqlite3

    cid = answer(gateway)
    record(store.uri, cid)  # the writer is up and the experiment exists
    db = sqlite3.connect(store.uri.removeprefix("sqlite:///"), isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # the store is busy for a moment: the next trace waits in the writer
    try:
        cid = answer(gateway)
        replies: list = []
        thread = threading.Thread(
            target=lambda: replies.append(
                gateway.post("/v1/feedback", headers=AUTH, json={"completion_id": cid, "rating": 2})
            )
        )
        thread.start()
        thread.join(2.0)
        assert thread.is_alive() and not replies  # waiting for the trace, not answering 404
    finally:
        db.execute("ROLLBACK")
        db.close()
    thread.join(60)
    assert replies[0].status_code == 200, replies[0].text
    (fb,) = record(store.uri, cid, with_feedback=1).feedback
    assert fb.rating == 0.25


def test_feedback_finds_a_trace_this_gateway_did_not_write(gateway, store):
    """Another replica, or this one before a restart, wrote it: found in the store by completion id."""
    cid = answer(gateway)
    record(store.uri, cid)
    gateway.gateway.capture._written.clear()
    reply = gateway.post("/v1/feedback", headers=AUTH, json={"completion_id": cid, "rating": "bad"})
    assert reply.status_code == 200, reply.text


def test_an_unknown_completion_is_404(gateway):
    reply = gateway.post("/v1/feedback", headers=AUTH, json={"completion_id": "chatcmpl-nope", "rating": "good"})
    assert reply.status_code == 404
    err = reply.json()["error"]
    assert (err["code"], err["param"]) == ("completion_not_found", "completion_id")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rating": "good"}, "completion_id"),
        ({"completion_id": "chatcmpl-x"}, "rating"),
        ({"completion_id": "chatcmpl-x", "rating": 6}, "rating"),
        ({"completion_id": "chatcmpl-x", "rating": "meh"}, "rating"),
        ({"completion_id": "chatcmpl-x", "rating": True}, "rating"),
        ({"completion_id": "chatcmpl-x", "rating": 3, "comment": 5}, "comment"),
        ({"completion_id": "chatcmpl-x", "rating": 3, "corrected": "x"}, "corrected"),
        ({"completion_id": "", "rating": 3}, "completion_id"),
    ],
)
def test_a_malformed_body_is_400_naming_the_field(gateway, body, param):
    reply = gateway.post("/v1/feedback", headers=AUTH, json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_a_body_that_is_not_json_is_400(gateway):
    reply = gateway.post("/v1/feedback", headers=AUTH, content=b"{rating: good")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"


def test_feedback_needs_the_api_key(gateway):
    cid = answer(gateway)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = gateway.post("/v1/feedback", headers=headers, json={"completion_id": cid, "rating": "good"})
        assert reply.status_code == 401
