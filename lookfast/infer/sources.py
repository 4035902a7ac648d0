"""Which files a job reads: every image file under a folder (recursively), or the files a glob pattern matches."""
from __future__ import annotations

import glob
import os

# Extensions taken from a folder (case-insensitive). A glob pattern takes whatever it matches: the user chose it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def list_images(source: str | os.PathLike) -> tuple[list[str], str, int]:
    """`source`: a folder or a glob pattern (`**` recurses). Returns (absolute file paths sorted, the root folder
    mask paths are made relative to, how many non-image files a folder held and were left out). Raises ValueError
    when a folder holds no image file or a pattern matches no file."""
    text = os.fspath(source)
    if os.path.isdir(text):
        root = os.path.abspath(text)
        found, skipped = [], 0
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in files:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(folder, name))
                else:
                    skipped += 1
        if not found:
            raise ValueError(f"input folder {text!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        return sorted(found), root, skipped
    if not glob.has_magic(text):
        if os.path.isfile(text):
            path = os.path.abspath(text)
            return [path], os.path.dirname(path), 0
        raise ValueError(f"input {text!r} is neither a folder, a file nor a glob pattern that matches files")
    found = sorted({os.path.abspath(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p)})
    if not found:
        raise ValueError(f"input pattern {text!r} matches no file")
    return found, _glob_root(text), 0


def _glob_root(pattern: str) -> str:
    """The folder before the first path component with a wildcard."""
    parts = []
    for part in os.path.normpath(pattern).split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.path.abspath(os.sep.join(parts) or ".") if parts != [""] else os.sep
