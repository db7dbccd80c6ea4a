"""The `paylater` command: what Prefect, MLflow and BentoML do not already cover."""

from __future__ import annotations

import typer

from bentos.cli import app as bento_app
from datagen.cli import app as demo_data_app
from registry.cli import app as registry_app
from worker.cli import enqueue, run_worker

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(demo_data_app, name="demo-data")
app.add_typer(registry_app, name="registry")
app.add_typer(bento_app, name="bento")
app.command("worker")(run_worker)
app.command("enqueue")(enqueue)


@app.command("settings")
def show_settings() -> None:
    """Print the backends this environment resolves to."""
    from paylater.settings import get_settings

    s = get_settings()
    for name, value in [
        ("home", s.home_dir),
        ("source", s.source),
        ("warehouse", s.warehouse),
        ("datasets", s.datasets),
        ("mlflow", s.tracking_uri),
        ("timezone", s.timezone),
    ]:
        typer.echo(f"{name:10} {value}")


if __name__ == "__main__":
    app()
