"""LoadFacePhotos: a folder of photos of any sizes, as a list that FaceChain's nodes take one by one."""

from __future__ import annotations

import folder_paths
import torch

from ..facechain_core import user_paths
from ..facechain_core.errors import FaceChainError
from ..facechain_core.images import PHOTO_EXTENSIONS, list_photos, photo_folders, read_photo, scan_folder
from .common import CATEGORY, input_subfolder, progress


class LoadFacePhotos:
    DESCRIPTION = ("Loads every photo in a folder under ComfyUI's input directory, as a list, so photos of "
                   "different sizes can go to FaceAlign together. Transparent parts become white, 16-bit "
                   "grayscale is scaled to 8 bits, an animated GIF gives its first frame. The report names "
                   "every file that was skipped and why.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("photos", "names", "report", "person")
    OUTPUT_IS_LIST = (True, True, False, False)
    OUTPUT_TOOLTIPS = ("One IMAGE per photo, each at its own size.", "The file name of each photo.",
                       "Which files were loaded (and how, when it is worth saying) and which were skipped, and why.",
                       "The folder's own name as a file name (e.g. 'obama' for people/obama): connect it to "
                       "TrainFaceLoRA's name so every person gets a LoRA of their own.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        # Read again whenever the editor refreshes its lists (the R key, or after an upload), like LoadImage's.
        folders = photo_folders(folder_paths.get_input_directory())
        return {"required": {
            "folder": (folders, {"tooltip": "Folder inside ComfyUI's input directory that holds 3-20 photos of "
                                 "one person (JPEG, PNG, WebP, TIFF, BMP, GIF). The list shows every folder there "
                                 "with photos; 'upload photos' below sends photos from this computer into a new "
                                 "or the selected folder. API clients may pass any folder name.",
                                 # the editor's upload button takes these files, the list the node reads
                                 "photo_extensions": sorted(PHOTO_EXTENSIONS)}),
            "max_photos": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Use at most this many "
                                   "photos (in name order)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, folder):
        # Taking 'folder' here makes the host skip its own "value not in list" check: an API prompt may name a
        # folder its client has just uploaded, or one made after the list was read. The name is checked when
        # the node runs (input_subfolder), where a bad one gives the pack's own message.
        return True

    @classmethod
    def IS_CHANGED(cls, folder, max_photos):
        try:
            files = list_photos(input_subfolder(folder))
        except FaceChainError:
            return float("nan")
        return "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)

    def load(self, folder, max_photos):
        files, skipped = scan_folder(input_subfolder(folder), folder_paths.get_input_directory(),
                                     "ComfyUI's input directory")
        skipped += [(p.name, f"beyond max_photos ({max_photos})") for p in files[max_photos:]]
        files = files[:max_photos]
        step = progress(len(files))
        photos, names, lines = [], [], []
        for i, path in enumerate(files):
            step(i, len(files))
            try:
                photo = read_photo(path)
            except FaceChainError as e:
                skipped.append((path.name, str(e)))
                continue
            photos.append(torch.from_numpy(photo.image).float().div_(255.0).unsqueeze(0))
            names.append(path.name)
            lines.append(f"- {path.name}: loaded{f', {photo.note}' if photo.note else ''}")
        step(len(files), len(files))
        lines += [f"- {name}: skipped, {why}" for name, why in sorted(skipped)]
        report = "\n".join([f"Load Face Photos: {len(photos)} photos from '{folder}', {len(skipped)} files skipped",
                            *lines])
        if not photos:
            raise FaceChainError(f"No photo in '{folder}' could be used:\n" + "\n".join(lines[-20:]))
        return {"ui": {"text": [report]}, "result": (photos, names, report, user_paths.file_name_from(folder))}


NODE_CLASS_MAPPINGS = {"FaceChainLoadPhotos": LoadFacePhotos}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainLoadPhotos": "Load Face Photos (FaceChain)"}
