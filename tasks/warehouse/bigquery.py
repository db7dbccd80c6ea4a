"""BigQuery warehouse (production). Built out by the daily-sync work; see tasks/warehouse/base.py."""

from __future__ import annotations

from tasks.warehouse.base import WarehouseError


class BigQueryWarehouse:
    """Placeholder until the BigQuery adapter lands."""

    dialect = "bigquery"

    @classmethod
    def from_url(cls, url: str) -> BigQueryWarehouse:
        """bigquery://project/dataset."""
        raise WarehouseError("the BigQuery adapter is not built yet")
