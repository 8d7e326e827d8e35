"""Who besides a file's owner may read or write it: mode bits and POSIX ACLs.

A secret key must be private to the uploader.  The mode bits alone cannot
tell: when a file has an access ACL, the group bits of its mode show the ACL
*mask*, not the owning group's permissions.  systemd hands a service its
credentials exactly so (``LoadCredential=`` for a non-root ``User=``: the file
is 0400 root-owned and the user gets read through a named ACL entry, so
``stat`` shows 0440).  Such a file is private to that user, and this module
says so by reading the ACL itself (``system.posix_acl_access``, the kernel's
binary form: a version, then (tag, permissions, id) entries).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct

__all__ = ["other_accessors"]

_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

_USER_OBJ = 0x01
_USER = 0x02
_GROUP_OBJ = 0x04
_GROUP = 0x08
_MASK = 0x10
_OTHER = 0x20

# Permission bits as the kernel stores them in an ACL entry (r=4, w=2, x=1).
_RWX = 0o7


def other_accessors(fd: int, *, me: int | None = None) -> list[str]:
    """Who but the owner and user ``me`` (default: this process) may access the file.

    Returns descriptions such as ``"group wheel"`` or ``"user alice (ACL)"``;
    an empty list means the file is private to its owner and ``me``.
    """
    st = os.fstat(fd)
    me = os.geteuid() if me is None else me
    entries = _read_acl(fd)
    mode = stat.S_IMODE(st.st_mode)
    if entries is None:
        found = []
        if mode & 0o070:
            found.append(f"group {_group_name(st.st_gid)}")
        if mode & 0o007:
            found.append("others")
        return found
    mask = next((perm for tag, perm, _ in entries if tag == _MASK), _RWX)
    found = []
    for tag, perm, ident in entries:
        effective = perm & mask if tag in (_USER, _GROUP_OBJ, _GROUP) else perm
        if not effective & _RWX:
            continue
        if tag == _USER and ident not in (me, st.st_uid):
            found.append(f"user {_user_name(ident)} (ACL)")
        elif tag == _GROUP_OBJ:
            found.append(f"group {_group_name(st.st_gid)} (ACL)")
        elif tag == _GROUP:
            found.append(f"group {_group_name(ident)} (ACL)")
        elif tag == _OTHER:
            found.append("others")
    return found


def _read_acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The access ACL's entries, or None when the file has none (mode bits rule)."""
    try:
        raw = os.getxattr(fd, _ACL_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EINVAL, "malformed POSIX ACL")
    (version,) = _HEADER.unpack_from(raw)
    if version != _ACL_VERSION:
        raise OSError(errno.EINVAL, f"unknown POSIX ACL version {version}")
    return [
        _ENTRY.unpack_from(raw, offset) for offset in range(_HEADER.size, len(raw), _ENTRY.size)
    ]


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
