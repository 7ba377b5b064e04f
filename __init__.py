"""comfyui-facechain: FaceChain's personal-portrait pipeline as ComfyUI nodes."""

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as e:
    # Imported outside ComfyUI (pytest collects this folder as a package): nothing to register.
    if e.name not in ("comfy", "folder_paths"):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
