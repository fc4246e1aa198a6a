"""Small protobuf helpers that work on both runtimes hako meets.

The host has protobuf 4.25 (``message_factory.GetMessageClass``); the guest has
Debian's 3.21.12 (upstream 4.21.12), which only offers the symbol database.
"""

from __future__ import annotations

from google.protobuf import message_factory, symbol_database

TYPE_CHECKING = False
if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor
    from google.protobuf.message import Message


def message_class(descriptor: Descriptor) -> type[Message]:
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:
        cls: type[Message] = get(descriptor)
        return cls
    found: type[Message] = symbol_database.Default().GetSymbol(descriptor.full_name)
    return found
