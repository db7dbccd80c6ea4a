"""Judge a registered version's gates again, against today's production, on its own out-of-time month."""

from __future__ import annotations

import json
from datetime import date

from registry.policy import (
    GateDecision,
    GateThresholds,
    alias_version,
    evaluate_gates,
    get_version,
    production_disagreement,
    record_gate,
    resolve_version,
)
from registry.reproduce import read_logged_dataset
from registry.runs import load_booster, score_production
from registry.store import RegistryError, client
from tasks.training import feature_matrix, predict, split_out_of_time

LINEAGE = ("dataset_uri", "dataset_digest", "feature_names", "as_of")
SPLIT_SHARE = 2
"""Any valid early-stopping share: the out-of-time month (the latest matured one) does not depend on it."""


def regate(stage_or_version: str, actor: str) -> tuple[str, GateDecision]:
    """(version, decision): the version's gates run again as monthly_retrain ran them, on the
    OOT rows of its logged dataset (digest checked), against the version production is now.

    The outcome replaces the version's gate tags (with the production version it was judged
    against, which promote checks) and is audited as a `regate` entry. It runs without the
    transition lock: production changing meanwhile is caught by promote, under the lock.
    """
    c = client()
    version = resolve_version(stage_or_version, c)
    if alias_version(c, "production") == version:
        raise RegistryError(f"version {version} is production itself: there is nothing to gate")
    disagreement = production_disagreement(c, version)
    if disagreement:
        raise RegistryError(f"cannot tell which version to gate v{version} against: {disagreement}")
    tags = get_version(c, version).tags or {}
    missing = [t for t in LINEAGE if not tags.get(t)]
    if missing:
        raise RegistryError(
            f"version {version} lacks lineage tags {missing} (registered outside monthly_retrain):"
            " its out-of-time month cannot be rebuilt to judge it"
        )
    table = read_logged_dataset(tags["dataset_uri"], tags["dataset_digest"])
    features = list(json.loads(tags["feature_names"]))
    try:
        split = split_out_of_time(table, features, date.fromisoformat(tags["as_of"]), SPLIT_SHARE)
    except ValueError as exc:
        raise RegistryError(
            f"version {version}'s out-of-time month cannot be rebuilt: {exc}"
        ) from exc
    probs = predict(load_booster(version), feature_matrix(split.oot_rows, features))
    decision = evaluate_gates(
        split.y_oot,
        probs,
        features,
        GateThresholds.from_settings(),
        score_production(split.oot_rows, split.oot_month),
    )
    record_gate(version, decision, actor, audit="regate")
    return version, decision
