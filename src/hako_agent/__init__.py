"""hako's guest agent: PID 1 of every sandbox VM, serving the host over ttRPC.

Runs on the guest image's Python (3.11, standard library + protobuf, started
with ``-IS``): no third-party modules, and as few imports as possible before it
serves the host (every module costs boot time under emulation).

    main        PID 1: mount the basics, find the host channel, serve it
    service     the ttRPC handlers (protobuf stays here)
    sandbox     the guest as a whole and its containers
    container   one container: state machine, init, execs
    spawn       forking container processes (namespaces, rootfs, credentials)
    spec        the OCI spec, parsed and checked
    cgroups     cgroup v2 limits, freezer, statistics
    network     the guest's NIC, addresses and routes, as the host gives them
    netlink     the few rtnetlink requests that takes
    stdio       pull-style process I/O
    reaper      the single waitpid loop
    linux       system calls through ctypes
    log         the agent's log lines
"""

__version__ = "0.1.0"
