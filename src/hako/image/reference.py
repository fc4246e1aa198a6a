"""Image references ("busybox", "hako.local/busybox:latest") and how a given one matches a stored name.

Matching is Docker's: "busybox" means "docker.io/library/busybox:latest". On top of that, a
reference without a registry also matches a stored name from any registry with the same
repository path and tag (so "busybox" finds "hako.local/busybox:latest"), as long as only one
image matches.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    domain: str | None  # None when the reference names no registry
    path: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        name, _, digest = ref.partition("@")
        last_slash = name.rfind("/")
        colon = name.rfind(":")
        tag = None
        if colon > last_slash:
            name, tag = name[:colon], name[colon + 1 :]
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            return cls(first, rest, tag, digest or None)
        return cls(None, name, tag, digest or None)

    def normalized(self) -> str:
        """Full form: registry, repository path, and a tag (":latest" when neither tag nor digest)."""
        domain = self.domain or DEFAULT_DOMAIN
        if domain == "index.docker.io":
            domain = DEFAULT_DOMAIN
        path = self.path
        if domain == DEFAULT_DOMAIN and "/" not in path:
            path = f"library/{path}"
        return f"{domain}/{path}{self._suffix()}"

    def short(self) -> str:
        """Repository path and tag without registry (and without Docker Hub's "library/")."""
        path = (
            self.path.removeprefix("library/")
            if (self.domain or DEFAULT_DOMAIN) == DEFAULT_DOMAIN
            else self.path
        )
        return f"{path}{self._suffix()}"

    def _suffix(self) -> str:
        tag = self.tag if self.tag is not None or self.digest else DEFAULT_TAG
        return (f":{tag}" if tag else "") + (f"@{self.digest}" if self.digest else "")


def matches(ref: str, name: str) -> bool:
    """Does the user's ``ref`` name the stored ``name`` exactly (after Docker normalisation)?"""
    return ref == name or Reference.parse(ref).normalized() == Reference.parse(name).normalized()


def matches_short(ref: str, name: str) -> bool:
    """Does a registry-less ``ref`` name ``name`` from some registry?"""
    wanted = Reference.parse(ref)
    return wanted.domain is None and wanted.short() == Reference.parse(name).short()
