"""The memory glibc's malloc holds for live allocations, over all arenas (not RSS, which also keeps freed
holes): what a cache that keeps objects alive adds, without the allocator's fragmentation."""
import ctypes


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
HAS_MALLINFO2 = hasattr(_libc, "mallinfo2")  # glibc 2.33+
if HAS_MALLINFO2:
    _libc.mallinfo2.restype = _MallInfo2


def live_heap_mib() -> float:
    """Bytes in use from the arenas plus mmapped blocks, in MiB."""
    info = _libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20
