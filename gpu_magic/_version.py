# (0.2.0: the first with a wire format; every commit before called itself 0.1.0)
__version__ = "0.2.0"

# What a kernel and the runner that runs its cells must share to read each other's pickles:
# the names of gpu_magic's own helpers a pickle refers to (its reducers, its references to
# inputs). Raise it with any change to them. Unequal, a cell could fail before it runs or,
# worse, its results could be lost after it ran: a gateway whose runners are not the kernel's
# own Python refuses such a kernel's cells, and the kernel refuses such a gateway, naming both
# versions (a version-skew trial: a hub's image and its GPU box are upgraded apart).
WIRE_FORMAT = 1
