"""Request and response schemas of the scoring API (v2 current, v1 the previous app release's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from paylater.product import MAX_AMOUNT_JPY, MIN_AMOUNT_JPY

MAX_USER_ID = 2**63 - 1
"""User ids are bigint: a larger one is the client's error (SQLite cannot even bind it)."""

# extra="forbid": an unexpected field is a client bug worth a 422, not something to ignore.
# allow_inf_nan=False: NaN/Infinity (which some JSON encoders emit) must never reach the model.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)


class ScoreRequestV2(BaseModel):
    """One pay-later request: a user to look up, or an explicit feature vector, plus the amount."""

    model_config = _STRICT

    user_id: int | None = Field(
        default=None, ge=1, le=MAX_USER_ID, description="User whose online features are used."
    )
    amount_jpy: int = Field(
        ge=MIN_AMOUNT_JPY, le=MAX_AMOUNT_JPY, description="Requested top-up amount in yen."
    )
    features: dict[str, float | None] | None = Field(
        default=None,
        description="Explicit user features by name (null = missing), instead of user_id.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ScoreRequestV2:
        """Exactly one of user_id and features says where the user's features come from."""
        if (self.user_id is None) == (self.features is None):
            raise ValueError("give exactly one of user_id and features")
        return self


class ScoreBatchV2(RootModel[list[ScoreRequestV2]]):
    """A list of v2 requests scored together (size limited by the service)."""

    model_config = ConfigDict(strict=True)

    # An empty batch is a client bug (nothing to score), answered 422 rather than 200 [].
    root: list[ScoreRequestV2] = Field(min_length=1)


class ScoreRequestV1(BaseModel):
    """The previous app release's request: customer id as text, amount as `requested_yen`."""

    model_config = _STRICT

    customer_id: str = Field(pattern=r"^[0-9]{1,18}$", description="User id as decimal text.")
    requested_yen: int = Field(ge=MIN_AMOUNT_JPY, le=MAX_AMOUNT_JPY)

    @field_validator("customer_id")
    @classmethod
    def _positive(cls, value: str) -> str:
        """A user id is at least 1, as v2's user_id: "0" is the client's error, not a crash in to_v2."""
        if int(value) < 1:
            raise ValueError("customer_id must be a positive user id")
        return value

    def to_v2(self) -> ScoreRequestV2:
        """The same request in the current schema."""
        return ScoreRequestV2(user_id=int(self.customer_id), amount_jpy=self.requested_yen)


class ScoreResponseV2(BaseModel):
    """The score of one request."""

    default_probability: float = Field(description="Probability the charge is not repaid in time.")
    decision: Literal["approve", "decline"] = Field(description="Decision at the model's cutoff.")
    model_version: str = Field(description="Registry version of the model that scored it.")
    reason_codes: list[str] = Field(description="Features pushing the score up, strongest first.")


class ScoreResponseV1(BaseModel):
    """The previous release's response: a risk score and a boolean approval."""

    customer_id: str
    risk_score: float
    approved: bool
    model_version: str
    reasons: list[str]


class FieldError(BaseModel):
    """One invalid field: where it is, and why."""

    field: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer: a machine-readable kind, a human sentence, and the fields at fault."""

    error: str
    detail: str
    fields: list[FieldError] = Field(default_factory=list)
    user_ids: list[int] = Field(default_factory=list)
