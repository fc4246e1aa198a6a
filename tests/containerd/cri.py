"""A small CRI v1 client for the private containerd's CRI plugin (what kubelet would call).

Messages come from PyPI's ``container-runtime-interface-api`` (``cri_api.v1.api_pb2``); calls
are made on a plain gRPC channel, one typed method per RPC used. Kept apart from harness.py so
that the ctr tests and the benchmark need neither grpc nor cri_api.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TypeVar

import grpc  # type: ignore[import-untyped]
from cri_api.v1 import api_pb2 as cri
from google.protobuf.message import Message

from tests.containerd.harness import BUSYBOX, CRI_NAMESPACE, Containerd

SERVICE = "/runtime.v1.RuntimeService/"
Response = TypeVar("Response", bound=Message)


class Cri:
    """RuntimeService over the daemon's gRPC socket; records the IDs it creates on ``containerd``
    (shim sockets are named after them) and removes its pods on :meth:`close`."""

    def __init__(self, containerd: Containerd, *, timeout: float = 300.0) -> None:
        self.containerd = containerd
        containerd.namespaces.add(CRI_NAMESPACE)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{containerd.paths.address}")
        self.pods: list[str] = []

    def _call(self, method: str, request: Message, response_type: type[Response]) -> Response:
        stub = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        response = stub(request, timeout=self.timeout)
        if not isinstance(response, response_type):
            raise TypeError(f"{method} answered {type(response).__name__}")
        return response

    # the RPCs

    def version(self) -> cri.VersionResponse:
        return self._call("Version", cri.VersionRequest(), cri.VersionResponse)

    def status(self) -> cri.StatusResponse:
        return self._call("Status", cri.StatusRequest(), cri.StatusResponse)

    def pod_config(self, name: str, *, host_network: bool = True) -> cri.PodSandboxConfig:
        """A pod on the host's network, or with a network of its own from the CNI plugins (where
        they are installed: see harness.render_config)."""
        uid = uuid.uuid4().hex
        log_directory = self.containerd.paths.pod_logs / uid
        log_directory.mkdir(parents=True, exist_ok=True)
        network = cri.NODE if host_network else cri.POD
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="hako-test", attempt=0),
            log_directory=str(log_directory),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=network, pid=cri.CONTAINER, ipc=cri.POD)
                )
            ),
        )

    def run_pod(self, config: cri.PodSandboxConfig, handler: str) -> str:
        request = cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
        pod_id = self._call("RunPodSandbox", request, cri.RunPodSandboxResponse).pod_sandbox_id
        self.pods.append(pod_id)
        self.containerd.seen_ids.add(pod_id)
        return pod_id

    def create_container(
        self,
        pod_id: str,
        pod_config: cri.PodSandboxConfig,
        name: str,
        command: list[str],
        image: str = BUSYBOX,
        volumes: dict[Path, str] | None = None,
    ) -> str:
        """``volumes``: host path -> container path, as kubelet gives a pod's volumes."""
        mounts = [cri.Mount(host_path=str(h), container_path=c) for h, c in (volumes or {}).items()]
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=image),
            command=command,
            log_path=f"{name}.log",
            mounts=mounts,
        )
        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
        container_id = self._call("CreateContainer", request, cri.CreateContainerResponse).container_id
        self.containerd.seen_ids.add(container_id)
        return container_id

    def start_container(self, container_id: str) -> None:
        self._call(
            "StartContainer", cri.StartContainerRequest(container_id=container_id), cri.StartContainerResponse
        )

    def container_state(self, container_id: str) -> int:
        request = cri.ContainerStatusRequest(container_id=container_id)
        return self._call("ContainerStatus", request, cri.ContainerStatusResponse).status.state

    def exec_sync(self, container_id: str, command: list[str], timeout: int = 60) -> cri.ExecSyncResponse:
        request = cri.ExecSyncRequest(container_id=container_id, cmd=command, timeout=timeout)
        return self._call("ExecSync", request, cri.ExecSyncResponse)

    def pod_ip(self, pod_id: str) -> str:
        """The pod's address, as its CNI network gave it ("" on the host's network)."""
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
        status = self._call("PodSandboxStatus", request, cri.PodSandboxStatusResponse).status
        return str(status.network.ip)

    def pod_state(self, pod_id: str) -> int:
        request = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
        return self._call("PodSandboxStatus", request, cri.PodSandboxStatusResponse).status.state

    def list_pods(self) -> list[str]:
        return [
            pod.id
            for pod in self._call(
                "ListPodSandbox", cri.ListPodSandboxRequest(), cri.ListPodSandboxResponse
            ).items
        ]

    def list_containers(self) -> list[str]:
        listing = self._call("ListContainers", cri.ListContainersRequest(), cri.ListContainersResponse)
        return [container.id for container in listing.containers]

    def stop_pod(self, pod_id: str) -> None:
        self._call(
            "StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), cri.StopPodSandboxResponse
        )

    def remove_pod(self, pod_id: str) -> None:
        self._call(
            "RemovePodSandbox",
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
            cri.RemovePodSandboxResponse,
        )
        if pod_id in self.pods:
            self.pods.remove(pod_id)

    def wait_for_pod_ready(self, pod_id: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pod_state(pod_id) != cri.SANDBOX_READY:
            if time.monotonic() > deadline:
                raise AssertionError(f"pod {pod_id} not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def close(self) -> list[str]:
        """Stop and remove every pod still there (through CRI, as kubelet would); return them."""
        left = []
        for pod_id in self.list_pods():
            left.append(f"pod {pod_id} left")
            try:
                self.stop_pod(pod_id)
                self.remove_pod(pod_id)
            except grpc.RpcError as err:
                left.append(f"pod {pod_id} could not be removed: {err.details()}")
        self.channel.close()
        return left


def log_path(pod_config: cri.PodSandboxConfig, container_name: str) -> Path:
    return Path(pod_config.log_directory) / f"{container_name}.log"
