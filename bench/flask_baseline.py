"""The baseline the bento must beat: Flask under gunicorn (sync workers), same model, same features.

As the real system served it (a Gunicorn/Flask container). Same request validation, the same
feature lookup and the same Scorer, so the two differ only in the serving stack.
Run: gunicorn -w 2 -b 127.0.0.1:PORT 'bench.flask_baseline:create_app()'
with BENTOML_HOME (model store), PAYLATER_BENCH_MODEL_TAG and PAYLATER_SOURCE_URL set.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, request


def create_app() -> Flask:
    """A Flask app answering POST /v2/score like the bento does."""
    from pydantic import ValidationError
    from pydantic_core import to_json

    from bentos.models import ScoreRequestV2
    from bentos.scoring import FeatureStore, Scorer
    from paylater.settings import get_settings

    scorer = Scorer.from_store(os.environ["PAYLATER_BENCH_MODEL_TAG"])
    store = FeatureStore(get_settings().source, scorer.user_feature_names)
    app = Flask(__name__)

    def answer(status: int, payload: Any) -> Response:
        return Response(to_json(payload), status=status, mimetype="application/json")

    @app.post("/v2/score")
    def score() -> Response:
        try:
            req = ScoreRequestV2.model_validate_json(request.get_data())
        except ValidationError as exc:
            return answer(422, {"error": "invalid_request", "detail": str(exc)})
        if req.user_id is not None:
            found = store.lookup([req.user_id])
            if req.user_id not in found:
                return answer(404, {"error": "unknown_user", "user_ids": [req.user_id]})
            features = found[req.user_id]
        else:
            features = req.features or {}
        s = scorer.score_rows([scorer.request_row(req.amount_jpy, features)])[0]
        return answer(
            200,
            {
                "default_probability": s.default_probability,
                "decision": s.decision,
                "model_version": s.model_version,
                "reason_codes": s.reason_codes,
            },
        )

    return app
