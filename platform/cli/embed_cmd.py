"""``brainiac embed``: encoder features of every preprocessed volume into the catalog's ``embeddings`` table."""

from __future__ import annotations

from typing import Annotated

import typer

from brainiac.platform.cli.common import (
    CatalogOption,
    ConfigOption,
    DatasetOption,
    SetOption,
    build_config,
    report_access,
)


def embed(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Encoder: models:/brainiac-encoder@ALIAS, /VERSION, or a checkpoint folder."
        ),
    ],
    catalog: CatalogOption = None,
    dataset: DatasetOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write the encoder's feature vector of every QC-passing volume to the [b]embeddings[/b] Delta table (scan_id,
    model, vector), for analyses outside the platform. Re-running adds only missing rows; each model version keeps
    its own partition.

      [b]brainiac embed --model models:/brainiac-encoder@candidate --catalog ./brainiac-data/catalog[/b]
      [b]brainiac catalog query "SELECT dataset, count(*) FROM embeddings GROUP BY 1"[/b]
    """
    from rich.console import Console

    from brainiac.jobs.embed import embed as run

    cfg = build_config(config, set_, catalog=catalog, datasets=dataset)
    report_access(cfg)  # an unknown or forbidden --dataset stops here; say what the access levels leave out
    s = run(cfg, model, progress=not quiet)
    Console().print(
        f"[b]embeddings[/b] model {s.model} · preprocess_version {s.preprocess_version} · volumes {s.selected} · "
        f"written {s.written} (dim {s.dim}) · table v{s.embeddings_version} · {s.seconds:.1f} s"
    )
