"""LoadTemplatePhoto: the template face photo, read only from inside ComfyUI's input directory.

The host's stock LoadImage (0.3.75) also opens names such as ``../../x.jpg`` and absolute paths; this node
applies Load Face Photos' rules instead: the name is checked, resolved with links followed, and must stay
inside ``input/``. Photos in subfolders are offered too (``obama/obama1.jpg``), and the editor's upload
button puts a new one into ``input/``.
"""

from __future__ import annotations

import hashlib

import folder_paths
import torch

from ..facechain_core import user_paths
from ..facechain_core.errors import FaceChainError
from ..facechain_core.images import PHOTO_EXTENSIONS, load_photo
from .common import CATEGORY

MAX_LISTED = 5000  # a huge input folder must not make /object_info slow


def input_photos() -> list[str]:
    """Photos anywhere under input/, as names relative to it (forward slashes), links to outside left out."""
    base = user_paths.within(folder_paths.get_input_directory(), ".", "folder")
    found = []
    for path in sorted(base.rglob("*")):
        if len(found) >= MAX_LISTED:
            break
        if path.suffix.lower() in PHOTO_EXTENSIONS and path.is_file() and base in path.resolve().parents:
            found.append(path.relative_to(base).as_posix())
    return found


def template_path(name: str):
    path = user_paths.within(folder_paths.get_input_directory(), name, "template photo",
                             "ComfyUI's input directory")
    if not path.is_file():
        raise FaceChainError(f"The template photo '{name.strip()}' was not found in ComfyUI's input directory. "
                             f"Upload it, or pick one from the list.")
    if path.suffix.lower() not in PHOTO_EXTENSIONS:
        raise FaceChainError(f"The template photo '{name.strip()}' is not a photo "
                             f"({', '.join(sorted(PHOTO_EXTENSIONS))}).")
    return path


class LoadTemplatePhoto:
    DESCRIPTION = ("Loads the template face photo (the face FaceFusion puts into the portraits) from ComfyUI's "
                   "input directory, subfolders included. Nothing outside the input directory can be read.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("photo",)
    OUTPUT_TOOLTIPS = ("The photo, RGB, EXIF rotation applied, transparent parts white.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": (input_photos(), {"image_upload": True, "tooltip": "A photo inside ComfyUI's input "
                                       "directory: a clear, frontal photo of the person."}),
        }}

    @classmethod
    def IS_CHANGED(cls, image):
        try:
            path = template_path(image)
        except FaceChainError:
            return float("nan")
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def load(self, image):
        photo = load_photo(template_path(image))
        return (torch.from_numpy(photo).float().div_(255.0).unsqueeze(0),)


NODE_CLASS_MAPPINGS = {"FaceChainLoadTemplatePhoto": LoadTemplatePhoto}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainLoadTemplatePhoto": "Load Template Photo (FaceChain)"}
