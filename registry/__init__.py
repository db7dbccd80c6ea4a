"""The model registry policy on MLflow: naming, stages/aliases, gates, promotion, rollback, audit history."""

from registry.policy import resolve_version

__all__ = ["resolve_version"]
