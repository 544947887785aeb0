"""Is the Hugging Face hub reachable? Asked once, in seconds, before anything tries to download.

Without this, a machine that cannot reach the hub spends ~25-35 s in huggingface_hub's retries (printing
each warning), then reports only the first input that needed the hub; the next one fails on the next try.
`require_hub` names every input that needs the hub in one error, with what to pass instead.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from read_cache.errors import ReadCacheError

PROBE_SECONDS = 4.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_choice() -> str | None:
    """The variable that switches the hub off, if one is set."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


@functools.cache
def hub_unreachable_reason() -> str | None:
    """None when the hub answers; else why not (one short phrase). Asked once per process."""
    variable = offline_by_choice()
    if variable:
        return f"{variable} is set"
    try:
        # Any HTTP answer, even an error status, means the hub is there; proxies from the environment apply.
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        return f"{endpoint()} did not answer ({getattr(e, 'reason', e)})"
    return None


def is_local_folder(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def require_hub(needs: dict[str, str]) -> None:
    """`needs` maps each input that must come from the hub to what to pass instead; refuse them all at once if it is unreachable."""
    if not needs:
        return
    reason = hub_unreachable_reason()
    if reason is None:
        return
    listed = "; ".join(f"{what} (instead: {instead})" for what, instead in needs.items())
    raise ReadCacheError(
        f"the Hugging Face hub cannot be reached ({reason}), and these inputs need it: {listed}. "
        "A model folder is anything save_pretrained wrote; GLUE files are the original TSV layout (see README 'No hub?')"
    )


def model_needs_hub(model: str, revision: str | None = None) -> bool:
    """A hub id not already in the local hub cache (a local folder, or a cached id, loads offline)."""
    if is_local_folder(model):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return not isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id: loading will say so
        return False


def glue_needs_hub() -> bool:
    """GLUE from the hub, unless the hub cache already holds nyu-mll/glue."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return not (Path(HF_HUB_CACHE) / "datasets--nyu-mll--glue").is_dir()


def require_hub_for(model: str | None, *, data_dir: Path | None, revision: str | None = None, want_data: bool = True) -> None:
    """One check for a command's inputs: every one that needs an unreachable hub is named in one error."""
    needs = {}
    if model is not None and model_needs_hub(model, revision):
        needs[f"--model {model}"] = "--model FOLDER written by save_pretrained"
    if want_data and data_dir is None and glue_needs_hub():
        needs["the GLUE data"] = "--data-dir FOLDER with the GLUE TSV files, e.g. SST-2/train.tsv"
    require_hub(needs)
