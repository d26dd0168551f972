"""Human output that fits a terminal: short sample ids, id prefixes, plurals, tables that fit 80 columns.

- `short_ids`: each sample id shortened to a prefix that is still unique in its dataset and that
  `--sample` accepts (`resolve_sample_ids`); never an ellipsis, so a printed id can be copied back.
  An id in the contract's form ``<video>-<start frame>-<12 hex digits>`` keeps its video and start
  frame and the fewest hex digits (at least 4) that keep it unique; any other id is kept whole.
- `resolve_sample_ids`: ids as a user typed them (whole, or a unique prefix) -> the dataset's ids.
- `plural`: ``1 error``, ``2 errors``; `paragraph`: text wrapped with a hanging indent.
- `fitted_table`: a rich table of the columns that fit the console width, most important first.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

#: the hex digits of a contract id (`fwdata.dataset.contract.make_sample_id`) kept at least
MIN_DIGEST = 4
_CONTRACT_ID = re.compile(r"^(.+-\d{6}-)([0-9a-f]{12})$")

#: words whose plural is not word + "s"
_IRREGULAR = {"was": "were", "is": "are", "this": "these", "match": "matches", "has": "have"}


def plural(n: int, word: str, plural_form: Optional[str] = None) -> str:
    """``f"{n} {word}"`` with the word in the plural unless n is 1: plural(1, "error") == "1 error"."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {plural_form or _IRREGULAR.get(word) or word + 's'}"


def short_ids(ids: Sequence[str]) -> dict[str, str]:
    """{id: its shortest unique form} for every id of a dataset (see the module docstring).

    A prefix is unique when it is longer than the common prefix with both neighbours in sorted
    order, so this is O(n log n) for any number of samples."""
    import os.path

    order = sorted(set(ids))
    out: dict[str, str] = {}
    for i, sid in enumerate(order):
        m = _CONTRACT_ID.match(sid)
        if m is None:
            out[sid] = sid
            continue
        head, digest = m.groups()
        shared = max((len(os.path.commonprefix([sid, order[j]])) for j in (i - 1, i + 1) if 0 <= j < len(order)),
                     default=0)
        out[sid] = sid[:max(len(head) + MIN_DIGEST, shared + 1)]
    return {sid: out[sid] for sid in ids}


def paragraph(text: str, width: int, indent: str = "  ", first: str = "") -> str:
    """`text` wrapped to `width` at spaces, continuation lines indented by `indent`. A word longer than
    the line (a long path) is kept whole, never split or cut."""
    import textwrap

    return textwrap.fill(text, width=max(width, 40), initial_indent=first, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


class SampleIdError(ValueError):
    """A given id matches no sample, or is a prefix of several."""


def resolve_sample_ids(given: Iterable[str], known: Sequence[str]) -> list[str]:
    """Each given id (a whole id, or a prefix matching exactly one id) -> that id, in the order given.

    Raises SampleIdError naming the unknown ids, or an ambiguous prefix with what it matches.
    """
    known_set = set(known)
    resolved, unknown = [], []
    for g in (x.strip() for x in given):
        if g in known_set:
            resolved.append(g)
            continue
        matches = [k for k in known if g and k.startswith(g)]
        if len(matches) == 1:
            resolved.append(matches[0])
        elif matches:
            shown = ", ".join(matches[:3]) + (f" and {len(matches) - 3} more" if len(matches) > 3 else "")
            raise SampleIdError(f"sample id prefix {g!r} is ambiguous: it matches {plural(len(matches), 'sample')} "
                                f"({shown}); give more of the id")
        else:
            unknown.append(g)
    if unknown:
        raise SampleIdError(f"unknown (or invalid) sample ids: {', '.join(unknown)}")
    return list(dict.fromkeys(resolved))


def fitted_table(columns: Sequence[tuple[str, Sequence[str]]], width: Optional[int], required: int = 1,
                 **table_kwargs):
    """A rich Table of `columns` ((header, cells) pairs, most important first) that fits `width`.

    The first `required` columns are always shown; each further column is added while the table
    still fits (None: every column). Returns (table, headers of the columns left out).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def make(cols):
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0), **table_kwargs)
        for header, _ in cols:
            t.add_column(header, no_wrap=header != columns[0][0], overflow="fold")
        for row in zip(*(cells for _, cells in cols)):
            t.add_row(*row)
        return t

    if width is None:
        return make(columns), []
    measure = Console(width=10_000)
    shown = list(columns[:required])
    left_out = []
    for col in columns[required:]:
        trial = shown + [col]
        if measure.measure(make(trial)).maximum <= width:
            shown = trial
        else:
            left_out.append(col[0])
    return make(shown), left_out
