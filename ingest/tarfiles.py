"""Tar archives read as streams, with the headers checked: what every reader of a tar
(image folders in a tar, WebDataset shards, the format peek) goes through.

tarfile trusts a header: a GNU long-name or pax record is read whole, whatever size it
declares, and a stream that stops mid-archive ends quietly. Here the records before one
member are capped, every header byte counts into the inflated total, sparse members are
refused, a cut archive is an error, and the members already passed are not kept.
"""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

from ingest.batches import MAX_IMAGE_BYTES
from ingest.plan import Limits, Report
from store.errors import DatasetError, TooLarge

ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)

MAX_TAR_HEADER_BYTES = 1 << 20  # one member's long-name / pax records, all together
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def open_tar(fileobj: Any) -> tarfile.TarFile:
    """`fileobj` as a streamed tar (gzip and the like too) whose headers are checked
    (`_Checked`): every reader of tar headers goes through this, WebDataset shards too."""
    return tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_Checked)


def tar_members(fileobj: Any, display: str, limits: Limits, report: Report,
                ) -> Iterator[tuple[tarfile.TarInfo, Any]]:
    """A tar's regular members in archive order, streamed (gzip too), each with the open
    stream to read it from; inflated bytes (headers and their long-name and pax records
    too) counted against `max_inflated_bytes`. A damaged or truncated archive is a
    DatasetError naming where it broke; a header bigger than MAX_TAR_HEADER_BYTES is
    refused before it is read. Members are not kept once passed (tarfile keeps a list of
    every member it has read, which on a stream of a million images is most of the
    memory)."""
    inflated, n = 0, 0
    try:
        with open_tar(fileobj) as tf:
            while (member := tf.next()) is not None:
                tf.members.clear()
                n += 1
                if n == 1 and member.isdir() and "/" not in tar_key(member.name).rstrip("/"):
                    # an archive that opens with its top folder's entry (`tar cf x.tar
                    # photos/`, the CLI's packed folder): its readers drop that folder
                    tf.opening_folder = tar_key(member.name).rstrip("/") + "/"
                if member.isreg():
                    inflated += member.size
                if inflated + tf.header_bytes > limits.max_inflated_bytes:
                    raise TooLarge(f"{display} inflates to more than "
                                   f"{limits.max_inflated_bytes} bytes (max_inflated_bytes)")
                if not member.isreg():
                    if not member.isdir():
                        report.skipped += 1
                    continue
                yield member, tf
            if getattr(tf, "cut_short", False):
                raise tarfile.ReadError("the archive ends before its end marker")
    except TarRefused as exc:
        raise type(exc)(f"{display}: after {n} members, {exc}") from None
    except ARCHIVE_ERRORS as exc:
        raise DatasetError(f"{display} is truncated or damaged after {n} members "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None


class TarRefused(DatasetError):
    """A tar header this reader will not read. Not a tarfile error, so that tarfile passes
    it through unchanged (it turns its own header errors into 'damaged'); a DatasetError,
    so that any reader of `open_tar` headers answers it as one."""


class TarHeaderTooLarge(TarRefused, TooLarge):
    """Long-name or pax records over MAX_TAR_HEADER_BYTES."""


class _Checked(tarfile.TarInfo):
    """tarfile ends a stream quietly where a header is missing or cut (a truncated
    archive); this notes it, so that a cut archive is an error, not a shorter dataset.

    tarfile reads a GNU long-name/long-link or pax record whole, whatever size its header
    declares, before the caller sees a member (a 400 KB .tar.gz declaring a 888 MiB long
    name took 888 MiB). Here the records before one member may hold MAX_TAR_HEADER_BYTES
    all together, checked before each is read; every header block and record counts into
    `tf.header_bytes` (the inflated total). GNU sparse members are refused: their maps are
    read unbounded too, and no image container uses them."""

    @classmethod
    def fromtarfile(cls, tf: Any) -> tarfile.TarInfo:
        tf.header_bytes = getattr(tf, "header_bytes", 0) + tarfile.BLOCKSIZE
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):  # type: ignore[attr-defined]
            tf.cut_short = True
            raise

    def _proc_member(self, tf: Any) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise TarRefused(f"a GNU sparse member ({self.name[:80]!r}): sparse members "
                             "are not read")
        if self.type not in _EXTENDED:
            tf.record_bytes = 0  # the records before this member end here
            return super()._proc_member(tf)
        size = self._block(self.size)
        tf.record_bytes = getattr(tf, "record_bytes", 0) + size
        if tf.record_bytes > MAX_TAR_HEADER_BYTES:
            raise TarHeaderTooLarge(f"a tar header of {tf.record_bytes} bytes (long-name or "
                                    f"pax records); the limit is {MAX_TAR_HEADER_BYTES}: "
                                    "not read")
        tf.header_bytes = getattr(tf, "header_bytes", 0) + size
        return super()._proc_member(tf)

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tf: Any) -> None:
        raise TarRefused("a GNU sparse member (pax 1.0 map): sparse members are not read")


def member_bytes(tf: Any, member: tarfile.TarInfo, key: str,
                 limit: int = MAX_IMAGE_BYTES) -> bytes | str:
    if member.size > limit:
        return f"{key} is {member.size} bytes; the limit is {limit}"
    f = tf.extractfile(member)
    data = f.read(member.size) if f is not None else b""
    if len(data) != member.size:
        raise tarfile.ReadError(f"{key}: unexpected end of data")
    return data


def tar_key(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")
