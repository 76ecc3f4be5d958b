"""gdb command `who ADDR`: the guard_malloc.c block holding ADDR, with the thread and backtrace that
allocated it and (when freed) that freed it. gdb reads PROT_NONE pages through ptrace, so it works on
freed blocks kept with GUARD_UAF=1 and on blocks whose pages are still mapped."""
import struct

import gdb

MAGIC = 0x6775617264
PAGE = 4096
NBT = 20
HEADER = struct.Struct("<QQQQqqii%dQ%dQ" % (NBT, NBT))  # guard_malloc.c's `header`


def _header_at(addr, max_pages=4096):
    """Walks down page by page from ADDR to the mapping start that carries the magic."""
    inf = gdb.selected_inferior()
    page = addr & ~(PAGE - 1)
    for i in range(max_pages):
        try:
            raw = bytes(inf.read_memory(page - i * PAGE, HEADER.size))
        except gdb.MemoryError:
            return None
        if struct.unpack_from("<Q", raw)[0] == MAGIC:
            return page - i * PAGE, HEADER.unpack(raw)
    return None


def _symbol(pc):
    try:
        return gdb.execute("info symbol 0x%x" % pc, to_string=True).strip()
    except gdb.error as e:
        return "0x%x (%s)" % (pc, e)


class Who(gdb.Command):
    """who ADDR: allocation and free records of the guarded block holding ADDR."""

    def __init__(self):
        super().__init__("who", gdb.COMMAND_USER)

    def invoke(self, arg, from_tty):
        addr = int(gdb.parse_and_eval(arg))
        found = _header_at(addr)
        if found is None:
            print("0x%x: not in a guarded block" % addr)
            return
        base, f = found
        _, _, maplen, size, alloc_tid, free_tid, n_alloc, n_free = f[:8]
        alloc_bt, free_bt = f[8:8 + NBT], f[8 + NBT:]
        user = base + maplen - PAGE - (size + 15) // 16 * 16  # 16-byte alignment: plain malloc's
        print("block of %d bytes at ~0x%x (ADDR - block = %d), allocated by thread %d, freed by %s" %
              (size, user, addr - user, alloc_tid, ("thread %d" % free_tid) if n_free else "nobody yet"))
        for title, pcs, n in (("allocated at:", alloc_bt, n_alloc), ("freed at:", free_bt, n_free)):
            print(title)
            for pc in pcs[:n]:
                print("   ", _symbol(pc))


Who()
