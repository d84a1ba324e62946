"""The model card (``README.md``) written beside every saved model.

Every save (``save_pretrained``, each training checkpoint, ``push_to_hub``) writes a
``README.md`` in the Hugging Face Hub's model-card format: YAML front matter
(``library_name: jetblocks``, tags) and then the model's class, parameter count and
configuration, and what is known of how it was made, from a ``card`` mapping:

- ``description``: a paragraph of Markdown under the title;
- ``data``: what it was trained on; ``steps``: optimizer steps taken;
- ``command``: the command line that trained it (a string or a list of arguments);
- ``metrics``: held-out results (``{"bits_per_dim": 1.49}``), measured at ``metrics_step``;
- ``repo_id``: where it is shared (the card's loading snippet names it);
- ``model_class`` and ``parameters``: filled in by the save itself.

The card's third part is a marker line (:data:`MARKER`): a ``README.md`` that lacks it was
written by someone else and is never overwritten (:func:`is_ours`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jetblocks.version import VERSION

__all__ = ["CARD_FIELDS", "MARKER", "check_card", "is_ours", "render_card"]

MARKER = (
    "<!-- jetblocks model card: written by jetblocks and rewritten at every save; "
    "delete this line to keep your own edits -->"
)
CARD_FIELDS = (
    "description",
    "data",
    "steps",
    "command",
    "metrics",
    "metrics_step",
    "repo_id",
    "model_class",
    "parameters",
)
_TEXT = ("description", "data", "repo_id", "model_class")
_COUNTS = ("steps", "metrics_step", "parameters")
_READ_LIMIT = 1 << 20  # the marker is near the top; a huge README is not read whole


def check_card(card: Mapping[str, Any] | None) -> dict[str, Any]:
    """``card`` as a plain dict, or ``ValueError`` naming a field that is unknown or of the
    wrong kind (see the module docstring)."""
    if card is None:
        return {}
    if not isinstance(card, Mapping):
        raise TypeError(f"card must be a mapping of model-card fields, got {type(card).__name__}")
    unknown = sorted(str(name) for name in card if name not in CARD_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown model card field(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(CARD_FIELDS)}"
        )
    card = {name: value for name, value in card.items() if value is not None}
    for name in _TEXT:
        if name in card and not isinstance(card[name], str):
            raise ValueError(f"card[{name!r}] must be a string, got {type(card[name]).__name__}")
    for name in _COUNTS:
        value = card.get(name)
        if name in card and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"card[{name!r}] must be an int >= 0, got {value!r}")
    command = card.get("command")
    if command is not None and not isinstance(command, str):
        if not isinstance(command, Sequence) or not all(isinstance(a, str) for a in command):
            raise ValueError("card['command'] must be a string or a list of strings")
        card["command"] = list(command)
    metrics = card.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in metrics.items()
        ):
            raise ValueError("card['metrics'] must map names to numbers")
        card["metrics"] = {k: float(v) for k, v in metrics.items()}
    return card


def is_ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` may be (over)written with a model card: it does not exist, or it is
    a file holding :data:`MARKER` (a card jetblocks wrote)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(_READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return False
    return any(line.strip() == MARKER for line in head.splitlines())


def render_card(config: Mapping[str, Any], card: Mapping[str, Any] | None = None) -> str:
    """The Markdown of a model card for a model saved with ``config`` (see the module
    docstring for ``card``'s fields)."""
    card = check_card(card)
    kind = str(config.get("model", "jet"))
    name = card.get("model_class") or kind
    tags = ["jetblocks", "normalizing-flow", "pytorch", kind]
    lines = ["---", "library_name: jetblocks", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in dict.fromkeys(tags)]
    lines += ["---", "", MARKER, "", f"# {_inline(name)}", ""]
    field = _code(f'"model": {json.dumps(kind)}')
    lines.append(
        f"A {_code(name)} model ({field} in `config.json`) "
        f"saved by jetblocks {VERSION}: `config.json` (its configuration) and "
        "`model.safetensors` (its weights, with their SHA-256 and a copy of the configuration, "
        "both checked when it loads)."
    )
    if card.get("description"):
        lines += ["", card["description"].strip()]
    rows = [("model class", _code(name))]
    if "parameters" in card:
        rows.append(("parameters", f"{card['parameters']:,}"))
    if "data" in card:
        rows.append(("trained on", _inline(card["data"])))
    if "steps" in card:
        rows.append(("training steps", f"{card['steps']:,}"))
    at = f" (at step {card['metrics_step']:,})" if "metrics_step" in card else ""
    for metric, value in card.get("metrics", {}).items():
        rows.append((f"held-out {_inline(metric)}", f"{_number(value)}{at}"))
    rows.append(("jetblocks version", VERSION))
    lines += ["", "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]
    source = json.dumps(card.get("repo_id", "path/to/this/folder"))
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from jetblocks import load_pretrained",
        "",
        f"model = load_pretrained({source})",
        "```",
    ]
    if "command" in card:
        command = card["command"]
        if not isinstance(command, str):
            command = shlex.join([Path(command[0]).name, *command[1:]] if command else [])
        lines += ["", "## Training command", "", *_fenced(command, "bash")]
    lines += ["", "## Configuration", "", "| field | value |", "|---|---|"]
    lines += [f"| `{key}` | {_code(json.dumps(value))} |" for key, value in _flat(config)]
    return "\n".join(lines) + "\n"


# -- Markdown helpers -------------------------------------------------------------------------
def _flat(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(field, value)`` rows, nested mappings as ``outer.inner``."""
    rows = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((_inline(f"{prefix}{key}").replace("`", "'"), value))
    return rows


def _inline(text: str) -> str:
    """``text`` on one line, safe in a table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    """``text`` as inline code in a table cell (backtick runs inside are fenced around)."""
    text = _inline(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fenced(text: str, language: str) -> list[str]:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", text, fence]


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)
