"""Evaluation prompt tables (the Meta-LoRA paper's appendix E, Tables 1-3) and their templates.

The tables ship as text files in ``metalora_core/data`` (one prompt per line, ``#`` comments):

- ``ffhq_male`` / ``ffhq_female``: Tables 1 (recontextualized) + 2 (stylistic), 20 prompts per
  class, used with CLIP-T;
- ``unsplash``: Table 3, 10 prompts written as templates (``[man/woman]``, ``[his/her]``,
  ``[he/she]``), used with R-FaceSim.
"""
from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

#: Built-in table name -> file in ``metalora_core/data``.
PROMPT_TABLES: dict[str, str] = {
    "ffhq_male": "prompts_ffhq_male.txt",
    "ffhq_female": "prompts_ffhq_female.txt",
    "unsplash": "prompts_unsplash.txt",
}

# "[man/woman]" -> first word for the male class, second for the female class.
_TEMPLATE = re.compile(r"\[([^\[\]/]+)/([^\[\]/]+)\]")
_GENDERS = {"man": 0, "male": 0, "m": 0, "woman": 1, "female": 1, "f": 1, "w": 1}


def is_template(prompt: str) -> bool:
    """True when ``prompt`` still holds a ``[male/female]`` choice such as ``[man/woman]``."""
    return _TEMPLATE.search(prompt) is not None


def expand_prompt(prompt: str, gender: str) -> str:
    """Fills every ``[male/female]`` choice of a template (Table 3's ``[man/woman]``, ``[his/her]``).

    Args:
        prompt: a prompt, templated or not (a plain prompt comes back unchanged).
        gender: "man"/"male" or "woman"/"female" (case-insensitive).

    Returns:
        The prompt with each ``[a/b]`` replaced by ``a`` (male) or ``b`` (female).

    Raises:
        ValueError: unknown gender.
    """
    key = gender.strip().lower()
    if key not in _GENDERS:
        raise ValueError(f"unknown gender {gender!r} for prompt templates; use 'man' or 'woman'")
    pick = _GENDERS[key] + 1
    return _TEMPLATE.sub(lambda m: m.group(pick).strip(), prompt)


def parse_prompts(text: str) -> list[str]:
    """Splits prompt-file text into prompts: one per non-empty line, ``#`` lines are comments."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(source: str | os.PathLike, gender: str | None = None) -> list[str]:
    """Loads a prompt table: a built-in name (``PROMPT_TABLES``) or a text file, templates expanded.

    Args:
        source: "ffhq_male", "ffhq_female", "unsplash", or the path of a UTF-8 text file with one
            prompt per line (``#`` lines are comments). An existing file wins over a built-in name.
        gender: fills ``[man/woman]``-style templates ("man" or "woman"); None leaves them as they
            are (see ``is_template`` and ``expand_prompt``).

    Returns:
        The prompts in file order.

    Raises:
        FileNotFoundError: neither a file nor a built-in table.
        ValueError: the file holds no prompt, or the gender is unknown.
    """
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        where = str(path)
    elif str(source) in PROMPT_TABLES:
        text = resources.files(__package__).joinpath(PROMPT_TABLES[str(source)]).read_text(encoding="utf-8")
        where = f"built-in table {source!r}"
    else:
        raise FileNotFoundError(
            f"no prompt file at {path}; pass a text file with one prompt per line or a built-in "
            f"table: {', '.join(PROMPT_TABLES)}"
        )
    prompts = parse_prompts(text)
    if not prompts:
        raise ValueError(f"{where} holds no prompt (every line is empty or a '#' comment)")
    if gender is not None:
        prompts = [expand_prompt(p, gender) for p in prompts]
    return prompts


__all__ = ["PROMPT_TABLES", "expand_prompt", "is_template", "load_prompts", "parse_prompts"]
