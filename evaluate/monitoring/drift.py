"""Drift: do the window's prompts still look like the prompts the version was trained on?

The reference is the version's own training prompts. Its training run logged the training split as an MLflow
dataset input whose source names the data files, the resolved job (shape and columns) and the held-out split;
the training prompts are the source files' prompts less the held-out ones. When the files are no longer
where the run read them, the held-out split the run logged stands in.

Measures: the meaning of the prompts, as mean-pooled hidden states of the served base model, compared by a
domain classifier (scikit-learn: cross-validated ROC AUC, a bootstrap interval, and a permutation p-value); and
the simple ones: prompt length (two-sample Kolmogorov-Smirnov, scipy), language, and the share of words the
training prompts never used.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.datafiles import data_files, detect_shape, iter_rows, to_messages
from core.registry import VersionRef
from core.schema.data import ColumnMap
from evaluate.monitoring.checks import Measure

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from evaluate.scoring import Subject

log = logging.getLogger(__name__)

TRAIN_CONTEXT = "train"
VALIDATION_ARTIFACT = "data/validation.jsonl"
CONFIG_ARTIFACT = "config/resolved.yaml"
_WORD = re.compile(r"[^\W\d_]+")
# A few of the most frequent function words of common Latin-script languages: enough to tell them apart on a
# sentence, which is all a drift measure needs (a prompt in another script is named by its script).
_FUNCTION_WORDS = {
    "en": "the a an is are do does i you to of and in for my can what how it on with be",
    "sv": "och att det som en är jag på för med av till har vad hur kan inte de du min",
    "de": "der die das und ist ich nicht ein eine zu den mit von wie was kann ist für auf",
    "fr": "le la les et est je des un une pour que qui dans en ne pas du comment vous mon",
    "es": "el la los las y es que de en un una para por cómo qué mi con se no puedo",
    "it": "il la che di e un una per è non sono come mi con del della posso cosa",
    "nl": "de het een en is ik van dat niet te op voor met hoe wat mijn kan zijn",
    "pt": "o a os as e é que de do da em um uma para com não como meu posso",
}
_SCRIPTS = [
    ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
    ("greek", re.compile(r"[\u0370-\u03ff]")),
    ("arabic", re.compile(r"[\u0600-\u06ff]")),
    ("hebrew", re.compile(r"[\u0590-\u05ff]")),
    ("devanagari", re.compile(r"[\u0900-\u097f]")),
    ("cjk", re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")),
]


@dataclass
class Reference:
    """The training prompts of a version, and where they came from."""

    prompts: list[str]
    source: str


def prompt_of(messages: list[dict[str, Any]]) -> str | None:
    """The last user turn before the answer (the whole text for plain-text examples)."""
    for m in reversed(messages):
        if m.get("role") in ("user", "text") and str(m.get("content") or "").strip():
            return str(m["content"])
    return None


def _download(run_id: str, artifact: str, dest: Path) -> Path | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dest)))
    except (MlflowException, OSError):
        return None


def _columns_and_shape(run_id: str, dest: Path) -> tuple[ColumnMap, str | None]:
    import yaml

    path = _download(run_id, CONFIG_ARTIFACT, dest)
    try:
        resolved = yaml.safe_load(path.read_text(encoding="utf-8")) if path else None
    except (OSError, yaml.YAMLError):
        resolved = None
    data = resolved.get("data") if isinstance(resolved, dict) else None
    if not isinstance(data, dict):
        return ColumnMap(), None
    shape = data.get("shape") if data.get("shape") not in (None, "auto") else None
    try:
        return ColumnMap.model_validate(data.get("columns") or {}), shape
    except ValueError:
        return ColumnMap(), shape


def _prompts_in_files(files: list[Path], columns: ColumnMap, shape: str | None) -> list[str]:
    prompts: list[str] = []
    for root in files:
        for f in data_files(root):
            for row in iter_rows(f, []):
                shape = shape or detect_shape(row.data, columns)
                if shape is None:
                    return prompts
                try:
                    prompt = prompt_of(to_messages(row.data, shape, columns))  # type: ignore[arg-type]
                except (ValueError, KeyError, TypeError):
                    continue
                if prompt:
                    prompts.append(prompt)
    return prompts


def training_prompts(client: MlflowClient, ref: VersionRef, workdir: Path) -> tuple[Reference | None, str | None]:
    """The version's training prompts, or None and why they cannot be had."""
    from mlflow.exceptions import MlflowException

    if not ref.run_id:
        return None, f"{ref.label} has no training run, so there are no training prompts to compare with"
    try:
        run = client.get_run(ref.run_id)
    except MlflowException:
        return None, f"the training run {ref.run_id} of {ref.label} is gone"
    held_out: list[str] = []
    path = _download(ref.run_id, VALIDATION_ARTIFACT, workdir / "validation")
    if path is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompt = prompt_of(json.loads(line).get("messages") or [])
                if prompt:
                    held_out.append(prompt)
    files: list[Path] = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        if not any(t.key == "mlflow.data.context" and t.value == TRAIN_CONTEXT for t in item.tags):
            continue
        try:
            uri = json.loads(item.dataset.source).get("uri", "")
        except (ValueError, AttributeError):
            continue
        files += [Path(p.strip()) for p in str(uri).split(", ") if p.strip()]
    readable = [f for f in files if f.exists()]
    if readable:
        columns, shape = _columns_and_shape(ref.run_id, workdir / "config")
        skip = set(held_out)
        try:
            prompts = [p for p in _prompts_in_files(readable, columns, shape) if p not in skip]
        except Exception as exc:  # any unreadable file: fall back to the logged held-out split
            log.warning("cannot read the training data of %s again (%s)", ref.label, exc)
            prompts = []
        if prompts:
            return Reference(prompts, f"training data of run {ref.run_id}: {', '.join(map(str, readable))}"), None
    if held_out:
        return Reference(held_out, f"held-out split logged by run {ref.run_id} ({VALIDATION_ARTIFACT})"), None
    return None, f"the training run {ref.run_id} of {ref.label} logged no training data to compare with"


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def language(text: str) -> str:
    """A script name, or for Latin script the language whose function words the text uses most."""
    for name, pattern in _SCRIPTS:
        if len(pattern.findall(text)) >= max(1, len(text) // 5):
            return name
    tokens = words(text)
    scores = {lang: sum(t in vocab for t in tokens) for lang, vocab in _FUNCTION_WORD_SETS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] else "unknown"


_FUNCTION_WORD_SETS = {lang: frozenset(ws.split()) for lang, ws in _FUNCTION_WORDS.items()}


def simple_measures(reference: list[str], window: list[str], confidence: float) -> dict[str, Measure]:
    """Prompt length (KS test), main-language share and out-of-vocabulary share of the window."""
    from scipy.stats import ks_2samp

    from evaluate.monitoring.service import share

    ref_len = np.array([len(words(p)) for p in reference])
    win_len = np.array([len(words(p)) for p in window])
    ks = ks_2samp(ref_len, win_len)
    out = {
        "drift_length_ks": Measure(float(ks.statistic), n=len(window)),
        "drift_length_pvalue": Measure(float(ks.pvalue), n=len(window)),
    }
    ref_langs = Counter(language(p) for p in reference)
    main = ref_langs.most_common(1)[0][0]
    same = sum(language(p) == main for p in window)
    out["drift_language_share"] = share(same, len(window), confidence)
    vocab = {w for p in reference for w in words(p)}
    window_words = [w for p in window for w in words(p)]
    oov = sum(w not in vocab for w in window_words)
    out["drift_oov_share"] = share(oov, len(window_words), confidence) if window_words else Measure(0.0)
    return out


def embed(subject: Subject, texts: list[str], batch_size: int, max_tokens: int = 256) -> np.ndarray:
    """Mean-pooled last hidden states of the subject's model (the base model with adapters off).

    Prompts are batched by length, so a batch pads little; the rows come back in the order of `texts`.
    """
    import torch

    tokenizer = subject.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else subject.eos_ids[0]
    ids_all = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [pad_id] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(ids_all[i]))
    out: list[np.ndarray] = [np.empty(0)] * len(texts)
    with subject.active() as model:
        device = next(model.parameters()).device
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            rows = [ids_all[i] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            result = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
                logits_to_keep=1,
            )
            hidden = result.hidden_states[-1].float()
            m = mask.to(device).unsqueeze(-1).float()
            pooled = ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()
            for i, row in zip(batch, pooled, strict=True):
                out[i] = row
    return np.stack(out) if out else np.empty((0, 0))


def _classifier(n_features: int, n_samples: int, seed: int) -> Any:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    components = max(2, min(32, n_features, n_samples // 2))
    return make_pipeline(
        StandardScaler(),
        PCA(n_components=components, random_state=seed),
        LogisticRegression(max_iter=2000, class_weight="balanced"),
    )


def domain_classifier(
    reference: np.ndarray, window: np.ndarray, permutations: int, samples: int, confidence: float, seed: int
) -> dict[str, Measure]:
    """Cross-validated ROC AUC of window-vs-reference, its bootstrap interval and its permutation p-value."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, permutation_test_score

    x = np.vstack([reference, window])
    y = np.r_[np.zeros(len(reference), dtype=int), np.ones(len(window), dtype=int)]
    folds = StratifiedKFold(n_splits=min(5, len(window), len(reference)), shuffle=True, random_state=seed)
    clf = _classifier(x.shape[1], len(x) - len(x) // folds.n_splits, seed)
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these fits are small, and on shared cores a thread pool per fit is 40x slower.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # convergence chatter on separable data: the AUC says it all
        scores = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
        auc = float(roc_auc_score(y, scores))
        _, _, pvalue = permutation_test_score(
            clf, x, y, cv=folds, scoring="roc_auc", n_permutations=permutations, random_state=seed
        )
    rng = np.random.default_rng(seed)
    ref_idx, win_idx = np.arange(len(reference)), np.arange(len(reference), len(x))
    aucs = []
    for _ in range(samples):
        idx = np.r_[rng.choice(ref_idx, len(ref_idx)), rng.choice(win_idx, len(win_idx))]
        aucs.append(roc_auc_score(y[idx], scores[idx]))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(aucs, [tail, 100 - tail])
    return {
        "drift_domain_auc": Measure(auc, (float(lo), float(hi)), n=len(window)),
        "drift_domain_pvalue": Measure(float(pvalue), n=len(window)),
    }


def sample(items: list[str], k: int, seed: int) -> list[str]:
    """At most k items, drawn without replacement but kept in their order."""
    if len(items) <= k:
        return list(items)
    keep = sorted(np.random.default_rng(seed).choice(len(items), k, replace=False))
    return [items[i] for i in keep]
