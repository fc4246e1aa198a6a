"""hako: secure containers in QEMU micro-VMs (host side)."""

__version__ = "0.1.0"
