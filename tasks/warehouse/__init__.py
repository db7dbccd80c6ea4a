"""Warehouse adapters: one interface, DuckDB (embedded) and BigQuery (production), chosen by URL."""

from __future__ import annotations

from tasks.warehouse.base import Warehouse, WarehouseError, open_warehouse

__all__ = ["Warehouse", "WarehouseError", "open_warehouse"]
