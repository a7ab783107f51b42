"""Process-level plumbing: the errors users see, the Accelerator, distributed launch, private library writes.

errors.py       UserError and DiskFull: one line on the console, exit non-zero
runtime.py      the Accelerator, host-side agreement between processes, signals, a process's layout
host_memory.py  freed tensors go back to the operating system (glibc's mmap threshold)
distributed.py  DeepSpeed ZeRO configs and launcher checks
compat.py       every write into another library's private state (tests/test_compat.py checks each)

The bottom of the package: everything may import it, it imports nothing of lowmem.
May import: nothing.
"""
