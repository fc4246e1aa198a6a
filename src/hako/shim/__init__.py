"""containerd-shim-hako-v2: containerd's runtime v2 shim for hako.

One shim process per pod (Kata 2's model: runtime, shim and proxy in one
process): it owns the pod's VM through the runtime library and serves
containerd's Task API over ttRPC.

    cli       the binary's commands: start, delete, and the serving process
    service   the 17 Task RPCs: protobuf in, protobuf out, nothing else
    pod       the pod: its sandbox (VM), containers and processes, their events
    stdio     containerd's FIFOs (and file:// URIs) pumped to and from the agent
    events    TaskCreate, TaskExit... forwarded to containerd, in order
    config    the TOML file the shim reads, and containerd's runtime options
"""
