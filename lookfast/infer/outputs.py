"""Prediction rows on disk: JSON Lines (one file) or Parquet (a folder of part files), written so that an interrupted
run keeps every row it finished, and resumable without duplicates.

A row: {"path": str, "top5": [[class, prob], ...] | None, "exit_index": int | None, "k": int | None,
        "mask": str | None, "error": str | None}

- JSON Lines (`*.jsonl`, `*.ndjson`): one object per line, the file flushed after every batch. On resume a torn last
  line (the process killed mid-write) is cut off before appending.
- Parquet (`*.parquet`): a folder of `part-NNNNN.parquet` files, as Spark and Ray Data write datasets; read it with
  `pandas.read_parquet(path)` or `pyarrow.parquet.read_table(path)`. Each part is written to a hidden temporary name
  and renamed into place, so a part is either complete or absent. Rows are buffered and a part written every
  `flush_rows` rows or `flush_seconds`, whichever comes first, and when the writer closes (also on an exception).
  Column types: path string, top5 list<struct<class: int64, prob: float>>, exit_index int64, k int64, mask string,
  error string (null where not applicable).

pyarrow is imported only for Parquet (`pip install 'lookfast[infer]'`).
"""
from __future__ import annotations

import json
import os
import re
import time

COLUMNS = ("path", "top5", "exit_index", "k", "mask", "error")
PART = re.compile(r"^part-(\d{5,})\.parquet$")


def output_format(path: str | os.PathLike) -> str:
    """"jsonl" or "parquet" from the output's extension; ValueError for another one."""
    text = os.fspath(path).rstrip("/\\").lower()
    if text.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if text.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"output {os.fspath(path)!r} must end in .jsonl, .ndjson or .parquet")


def _pa():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("Parquet output needs pyarrow: pip install 'lookfast[infer]' (or pip install pyarrow); "
                          "or write JSON Lines (--output preds.jsonl)") from exc
    return pyarrow


def arrow_schema():
    pa = _pa()
    pair = pa.struct([("class", pa.int64()), ("prob", pa.float32())])
    return pa.schema([("path", pa.string()), ("top5", pa.list_(pair)), ("exit_index", pa.int64()),
                      ("k", pa.int64()), ("mask", pa.string()), ("error", pa.string())])


def rows_to_table(rows: list[dict]):
    """Rows (top5 as [[class, prob], ...]) -> a pyarrow Table with `arrow_schema()`."""
    pa = _pa()
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    columns["top5"] = [None if t is None else [{"class": int(c), "prob": float(p)} for c, p in t]
                       for t in columns["top5"]]
    return pa.Table.from_pydict(columns, schema=arrow_schema())


def table_to_rows(table) -> list[dict]:
    """The inverse of rows_to_table (probabilities back to the float32 value's shortest decimal)."""
    rows = table.select(list(COLUMNS)).to_pylist()
    for row in rows:
        if row["top5"] is not None:
            row["top5"] = [[pair["class"], _f32(pair["prob"])] for pair in row["top5"]]
    return rows


def _f32(value: float) -> float:
    """A float32 probability as the shortest decimal that reads back as the same float32 (0.1, not 0.100000001)."""
    import numpy as np

    return float(str(np.float32(value)))


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every complete row of an output (JSON Lines file or Parquet folder), in file order. A torn last JSON line is
    ignored."""
    path = os.fspath(path)
    if output_format(path) == "jsonl":
        return _read_jsonl(path)[0]
    pq = _pa().parquet
    rows = []
    for part in _parts(path):
        rows += table_to_rows(pq.read_table(os.path.join(path, part)))
    return rows


def _read_jsonl(path: str) -> tuple[list[dict], int]:
    """(rows, byte length of the complete lines)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # a last line without its newline was cut by an interruption
    rows = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}: line {number} is not JSON ({exc}); not a lookfast output?") from exc
        if not isinstance(row, dict) or "path" not in row:
            raise ValueError(f"{path}: line {number} has no 'path'; not a lookfast output?")
        rows.append(row)
    return rows, end


def _parts(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"Parquet output {folder!r} must be a folder of part files (it is a file)")
    names = [n for n in os.listdir(folder) if PART.match(n)]
    return sorted(names, key=lambda n: int(PART.match(n).group(1)))


class RowWriter:
    """Appends rows to an output. `RowWriter(path, resume)`: when the output exists, resume=False raises
    FileExistsError (nothing is overwritten) and resume=True keeps it; `done` is then the set of paths it holds.
    `write(rows)` adds rows (JSON Lines: written and flushed at once; Parquet: buffered, see the module docstring);
    `close()` writes what is buffered. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, flush_rows: int = 1024,
                 flush_seconds: float = 60.0):
        self.path = os.fspath(path)
        self.format = output_format(self.path)
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.done: set[str] = set()
        self.rows_written = 0
        exists = os.path.exists(self.path)
        if exists and not resume:
            raise FileExistsError(f"output {self.path!r} exists; pass --resume to continue it, or remove it")
        if self.format == "jsonl":
            self._open_jsonl(exists)
        else:
            self._open_parquet(exists)

    # -- JSON Lines
    def _open_jsonl(self, exists: bool) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        if exists:
            rows, end = _read_jsonl(self.path)
            self.done = {row["path"] for row in rows}
            with open(self.path, "r+b") as f:
                f.truncate(end)  # drop a torn last line
        self._file = open(self.path, "a", encoding="utf-8")

    # -- Parquet
    def _open_parquet(self, exists: bool) -> None:
        pq = _pa().parquet
        self._buffer: list[dict] = []
        self._last_flush = time.monotonic()
        self._next_part = 0
        if exists:
            parts = _parts(self.path)
            for name in os.listdir(self.path):  # temporaries of a run killed while writing a part
                if name.startswith(".part-") and name.endswith(".tmp"):
                    os.remove(os.path.join(self.path, name))
            for part in parts:
                self.done.update(pq.read_table(os.path.join(self.path, part), columns=["path"]).column(0).to_pylist())
            if parts:
                self._next_part = int(PART.match(parts[-1]).group(1)) + 1
        else:
            os.makedirs(self.path)

    def _write_part(self) -> None:
        if not self._buffer:
            return
        pq = _pa().parquet
        name = f"part-{self._next_part:05d}.parquet"
        tmp = os.path.join(self.path, f".{name}.tmp")
        pq.write_table(rows_to_table(self._buffer), tmp)
        os.replace(tmp, os.path.join(self.path, name))
        self._next_part += 1
        self._buffer = []
        self._last_flush = time.monotonic()

    # -- both
    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.done.add(row["path"])
        self.rows_written += len(rows)
        if self.format == "jsonl":
            self._file.write("".join(json.dumps(_jsonable(row)) + "\n" for row in rows))
            self._file.flush()
            return
        self._buffer += rows
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self._write_part()

    def close(self) -> None:
        if self.format == "jsonl":
            if not self._file.closed:
                self._file.close()
        else:
            self._write_part()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(row: dict) -> dict:
    out = {name: row.get(name) for name in COLUMNS}
    if out["top5"] is not None:
        out["top5"] = [[int(c), _f32(p)] for c, p in out["top5"]]
    return out
