"""A client-side stub built from a service descriptor: ``stub.Method(request)``."""

from __future__ import annotations

from hako_ttrpc._proto import message_class

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from google.protobuf.descriptor import ServiceDescriptor
    from google.protobuf.message import Message

    from hako_ttrpc.client import Client, Metadata


class _Method:
    __slots__ = ("_client", "_method", "_response", "_service")

    def __init__(self, client: Client, service: str, method: str, response: type[Message]) -> None:
        self._client = client
        self._service = service
        self._method = method
        self._response = response

    def __call__(
        self, request: Message, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Any:
        return self._client.call(
            self._service, self._method, request, self._response, timeout=timeout, metadata=metadata
        )


class Stub:
    def __init__(self, client: Client, service: ServiceDescriptor) -> None:
        self.service_name = service.full_name
        for method in service.methods:
            setattr(
                self,
                method.name,
                _Method(client, service.full_name, method.name, message_class(method.output_type)),
            )

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{self.service_name} has no method {name}")
