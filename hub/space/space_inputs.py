"""Validation of what the Space receives from the web: uploaded files, clicked points, typed names.

Every check raises `InputError` with a short message that names the field; the app shows it as a
`gr.Error` toast (or returns it to API clients), never as a traceback. No gradio import here, so the
checks are unit-tested on their own.

Limits (one place, documented in the Space README):
- uploads: at most `MAX_UPLOAD_MB` (enforced by gradio's `max_file_size` before anything is decoded);
- images: at most `MAX_IMAGE_SIDE` pixels on a side and `MAX_IMAGE_PIXELS` pixels in all. Checked on
  the header Pillow reads at open time, before the pixels are decoded, so a decompression bomb
  costs nothing; a phone photo (12 MP, 4032 px) fits;
- keypoints: 1 to `MAX_KEYPOINTS` per request (each one is a sequence of the batched decoding; MP-100
  categories have up to 68 keypoints, AP-10K 17, the embedded benchmark 8-17);
- names: 1 to `MAX_KEYPOINTS`, each at most `MAX_NAME_CHARS` characters.
"""

import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_MB = 20
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = 16_000_000
MAX_KEYPOINTS = 32
MAX_NAME_CHARS = 64

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POINT_LINE = re.compile(rf"^\s*\(?\s*({_NUMBER})\s*[,;\s]\s*({_NUMBER})\s*\)?\s*$")


class InputError(ValueError):
    """A problem with what the user sent; its message is shown to them as is."""


def load_image(
    path: str | Path | None, field: str, to_rgb: Callable[[Image.Image, str], Image.Image] | None = None
) -> Image.Image:
    """The uploaded file at `path` as an RGB image, or InputError saying why it cannot be used.

    `to_rgb` is the model's processor's conversion (`processor.to_rgb_image`: 16-bit and float images
    rescaled as the training data were); without a model only 8-bit images are shown faithfully.
    """
    if path is None or str(path).strip() == "":
        raise InputError(f"{field}: no image; upload one first")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{field}: the uploaded file {path.name!r} is gone; upload it again")
    with warnings.catch_warnings():
        # Pillow only warns between 89 and 179 MP: make that an error too, our caps are far lower anyway
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise InputError(f"{field}: the image is far too large ({_caps()})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise InputError(f"{field}: {path.name!r} is not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    check_image_size(image.size, field)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos: show and use them the way they were taken
        if to_rgb is not None:
            return to_rgb(image, field)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            return _flatten(image.convert("RGBA"))
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{field}: {path.name!r} could not be decoded ({err})") from None


def _flatten(image: Image.Image) -> Image.Image:
    """Transparent pixels on white, as the processor does: black would look like an object edge."""
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background


def _caps() -> str:
    return f"at most {MAX_IMAGE_SIDE} px on a side and {MAX_IMAGE_PIXELS / 1e6:g} MP"


def check_image_size(size: tuple[int, int], field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{field}: the image is empty ({width}x{height})")
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{field}: the image is {width}x{height}; {_caps()} please (resize or crop it)")


def check_point(x: float, y: float, image_size: tuple[int, int], field: str) -> tuple[float, float]:
    """(x, y) as floats if it lies on the image (pixel edges included), else InputError."""
    width, height = image_size
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise InputError(f"{field}: ({x!r}, {y!r}) is not a pair of numbers") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InputError(f"{field}: ({x}, {y}) is not a finite position")
    if not (0 <= x <= width and 0 <= y <= height):
        raise InputError(f"{field}: ({x:g}, {y:g}) is outside the {width}x{height} image")
    return x, y


def click_position(index: Sequence | None, image_size: tuple[int, int], field: str) -> tuple[float, float]:
    """The pixel a click selected (gradio's `SelectData.index`: [x, y]), checked against the image."""
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise InputError(f"{field}: the click carried no (x, y) position; click on the image itself")
    return check_point(index[0], index[1], image_size, field)


def parse_points(
    text: str | None, image_size: tuple[int, int], field: str, hint: str = "click on the support image to add some"
) -> list[list[float]]:
    """Keypoints typed or clicked as one "x, y" per line -> [[x, y], ...] on the image."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{field}: no keypoints; {hint}")
    if len(lines) > MAX_KEYPOINTS:
        raise InputError(f"{field}: {len(lines)} keypoints, at most {MAX_KEYPOINTS} per request")
    points = []
    for number, line in enumerate(lines, start=1):
        match = _POINT_LINE.match(line)
        if match is None:
            raise InputError(f"{field}: line {number} ({line.strip()[:40]!r}) is not 'x, y'")
        points.append(list(check_point(match.group(1), match.group(2), image_size, f"{field}, keypoint {number}")))
    return points


def format_points(points: Sequence[Sequence[float]]) -> str:
    return "\n".join(f"{x:.1f}, {y:.1f}" for x, y in points)


def add_point(text: str | None, x: float, y: float, field: str) -> str:
    """The points text with (x, y) appended, refusing the one click too many."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if len(lines) >= MAX_KEYPOINTS:
        raise InputError(f"{field}: already {len(lines)} keypoints, the most one request takes")
    return "\n".join([*lines, f"{x:.1f}, {y:.1f}"])


def parse_names(text: str | None, field: str) -> list[str]:
    """Keypoint names separated by commas or new lines -> a list, blanks dropped, order kept."""
    names = [" ".join(part.split()) for part in re.split(r"[,\n]", text or "")]
    names = [name for name in names if name]
    if not names:
        raise InputError(f"{field}: no keypoint names; type some, separated by commas or new lines")
    if len(names) > MAX_KEYPOINTS:
        raise InputError(f"{field}: {len(names)} names, at most {MAX_KEYPOINTS} per request")
    too_long = [name for name in names if len(name) > MAX_NAME_CHARS]
    if too_long:
        raise InputError(f"{field}: {too_long[0][:20]!r}... is longer than {MAX_NAME_CHARS} characters")
    return names
