"""Write a new HDF5 file so that a failed write (a full disk) is a plain ``OSError``, never HDF5's.

When a write fails inside HDF5 (ENOSPC while it flushes metadata or a sieve buffer), HDF5 keeps
the dirty objects alive after the file is "closed": h5py then reports ``Can't decrement id ref
count`` from a finaliser and HDF5's exit handler (``H5_term_library``) crashes the process with
SIGSEGV (h5py 3.16 / HDF5 2.0). A checkpoint or result file that cannot be written must instead
end the run with one clear error and leave the earlier files as they were.

:func:`create_h5` hands HDF5 a Python file object (h5py's ``fileobj`` driver) that writes
through to the real file with ``pwrite``. The first failed write is remembered and every write
after it is discarded as if it had succeeded, so HDF5 finishes and closes cleanly; the error is
raised once HDF5 is done, and the half-written file is the caller's to delete.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py


class _WriteThrough:
    """The file object HDF5 writes through (the calls h5py's ``fileobj`` driver makes)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.error: OSError | None = None
        self._position = 0
        self._size = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        size = self._size - self._position if size < 0 else size
        data = b"" if self.error else os.pread(self.fd, size, self._position)
        # After a failed write the file is garbage anyway: zeros keep HDF5 from failing a read.
        data = data.ljust(min(size, max(0, self._size - self._position)), b"\0")
        self._position += len(data)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # pwrite may write less than asked
                    done += os.pwrite(self.fd, view[done:], self._position + done)
            except OSError as err:
                self.error = err
        self._position += len(view)
        self._size = max(self._size, self._position)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as err:
                self.error = err
        self._size = size
        return size

    def flush(self) -> None:
        """Nothing to flush: every write went to the file; :func:`create_h5` fsyncs at the end."""


@contextmanager
def create_h5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Create (truncate) the HDF5 file ``path`` for writing; on exit close it and ``fsync`` it.

    Parameters
    ----------
    path : path-like
        The file to create. On failure it is left partly written; delete it.

    Yields
    ------
    h5py.File
        The open file.

    Raises
    ------
    OSError
        The first write, truncate or ``fsync`` that failed (``errno`` says why, e.g. ENOSPC),
        raised after HDF5 has closed the file.
    """
    sink = _WriteThrough(Path(path))
    try:
        with h5py.File(sink, "w") as file:
            yield file
        if sink.error is not None:
            raise sink.error
        os.fsync(sink.fd)
    finally:
        os.close(sink.fd)
