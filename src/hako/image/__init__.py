"""OCI images on the host: import layouts and archives into a store of unpacked rootfs trees.

- :class:`ImageStore` (``hako.image.store``): ``resolve``, ``get``, ``import_path``, ``list``, ``remove``
- :class:`Image`, :class:`ImageConfig`: an imported image and what its config says about running it
- :class:`Bundle`, :func:`load_bundle`: an OCI bundle directory (from ``hako.oci.bundle``)
- ``hako.image.busybox``: builds the busybox test image (``python -m hako.image.busybox OUTDIR``);
  not imported here, so that ``python -m`` runs it cleanly

Threat model: an image is untrusted input unpacked on the host as root. Layers may try to write
outside the rootfs (``..``, absolute names, symlinked parents, hard links): see ``hako.image.layer``.
Host code that later reads a file inside a rootfs must resolve it with ``hako.image.securejoin``.
"""

from hako.image.config import ImageConfig
from hako.image.store import Image, ImageStore
from hako.oci.bundle import Bundle, load_bundle

__all__ = ["Bundle", "Image", "ImageConfig", "ImageStore", "load_bundle"]
