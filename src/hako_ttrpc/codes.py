"""gRPC status codes, as ttRPC carries them in google.rpc.Status.

Plain integers (not an enum): this module is imported by the guest agent at
boot, where every imported module costs time under emulation.
"""

OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16

NAMES = {value: name for name, value in dict(globals()).items() if name.isupper() and isinstance(value, int)}


def name(code: int) -> str:
    """``NOT_FOUND`` for 5; the number itself for a code gRPC does not define."""
    return NAMES.get(code, str(code))
