"""`read-cache predict`: the backbone and a trained side network together on new text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from read_cache.cli.common import user_errors
from read_cache.errors import ReadCacheError


@user_errors
def predict(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to label; a sentence pair as 'first ||| second'.")] = None,
    run: Annotated[Path, typer.Option(help="A run folder written by `read-cache train`.")] = ...,
    model: Annotated[Optional[str], typer.Option(help="The backbone; default: the one the run's cache was built from.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="A UTF-8 text file with one text (or 'first ||| second' pair) per line.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda; default: CUDA when present.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per text, with every label's probability.")] = False,
) -> None:
    """Run the backbone and a trained side network together on new text; print each label and its probability."""
    lines = list(texts or [])
    empty = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if empty:
        raise ReadCacheError(f"text argument {empty[0]} is empty; pass the text to label (or drop the empty argument)")
    if file is not None:
        lines += [line for line in read_text_file(file).splitlines() if line.strip()]
    if not lines:
        raise ReadCacheError("nothing to predict; pass texts as arguments or --file F")
    examples = [tuple(part.strip() for part in line.split("|||")) if "|||" in line else line for line in lines]
    from read_cache.inference.predict import predict as predict_texts

    result = predict_texts(run, examples, model, device=device)
    for line, row in zip(lines, result.rows()):
        if as_json:
            typer.echo(json.dumps({"text": line, **row}))
        elif "score" in row:
            typer.echo(f"{row['score']:.3f}\t{line}")
        else:  # plain tab-separated lines, for pipes: label, its probability, the text
            typer.echo(f"{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{line}")


def read_text_file(file: Path) -> str:
    if not file.is_file():
        raise ReadCacheError(f"--file {file} does not exist; pass a text file with one example per line")
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReadCacheError(f"--file {file} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); save it as UTF-8 and retry") from None
