"""A parquet writer with fixed-size row groups that replaces its target only when complete."""
from __future__ import annotations

import os

import pyarrow as pa

from ..run.errors import UserError
from .rawio import DEFAULT_ROW_GROUP_SIZE


class ParquetSink:
    """Writes a parquet file in row groups of exactly row_group_size rows; atomic on close.

    Rows go to '<path>.tmp', renamed over path only when everything was written, so an
    interrupted run never leaves a half file under the final name.
    """

    def __init__(self, path: str, schema: pa.Schema, row_group_size: int = DEFAULT_ROW_GROUP_SIZE):
        import pyarrow.parquet as pq

        if row_group_size < 1:
            raise UserError(f"row_group_size={row_group_size} must be at least 1")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.tmp, self.size = path, path + ".tmp", int(row_group_size)
        self.schema = schema
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.size:
            whole = pa.concat_tables(self.pending)
            full = (whole.num_rows // self.size) * self.size
            self.writer.write_table(whole.slice(0, full), row_group_size=self.size)
            rest = whole.slice(full)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.size)
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
