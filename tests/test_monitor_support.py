"""Traffic as the gateway writes it, for the monitoring and retraining tests."""

from __future__ import annotations

import time

from core.traffic import Capture, experiment_id, traffic_experiment, write_trace

FAQ = [
    "Do I need a building permit for a carport?",
    "How long does a kitchen renovation take?",
    "What does a loft conversion cost?",
    "Can you build an extension in winter?",
    "Who is responsible for the site during the works?",
]


def send(
    uri: str, model: str, version: str, n: int, *, content: bool = True, error_every: int = 0, cut_every: int = 4, **kw
) -> list[str]:
    """Write n traces as the gateway would; returns their ids."""
    from core.registry import connect

    exp = experiment_id(connect(uri), traffic_experiment(model))
    ids = []
    for i in range(n):
        prompt = FAQ[i % len(FAQ)] + ("" if i < len(FAQ) else f" (case {i})")
        failed = bool(error_every) and i % error_every == 0
        cap = Capture(
            request_id=f"chatcmpl-{model}-{version}-{i}-{time.monotonic_ns()}",
            model=kw.get("as_model", model),
            version=version,
            alias=None,
            endpoint="chat",
            api_key_label="team-a",
            started_at=time.time(),
            status="error" if failed else "ok",
            http_status=500 if failed else 200,
            error="boom" if failed else None,
            finish_reasons=() if failed else ("length" if cut_every and i % cut_every == 0 else "stop",),
            prompt_tokens=12,
            completion_tokens=0 if failed else 8,
            ttft_s=0.02,
            latency_s=0.05 + 0.01 * i,
            messages=[{"role": "user", "content": prompt}] if content else None,
            completions=None if not content or failed else [f"Answer {i}."],
        )
        ids.append(write_trace(uri, exp, cap))
    return ids
