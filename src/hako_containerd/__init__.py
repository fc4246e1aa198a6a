"""containerd's protobuf types (shim API, events, runtime options, cgroup metrics), compiled at
build time from Debian's golang-github-containerd-containerd-dev (see setup.py). Host side only."""
