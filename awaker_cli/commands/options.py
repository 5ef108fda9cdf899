"""Options that several commands share, declared once so their names and help read the same everywhere."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

MinPixels = Annotated[Optional[int], typer.Option(
    "--min-pixels", help="Smallest image size in pixels after resizing (default: the model's processor; a "
                         "trained model's holds its training's).")]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", help="Largest image size in pixels after resizing (fewer pixels, fewer image tokens; "
                         "default as --min-pixels).")]
ImageRoot = Annotated[Optional[str], typer.Option(
    "--image-root", help="Directory the data's image paths are relative to (default: the data file's "
                         "directory), as training's data.image_root.")]
