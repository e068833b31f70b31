"""Small image-folder tasks (one sub-folder per class) written for a test."""
from PIL import Image


def image_folder(root, classes=("cat", "dog"), n=3, ext="png", broken=False):
    """``root`` with ``n`` 16 x 16 images per class (``broken``: bytes that are no image)."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / c / f"{i}.{ext}"
            if broken:
                path.write_bytes(b"not an image")
            else:
                Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(path)
    return root
