"""The OCI runtime side: bundles, the runtime spec (config.json) a container runs with, and its checks.

Modules (imported directly; this package re-exports nothing, so hako.image can use hako.oci.bundle
without pulling in the spec builder):

- :mod:`hako.oci.bundle`   ``load_bundle(path) -> Bundle`` for a bundle directory
- :mod:`hako.oci.spec`     ``RunOptions``, ``build_spec``
- :mod:`hako.oci.validate` ``validate_spec`` with errors that name the JSON path at fault
- :mod:`hako.oci.users`    ``resolve_user``: "name|uid[:group|gid]" against the rootfs's passwd/group
- :mod:`hako.oci.defaults` Docker's and runc's defaults (capabilities, mounts, masked paths)
"""
