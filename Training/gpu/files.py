"""Helpers the GPU run's scripts share (prepare.sh here, device.sh there): file checksums."""
import hashlib


def sha256(path):
    """sha256 of a file, read a megabyte at a time, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
